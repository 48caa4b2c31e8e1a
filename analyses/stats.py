"""Inferential statistics over training seeds, family-wise error control and the verdict rule.

Every test is `scipy.stats`; this module chooses the test, reports it in one shape
(`TestResult`) and applies one stated rule (`RULE`, `verdicts`). What each claim tests is fixed
in advance in an analysis plan (`analyses.plan`); this module only computes.

- `t_test`: one-sample (or paired, on per-seed differences: `paired`) t-test, **one-sided in
  the direction the plan fixed**, and beside it the test *against* the claim: that the effect
  in the claimed direction is smaller than a stated margin m (the opposite direction when
  m = 0; "no effect larger than m" otherwise, the relevant half of a TOST). A 95% t interval
  (studentised: its coverage is exact for normal seed-to-seed variation, checked by
  simulation in `tests/test_stats.py`). A t-test has no floor on p, so a claim can be decided
  at any n ≥ 2 if the data are clear enough.
- `paired`: a seed fixes the initial weights and the batches of every variant, so two arms
  trained with the same seeds are paired; the test runs on the per-seed differences. The
  unpaired exact permutation test it replaces has a floor (`min_permutation_p`: one-sided
  1 / C(2n, n), 0.004 at 5 vs 5 seeds), which Holm's threshold can be below.
- `tost`: two one-sided tests of equivalence within [low, high]: supports "no effect larger
  than the margin".
- `holm`: Holm's step-down adjustment over the claims of one study (family-wise error ≤ alpha).
- `seeds_for_power`: seeds a one-sided t-test needs for 80% power at an effect and spread
  (the observed ones, at the worst-case Holm threshold), by the noncentral t distribution.
- `fisher_learned`: Fisher's exact test of how many seeds reached a criterion (one-sided).
- `exact_check`: a deterministic check on every run (an invariance to float tolerance).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

ALPHA = 0.05
POWER = 0.8
SPREAD_TOLERANCE = 1e-12
"""Relative seed-to-seed spread below which values count as identical (a t-test cannot judge them)."""
VERDICTS = ("supported", "contradicted", "inconclusive")
SECONDARY = "secondary"
"""The verdict column of a row reported beside the family (raw p, no verdict of its own)."""
RULE = ("each test is one-sided in the direction the plan fixed before the run; Holm's step-down adjusts p over the "
        "primary claims of the study (family-wise error {alpha}); supported: the adjusted p of the claimed side "
        "<= {alpha}; contradicted: the adjusted p of the test against the claim (the effect in the claimed direction "
        "is smaller than the margin m: the opposite direction when m = 0, no effect larger than m otherwise; Holm "
        "over the same claims) <= {alpha}; otherwise inconclusive. Exact checks hold or fail on every run and are "
        "not tests; secondary rows are shown with raw p and no verdict")


@dataclass(frozen=True)
class TestResult:
    """One test's outcome. `value` estimates `statistic` (mean over seeds of the per-seed
    statistic, or the difference of two arms); `p` is the one-sided p of the claimed side,
    `p_against` that of the test against the claim (see `t_test`); `ci_low`/`ci_high` a
    two-sided 95% interval; `sd` the seed-to-seed standard deviation behind `value` (for
    the power figure); `holds` is set only for an `exact_check`."""

    test: str
    statistic: str
    value: float
    n: int
    p: float = math.nan
    p_against: float = math.nan
    ci_low: float = math.nan
    ci_high: float = math.nan
    sd: float = math.nan
    margin: float = 0.0
    holds: bool | None = None


def finite_values(values: Sequence[float], name: str, minimum: int = 2) -> np.ndarray:
    """`values` as a float array, or one readable line saying why they cannot be tested.

    Args:
        values: one number per seed.
        name: what they are, for the message.
        minimum: the fewest values the test needs.

    Returns:
        The values as a 1-D float array.
    """
    array = np.asarray(values, dtype=float).ravel()
    if len(array) < minimum:
        raise ValueError(f"{name}: {len(array)} value(s), the test needs at least {minimum} (one per seed)")
    if not np.isfinite(array).all():
        raise ValueError(f"{name}: {int((~np.isfinite(array)).sum())} of {len(array)} values are missing or infinite")
    return array


def _check_direction(direction: int) -> None:
    if direction not in (-1, 0, 1):
        raise ValueError(f"direction must be +1, -1 or 0, got {direction}")


def t_interval(values: Sequence[float], confidence: float = 1 - ALPHA) -> tuple[float, float]:
    """Two-sided studentised (t) interval for the mean of `values`.

    Args:
        values: one number per seed (at least 2).
        confidence: the interval's level.

    Returns:
        (low, high).
    """
    x = finite_values(values, "values")
    half = stats.t.ppf(0.5 + confidence / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return float(x.mean() - half), float(x.mean() + half)


def _one_sided(x: np.ndarray, shift: float, sign: int) -> float:
    """One-sided t-test p of H1: sign · (mean − shift) > 0."""
    return float(stats.ttest_1samp(x - shift, 0.0, alternative="greater" if sign > 0 else "less").pvalue)


def t_test(values: Sequence[float], direction: int, *, margin: float = 0.0, statistic: str = "mean",
           test: str = "one-sample t-test") -> TestResult:
    """One-sample t-test of the mean of `values` (one per seed) against 0.

    `direction` +1 or −1: `p` tests H1: direction · mean > 0; `p_against` tests
    H1: direction · mean < `margin` (the effect in the claimed direction is smaller than the
    margin). `direction` 0 (a claim of no effect): `p` is `tost` within ±`margin`, `p_against`
    the two-sided t-test of any difference. Values with no spread get NaN p's (a t-test cannot
    judge identical values).

    Args:
        values: the per-seed statistic (at least 2 finite values).
        direction: +1, −1 (the claimed side) or 0 (a claim of no effect).
        margin: m, what "no effect" means (>= 0; > 0 for direction 0).
        statistic: its name, for the table.
        test: the test's name, for the table.

    Returns:
        A `TestResult` with `p`, `p_against`, the 95% t interval and the seed-to-seed sd.
    """
    _check_direction(direction)
    if margin < 0 or (direction == 0 and margin <= 0):
        raise ValueError(f"margin must be >= 0 (> 0 for a claim of no effect), got {margin}")
    x = finite_values(values, statistic)
    sd = float(x.std(ddof=1))
    sd = sd if sd > SPREAD_TOLERANCE * max(1.0, abs(float(x.mean()))) else 0.0  # identical up to rounding
    low, high = t_interval(x) if sd > 0 else (math.nan, math.nan)
    result = TestResult(test=test, statistic=statistic, value=float(x.mean()), n=len(x), ci_low=low, ci_high=high,
                        sd=sd, margin=margin)
    if not sd > 0:
        return result
    if direction == 0:
        p, against = tost(x, -margin, margin), float(stats.ttest_1samp(x, 0.0).pvalue)
    else:
        p, against = _one_sided(x, 0.0, direction), _one_sided(x, direction * margin, -direction)
    return TestResult(**{**result.__dict__, "p": p, "p_against": against})


def paired(a: pd.Series, b: pd.Series, direction: int, *, margin: float = 0.0, statistic: str = "a − b") -> TestResult:
    """`t_test` of the per-seed differences a − b of two arms trained with the same seeds.

    Args:
        a: arm a's values, indexed by seed.
        b: arm b's values, indexed by seed (only seeds in both count).
        direction: the claimed side of a − b (+1, −1; 0 for no effect).
        margin: m, as in `t_test`.
        statistic: its name, for the table.

    Returns:
        The `TestResult`, its test named with the unpaired test's floor.
    """
    difference = paired_differences(a, b)
    return t_test(difference.to_numpy(), direction, margin=margin, statistic=statistic,
                  test=paired_test_name(len(difference)))


def paired_differences(a: pd.Series, b: pd.Series) -> pd.Series:
    """Per-seed a − b over the seeds both arms have (indexed by seed, sorted)."""
    a, b = pd.Series(a, dtype=float), pd.Series(b, dtype=float)
    shared = a.index.intersection(b.index)
    return (a[shared] - b[shared]).sort_index()


def paired_test_name(n: int) -> str:
    """How a paired test over `n` seeds is named in a table, with the unpaired test's floor."""
    floor = min_permutation_p(n, n) / 2 if n else math.nan
    return (f"paired t-test over seeds, one-sided (the unpaired exact permutation test's smallest one-sided p at "
            f"{n} vs {n} would be {floor:.2g})")


def tost(values: Sequence[float], low: float, high: float) -> float:
    """Two one-sided t-tests (TOST) of equivalence.

    Args:
        values: one number per seed.
        low: the lower equivalence bound.
        high: the upper equivalence bound (> low).

    Returns:
        The p of H1: low < mean < high, the larger of the two one-sided p's.
    """
    if not low < high:
        raise ValueError(f"an equivalence interval needs low < high, got [{low}, {high}]")
    x = finite_values(values, "values")
    return max(_one_sided(x, low, +1), _one_sided(x, high, -1))


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (NaN entries, tests not run, are left out of the
    family and stay NaN): the k-th smallest of m is multiplied by m − k + 1, then made
    monotone and capped at 1.

    Args:
        p_values: raw p-values of one family (NaN: not tested).

    Returns:
        The adjusted p-values, in the same order.
    """
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full_like(p, np.nan)
    present = np.flatnonzero(~np.isnan(p))
    order = present[np.argsort(p[present], kind="stable")]
    m, running = len(order), 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[index]))
        adjusted[index] = running
    return adjusted


def seeds_for_power(effect: float, sd: float, alpha: float, power: float = POWER, limit: int = 10_000) -> float:
    """Seeds a one-sided one-sample (or paired) t-test at level `alpha` needs to reject with
    probability `power` when the true mean is `effect` (> 0 on the claimed side) and the
    seed-to-seed sd is `sd`; NaN when the effect is not on the claimed side or has no spread
    to judge, `limit` if even that many would not do.

    Args:
        effect: the mean on the claimed side (direction × observed mean).
        sd: the seed-to-seed standard deviation.
        alpha: the one-sided level (Holm's worst case: alpha / m).
        power: the wanted power.
        limit: the most seeds searched.

    Returns:
        The seeds, as a float (NaN when undefined).
    """
    if not (effect > 0 and sd > 0 and math.isfinite(effect) and math.isfinite(sd)):
        return math.nan
    for n in range(2, limit):
        critical = stats.t.ppf(1 - alpha, n - 1)
        if stats.nct.sf(critical, n - 1, effect / sd * math.sqrt(n)) >= power:
            return float(n)
    return float(limit)


def min_fisher_p(n_a: int, n_b: int) -> float:
    """Smallest one-sided Fisher p for arms of `n_a` and `n_b` seeds: the most extreme table
    (every seed of one arm reaches the criterion, none of the other): 1 / C(n_a + n_b, n_a)."""
    return float(stats.fisher_exact([[n_a, 0], [0, n_b]], alternative="greater").pvalue)


def min_permutation_p(n_a: int, n_b: int) -> float:
    """Smallest two-sided p of the exact two-sample permutation test: 2 / C(n_a + n_b, n_a)."""
    return min(1.0, 2 / math.comb(n_a + n_b, n_a))


def fisher_learned(learned_a: int, n_a: int, learned_b: int, n_b: int) -> TestResult:
    """Fisher's exact test, one-sided, that arm a reaches a criterion on more of its seeds than
    arm b; `value` = share in a − share in b, `p_against` the other side."""
    for learned, n, arm in ((learned_a, n_a, "a"), (learned_b, n_b, "b")):
        if not (isinstance(n, int) and isinstance(learned, int) and n >= 1 and 0 <= learned <= n):
            raise ValueError(f"arm {arm}: need 0 <= seeds reaching the criterion <= seeds >= 1, got {learned} of {n}")
    table = [[learned_a, n_a - learned_a], [learned_b, n_b - learned_b]]
    return TestResult(test=f"Fisher exact, one-sided (smallest p at {n_a} vs {n_b}: {min_fisher_p(n_a, n_b):.2g})",
                      statistic="share of seeds reaching the criterion, a − b", value=learned_a / n_a - learned_b / n_b,
                      n=min(n_a, n_b), p=float(stats.fisher_exact(table, alternative="greater").pvalue),
                      p_against=float(stats.fisher_exact(table, alternative="less").pvalue))


def exact_check(statistic: str, value: float, holds: bool, n: int) -> TestResult:
    """A deterministic check that holds or fails on every one of `n` runs (e.g. an invariance
    to float tolerance): no p; supported when it holds, contradicted when not."""
    return TestResult(test="exact check on every run", statistic=statistic, value=float(value), n=n,
                      holds=bool(holds))


def verdicts(results: Sequence[TestResult | None], primary: Sequence[bool],
             alpha: float = ALPHA) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The verdict of every claim of one study by `RULE`, with Holm's adjusted p of the claimed
    side and of the test against it (NaN outside the family). `results[i]` None: the claim
    could not be tested (inconclusive); `primary[i]` False: a secondary row (`SECONDARY`).

    Args:
        results: one test result (or None) per claim of the study.
        primary: whether each claim is in the Holm family.
        alpha: the family-wise level.

    Returns:
        (verdicts, Holm-adjusted p of the claimed side, Holm-adjusted p against the claim).
    """
    in_family = [bool(keep) and result is not None and result.holds is None
                 for result, keep in zip(results, primary)]
    p = [result.p if keep else math.nan for result, keep in zip(results, in_family)]
    against = [result.p_against if keep else math.nan for result, keep in zip(results, in_family)]
    p_adjusted, against_adjusted = holm(p), holm(against)
    found = []
    for index, result in enumerate(results):
        if result is not None and result.holds is not None:
            found.append(VERDICTS[0] if result.holds else VERDICTS[1])
        elif not primary[index]:
            found.append(SECONDARY)
        elif p_adjusted[index] <= alpha:
            found.append(VERDICTS[0])
        elif against_adjusted[index] <= alpha:
            found.append(VERDICTS[1])
        else:
            found.append(VERDICTS[2])
    return found, p_adjusted, against_adjusted


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


def bootstrap_mean_interval(values: np.ndarray, n_resamples: int = 2000, confidence: float = 1 - ALPHA,
                            seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two-sided bias-corrected and accelerated (BCa) bootstrap interval of the mean of each row
    of `values` (one row per cell, one column per prompt), all rows at once.

    `scipy.stats.bootstrap(method="BCa")` gives the same interval (tests: within resampling
    noise) but resamples one statistic at a time; a patching table has hundreds of cells over
    the same prompts, so here every row shares one set of resamples (multinomial counts, one
    matrix product) and the jackknife of the mean has a closed form. Rows without spread get the
    mean as both ends; fewer than 2 columns give NaN.

    Args:
        values: `[rows, n]` finite values.
        n_resamples: bootstrap resamples.
        confidence: the interval's level.
        seed: draws the resamples.

    Returns:
        `(low, high)`, each `[rows]`.
    """
    values = np.asarray(values, dtype=float)
    if values.ndim != 2:
        raise ValueError(f"values must be [rows, n], got shape {values.shape}")
    rows, n = values.shape
    if n < 2:
        return np.full(rows, np.nan), np.full(rows, np.nan)
    counts = np.random.default_rng(seed).multinomial(n, np.full(n, 1 / n), size=n_resamples).astype(float)
    means = values.mean(1)
    resampled = np.sort(values @ counts.T / n, axis=1)  # [rows, resamples]
    below = (resampled < means[:, None]).mean(1)
    bias = stats.norm.ppf(np.clip(below, 1 / n_resamples, 1 - 1 / n_resamples))
    jackknife = (values.sum(1, keepdims=True) - values) / (n - 1)
    spread = jackknife.mean(1, keepdims=True) - jackknife
    cubes, squares = (spread**3).sum(1), (spread**2).sum(1)
    acceleration = np.divide(cubes, 6 * squares**1.5, out=np.zeros(rows), where=squares > 0)
    z = stats.norm.ppf([(1 - confidence) / 2, (1 + confidence) / 2])
    shifted = bias[:, None] + z[None, :]
    levels = stats.norm.cdf(bias[:, None] + shifted / (1 - acceleration[:, None] * shifted))  # [rows, 2]
    ranks = np.clip(np.round(levels * (n_resamples - 1)).astype(int), 0, n_resamples - 1)
    low, high = np.take_along_axis(resampled, ranks, axis=1).T
    flat = np.ptp(values, axis=1) <= SPREAD_TOLERANCE * np.maximum(1.0, np.abs(means))
    return np.where(flat, means, low), np.where(flat, means, high)
