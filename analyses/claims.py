"""The claims poslens tests, executed as their analysis plan (`analyses.plan`) fixed them.

Each claim of a plan becomes one row: its per-seed statistic computed from the merged tables,
the plan's one-sided test, raw and Holm-adjusted p side by side, the verdict on the adjusted
one (`analyses.stats.RULE`), the seeds a test would need for 80% power at the observed effect
and spread, when the claim was registered and any flag. Nothing is written by hand. A claim
that cannot be tested on the data at hand says why in words (`note`); with one seed the row
shows that seed's value and says n = 1 cannot decide it and how many seeds could.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from poslens.analyses.plan import DYNAMICS_PLAN, REPRODUCE_PLAN, AnalysisPlan, PlannedClaim, minimal_seeds, split_seeds
from poslens.analyses.stats import (
    RULE,
    TestResult,
    exact_check,
    fisher_learned,
    paired_differences,
    paired_test_name,
    seeds_for_power,
    t_test,
    verdicts,
)

FIRST_CAUSAL_SITE = "blocks.0.hook_resid_post"  # the stream after one causal attention layer and its MLP
CEILING = 0.99
CLAIM_TABLE_COLUMNS = ("section", "claim", "statistic", "value", "n", "test", "p", "p_adjusted", "p_against",
                       "p_against_adjusted", "margin", "ci_low", "ci_high", "verdict", "seeds_for_80pct_power",
                       "registered", "note", "rule", "key")


@dataclass
class Measured:
    """A claim's per-seed statistic (`values`, indexed by seed) before its test; `untestable`
    says in words why this measure cannot test the claim on these data."""

    values: pd.Series
    test: str = "one-sample t-test over seeds, one-sided"
    detail: str = ""
    untestable: str = ""


def _one_seed(n: int, needed: int) -> str:
    return (f"n = {n} cannot decide this claim: its test needs at least 2 seeds per arm (this plan needs {needed} "
            "seeds per variant for every claim; more for power, see seeds_for_80pct_power once there are 2)")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' * (n != 1)}"


def _where(where: dict) -> str:
    return ", ".join(f"{column} {value}" for column, value in where.items())


def _per_seed(table: pd.DataFrame, value: str, **where: object) -> pd.Series:
    """`value` of the rows matching `where`, indexed by seed (one row per seed)."""
    rows = table
    for column, wanted in where.items():
        if column not in rows:
            raise ValueError(f"the table has no column {column}")
        rows = rows[rows[column] == wanted]
    if rows.empty:
        raise ValueError(f"no rows with {_where(where)}")
    return rows.set_index("seed")[value].astype(float).sort_index()


def _probe(probe: pd.DataFrame, variant: str, site: str, baseline: str) -> pd.Series:
    return _per_seed(probe, "value", variant=variant, site=site, baseline=baseline, metric="accuracy",
                     probe="position")


def _content_bar(probe: pd.DataFrame, variant: str, site: str) -> pd.Series:
    """Per seed, the stronger of the role-identity and bag-of-prefix accuracies at `site`."""
    return np.maximum(_probe(probe, variant, site, "role_identity"), _probe(probe, variant, site, "bag_of_prefix"))


def _beyond(value: pd.Series, bar: pd.Series, name: str) -> Measured:
    """`value` − `bar` per seed, untestable where the bar is at ceiling on every seed."""
    ceiling = bool((bar >= CEILING).all())
    return Measured(value - bar, untestable=f"not testable with this measure: the {name} is at ceiling "
                    f"(>= {CEILING}) on every seed, so nothing can exceed it" if ceiling else "")


def _paired(a: pd.Series, b: pd.Series, ceiling: bool = False) -> Measured:
    difference = paired_differences(a, b)
    both = bool(ceiling and (a >= CEILING).all() and (b >= CEILING).all())
    return Measured(difference, test=paired_test_name(len(difference)),
                    untestable=f"not testable with this measure: both arms are at ceiling (>= {CEILING}) on every "
                               "seed" if both else "")


def _blocks(table: pd.DataFrame, variant: str) -> list[str]:
    sites = table.loc[table["variant"] == variant, "site"]
    blocks = sorted({int(block) for block in sites.str.extract(r"^blocks\.(\d+)\.", expand=False).dropna()})
    if not blocks:
        raise ValueError(f"no block sites for {variant}")
    return [f"blocks.{block}.hook_resid_post" for block in blocks]


def _level(table: pd.DataFrame, variant: str, score: str, weights: str) -> pd.Series:
    """Per seed: the mean over block outputs of `score`'s excess over its null, for `weights`."""
    rows = table[(table["variant"] == variant) & (table["score"] == score) & (table["weights"] == weights)
                 & table["site"].isin(_blocks(table, variant))]
    if rows.empty:
        raise ValueError(f"no {weights} {score} rows for {variant}")
    return rows.groupby("seed")["excess"].mean()


def _haviv(probe: pd.DataFrame, variant: str) -> Measured:
    """Last block output − the peak earlier block output, the peak chosen on the selection half
    of the seeds (`plan.split_seeds`) and tested on the other half."""
    sites = _blocks(probe, variant)
    if len(sites) < 2:
        raise ValueError(f"{variant} has one block: no earlier block output to compare its last with")
    trained = probe[(probe["variant"] == variant) & (probe["baseline"] == "trained") & (probe["probe"] == "position")
                    & (probe["metric"] == "accuracy")].pivot_table(index="seed", columns="site", values="value")
    select, tested = split_seeds(list(trained.index))
    if not select:  # one seed: shown, but it cannot both choose the peak and test it
        select = tested
    peak = str(trained.loc[select, sites[:-1]].mean().idxmax())
    return Measured(trained.loc[tested, sites[-1]] - trained.loc[tested, peak],
                    detail=f"peak {peak} chosen on seed(s) {', '.join(map(str, select))}; tested on seed(s) "
                           f"{', '.join(map(str, tested))}" + (" (the same seed: descriptive only)"
                                                               if select == tested else ""))


def _shift(shift: pd.DataFrame, variant: str, bar: str) -> Measured:
    value = _per_seed(shift, "value", variant=variant, site=FIRST_CAUSAL_SITE, baseline="trained")
    return _beyond(value, _per_seed(shift, "value", variant=variant, site=FIRST_CAUSAL_SITE, baseline=bar),
                   bar.replace("_", "-") + " bar")


def _invariance(tables: dict[str, pd.DataFrame], invariant: bool, runs: dict[str, tuple[str, ...]],
                twins: Callable[[pd.DataFrame], pd.Series]) -> TestResult:
    """An exact check over the `invariance` rows of `runs` (variant → weights) and the symmetry
    twins selected by `twins`: every one (in)variant as claimed."""
    invariance, symmetry = _table(tables, "invariance"), tables.get("symmetry")
    parts = [invariance[(invariance["variant"] == variant) & invariance["weights"].isin(weights)]
             for variant, weights in runs.items()]
    if symmetry is not None and not symmetry.empty:
        parts.append(symmetry[twins(symmetry)])
    rows = pd.concat(parts, ignore_index=True)
    if rows.empty:
        raise ValueError("no invariance rows for this check")
    delta = rows["max_abs_delta"].max() if invariant else rows["max_abs_delta"].min()
    return exact_check(f"{'max' if invariant else 'min'} |Δ last-position logit| over permutations",
                       float(delta), bool((rows["invariant"] == invariant).all()), len(rows))


def _table(tables: dict[str, pd.DataFrame], name: str) -> pd.DataFrame:
    if name not in tables:
        raise ValueError(f"these results have no {name} table (measured before analysis plan version 3?)")
    return tables[name]


def _reproduce_measures(tables: dict[str, pd.DataFrame]) -> dict[str, Callable[[], Measured | TestResult]]:
    training, probe, correlation, geometry = (_table(tables, name) for name in ("training", "probe", "correlation",
                                                                               "geometry"))
    shifted, nope, bidirectional, learned = "nope-causal@shifted", "nope-causal", "nope-bidirectional", "learned-causal"
    cuts = {"cut0": "nope-causal+cut0", "cut01": "nope-causal+cut0,1"}

    def learned_seeds(variant: str) -> pd.Series:
        return _per_seed(training, "learned", variant=variant)

    def last(variant: str) -> str:
        return _blocks(probe, variant)[-1]

    measures = {
        "symmetry_bidirectional": lambda: _invariance(tables, True, {bidirectional: ("random", "trained")},
                                                      lambda s: (s["encoding"] == "nope")
                                                      & (s["attention"] == "bidirectional")),
        "symmetry_causal": lambda: _invariance(tables, False, {nope: ("random", "trained")},
                                               lambda s: (s["encoding"] == "nope") & (s["attention"] == "causal")
                                               & (s["n_layers"] >= 2)),
        "symmetry_one_layer": lambda: _invariance(tables, True, {nope: ("random, 1 layer",)},
                                                  lambda s: (s["encoding"] == "nope") & (s["attention"] == "causal")
                                                  & (s["n_layers"] == 1)),
        "symmetry_pe": lambda: _invariance(tables, False, {learned: ("random", "trained")},
                                           lambda s: s["encoding"] != "nope"),
        "learning": lambda: _paired(_per_seed(training, "exact_match", variant=nope),
                                    _per_seed(training, "exact_match", variant=bidirectional)),
        "learning_criterion": lambda: fisher_learned(int(learned_seeds(nope).sum()), len(learned_seeds(nope)),
                                                     int(learned_seeds(bidirectional).sum()),
                                                     len(learned_seeds(bidirectional))),
        "probe_first": lambda: _beyond(_probe(probe, shifted, FIRST_CAUSAL_SITE, "trained"),
                                       _content_bar(probe, shifted, FIRST_CAUSAL_SITE), "content bar"),
        "probe_first_fixed": lambda: _beyond(_probe(probe, nope, FIRST_CAUSAL_SITE, "trained"),
                                             _probe(probe, nope, FIRST_CAUSAL_SITE, "token_identity"),
                                             "token-identity bar"),
        "chi": lambda: _beyond(_probe(probe, shifted, FIRST_CAUSAL_SITE, "random_init"),
                               _content_bar(probe, shifted, FIRST_CAUSAL_SITE), "content bar"),
        "chi_fixed": lambda: _beyond(_probe(probe, nope, FIRST_CAUSAL_SITE, "random_init"),
                                     _probe(probe, nope, FIRST_CAUSAL_SITE, "token_identity"), "token-identity bar"),
        "haviv": lambda: _haviv(probe, shifted),
        "haviv_middle_fixed": lambda: Measured(
            _probe(probe, nope, last(nope), "trained")
            - _probe(probe, nope, _blocks(probe, nope)[(len(_blocks(probe, nope)) - 1) // 2], "trained")),
        "shift": lambda: _shift(_table(tables, "shift_probe"), shifted, "token_identity"),
        "shift_content": lambda: _shift(_table(tables, "shift_probe"), shifted, "bag_of_prefix"),
        "variance_slope": lambda: Measured(_per_seed(geometry, "excess", variant=nope, site="blocks.0.hook_resid_mid",
                                                     score="variance_slope", weights="random_init")),
        "adjacency": lambda: _paired(*(_per_seed(geometry, "excess", variant=shifted, site=last(shifted),
                                                 score="adjacency", weights=weights)
                                       for weights in ("trained", "random_init"))),
        "adjacency_fixed": lambda: Measured(_per_seed(geometry, "excess", variant=nope, site=last(nope),
                                                      score="adjacency", weights="trained")),
    }
    for cut, variant in cuts.items():
        measures |= {
            f"convergence_{cut}": lambda v=variant: _paired(_per_seed(training, "mean_exact_match", variant=v),
                                                            _per_seed(training, "mean_exact_match", variant=nope)),
            f"slices_level_{cut}": lambda v=variant: _paired(_level(correlation, v, "contrast", "trained"),
                                                             _level(correlation, nope, "contrast", "trained")),
            f"slices_built_{cut}": lambda v=variant: _paired(
                _level(correlation, v, "contrast", "trained") - _level(correlation, v, "contrast", "random_init"),
                _level(correlation, nope, "contrast", "trained") - _level(correlation, nope, "contrast",
                                                                          "random_init")),
            f"slices_position_{cut}": lambda v=variant: _paired(_probe(probe, v, last(v), "trained"),
                                                                _probe(probe, nope, last(nope), "trained"),
                                                                ceiling=True),
        }
    return measures


def missed_criterion(training: pd.DataFrame, criterion: float, expected_to_fail: tuple[str, ...] = ()) -> list[str]:
    """One line per run that ended below `criterion` exact match (from `reproduce`'s training
    table), for the top of a report; runs of `expected_to_fail` variants say so.

    Args:
        training: rows with variant, seed, exact_match and learned.
        criterion: the exact-match criterion, for the text.
        expected_to_fail: variants a claim says cannot learn.

    Returns:
        One sentence per run below the criterion.
    """
    missed = training[~training["learned"].astype(bool)].sort_values(["variant", "seed"])
    return [f"{row.variant} seed {row.seed} ended at {row.exact_match:.3f} held-out exact match, below the "
            f"{criterion:g} criterion" + (" (expected: the claim is that it cannot learn)"
                                          if row.variant in expected_to_fail else "")
            for row in missed.itertuples()]


def _filter_seeds(tables: dict[str, pd.DataFrame], seeds) -> dict[str, pd.DataFrame]:
    if seeds is None:
        return tables
    return {name: table[table["seed"].isin(list(seeds))] if "seed" in table else table
            for name, table in tables.items()}


def reproduce_claims(tables: dict[str, pd.DataFrame], *, plan: AnalysisPlan = REPRODUCE_PLAN,
                     seeds=None) -> pd.DataFrame:
    """One row per claim of `plan` (`CLAIM_TABLE_COLUMNS`) from `reproduce`'s merged tables,
    on every seed or only on `seeds` (e.g. `plan.CONFIRM`, fresh seeds for claims changed
    after data were seen).

    Args:
        tables: the merged tables (training, invariance, symmetry, probe, correlation, geometry,
            shift_probe).
        plan: the analysis plan to execute.
        seeds: the seeds to test on (default: every seed in the tables).

    Returns:
        The claims table (`CLAIM_TABLE_COLUMNS`), one row per claim of the plan, in its order.
    """
    measures = _reproduce_measures(_filter_seeds(tables, seeds))
    return evaluate(plan, [(claim, measures[claim.key], "") for claim in plan.claims])


def rebound_claims(rebound: pd.DataFrame, *, plan: AnalysisPlan = DYNAMICS_PLAN) -> pd.DataFrame:
    """JoMA's "sparse, then dense" from `poslens dynamics`: per run label and layer, does the
    entropy over the loss-bearing queries dip and then rise, each by more than the
    snapshot-to-snapshot noise (`measures.entropy.entropy_rebound`'s `rebound_excess`), over
    seeds? Labels `...@constant-lr` are the control: a rebound there is not the cosine decay's.

    Args:
        rebound: `entropy_rebound`'s table.
        plan: the dynamics plan.

    Returns:
        The claims table, one row per (run label, layer).
    """
    claim = plan.claim("rebound")
    rows = rebound[rebound["measure"] == "nats_loss"]
    jobs = [(claim, lambda group=group: Measured(group.set_index("seed")["rebound_excess"].sort_index()),
             f"{variant}, layer {layer}") for (variant, layer), group in rows.groupby(["variant", "layer"])]
    return evaluate(plan, jobs)


def evaluate(plan: AnalysisPlan, jobs: list[tuple[PlannedClaim, Callable[[], Measured | TestResult], str]]
             ) -> pd.DataFrame:
    """Run each job's measure and its planned test, then Holm and the verdicts over the study;
    `jobs` are (claim, measure, label prefixed to the claim text) in table order.

    Args:
        plan: the plan the claims come from (level, and the seeds every claim needs).
        jobs: (claim, a callable giving its `Measured` or `TestResult`, label) per row.

    Returns:
        The claims table (`CLAIM_TABLE_COLUMNS`).
    """
    results, rows, primary = [], [], []
    family = sum(claim.primary and claim.test != "exact" for claim, _, _ in jobs)
    needed = minimal_seeds(plan, family)
    for claim, measure, label in jobs:
        result, row = _test(claim, measure, needed)
        row |= {"section": claim.section, "key": claim.key,
                "claim": f"{label}: {claim.claim}" if label else claim.claim,
                "registered": claim.registered, "margin": claim.margin}
        results.append(result)
        rows.append(row)
        primary.append(claim.primary)
    found, p_adjusted, against_adjusted = verdicts(results, primary, plan.alpha)
    m = max(1, int(np.isfinite(p_adjusted).sum()))
    for row, result, verdict, adjusted, against in zip(rows, results, found, p_adjusted, against_adjusted):
        row |= {"verdict": verdict, "p_adjusted": adjusted, "p_against_adjusted": against,
                "rule": "exact check: supported when it holds on every run, else contradicted"
                if result is not None and result.holds is not None else RULE.format(alpha=plan.alpha)}
        direction = plan.claim(row["key"]).direction
        if result is not None and result.holds is None and direction:
            row["seeds_for_80pct_power"] = seeds_for_power(direction * result.value, result.sd, plan.alpha / m)
    return pd.DataFrame(rows, columns=list(CLAIM_TABLE_COLUMNS))


def _test(claim: PlannedClaim, measure: Callable[[], Measured | TestResult], needed: int
          ) -> tuple[TestResult | None, dict]:
    """The claim's test on its measure, or None and a row saying in words why it was not tested."""
    notes = [claim.note] if claim.note else []
    empty = {"statistic": claim.statistic, "value": math.nan, "n": "", "test": claim.test, "p": math.nan,
             "p_against": math.nan, "ci_low": math.nan, "ci_high": math.nan, "seeds_for_80pct_power": math.nan}
    try:
        measured = measure()
    except ValueError as error:
        return None, {**empty, "note": "; ".join([*notes, f"not tested: {error}"])}
    except KeyError as error:  # pandas names the missing label
        missing = error.args[0] if error.args else ""
        missing = ", ".join(map(str, missing)) if isinstance(missing, (list, tuple)) else str(missing)
        return None, {**empty, "note": "; ".join([*notes, f"not tested: the tables lack {missing}"])}
    if isinstance(measured, TestResult):
        result = measured
        if result.holds is None and result.n < 2:
            notes.append(_one_seed(result.n, needed))
    else:
        values = measured.values.dropna()
        notes += [text for text in (measured.detail, measured.untestable) if text]
        n = len(values)
        shown = {**empty, "value": float(values.mean()) if n else math.nan, "n": _count(n, "seed"),
                 "test": measured.test}
        if measured.untestable:
            return None, {**shown, "note": "; ".join(notes)}
        if n < 2:
            notes.append(_one_seed(n, needed))
            return None, {**shown, "note": "; ".join(notes)}
        result = t_test(values.to_numpy(), claim.direction, margin=claim.margin, statistic=claim.statistic,
                        test=measured.test)
        if not result.sd > 0:
            notes.append("every seed gives the same value: a t-test cannot judge identical values")
    row = {"statistic": result.statistic if result.holds is None else claim.statistic,
           "value": result.value, "n": _count(result.n, "run" if result.holds is not None else "seed"),
           "test": result.test, "p": result.p, "p_against": result.p_against, "ci_low": result.ci_low,
           "ci_high": result.ci_high, "seeds_for_80pct_power": math.nan, "note": "; ".join(notes)}
    return result, row

