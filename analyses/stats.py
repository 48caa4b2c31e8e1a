"""Inferential statistics over training seeds, and the rule that turns a test into a verdict.

Every test is `scipy.stats`; this module only chooses the test, reports it in one shape
(`TestResult`: the statistic and its value, n, p, a confidence interval, the smallest p the
test can give at this n and the seeds per arm it needs to be able to reach alpha) and applies
one stated rule (`verdict`, `RULE`):

- `fisher_learned`: did one arm reach a criterion (e.g. "learned the task") on more seeds than
  another? Fisher's exact test on the 2 × 2 table of seeds. With 3 seeds per arm its smallest
  two-sided p is 0.1 (3 of 3 against 0 of 3), so no outcome can be significant at 0.05;
  `fisher_seeds_needed()` = 4 per arm.
- `compare`: a metric's difference between two arms (mean a − mean b), by Welch's t-test (with
  its t confidence interval) or an exact permutation test (with a percentile bootstrap
  interval). The permutation test's smallest two-sided p is 2 / C(n_a + n_b, n_a): 0.1 at
  3 + 3 seeds.
- `one_sample`: does a metric beat a bar over seeds (e.g. probe accuracy − token-identity
  accuracy > 0)? A one-sample t-test (t interval) or an exact sign-flip test (smallest p
  2 / 2^n: 0.25 at 3 seeds, conclusive from 6; bootstrap interval).
- `exact_check`: a claim that is a deterministic check on every run (an invariance to float
  tolerance), not a test.

The t-tests assume roughly normal seed-to-seed variation and have no floor on p: with zero
spread (e.g. exact match 1.0 on every seed) they return p = 0, which overstates what 3 seeds
show; use the exact tests for bounded metrics like exact match.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

ALPHA = 0.05
VERDICTS = ("supported", "contradicted", "inconclusive")
CLAIM_COLUMNS = ("claim", "statistic", "value", "n", "test", "p", "ci_low", "ci_high", "verdict", "rule", "n_needed")
RULE = ("two-sided p <= {alpha} with the estimate on the claimed side of no effect (and a confidence interval, if "
        "any, excluding no effect): supported; the same on the opposite side: contradicted; otherwise, or when the "
        "smallest p this test can give at this n exceeds {alpha}: inconclusive")
N_RESAMPLES = 9999


@dataclass(frozen=True)
class TestResult:
    """One test's outcome. `value` estimates `statistic`; `null_value` is its value under no
    effect; `p` is two-sided; `min_p` is the smallest p the test can give at this n (0 when it
    has no floor) and `n_needed` the seeds per arm it needs before `min_p` <= 0.05; `holds` is
    set only for an `exact_check`."""

    test: str
    statistic: str
    value: float
    n: str
    p: float = math.nan
    ci_low: float = math.nan
    ci_high: float = math.nan
    null_value: float = 0.0
    min_p: float = 0.0
    n_needed: int = 2
    holds: bool | None = None


def _values(values: Sequence[float], name: str, minimum: int = 2) -> np.ndarray:
    array = np.asarray(values, dtype=float)
    if array.ndim != 1 or len(array) < minimum or not np.isfinite(array).all():
        raise ValueError(f"{name} must be at least {minimum} finite numbers (one per seed), got {values!r}")
    return array


def _difference(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(a, axis=axis) - np.mean(b, axis=axis)


def _mean(a: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(a, axis=axis)


def min_fisher_p(n_a: int, n_b: int) -> float:
    """Smallest two-sided Fisher p for arms of `n_a` and `n_b` seeds: the most extreme table
    (every seed of one arm reaches the criterion, none of the other)."""
    return float(stats.fisher_exact([[n_a, 0], [0, n_b]]).pvalue)


def min_permutation_p(n_a: int, n_b: int) -> float:
    """Smallest two-sided p of the exact two-sample permutation test: 2 / C(n_a + n_b, n_a)."""
    return min(1.0, 2 / math.comb(n_a + n_b, n_a))


def min_sign_flip_p(n: int) -> float:
    """Smallest two-sided p of the exact sign-flip test on n values: 2 / 2^n."""
    return min(1.0, 2 / 2**n)


def _seeds_needed(min_p, alpha: float, limit: int = 1000) -> int:
    return next(n for n in range(1, limit) if min_p(n) <= alpha)


def fisher_seeds_needed(alpha: float = ALPHA) -> int:
    """Seeds per arm before Fisher's test can reach `alpha` at all (4 for 0.05)."""
    return _seeds_needed(lambda n: min_fisher_p(n, n), alpha)


def fisher_learned(learned_a: int, n_a: int, learned_b: int, n_b: int) -> TestResult:
    """Fisher's exact test (two-sided) of how many seeds reached a criterion in arm a against
    arm b; `value` = share in a − share in b."""
    for learned, n, arm in ((learned_a, n_a, "a"), (learned_b, n_b, "b")):
        if not (isinstance(n, int) and isinstance(learned, int) and n >= 1 and 0 <= learned <= n):
            raise ValueError(f"arm {arm}: need 0 <= seeds reaching the criterion <= seeds >= 1, got {learned!r} of {n!r}")
    p = float(stats.fisher_exact([[learned_a, n_a - learned_a], [learned_b, n_b - learned_b]]).pvalue)
    return TestResult(test="Fisher exact (two-sided)", statistic="share of seeds reaching the criterion, a − b",
                      value=learned_a / n_a - learned_b / n_b, n=f"{n_a} vs {n_b}", p=p,
                      min_p=min_fisher_p(n_a, n_b), n_needed=fisher_seeds_needed())


def compare(a: Sequence[float], b: Sequence[float], *, method: str = "permutation", statistic: str = "mean a − mean b",
            seed: int = 0) -> TestResult:
    """Difference of a metric's means between two arms (one value per seed): `welch` (Welch's
    t-test, 95% t interval) or `permutation` (exact permutation test of the mean difference,
    95% percentile bootstrap interval, seeded)."""
    a, b = _values(a, "a"), _values(b, "b")
    n = f"{len(a)} vs {len(b)}"
    if method == "welch":
        result = stats.ttest_ind(a, b, equal_var=False)
        interval = result.confidence_interval(1 - ALPHA)
        return TestResult(test="Welch t-test (two-sided)", statistic=statistic, value=float(_difference(a, b)), n=n,
                          p=float(result.pvalue), ci_low=float(interval.low), ci_high=float(interval.high))
    if method != "permutation":
        raise ValueError(f"unknown method {method!r}; allowed: ['permutation', 'welch']")
    rng = np.random.default_rng(seed)
    result = stats.permutation_test((a, b), _difference, permutation_type="independent", vectorized=True,
                                    n_resamples=N_RESAMPLES, rng=rng)
    interval = stats.bootstrap((a, b), _difference, method="percentile", vectorized=True, n_resamples=N_RESAMPLES,
                               confidence_level=1 - ALPHA, rng=rng).confidence_interval
    return TestResult(test="exact permutation test (two-sided) + percentile bootstrap CI", statistic=statistic,
                      value=float(_difference(a, b)), n=n, p=float(result.pvalue), ci_low=float(interval.low),
                      ci_high=float(interval.high), min_p=min_permutation_p(len(a), len(b)),
                      n_needed=_seeds_needed(lambda k: min_permutation_p(k, k), ALPHA))


def one_sample(values: Sequence[float], bar: float = 0.0, *, method: str = "t",
               statistic: str = "mean − bar", seed: int = 0) -> TestResult:
    """Whether a metric's mean over seeds differs from `bar`: `t` (one-sample t-test, 95% t
    interval) or `sign_flip` (exact sign-flip test of the mean of values − bar, 95% percentile
    bootstrap interval, seeded). `value` = mean − bar."""
    excess = _values(values, "values") - bar
    n = str(len(excess))
    if method == "t":
        result = stats.ttest_1samp(excess, 0.0)
        interval = result.confidence_interval(1 - ALPHA)
        return TestResult(test="one-sample t-test (two-sided)", statistic=statistic, value=float(excess.mean()), n=n,
                          p=float(result.pvalue), ci_low=float(interval.low), ci_high=float(interval.high))
    if method != "sign_flip":
        raise ValueError(f"unknown method {method!r}; allowed: ['sign_flip', 't']")
    rng = np.random.default_rng(seed)
    result = stats.permutation_test((excess,), _mean, permutation_type="samples", vectorized=True,
                                    n_resamples=N_RESAMPLES, rng=rng)
    interval = stats.bootstrap((excess,), _mean, method="percentile", vectorized=True, n_resamples=N_RESAMPLES,
                               confidence_level=1 - ALPHA, rng=rng).confidence_interval
    return TestResult(test="exact sign-flip test (two-sided) + percentile bootstrap CI", statistic=statistic,
                      value=float(excess.mean()), n=n, p=float(result.pvalue), ci_low=float(interval.low),
                      ci_high=float(interval.high), min_p=min_sign_flip_p(len(excess)),
                      n_needed=_seeds_needed(min_sign_flip_p, ALPHA))


def exact_check(statistic: str, value: float, holds: bool, n: int) -> TestResult:
    """A deterministic check that holds or fails on every one of `n` runs (e.g. an invariance
    to float tolerance): no p; the verdict follows `holds`."""
    return TestResult(test="exact check on every run", statistic=statistic, value=float(value), n=str(n),
                      min_p=math.nan, n_needed=1, holds=bool(holds))


def verdict(result: TestResult, direction: int, alpha: float = ALPHA) -> str:
    """*supported*, *contradicted* or *inconclusive* by `RULE`. `direction`: +1 when the claim
    says the statistic exceeds its no-effect value, −1 below it, 0 that it differs (such a
    claim is never contradicted by a test: no difference found is inconclusive). An
    `exact_check` (state it so that it holds when the claim is true) is supported when it
    holds and contradicted when it does not."""
    if direction not in (-1, 0, 1):
        raise ValueError(f"direction must be +1, -1 or 0, got {direction!r}")
    if result.holds is not None:
        return VERDICTS[0] if result.holds else VERDICTS[1]
    if result.min_p > alpha or not result.p <= alpha:
        return VERDICTS[2]
    interval = (result.ci_low, result.ci_high)
    if not any(math.isnan(bound) for bound in interval) and interval[0] <= result.null_value <= interval[1]:
        return VERDICTS[2]
    side = np.sign(result.value - result.null_value)
    if direction == 0 or side == direction:
        return VERDICTS[0]
    return VERDICTS[1] if side else VERDICTS[2]


def claim_row(claim: str, result: TestResult, direction: int, alpha: float = ALPHA) -> dict:
    """One tidy row of the claims table (`CLAIM_COLUMNS`), its verdict by `verdict` and the rule stated."""
    rule = ("exact check: supported when it holds on every run, else contradicted" if result.holds is not None
            else RULE.format(alpha=alpha) + f"; at least {result.n_needed} seeds per arm can be conclusive")
    return {"claim": claim, "statistic": result.statistic, "value": result.value, "n": result.n, "test": result.test,
            "p": result.p, "ci_low": result.ci_low, "ci_high": result.ci_high,
            "verdict": verdict(result, direction, alpha), "rule": rule, "n_needed": result.n_needed}


def against_null(value: float, null: Sequence[float]) -> dict:
    """`value` beside a null distribution (draws of the same score on shuffled data): value,
    null_mean, null_sd (sample sd), excess = value − null_mean, z = excess / null_sd (NaN when
    the null has no spread or a draw is NaN)."""
    null = np.asarray(null, dtype=float)
    if null.ndim != 1 or len(null) < 2:
        raise ValueError(f"a null needs at least 2 draws, got {len(null) if null.ndim == 1 else null.shape}")
    mean, sd = float(null.mean()), float(null.std(ddof=1))
    return {"value": value, "null_mean": mean, "null_sd": sd, "excess": value - mean,
            "z": (value - mean) / sd if sd > 0 else math.nan}
