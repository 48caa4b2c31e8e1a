"""The claims table on synthetic tables whose answers are known: each verdict, Holm, the one-seed
report, the split-half Haviv test, the ceiling rule and the rebound on planted curves."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from poslens.analyses.claims import CLAIM_TABLE_COLUMNS, _haviv, missed_criterion, rebound_claims, reproduce_claims
from poslens.analyses.measures.entropy import dip_and_rise
from poslens.analyses.plan import REPRODUCE_PLAN
from poslens.analyses.stats import t_test

NOPE, CUT0, CUT01, LEARNED, BIDIR, SHIFTED = ("nope-causal", "nope-causal+cut0", "nope-causal+cut0,1",
                                             "learned-causal", "nope-bidirectional", "nope-causal@shifted")
SITES = [f"blocks.{block}.hook_resid_post" for block in range(4)]
FIRST = SITES[0]
REPRS = ("dtype", "Name:", "array(", "Series(", "tensor(")


def synthetic(seeds: int, *, effect: float = 1.0, noise: float = 0.01) -> dict[str, pd.DataFrame]:
    """Merged reproduce tables in which every primary claim holds (`effect` 1) or is reversed
    (`effect` −1), with seed-to-seed noise of `noise` and a seed effect shared by the arms."""
    rng = np.random.default_rng(0)
    jitter = lambda: float(rng.normal(0, noise))  # noqa: E731
    shared = rng.normal(0, 0.05, seeds)  # a seed's effect, common to its variants (the pairing)
    training = pd.DataFrame([{"variant": variant, "seed": seed, "learned": variant != BIDIR,
                              "exact_match": (1.0 if variant != BIDIR else 0.1 + jitter()),
                              "mean_exact_match": 0.6 + shared[seed] - (0.2 * effect if "+" in variant else 0)
                              + jitter()}
                             for variant in (NOPE, CUT0, CUT01, LEARNED, BIDIR, SHIFTED) for seed in range(seeds)])
    invariance = pd.DataFrame([{"variant": variant, "seed": seed, "weights": weights, "n_layers": 2,
                                "max_abs_delta": 1e-15 if variant == BIDIR or weights == "random, 1 layer" else 0.3,
                                "invariant": variant == BIDIR or weights == "random, 1 layer"}
                               for variant in (NOPE, LEARNED, BIDIR) for seed in range(seeds)
                               for weights in ("trained", "random",
                                               *(("random, 1 layer",) if variant == NOPE else ()))])
    symmetry = pd.DataFrame([{"encoding": encoding, "attention": attention, "weights": "random", "n_layers": depth,
                              "max_abs_delta": 1e-15 if invariant else 0.2, "invariant": invariant, "seed": seed}
                             for seed in range(seeds) for encoding in ("nope", "learned", "sinusoidal", "rotary")
                             for attention in ("causal", "bidirectional") for depth in (1, 2)
                             for invariant in [encoding == "nope" and (attention == "bidirectional" or depth == 1)]])
    probe = []
    for seed in range(seeds):
        peak = {NOPE: [0.9, 0.97, 0.95, 0.9], SHIFTED: [0.8, 0.9, 0.85, 0.9 - 0.1 * effect],
                CUT0: [0.8, 0.85, 0.85, 0.9 - 0.1 * effect], CUT01: [0.8, 0.85, 0.85, 0.9 - 0.1 * effect]}
        for variant, accuracies in peak.items():
            for site, accuracy in zip(SITES, accuracies):
                bars = {"trained": accuracy + shared[seed] / 5 + jitter(), "random_init": 0.6 + 0.2 * effect + jitter(),
                        "token_identity": 0.31, "role_identity": 0.5, "bag_of_prefix": 0.6}
                if variant == NOPE:
                    bars["trained"] = 0.95 + jitter()  # the intact model at the last block: cut models read less
                probe += [{"variant": variant, "seed": seed, "site": site, "layer": float(SITES.index(site) + 1),
                           "probe": "position", "metric": "accuracy", "value": value, "baseline": baseline}
                          for baseline, value in bars.items()]
    correlation = pd.DataFrame([{"variant": variant, "seed": seed, "site": site, "weights": weights,
                                 "score": "contrast", "excess": (0.05 if weights == "random_init" else
                                                                 0.2 - (0.1 * effect if "+" in variant else 0))
                                 + jitter()}
                                for variant in (NOPE, CUT0, CUT01) for seed in range(seeds) for site in SITES
                                for weights in ("trained", "random_init")])
    geometry = pd.DataFrame([{"variant": variant, "seed": seed, "site": site, "weights": weights, "score": score,
                              "excess": value * effect + jitter()}
                             for seed in range(seeds)
                             for variant, site, weights, score, value in (
                                 (NOPE, "blocks.0.hook_resid_mid", "random_init", "variance_slope", -0.5),
                                 (NOPE, SITES[-1], "trained", "adjacency", 0.1),
                                 (SHIFTED, SITES[-1], "trained", "adjacency", 0.2),
                                 (SHIFTED, SITES[-1], "random_init", "adjacency", 0.05))])
    shift = pd.DataFrame([{"variant": SHIFTED, "seed": seed, "site": FIRST, "baseline": baseline, "value": value}
                          for seed in range(seeds) for baseline, value in (
                              ("trained", 0.2 + 0.5 * effect + jitter()), ("token_identity", 0.21),
                              ("bag_of_prefix", 1.0), ("chance", 0.2))])
    return {"training": training, "invariance": invariance, "symmetry": symmetry, "probe": pd.DataFrame(probe),
            "correlation": correlation, "geometry": geometry, "shift_probe": shift}


def test_every_primary_claim_is_supported_where_the_tables_say_so():
    claims = reproduce_claims(synthetic(5))
    assert list(claims.columns) == list(CLAIM_TABLE_COLUMNS) and len(claims) == len(REPRODUCE_PLAN.claims)
    by_key = claims.set_index("key")
    primary = [claim.key for claim in REPRODUCE_PLAN.primary]
    assert (by_key.loc[primary, "verdict"] == "supported").all(), by_key.loc[primary, ["verdict", "p", "note"]]
    assert (by_key.loc[[k for k in by_key.index if k.startswith("symmetry")], "verdict"] == "supported").all()
    secondary = [claim.key for claim in REPRODUCE_PLAN.claims if not claim.primary]
    assert (by_key.loc[secondary, "verdict"] == "secondary").all() and by_key.loc[secondary, "p_adjusted"].isna().all()
    tested = by_key.loc[primary]
    assert (tested["p_adjusted"] >= tested["p"]).all() and tested["p_adjusted"].max() <= 0.05
    assert tested["p"].min() * len(primary) == pytest.approx(tested["p_adjusted"].min())  # Holm's first step
    assert tested["test"].str.contains("paired t-test").sum() == 8 and (tested.drop("haviv")["n"] == "5 seeds").all()
    assert by_key.loc["haviv", "n"] == "3 seeds" and "chosen on seed(s) 0, 1" in by_key.loc["haviv", "note"]
    assert "not testable with this measure" in by_key.loc["shift_content", "note"]  # the bar is at ceiling
    assert by_key.loc["haviv_middle_fixed", "registered"].startswith("after the data were seen")
    assert "confirm on fresh seeds 5–9" in by_key.loc["haviv_middle_fixed", "registered"]
    assert (tested["seeds_for_80pct_power"] >= 2).all()
    text = claims.astype(str).to_string()
    assert not any(marker in text for marker in REPRS)


def test_effects_the_other_way_are_contradicted_and_a_broken_symmetry_too():
    tables = synthetic(5, effect=-1.0)
    tables["invariance"].loc[tables["invariance"]["variant"] == BIDIR, ["invariant", "max_abs_delta"]] = [False, 0.2]
    by_key = reproduce_claims(tables).set_index("key")
    for key in ("convergence_cut0", "slices_level_cut01", "slices_position_cut0", "chi", "haviv", "variance_slope",
                "adjacency"):
        assert by_key.loc[key, "verdict"] == "contradicted", (key, by_key.loc[key, ["p", "p_against", "note"]])
    assert by_key.loc["symmetry_bidirectional", "verdict"] == "contradicted"
    assert by_key.loc["symmetry_pe", "verdict"] == "supported"


def test_holm_makes_marginal_claims_inconclusive():
    """Two claims with raw p about 0.03 beside eleven strong ones: Holm holds the smaller of
    the two to 0.05 / 2, so neither is supported, though each would be alone at 0.05."""
    tables = synthetic(5)
    training = tables["training"]
    intact = training.loc[training["variant"] == NOPE, "mean_exact_match"].to_numpy()
    for variant in (CUT0, CUT01):
        training.loc[training["variant"] == variant, "mean_exact_match"] = intact + np.array(
            [-0.02, -0.01, 0.004, -0.015, -0.012])
    rows = reproduce_claims(tables).set_index("key").loc[["convergence_cut0", "convergence_cut01"]]
    assert (rows["p"] < 0.05).all() and (rows["p_adjusted"] > 0.05).all()
    assert (rows["verdict"] == "inconclusive").all()


def test_one_seed_shows_its_value_and_says_how_many_seeds_would_decide():
    claims = reproduce_claims(synthetic(1)).set_index("key")
    t_rows = claims.loc[[claim.key for claim in REPRODUCE_PLAN.claims if claim.test in ("t", "split_half_t")]]
    assert (t_rows["verdict"].isin(["inconclusive", "secondary"])).all()
    assert t_rows["value"].notna().all() and (t_rows["n"] == "1 seed").all()
    decided = t_rows[~t_rows["note"].str.contains("not testable with this measure")]
    assert decided["note"].str.contains("n = 1 cannot decide this claim").all()
    assert decided["note"].str.contains("this plan needs 3 seeds per variant").all()
    assert claims.loc["convergence_cut0", "value"] == pytest.approx(-0.2, abs=0.05)
    assert (claims.loc[[key for key in claims.index if key.startswith("symmetry")], "verdict"] == "supported").all()
    text = claims.astype(str).to_string()
    assert not any(marker in text for marker in REPRS), text


def test_a_missing_table_is_said_in_words():
    tables = synthetic(5)
    del tables["shift_probe"]
    row = reproduce_claims(tables).set_index("key").loc["shift"]
    assert row["verdict"] == "inconclusive"
    assert row["note"] == ("not tested: these results have no shift_probe table "
                           "(measured before analysis plan version 3?)")


def test_late_layer_loss_is_not_found_in_flat_noise_and_the_peak_is_chosen_on_other_seeds():
    """Twelve block outputs that decode position equally well up to noise, 10 seeds, 100
    studies: the split-half test finds a loss about as often as its level allows (expected 5),
    while each seed's best earlier block would beat the last in nearly every study."""
    found, biased = 0, 0
    for study in range(100):
        rng = np.random.default_rng(study)
        flat = pd.DataFrame([{"variant": SHIFTED, "seed": seed, "site": f"blocks.{block}.hook_resid_post",
                              "probe": "position", "metric": "accuracy", "value": 0.95 + rng.normal(0, 0.01),
                              "baseline": "trained"} for seed in range(10) for block in range(12)])
        measured = _haviv(flat, SHIFTED)
        found += t_test(measured.values, -1).p <= 0.05
        values = flat.pivot(index="seed", columns="site", values="value")
        best_earlier = values[[f"blocks.{block}.hook_resid_post" for block in range(11)]].max(axis=1)
        biased += t_test(values["blocks.11.hook_resid_post"] - best_earlier, -1).p <= 0.05
    assert found <= 10 and biased >= 95, (found, biased)
    assert list(measured.values.index) == [5, 6, 7, 8, 9] and "chosen on seed(s) 0, 1, 2, 3, 4" in measured.detail


def test_ceiling_makes_a_position_sensitive_measure_untestable():
    tables = synthetic(5)
    probe = tables["probe"]
    probe.loc[probe["baseline"] == "trained", "value"] = 1.0
    row = reproduce_claims(tables).set_index("key").loc["slices_position_cut01"]
    assert row["verdict"] == "inconclusive" and row["note"].endswith(
        "not testable with this measure: both arms are at ceiling (>= 0.99) on every seed")


def test_claims_can_be_confirmed_on_fresh_seeds_alone():
    claims = reproduce_claims(synthetic(10), seeds=range(5, 10)).set_index("key")
    assert claims.loc["learning", "n"] == "5 seeds" and claims.loc["haviv", "note"].startswith(
        "peak blocks.")
    assert "chosen on seed(s) 5, 6" in claims.loc["haviv", "note"]


def test_missed_criterion_lines():
    training = pd.DataFrame([{"variant": "learned-causal@shifted", "seed": 0, "exact_match": 0.852, "learned": False},
                             {"variant": NOPE, "seed": 0, "exact_match": 1.0, "learned": True},
                             {"variant": BIDIR, "seed": 1, "exact_match": 0.05, "learned": False}])
    assert missed_criterion(training, 0.99, (BIDIR,)) == [
        "learned-causal@shifted seed 0 ended at 0.852 held-out exact match, below the 0.99 criterion",
        "nope-bidirectional seed 1 ended at 0.050 held-out exact match, below the 0.99 criterion (expected: the claim "
        "is that it cannot learn)"]


# the JoMA rebound on planted curves ----------------------------------------------------------------------------------

STEPS = 12


def planted(kind: str, seeds: int, noise: float = 0.03, seed: int = 0) -> pd.DataFrame:
    """The rebound table of `seeds` planted entropy curves of `STEPS` snapshots, two layers."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 1, STEPS)
    shape = {"flat": np.full(STEPS, 1.5), "falls": 1.0 + np.exp(-5 * t), "rebound": 1.0 + 4 * (t - 0.4) ** 2,
             "falls_then_flat": np.where(t < 0.3, 2.0 - 3 * t, 1.1)}[kind]
    rows = [{"variant": kind, "seed": index, "layer": layer, "measure": "nats_loss",
             **dip_and_rise(shape + rng.normal(0, noise, STEPS))} for index in range(seeds) for layer in (0, 1)]
    return pd.DataFrame(rows)


@pytest.mark.parametrize("kind", ["flat", "falls", "falls_then_flat"])
@pytest.mark.parametrize("seeds", [5, 10, 50, 400])
def test_no_rebound_is_never_supported_at_any_seed_count(kind, seeds):
    claims = rebound_claims(planted(kind, seeds, seed=seeds))
    assert len(claims) == 2 and not (claims["verdict"] == "supported").any(), claims[["claim", "value", "p"]]


def test_a_real_rebound_is_found_at_five_seeds_and_noise_alone_never():
    claims = rebound_claims(planted("rebound", 5))
    assert (claims["verdict"] == "supported").all(), claims[["value", "p", "p_adjusted"]]
    assert claims["claim"].str.startswith("rebound, layer ").all() and (claims["n"] == "5 seeds").all()
    noiseless = dip_and_rise(np.full(STEPS, 1.5))
    assert noiseless == {"dip": 0.0, "rise": 0.0, "noise": 0.0, "rebound_excess": 0.0}
    flat = [dip_and_rise(1.5 + np.random.default_rng(k).normal(0, 0.03, STEPS))["rebound_excess"] for k in range(400)]
    assert np.mean(flat) < 0  # the minimum read off other snapshots than it was found on: no selection bias
