"""The claims poslens tests, each turned into one row of a verdict table, computed from the tables.

Every claim names its statistic, the test (`analyses.stats`), n (seeds) and the verdict by the
stated rule; nothing is written by hand. A claim that cannot be tested on the data at hand (one
seed, a variant not run) is *inconclusive* with the reason in its `test` column. The claims
are those of Zuo & Guerzhoy (the symmetry theorem, NoPE-causal learning, residual connections
and "vertical slices") and of the papers set beside them (docs/background.md): Chi et al.'s
random-init signal, Haviv et al.'s late-layer loss, Zuo et al.'s adjacency, JoMA's dip and
rebound (from `poslens dynamics`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

from poslens.analyses.stats import (
    CLAIM_COLUMNS,
    TestResult,
    claim_row,
    compare,
    exact_check,
    fisher_learned,
    one_sample,
)

FIRST_CAUSAL_SITE = "blocks.0.hook_resid_post"  # the stream after one causal attention layer and its MLP
CLAIM_TABLE_COLUMNS = ("section", *CLAIM_COLUMNS)


def _row(section: str, claim: str, direction: int, test: Callable[[], TestResult]) -> dict:
    """`claim_row` of `test()`, or an inconclusive row saying why the test could not run."""
    try:
        return {"section": section, **claim_row(claim, test(), direction)}
    except (ValueError, KeyError) as error:
        return {"section": section, "claim": claim, "statistic": "", "value": np.nan, "n": "", "p": np.nan,
                "ci_low": np.nan, "ci_high": np.nan, "verdict": "inconclusive", "n_needed": np.nan,
                "test": f"not tested: {error}", "rule": "a claim that cannot be tested on these runs is inconclusive"}


def _per_seed(table: pd.DataFrame, value: str, **where: object) -> pd.Series:
    """`value` of the rows matching `where`, indexed by seed (one row per seed)."""
    rows = table
    for column, wanted in where.items():
        rows = rows[rows[column] == wanted]
    if rows.empty:
        raise ValueError(f"no rows with {where}")
    return rows.set_index("seed")[value].sort_index()


def _probe(probe: pd.DataFrame, variant: str, site: str, baseline: str, metric: str = "accuracy",
           target: str = "position") -> pd.Series:
    return _per_seed(probe, "value", variant=variant, site=site, baseline=baseline, metric=metric, probe=target)


def _invariance(invariance: pd.DataFrame, variants: tuple[str, ...], weights: tuple[str, ...],
                invariant: bool) -> TestResult:
    rows = invariance[invariance["variant"].isin(variants) & invariance["weights"].isin(weights)]
    if rows.empty:
        raise ValueError(f"no invariance rows for {variants} with weights {weights}")
    holds = bool((rows["invariant"] == invariant).all())
    return exact_check("max |Δ last-position logit| over permutations", float(rows["max_abs_delta"].max()
                       if invariant else rows["max_abs_delta"].min()), holds, len(rows))


def _last_minus_middle(probe: pd.DataFrame, variant: str) -> pd.Series:
    """Per seed: position-probe accuracy at the last block's output minus at the middle block's
    (block (n_blocks − 1) // 2). The reference site is fixed in advance: against the best of the
    earlier sites, the last would lose by the noise the maximum selects even where nothing is lost."""
    blocks = probe.loc[probe["variant"] == variant, "site"].str.extract(r"^blocks\.(\d+)\.", expand=False).dropna()
    if blocks.empty:
        raise ValueError(f"no probe rows for {variant}")
    n_blocks = 1 + blocks.astype(int).max()
    if n_blocks < 2:
        raise ValueError(f"{variant} has one block: no middle block to compare its last with")
    last, middle = f"blocks.{n_blocks - 1}.hook_resid_post", f"blocks.{(n_blocks - 1) // 2}.hook_resid_post"
    return _probe(probe, variant, last, "trained") - _probe(probe, variant, middle, "trained")


def _trained_minus_random(table: pd.DataFrame, variant: str, sites: list[str], score: str) -> pd.Series:
    """Per seed: the mean over `sites` of (trained − random-init) excess of `score` over its null."""
    rows = table[(table["variant"] == variant) & table["site"].isin(sites) & (table["score"] == score)]
    wide = rows.pivot_table(index=["seed", "site"], columns="weights", values="excess")
    if wide.empty or not {"trained", "random_init"} <= set(wide.columns):
        raise ValueError(f"no trained and random_init {score} rows for {variant}")
    return (wide["trained"] - wide["random_init"]).groupby(level="seed").mean()


def reproduce_claims(tables: dict[str, pd.DataFrame], *, nope: str = "nope-causal", learned: str = "learned-causal",
                     bidirectional: str = "nope-bidirectional", cuts: tuple[str, ...] = ("nope-causal+cut0",
                                                                                          "nope-causal+cut0,1"),
                     shifted: str = "nope-causal@shifted") -> pd.DataFrame:
    """One row per claim (`CLAIM_TABLE_COLUMNS`) from `reproduce`'s merged tables."""
    training, invariance, probe = tables["training"], tables["invariance"], tables["probe"]
    correlation, geometry = tables["correlation"], tables["geometry"]
    sites = sorted(set(correlation["site"]), key=lambda site: int(site.split(".")[1]))
    learned_count = {variant: _per_seed(training, "learned", variant=variant) for variant in (nope, bidirectional)}
    rows = [
        _row("symmetry", "Without positional encoding and without a causal mask the last position's logits are "
             "invariant to any permutation of the earlier tokens (random and trained weights)", +1,
             lambda: _invariance(invariance, (bidirectional,), ("random", "trained"), True)),
        _row("symmetry", "A causal mask (with two or more layers) or a positional encoding breaks that invariance", +1,
             lambda: _invariance(invariance, (nope, learned), ("random", "trained"), False)),
        _row("symmetry", "One causal NoPE layer is still invariant at the last position", +1,
             lambda: _invariance(invariance, (nope,), ("random, 1 layer",), True)),
        _row("learning", "NoPE-causal learns 3-digit addition (≥ 99% exact match) and NoPE-bidirectional cannot", +1,
             lambda: fisher_learned(int(learned_count[nope].sum()), len(learned_count[nope]),
                                    int(learned_count[bidirectional].sum()), len(learned_count[bidirectional]))),
    ]
    for cut in cuts:
        rows.append(_row("residual cuts", f"Removing residual connections ({cut.split('+')[1]}) slows convergence: "
                         "a lower mean held-out exact match over training", -1,
                         lambda cut=cut: compare(_per_seed(training, "mean_exact_match", variant=cut),
                                                 _per_seed(training, "mean_exact_match", variant=nope),
                                                 statistic=f"mean exact match over training, {cut} − {nope}")))
    for cut in cuts:
        rows.append(_row("vertical slices", f"Residual connections make positions' columns more block-diagonal: with "
                         f"them removed ({cut.split('+')[1]}) training builds less block contrast", -1,
                         lambda cut=cut: compare(_trained_minus_random(correlation, cut, sites, "contrast"),
                                                 _trained_minus_random(correlation, nope, sites, "contrast"),
                                                 statistic=f"block contrast built by training (trained − random "
                                                           f"init, over its null), {cut} − {nope}")))
    rows += [
        _row("position probes", "Position is linearly decodable after the first causal layer beyond token identity",
             +1, lambda: one_sample(_probe(probe, nope, FIRST_CAUSAL_SITE, "trained")
                                    - _probe(probe, nope, FIRST_CAUSAL_SITE, "token_identity"),
                                    statistic=f"probe − token-identity accuracy at {FIRST_CAUSAL_SITE}, {nope}")),
        _row("position probes", "... and beyond the role baseline, where position and role come apart (shifted "
             "format)", +1, lambda: one_sample(_probe(probe, shifted, FIRST_CAUSAL_SITE, "trained")
                                              - _probe(probe, shifted, FIRST_CAUSAL_SITE, "role_identity"),
                                              statistic=f"probe − role-identity accuracy at {FIRST_CAUSAL_SITE}, "
                                                        f"{shifted}")),
        _row("position probes", "An untrained causal NoPE model already carries position (Chi et al.)", +1,
             lambda: one_sample(_probe(probe, nope, FIRST_CAUSAL_SITE, "random_init")
                                - _probe(probe, nope, FIRST_CAUSAL_SITE, "token_identity"),
                                statistic=f"random-init probe − token-identity accuracy at {FIRST_CAUSAL_SITE}")),
        _row("position probes", "The last layers lose some position (Haviv et al.)", -1,
             lambda: one_sample(_last_minus_middle(probe, nope),
                                statistic=f"last block's output − middle block's, position-probe accuracy, {nope}")),
        _row("geometry", "At random initialisation the residual stream's variance shrinks with position after "
             "causal attention (Chi et al.)", -1,
             lambda: one_sample(_per_seed(geometry, "excess", variant=nope, site="blocks.0.hook_resid_mid",
                                          score="variance_slope", weights="random_init"),
                                statistic="log-log slope of variance on position over its null, blocks.0 "
                                          "resid_mid, random init")),
        _row("geometry", "Neighbouring positions' hidden states are more alike than distant ones in a trained "
             "NoPE-causal model (Zuo et al. 2025)", +1,
             lambda: one_sample(_per_seed(geometry, "excess", variant=nope, site=sites[-1], score="adjacency",
                                          weights="trained"),
                                statistic=f"adjacency over its null at {sites[-1]}")),
    ]
    return pd.DataFrame(rows, columns=list(CLAIM_TABLE_COLUMNS))


def rebound_claims(rebound: pd.DataFrame) -> pd.DataFrame:
    """JoMA's "sparse, then dense" from `poslens dynamics`: per run label and layer, does attention
    entropy over the loss-bearing queries (JoMA's measure, in nats) rise after its minimum, over
    seeds? Runs labelled `...@constant-lr` are the control: a rebound there cannot be the cosine
    decay's doing."""
    rows = []
    for (variant, layer), group in rebound[rebound["measure"] == "nats_loss"].groupby(["variant", "layer"]):
        rows.append(_row("attention dynamics", f"{variant}, layer {layer}: attention entropy on loss-bearing queries "
                         "falls, then rises again (JoMA)", +1,
                         lambda group=group: one_sample(group.set_index("seed")["rebound"],
                                                        statistic="final − minimum entropy (nats)")))
    return pd.DataFrame(rows, columns=list(CLAIM_TABLE_COLUMNS))
