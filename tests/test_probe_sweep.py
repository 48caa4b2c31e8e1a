"""The probe sweep: tidy schema, honest controls, and what a NoPE-bidirectional model cannot do."""

import pandas as pd
import pytest
import torch

from poslens.analyses.measures.probe_sweep import probe_sweep
from poslens.analyses.tables import (
    PROBE_COLUMNS,
    export_table,
    read_table,
    side_by_side,
    validate_probe_table,
    wide_table,
)
from poslens.hooks import capture_residuals
from poslens.variants import build, load


@pytest.fixture(scope="module")
def sweep(trained_runs, addition):
    models = {"nope-bidirectional": [load(trained_runs[("nope-bidirectional", 2)])],
              "nope-causal": [load(trained_runs[("nope-causal", 2)])],
              "learned-causal": [load(trained_runs[("learned-causal", 2)])]}
    return probe_sweep(models, addition, n_sequences=240, quiet=True)


def value(table, variant, site, probe="position", metric="accuracy", baseline="trained"):
    rows = table.query("variant == @variant and site == @site and probe == @probe and metric == @metric "
                       "and baseline == @baseline")
    assert len(rows) == 1
    return rows["value"].item()


def test_sweep_has_the_stable_schema(sweep):
    assert list(sweep.columns) == list(PROBE_COLUMNS)
    validate_probe_table(sweep)
    assert set(sweep["baseline"]) == {"trained", "random_init", "token_identity", "chance"}
    assert set(sweep["probe"]) == {"position", "position_control", "position_ridge"}
    assert set(sweep["site"]) == {"embed"} | {f"blocks.{b}.hook_resid_{s}" for b in range(2) for s in ("mid", "post")}
    assert wide_table(sweep).shape == (5, 3)


def test_sweep_values_make_sense(sweep):
    chance = value(sweep, "nope-causal", "embed", baseline="chance")
    assert chance == pytest.approx(1 / 12)
    assert value(sweep, "nope-causal", "embed", metric="mad", baseline="chance") == pytest.approx(143 / 36)
    # A learned positional embedding makes position linearly readable from the first site.
    assert value(sweep, "learned-causal", "embed") > 0.95
    # NoPE's embedding stream is the token embedding: exactly the token-identity information.
    token_identity = value(sweep, "nope-causal", "embed", baseline="token_identity")
    assert abs(value(sweep, "nope-causal", "embed") - token_identity) < 0.03
    # Causal attention writes position into the stream of a NoPE model.
    assert value(sweep, "nope-causal", "blocks.1.hook_resid_post") > token_identity + 0.2
    for site in sweep["site"].unique():
        selectivity = value(sweep, "nope-causal", site, metric="selectivity")
        control = value(sweep, "nope-causal", site, probe="position_control")
        assert selectivity == pytest.approx(value(sweep, "nope-causal", site) - control)


def test_nope_bidirectional_cannot_beat_token_identity(sweep, trained_runs, addition):
    model = load(trained_runs[("nope-bidirectional", 2)])
    tokens = addition.test_set()[:64]
    capture = capture_residuals(model, tokens)
    for sequence in range(len(tokens)):
        row = tokens[sequence]
        same = [(i, j) for i in range(len(row)) for j in range(i + 1, len(row)) if row[i] == row[j]]
        for i, j in same:
            torch.testing.assert_close(capture.activations[:, sequence, i], capture.activations[:, sequence, j],
                                       atol=1e-6, rtol=0)
    token_identity = value(sweep, "nope-bidirectional", "embed", baseline="token_identity")
    for site in sweep["site"].unique():
        assert value(sweep, "nope-bidirectional", site) <= token_identity + 0.03, site


def test_seeds_are_rows_and_export_round_trips(tiny, tmp_path, addition):
    models = {"nope-causal": [build(tiny("nope-causal", seed=seed)) for seed in (0, 1)]}
    table = probe_sweep(models, addition, n_sequences=40, controls=("chance",), sites=["embed"], quiet=True)
    assert sorted(table["seed"].unique()) == [0, 1]
    for suffix in (".csv", ".json"):
        pd.testing.assert_frame_equal(read_table(export_table(table, tmp_path / f"t{suffix}")), table)


def test_sweep_rejects_bad_input(tiny, addition):
    model = build(tiny("nope-causal"))
    with pytest.raises(ValueError, match=r"unknown controls \['shuffle'\]; allowed"):
        probe_sweep({"x": [model]}, addition, controls=("shuffle",))
    with pytest.raises(ValueError, match="at least one model"):
        probe_sweep({"x": []}, addition)
    with pytest.raises(ValueError, match="need at least 4 sequences"):
        probe_sweep({"x": [model]}, addition, n_sequences=2)
    with pytest.raises(ValueError, match="sites must be distinct and among"):
        probe_sweep({"x": [model]}, addition, n_sequences=8, sites=["blocks.9.hook_resid_post"])


def test_side_by_side_puts_each_variant_beside_its_untrained_twin(sweep):
    table = side_by_side(sweep)
    assert list(table.columns) == ["nope-bidirectional", "nope-bidirectional (random init)", "nope-causal",
                                   "nope-causal (random init)", "learned-causal", "learned-causal (random init)",
                                   "token identity", "chance"]
    assert table.loc["embed", "chance"] == "0.083"
    assert float(table.loc["embed", "learned-causal"]) == pytest.approx(value(sweep, "learned-causal", "embed"), abs=5e-4)
