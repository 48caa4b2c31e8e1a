"""The analysis plans: every claim's statistic, test, direction, site and comparison, fixed before a run.

A plan is data (`AnalysisPlan`, a tuple of `PlannedClaim`s) that `analyses.claims` executes
and the report prints. Nothing in a claim's test is chosen after the run: the direction of
every one-sided test, the margin m below which an effect counts as absent, the site, the
comparison and whether the claim is in the family Holm's correction runs over. Changing any
of it bumps the plan's `version`; a claim changed after its data were seen says so
(`changed_after_data`) and names the fresh seeds that would confirm it (`confirm_seeds`).

`decidability(plan, n_seeds)` says, per primary claim, whether its test can reach Holm's
threshold at all in the worst case (the claim with the smallest p is held to alpha / m), and
`minimal_seeds(plan)` the fewest seeds per variant at which every primary claim can.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import pandas as pd

from poslens.analyses.stats import ALPHA, min_fisher_p

TESTS = ("t", "split_half_t", "fisher", "exact")
"""`t`: a one-sample or paired t-test over seeds (one-sided); `split_half_t`: the same on the seeds
left after a site was chosen on the first half (`split_seeds`); `fisher`: Fisher's exact test on
seeds reaching a criterion; `exact`: a deterministic check on every run (not a test)."""
DIRECTIONS = {+1: "greater than 0", -1: "less than 0", 0: "within ±m of 0"}
CONFIRM = (5, 6, 7, 8, 9)
"""Fresh seeds for claims changed after data were seen: `poslens reproduce --seeds 10` trains them,
and `reproduce_claims(tables, seeds=CONFIRM)` tests those claims on them alone."""


@dataclass(frozen=True)
class PlannedClaim:
    """One claim as fixed before the run. `direction` is the claimed side of the statistic
    (+1 above 0, −1 below, 0 a claim of no effect within ±`margin`); `margin` (m) is also what
    "no effect" means for the test against a directional claim; `primary` claims form the
    family Holm's correction runs over, the rest are reported beside them (labelled, raw p,
    no verdict)."""

    key: str
    section: str
    claim: str
    statistic: str
    test: str
    direction: int
    site: str
    comparison: str
    margin: float = 0.0
    primary: bool = True
    changed_after_data: str = ""
    confirm_seeds: tuple[int, ...] = ()
    note: str = ""

    def __post_init__(self) -> None:
        if self.test not in TESTS:
            raise ValueError(f"claim {self.key}: unknown test {self.test}; allowed: {list(TESTS)}")
        if self.direction not in DIRECTIONS:
            raise ValueError(f"claim {self.key}: direction must be +1, -1 or 0, got {self.direction}")

    @property
    def registered(self) -> str:
        """When the claim's test was fixed, in words for the report."""
        if not self.changed_after_data:
            return "before the data"
        seeds = f"; confirm on fresh seeds {self.confirm_seeds[0]}–{self.confirm_seeds[-1]}" if self.confirm_seeds \
            else ""
        return f"after the data were seen: {self.changed_after_data}{seeds}"


@dataclass(frozen=True)
class AnalysisPlan:
    """A study's claims, the level and the correction, and what is deliberately left out."""

    name: str
    version: int
    claims: tuple[PlannedClaim, ...]
    history: str
    excluded: tuple[tuple[str, str], ...] = ()
    alpha: float = ALPHA
    correction: str = "Holm step-down over the primary claims"

    def __post_init__(self) -> None:
        keys = [claim.key for claim in self.claims]
        if len(set(keys)) != len(keys):
            raise ValueError(f"plan {self.name}: claim keys must be unique")

    @property
    def primary(self) -> tuple[PlannedClaim, ...]:
        return tuple(claim for claim in self.claims if claim.primary and claim.test != "exact")

    def claim(self, key: str) -> PlannedClaim:
        found = [claim for claim in self.claims if claim.key == key]
        if not found:
            raise ValueError(f"plan {self.name} has no claim {key}; it has {[c.key for c in self.claims]}")
        return found[0]

    def table(self) -> pd.DataFrame:
        """The plan as a table for the report: one row per claim (direction in words)."""
        rows = [{**asdict(claim), "direction": DIRECTIONS[claim.direction], "registered": claim.registered,
                 "role": _role(claim)} for claim in self.claims]
        columns = ["key", "section", "claim", "statistic", "test", "direction", "margin", "site", "comparison",
                   "role", "registered", "note"]
        return pd.DataFrame(rows)[columns]

    def header(self) -> str:
        """One paragraph naming the plan, its version, level, correction and exclusions."""
        excluded = "; ".join(f"{what}: {why}" for what, why in self.excluded)
        return (f"Analysis plan '{self.name}', version {self.version} ({self.history}). Level {self.alpha}, "
                f"{self.correction} ({len(self.primary)} claims)." + (f" Left out of the verdicts: {excluded}."
                                                                     if excluded else ""))


def _role(claim: PlannedClaim) -> str:
    if claim.test == "exact":
        return "exact check"
    return "primary (Holm family)" if claim.primary else "secondary (beside, no verdict)"


def split_seeds(seeds: list[int]) -> tuple[list[int], list[int]]:
    """Split seeds for a choose-then-test claim.

    Args:
        seeds: the seeds at hand.

    Returns:
        The selection half (the first ⌊n/2⌋ seeds, sorted) and the test half (the rest).
    """
    seeds = sorted(seeds)
    return seeds[: len(seeds) // 2], seeds[len(seeds) // 2:]


def smallest_p(test: str, n_seeds: int) -> float:
    """The smallest p a planned test can give.

    Args:
        test: one of `TESTS`.
        n_seeds: seeds per variant.

    Returns:
        The smallest p (0 for a t-test with at least 2 values, NaN for an exact check).
    """
    if test == "exact":
        return math.nan
    if test == "fisher":
        return min_fisher_p(n_seeds, n_seeds)
    tested = len(split_seeds(list(range(n_seeds)))[1]) if test == "split_half_t" else n_seeds
    selecting = n_seeds // 2 if test == "split_half_t" else 1
    return 0.0 if tested >= 2 and selecting >= 1 else 1.0  # a t-test has no floor once it has 2 values


def decidability(plan: AnalysisPlan, n_seeds: int, family_size: int | None = None) -> pd.DataFrame:
    """Per primary claim: the smallest p its test can give at `n_seeds` per variant, Holm's
    worst-case threshold alpha / m (m = `family_size`, default the plan's primary claims) and
    whether the first is below the second (`decidable`).

    Args:
        plan: the analysis plan.
        n_seeds: seeds per variant.
        family_size: m, when the study expands a claim into several rows (dynamics).

    Returns:
        One row per primary claim: key, test, smallest_p, threshold, decidable.
    """
    if isinstance(n_seeds, bool) or not isinstance(n_seeds, int) or n_seeds < 1:
        raise ValueError(f"n_seeds must be an integer >= 1, got {n_seeds}")
    m = family_size or len(plan.primary)
    rows = [{"key": claim.key, "test": claim.test, "smallest_p": smallest_p(claim.test, n_seeds),
             "threshold": plan.alpha / m} for claim in plan.primary]
    table = pd.DataFrame(rows, columns=["key", "test", "smallest_p", "threshold"])
    return table.assign(decidable=table["smallest_p"] < table["threshold"])


def minimal_seeds(plan: AnalysisPlan, family_size: int | None = None, limit: int = 100) -> int:
    """The fewest seeds per variant at which every primary claim of `plan` is decidable.

    Args:
        plan: the analysis plan.
        family_size: m, as in `decidability`.
        limit: the most seeds searched.

    Returns:
        The seed count.
    """
    return next(n for n in range(1, limit) if decidability(plan, n, family_size)["decidable"].all())


def _claim(key, section, claim, statistic, test, direction, site, comparison, **rest) -> PlannedClaim:
    after = rest.pop("after", "")
    return PlannedClaim(key, section, claim, statistic, test, direction, site, comparison, changed_after_data=after,
                        confirm_seeds=CONFIRM if after else (), **rest)


NOPE, SHIFTED_NOPE, FIRST = "nope-causal", "nope-causal@shifted", "blocks.0.hook_resid_post"
CONTENT = "the stronger of the role-identity and bag-of-prefix bars"
_CUTS = {"cut0": "nope-causal+cut0", "cut01": "nope-causal+cut0,1"}
_PAIRED = "per-seed difference, paired by seed"
REPRODUCE_PLAN = AnalysisPlan("reproduce", 3, (
    _claim("symmetry_bidirectional", "symmetry", "Without a positional encoding and without a causal mask the last "
           "position's logits are invariant to any permutation of the earlier tokens", "max |Δ last-position logit| "
           "over permutations, float64", "exact", +1, "logits", "NoPE-bidirectional trained and random, and 1- and "
           "2-layer random twins"),
    _claim("symmetry_causal", "symmetry", "A causal mask with two or more layers breaks that invariance",
           "min |Δ last-position logit| over permutations", "exact", +1, "logits",
           "NoPE-causal trained and random, and 2-layer random twins"),
    _claim("symmetry_one_layer", "symmetry", "One causal NoPE layer is still invariant at the last position",
           "max |Δ last-position logit| over permutations", "exact", +1, "logits", "1-layer random NoPE-causal twins"),
    _claim("symmetry_pe", "symmetry", "A positional encoding breaks it, with either mask and one layer or two",
           "min |Δ last-position logit| over permutations", "exact", +1, "logits",
           "learned, sinusoidal and rotary random twins (causal and bidirectional, "
           "1 and 2 layers), learned-causal trained and random"),
    _claim("learning", "learning", "NoPE-causal learns 3-digit addition and NoPE-bidirectional cannot",
           "final held-out exact match, NoPE-causal − NoPE-bidirectional", "t", +1, "greedy answers", _PAIRED,
           margin=0.5, after="paired t on final exact match replaces Fisher on seeds at the criterion, whose smallest "
           "p at 5 vs 5 (0.004) is above Holm's threshold"),
    _claim("learning_criterion", "learning", "... counted as seeds ending at >= 99% exact match", "share of seeds at "
           "the criterion, NoPE-causal − NoPE-bidirectional", "fisher", +1, "greedy answers", "seeds per arm",
           primary=False),
    *(_claim(f"convergence_{cut}", "residual cuts", f"Removing residual connections ({cut[3:].replace('01', '0,1')}) "
             "slows convergence: a lower mean held-out exact match over training", "mean exact match over the "
             f"run's evaluations, {variant} − nope-causal", "t", -1, "greedy answers", _PAIRED, margin=0.02,
             after="paired t replaces the unpaired permutation test (issue #23 review of the 5-seed run)")
      for cut, variant in _CUTS.items()),
    *(_claim(f"slices_level_{cut}", "vertical slices", f"Residual connections keep positions' columns apart: the "
             f"trained model without them ({cut[3:].replace('01', '0,1')}) is less block-diagonal (trained levels, "
             "as the paper compares them)", f"block contrast over its null, mean over block outputs, trained "
             f"{variant} − trained nope-causal", "t", -1, "every blocks.L.hook_resid_post", _PAIRED, margin=0.01,
             after="trained levels replace the trained − random-init statistic, from the review's reading of the "
                   "data", note="a correlation over examples cannot see position at all (docs/measures.md)")
      for cut, variant in _CUTS.items()),
    *(_claim(f"slices_built_{cut}", "vertical slices", f"... the statistic of plan versions <= 2: block contrast "
             f"built by training (trained − random init), {cut[3:].replace('01', '0,1')} − intact",
             f"(trained − random init) block contrast over its null, {variant} − nope-causal", "t", -1,
             "every blocks.L.hook_resid_post", _PAIRED, primary=False,
             note="kept beside for comparison: the cut models start lower at initialisation")
      for cut, variant in _CUTS.items()),
    *(_claim(f"slices_position_{cut}", "vertical slices", f"... and a probe reads less of each column's position "
             f"after the cut ({cut[3:].replace('01', '0,1')}): a position-sensitive measure of the same idea",
             f"position-probe accuracy at the last block's output, {variant} − nope-causal", "t", -1,
             "last blocks.L.hook_resid_post", _PAIRED, margin=0.02,
             note="not testable with this measure where both arms decode position at ceiling")
      for cut, variant in _CUTS.items()),
    _claim("probe_first", "position probes", "Position is linearly decodable after the first causal layer beyond "
           "content", f"probe accuracy − {CONTENT}, shifted format", "t", +1, FIRST, f"{SHIFTED_NOPE}: per seed",
           after="the shifted format and the bag-of-prefix bar replace token identity on the fixed format"),
    _claim("probe_first_fixed", "position probes", "... on the fixed format, beyond token identity (position and "
           "role coincide there)", "probe − token-identity accuracy", "t", +1, FIRST, f"{NOPE}: per seed",
           primary=False),
    _claim("chi", "position probes", "An untrained causal NoPE model already carries position beyond content "
           "(Chi et al.)", f"random-init probe accuracy − {CONTENT}, shifted format", "t", +1, FIRST,
           f"{SHIFTED_NOPE} random-init twin: per seed",
           after="the shifted format and the bag-of-prefix bar; the review saw +0.010 over role identity there"),
    _claim("chi_fixed", "position probes", "... on the fixed format, beyond token identity", "random-init probe − "
           "token-identity accuracy", "t", +1, FIRST, f"{NOPE}: per seed", primary=False),
    _claim("haviv", "position probes", "The last layers lose some position (Haviv et al.): the last block's output "
           "decodes less than the peak of the earlier ones", "probe accuracy at the last block's output − at the "
           "peak block output, peak chosen on the selection half of the seeds, tested on the other half, shifted "
           "format", "split_half_t", -1, "blocks.L.hook_resid_post", f"{SHIFTED_NOPE}: per test seed", margin=0.02,
           after="peak chosen on half the seeds, shifted format; the review saw the last block lose 0.114 there"),
    _claim("haviv_middle_fixed", "position probes", "... as in plan version 2: last block's output − middle block's, "
           "fixed format", "probe accuracy, last − middle block output", "t", -1, "blocks.L.hook_resid_post",
           f"{NOPE}: per seed", primary=False,
           after="the middle block was chosen as the reference after seeing the data (plan version 2), and block 1 "
                 "of 4 is not Haviv's peak"),
    _claim("shift", "position probes", "The stream carries the shift on operand tokens (where position and role "
           "come apart) after the first causal layer", "shift-probe accuracy on operand tokens − token-identity "
           "accuracy", "t", +1, FIRST, f"{SHIFTED_NOPE}: per seed"),
    _claim("shift_content", "position probes", "... beyond the bag-of-prefix bar", "shift-probe accuracy − "
           "bag-of-prefix accuracy", "t", +1, FIRST, f"{SHIFTED_NOPE}: per seed", primary=False,
           note="the share of fillers in the prefix determines the shift, though not linearly: not testable with "
                "this measure where the bar is at ceiling"),
    _claim("variance_slope", "geometry", "At random initialisation the residual stream's variance shrinks with "
           "position after causal attention (Chi et al.)", "log-log slope of variance on position over its null, "
           "random init", "t", -1, "blocks.0.hook_resid_mid", f"{NOPE} untrained twin: per seed"),
    _claim("adjacency", "geometry", "Neighbouring positions' hidden states are more alike than distant ones in a "
           "trained NoPE-causal model (Zuo et al. 2025)", "adjacency over its null, trained − untrained twin, "
           "shifted format", "t", +1, "last blocks.L.hook_resid_post", f"{SHIFTED_NOPE}: {_PAIRED}",
           after="the untrained twin and the shifted format: the null keeps the fixed format's token layout"),
    _claim("adjacency_fixed", "geometry", "... as in plan version 2: adjacency over its null, trained, fixed "
           "format", "adjacency over its null", "t", +1, "last blocks.L.hook_resid_post", f"{NOPE}: per seed",
           primary=False, note="the null keeps the token layout: token embeddings alone score above it"),
), history="1: the first claims table; 2: Haviv's reference site moved to the middle block after the data were "
           "seen; 3: pre-registered plan, paired one-sided tests, Holm, shifted-format probe claims with the "
           "bag-of-prefix bar (issue #23)",
    excluded=(("Hewitt–Liang control task and selectivity", "with 12 (13 shifted) token types a probe memorises "
               "the control labels, so selectivity says nothing about position"),
              ("position swap at a NoPE embedding", "a token swap: the answer follows it by construction "
               "(flagged fixed_by_construction)")))

DYNAMICS_PLAN = AnalysisPlan("dynamics", 2, (
    _claim("rebound", "attention dynamics", "Attention entropy on loss-bearing queries falls, then rises again "
           "(JoMA), per run label and layer", "min(dip, rise) − snapshot noise (nats), cross-fitted: the minimum "
           "located on odd snapshots, dip and rise read on even ones", "t", +1, "every attention layer",
           "per seed"),
), history="1: final − minimum entropy (>= 0 by construction); 2: a dip and a rise each larger than the "
            "snapshot-to-snapshot noise (issue #23)")
