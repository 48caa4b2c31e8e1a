"""The probe sweep: tidy schema, honest controls, and what a NoPE-bidirectional model cannot do."""

from dataclasses import dataclass

import pandas as pd
import pytest
import torch

from poslens.analyses.measures.probe_sweep import (
    PROBE_POSITION_COLUMNS,
    probe_table,
    run_probe_sweep,
    sidecar_paths,
)
from poslens.analyses.tables import (
    PROBE_COLUMNS,
    export_table,
    read_table,
    side_by_side,
    validate_probe_table,
    wide_table,
)
from poslens.hooks import capture_residuals
from poslens.tasks import Addition
from poslens.variants import build, load


@pytest.fixture(scope="module")
def sweep(trained_runs, addition):
    models = {"nope-bidirectional": [load(trained_runs[("nope-bidirectional", 2)])],
              "nope-causal": [load(trained_runs[("nope-causal", 2)])],
              "learned-causal": [load(trained_runs[("learned-causal", 2)])]}
    return probe_table(models, addition, n_sequences=240, quiet=True)


def value(table, variant, site, probe="position", metric="accuracy", baseline="trained"):
    rows = table.query("variant == @variant and site == @site and probe == @probe and metric == @metric "
                       "and baseline == @baseline")
    assert len(rows) == 1
    return rows["value"].item()


def test_sweep_has_the_stable_schema(sweep):
    assert list(sweep.columns) == list(PROBE_COLUMNS)
    validate_probe_table(sweep)
    assert set(sweep["baseline"]) == {"trained", "random_init", "token_identity", "bag_of_prefix", "chance"}
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
    # The bag-of-prefix bar sees the token too, and the share of `+` and `=` in the prefix: a higher bar.
    assert value(sweep, "nope-causal", "embed", baseline="bag_of_prefix") > token_identity + 0.2
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
    table = probe_table(models, addition, n_sequences=40, controls=("chance",), sites=["embed"], quiet=True)
    assert sorted(table["seed"].unique()) == [0, 1]
    for suffix in (".csv", ".json"):
        pd.testing.assert_frame_equal(read_table(export_table(table, tmp_path / f"t{suffix}")), table)


def test_sweep_rejects_bad_input(tiny, addition):
    model = build(tiny("nope-causal"))
    with pytest.raises(ValueError, match=r"unknown controls \['shuffle'\]; allowed"):
        probe_table({"x": [model]}, addition, controls=("shuffle",))
    with pytest.raises(ValueError, match="at least one model"):
        probe_table({"x": []}, addition)
    with pytest.raises(ValueError, match="need at least 4 sequences"):
        probe_table({"x": [model]}, addition, n_sequences=2)
    with pytest.raises(ValueError, match="sites must be distinct and among"):
        probe_table({"x": [model]}, addition, n_sequences=8, sites=["blocks.9.hook_resid_post"])


def test_side_by_side_puts_each_variant_beside_its_untrained_twin(sweep):
    table = side_by_side(sweep)
    assert list(table.columns) == ["nope-bidirectional", "nope-bidirectional (random init)", "nope-causal",
                                   "nope-causal (random init)", "learned-causal", "learned-causal (random init)",
                                   "token identity", "chance"]
    assert table.loc["embed", "chance"] == "0.083"
    assert (float(table.loc["embed", "learned-causal"])
            == pytest.approx(value(sweep, "learned-causal", "embed"), abs=5e-4))


# ---------------------------------------------------------------- by position, roles, metadata

ROLES = torch.tensor([0, 0, 0, 1, 0, 0, 0, 2, 3, 3, 3, 3])  # operand digit, +, =, answer digit


@dataclass(frozen=True)
class RoleAddition(Addition):
    """Addition with coarse role labels, in the form a task exposes them (`role_labels`, `role_names`)."""

    role_names = ("operand", "+", "=", "answer")

    def role_labels(self, tokens: torch.Tensor) -> torch.Tensor:
        return ROLES.expand_as(tokens)


@pytest.fixture(scope="module")
def full(trained_runs):
    models = {"learned-causal": [load(trained_runs[("learned-causal", 2)])],
              "nope-bidirectional": [load(trained_runs[("nope-bidirectional", 2)])]}
    return run_probe_sweep(models, RoleAddition(), n_sequences=160, targets=("position", "role"), quiet=True)


def test_by_position_rows_average_to_the_per_site_values(full):
    by_position = full.by_position
    assert list(by_position.columns) == list(PROBE_POSITION_COLUMNS)
    keys = ["variant", "seed", "site", "probe", "position", "metric", "baseline"]
    assert not by_position.duplicated(keys).any()
    assert set(by_position["position"]) == set(range(12))
    assert set(by_position["baseline"]) == {"trained", "random_init", "token_identity", "role_identity",
                                            "bag_of_prefix", "chance"}
    # knowing only the role: `+` and `=` have one place each, an operand digit one of 6, an answer digit one of 4
    role_identity = full.table.query("baseline == 'role_identity' and metric == 'accuracy'")["value"]
    assert role_identity.tolist() == pytest.approx([(1 + 1 + 6 / 6 + 4 / 4) / 12] * len(role_identity), abs=1e-9)
    assert set(zip(by_position["probe"], by_position["metric"])) == {("position", "accuracy"), ("position", "mad"),
                                                                      ("role", "accuracy")}
    means = by_position.groupby(["variant", "seed", "site", "probe", "metric", "baseline"])["value"].mean()
    table = full.table.set_index(["variant", "seed", "site", "probe", "metric", "baseline"])["value"]
    assert means.index.isin(table.index).all()
    for key, value in means.items():  # role chance is the majority rate per site, a random draw per position
        if key[3:6:2] != ("role", "chance"):
            assert value == pytest.approx(table[key], abs=1e-9), key
    chance = by_position.query("probe == 'position' and baseline == 'chance' and site == 'embed' "
                               "and variant == 'learned-causal'")
    assert chance.query("metric == 'accuracy'")["value"].tolist() == pytest.approx([1 / 12] * 12)
    t = torch.arange(12.0)
    assert chance.query("metric == 'mad'")["value"].tolist() == pytest.approx(
        [(t - position).abs().mean().item() for position in range(12)])


def test_by_position_finds_what_is_planted(full):
    def curve(variant, baseline, probe="position", metric="accuracy", site="embed"):
        rows = full.by_position.query("variant == @variant and baseline == @baseline and probe == @probe "
                                      "and metric == @metric and site == @site")
        return rows.sort_values("position")["value"].tolist()

    assert curve("learned-causal", "trained") == [1.0] * 12  # a learned PE: every position readable everywhere
    assert curve("learned-causal", "trained", metric="mad") == [0.0] * 12
    identity = curve("learned-causal", "token_identity")
    assert identity[3] == identity[7] == 1.0 and max(identity[:3] + identity[4:7]) < 0.5  # + and = give themselves away
    assert curve("learned-causal", "token_identity", probe="role")[3] == 1.0
    assert curve("learned-causal", "trained", probe="role") == pytest.approx([1.0] * 12, abs=0.05)


def test_role_probes_and_their_controls(full):
    roles = full.table.query("probe in ['role', 'role_control']")
    assert set(roles["metric"]) == {"accuracy", "selectivity"}
    for variant in ("learned-causal", "nope-bidirectional"):  # noqa: B007 (read by query as @variant)
        rows = full.table.query("variant == @variant and baseline == 'trained' and site == 'embed'").set_index(
            ["probe", "metric"])["value"]
        assert rows[("role", "selectivity")] == pytest.approx(rows[("role", "accuracy")] - rows[("role_control",
                                                                                                  "accuracy")])
    chance = full.table.query("probe == 'role' and baseline == 'chance'")["value"].unique()
    assert chance.tolist() == pytest.approx([6 / 12])  # the majority role, operand digits, fill half the positions


def test_no_role_labels_falls_back_to_position(tiny):
    tokens = torch.randint(12, (40, 12), generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="have no role labels"):
        result = run_probe_sweep({"nope": [build(tiny("nope-bidirectional"))]}, tokens, targets=("position", "role"),
                              controls=("chance",), quiet=True)
    assert set(result.table["probe"]) == {"position", "position_ridge"}
    # random tokens carry no position, and a NoPE bidirectional model cannot add any
    accuracy = result.table.query("baseline == 'trained' and probe == 'position' and metric == 'accuracy'")["value"]
    assert accuracy.max() < 1 / 12 + 0.08
    with pytest.raises(ValueError, match=r"unknown targets \['digit'\]; allowed: \['position', 'role'\]"):
        run_probe_sweep({"nope": [build(tiny("nope-causal"))]}, tokens, targets=("digit",))


def test_models_table_and_export_of_all_three(full, tmp_path):
    assert full.models.set_index("variant")["pe_kind"].to_dict() == {"learned-causal": "learned",
                                                                       "nope-bidirectional": "none"}
    paths = full.export(tmp_path / "probe.json")
    assert [path.name for path in paths] == ["probe.json", "probe.by_position.json", "probe.models.json"]
    pd.testing.assert_frame_equal(read_table(paths[1]), full.by_position)
    assert sidecar_paths(tmp_path / "probe.json")["models"] == paths[2]
    paths[0].unlink()
    with pytest.raises(FileExistsError, match="probe.by_position.json already exists"):
        full.export(tmp_path / "probe.json")
    assert not paths[0].exists()  # refused before writing anything
