"""Training dynamics: attention entropy against its references, rebound and decodability on
hand-made curves, the whole walk over a tiny run's snapshots, and `poslens dynamics`."""

import json
import math

import pandas as pd
import pytest
import torch

from poslens.analyses.experiments.dynamics import training_dynamics
from poslens.analyses.experiments.presets import MARKOV_TASK, MARKOV_TRAINING
from poslens.analyses.figures.dynamics import METRIC_COLUMNS
from poslens.analyses.measures.entropy import (
    ENTROPY_COLUMNS,
    ENTROPY_SPLIT_COLUMNS,
    PROBE_STEP_COLUMNS,
    attention_entropy,
    attention_summary,
    decodable_steps,
    entropy_rebound,
    loss_queries,
    uniform_entropy_reference,
)
from poslens.analyses.tables import read_table, validate_probe_table
from poslens.tasks import MarkovICL
from poslens.variants import build, train
from poslens.variants.training import list_snapshots


def uniform_pattern(batch: int, heads: int, n: int, causal: bool) -> torch.Tensor:
    visible = torch.ones(n, n).tril() if causal else torch.ones(n, n)
    return (visible / visible.sum(-1, keepdim=True)).expand(batch, heads, n, n)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n", [2, 12, 35])
def test_uniform_attention_entropy_equals_the_reference(n, causal):
    entropy = attention_entropy(uniform_pattern(3, 2, n, causal), causal=causal)
    reference = sum(math.log(t) for t in range(1, n + 1)) / n if causal else math.log(n)
    assert uniform_entropy_reference(n, causal) == pytest.approx(reference, rel=1e-12)
    assert torch.allclose(entropy.nats, torch.full((2,), reference, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(entropy.normalised, torch.ones(2, dtype=torch.float64), atol=1e-6)


def test_entropy_reference_values_and_errors():
    assert uniform_entropy_reference(35, causal=True) == pytest.approx(2.632, abs=5e-4)  # JoMA's T = 35
    assert uniform_entropy_reference(1, causal=True) == 0.0
    with pytest.raises(ValueError, match="n_ctx must be an integer >= 1, got 0"):
        uniform_entropy_reference(0, causal=True)
    with pytest.raises(ValueError, match=r"pattern must be \[batch, head, query, key\], got shape \(4, 4\)"):
        attention_entropy(torch.ones(4, 4), causal=True)
    with pytest.raises(ValueError, match="a causal pattern must be square"):
        attention_entropy(torch.ones(1, 1, 3, 4) / 4, causal=True)


def test_one_hot_attention_has_zero_entropy_and_single_key_rows_are_left_out():
    n = 10
    previous_token = torch.zeros(2, 1, n, n)
    previous_token[:, :, 0, 0] = 1
    previous_token[:, :, torch.arange(1, n), torch.arange(n - 1)] = 1
    entropy = attention_entropy(previous_token, causal=True)
    assert entropy.nats.abs().max() < 1e-6 and entropy.normalised.abs().max() < 1e-6
    # Half the heads uniform, half one-hot: the per-head means are kept apart.
    mixed = torch.cat([uniform_pattern(2, 1, n, causal=True), previous_token], dim=1)
    entropy = attention_entropy(mixed, causal=True)
    assert entropy.normalised.tolist() == pytest.approx([1.0, 0.0], abs=1e-6)
    # A causal sequence of one token: its only query sees one key, so nothing is left to normalise.
    lonely = attention_entropy(torch.ones(1, 1, 1, 1), causal=True)
    assert lonely.nats.item() == pytest.approx(0, abs=1e-7) and math.isnan(lonely.normalised.item())


def test_a_model_with_blank_queries_attends_uniformly_and_meets_the_reference(tiny, addition):
    model = build(tiny("nope-causal"))
    with torch.no_grad():
        for block in model.blocks:
            block.attn.W_Q.zero_()
            block.attn.b_Q.zero_()
    heads, patterns = attention_summary(model, addition.test_set()[:20, :-1], batch_size=7)
    reference = uniform_entropy_reference(addition.seq_len - 1, causal=True)
    assert list(heads.columns) == ["layer", "head", "entropy_nats", "entropy_normalised"]
    assert len(heads) == model.cfg.n_layers * model.cfg.n_heads
    assert heads["entropy_nats"].to_numpy() == pytest.approx(reference, abs=1e-5)
    assert heads["entropy_normalised"].to_numpy() == pytest.approx(1.0, abs=1e-5)
    assert patterns.shape == (2, model.cfg.n_heads, 11, 11)
    assert torch.allclose(patterns[1, 0, 3], torch.tensor([0.25] * 4 + [0.0] * 7))


def test_entropy_of_loss_bearing_queries_is_kept_apart_from_the_rest(addition):
    assert loss_queries(addition) == [7, 8, 9, 10]  # `=` and the first three answer digits predict the answer
    n = addition.seq_len - 1
    # uniform attention on the loss-bearing queries, one-hot (previous token) on the others
    pattern = uniform_pattern(2, 1, n, causal=True).clone()
    rest = [q for q in range(n) if q not in loss_queries(addition)]
    pattern[:, :, rest] = 0
    pattern[:, :, rest, [max(q - 1, 0) for q in rest]] = 1
    loss = attention_entropy(pattern, causal=True, queries=loss_queries(addition))
    other = attention_entropy(pattern, causal=True, queries=rest)
    everything = attention_entropy(pattern, causal=True)
    reference = uniform_entropy_reference(n, causal=True, queries=loss_queries(addition))
    assert reference == pytest.approx(sum(math.log(q + 1) for q in range(7, 11)) / 4)
    assert (loss.nats.item() == pytest.approx(reference, abs=1e-6)
            and loss.normalised.item() == pytest.approx(1, abs=1e-6))
    assert other.nats.item() == pytest.approx(0, abs=1e-6) and other.normalised.item() == pytest.approx(0, abs=1e-6)
    assert everything.nats.item() == pytest.approx(reference * 4 / n, abs=1e-6)  # JoMA's mean dilutes it 4 / 11
    assert math.isnan(attention_entropy(pattern, causal=True, queries=[]).nats.item())
    assert uniform_entropy_reference(n, causal=False, queries=[0, 3]) == pytest.approx(math.log(n))
    with pytest.raises(ValueError, match=r"queries must be positions in 0..10, got \[11\]"):
        attention_entropy(pattern, causal=True, queries=[3, 11])


def test_attention_summary_splits_loss_bearing_queries(tiny, addition):
    model = build(tiny("nope-causal"))
    tokens = addition.sample_test(20, seed=0)[:, :-1]
    heads, _ = attention_summary(model, tokens, batch_size=7, loss_queries=loss_queries(addition))
    assert list(heads.columns) == ["layer", "head", "entropy_nats", "entropy_normalised", *ENTROPY_SPLIT_COLUMNS]
    n, n_loss = tokens.shape[1], len(loss_queries(addition))
    # JoMA's all-query mean is the query-weighted mean of the two parts
    combined = (n_loss * heads["entropy_nats_loss"] + (n - n_loss) * heads["entropy_nats_rest"]) / n
    assert heads["entropy_nats"].to_numpy() == pytest.approx(combined.to_numpy(), abs=1e-9)
    plain, _ = attention_summary(model, tokens, batch_size=7)
    assert plain["entropy_nats"].to_numpy() == pytest.approx(heads["entropy_nats"].to_numpy(), abs=1e-12)


def test_entropy_rebound_reads_the_split_measures_when_present():
    table = entropy_table({0: [2.0, 1.0, 1.5]}, steps=[0, 10, 100]).assign(
        entropy_nats_loss=lambda t: t["entropy_nats"] / 2, entropy_nats_rest=lambda t: t["entropy_nats"],
        entropy_normalised_loss=0.5, entropy_normalised_rest=0.25)
    rebound = entropy_rebound(table).set_index("measure")
    assert list(rebound.index) == ["nats", "normalised", "nats_loss", "nats_rest", "normalised_loss",
                                   "normalised_rest"]
    assert rebound.loc["nats_loss", ["min", "rebound"]].tolist() == pytest.approx([0.5, 0.25])


def entropy_table(curves: dict[int, list[float]], steps: list[int]) -> pd.DataFrame:
    rows = [{"variant": "v", "seed": 0, "step": step, "layer": layer, "head": head, "entropy_nats": value + head,
             "entropy_normalised": value / 2, "uniform_nats": 2.0}
            for layer, values in curves.items() for step, value in zip(steps, values) for head in (-0.5, 0.5)]
    return pd.DataFrame(rows, columns=list(ENTROPY_COLUMNS))


def test_entropy_rebound_names_the_minimum_and_the_share_won_back():
    table = entropy_table({0: [2.0, 1.0, 0.5, 1.0, 1.25], 1: [2.0, 1.8, 1.6, 1.4, 1.2], 2: [1.0, 1.5, 1.2, 1.1, 1.0]},
                          steps=[0, 1, 10, 100, 1000])
    rebound = entropy_rebound(table.sample(frac=1, random_state=0)).set_index(["layer", "measure"])
    columns = ["initial", "min_step", "min", "final", "rebound", "rebound_fraction"]
    assert rebound.loc[(0, "nats"), columns].tolist() == pytest.approx([2.0, 10, 0.5, 1.25, 0.75, 0.5])
    assert rebound.loc[(0, "normalised"), "rebound_fraction"] == pytest.approx(0.5)
    assert rebound.loc[(1, "nats"), ["min_step", "rebound", "rebound_fraction"]].tolist() == pytest.approx([1000, 0, 0])
    assert rebound.loc[(2, "nats"), "min_step"] == 0 and math.isnan(rebound.loc[(2, "nats"), "rebound_fraction"])
    heads = entropy_rebound(table, per_head=True).set_index(["layer", "head", "measure"])
    assert heads.loc[(0, 0.5, "nats"), ["min", "final", "rebound_fraction"]].tolist() == pytest.approx([1.0, 1.75, 0.5])
    assert len(heads) == 3 * 2 * 2
    with pytest.raises(ValueError, match=r"entropy table lacks columns \['uniform_nats'\]"):
        entropy_rebound(table.drop(columns="uniform_nats"))


def test_decodable_steps_is_the_first_step_past_token_identity_plus_margin():
    rows = []
    for step, accuracy in zip([0, 5, 50], [0.30, 0.40, 0.90]):
        for site, value in (("embed", 0.31), ("blocks.0.hook_resid_mid", accuracy)):
            for baseline, v in (("trained", value), ("token_identity", 0.31), ("chance", 0.08)):
                rows.append({"step": step, "variant": "v", "seed": 1, "site": site, "layer": 0.0 if site == "embed"
                             else 0.5, "probe": "position", "metric": "accuracy", "value": v, "baseline": baseline})
    decodable = decodable_steps(pd.DataFrame(rows, columns=list(PROBE_STEP_COLUMNS)), margins=(0.05, 0.5))
    found = decodable.set_index(["site", "margin"])["step"]
    assert found[("blocks.0.hook_resid_mid", 0.05)] == 5 and found[("blocks.0.hook_resid_mid", 0.5)] == 50
    assert math.isnan(found[("embed", 0.05)]) and math.isnan(found[("embed", 0.5)])
    assert decodable["final_accuracy"].tolist() == pytest.approx([0.31, 0.90, 0.31, 0.90])
    with pytest.raises(ValueError, match="lacks the \\['token_identity'\\] position-accuracy rows"):
        decodable_steps(pd.DataFrame([r for r in rows if r["baseline"] != "token_identity"]))


@pytest.fixture(scope="module")
def snapshot_run(tiny, tmp_path_factory, addition):
    out = tmp_path_factory.mktemp("dynamics") / "run"
    train(tiny("nope-causal"), addition, out_dir=out, steps=30, batch_size=32, lr=1e-2, warmup_steps=3,
          eval_every=30, quiet=True, snapshots=3)
    return out


def test_training_dynamics_walks_every_snapshot(snapshot_run):
    result = training_dynamics(snapshot_run, n_sequences=40, quiet=True)
    steps = [step for step, _ in list_snapshots(snapshot_run)]
    assert result.steps == steps == [0, 1, 5, 30]
    assert list(result.metrics.columns) == list(METRIC_COLUMNS) and result.metrics["step"].tolist() == steps
    assert result.metrics["test_loss"].iloc[-1] < result.metrics["test_loss"].iloc[0]
    assert list(result.entropy.columns) == [*ENTROPY_COLUMNS, *ENTROPY_SPLIT_COLUMNS]
    # the loss-bearing queries (predicting the 4 answer digits) and the rest partition every query
    split = result.entropy
    assert (split["entropy_nats"]
            - (4 * split["entropy_nats_loss"] + 7 * split["entropy_nats_rest"]) / 11).abs().max() < 1e-9
    assert len(result.entropy) == len(steps) * 2 * 4  # steps × layers × heads
    assert (result.entropy["entropy_nats"] <= result.entropy["uniform_nats"] + 1e-6).all()
    assert result.entropy["uniform_nats"].unique().tolist() == pytest.approx([uniform_entropy_reference(11, True)])
    assert list(result.probes.columns) == list(PROBE_STEP_COLUMNS)
    for _step, rows in result.probes.groupby("step"):
        validate_probe_table(rows.drop(columns="step"))
        assert set(rows["baseline"]) == {"trained", "token_identity", "chance"}
    assert result.patterns.shape == (len(steps), 2, 4, 11, 11)
    assert torch.allclose(result.patterns.sum(-1), torch.ones(()))
    assert set(result.rebound["layer"]) == {0, 1} and set(result.decodable["margin"]) == {0.05, 0.5}
    figures = result.figures()
    assert figures["attention_entropy"].layout.xaxis.type == "log"
    patterns = figures["attention_patterns"]
    assert [frame.name for frame in patterns.frames] == ["0", "1", "5", "30"]
    assert [step.label for step in patterns.layout.sliders[0].steps] == ["0", "1", "5", "30"]
    assert patterns.frames[-1].data[0].z[0][0] == pytest.approx(1.0)


def test_training_dynamics_needs_snapshots(tiny, tmp_path, addition):
    train(tiny("nope-causal", n_layers=1), addition, out_dir=tmp_path, steps=2, batch_size=8, quiet=True)
    with pytest.raises(ValueError, match="has no snapshots; train it with train"):
        training_dynamics(tmp_path, quiet=True)


@pytest.mark.slow
def test_cli_writes_outputs_and_a_rerun_resumes_without_measuring_again(run_cli, tmp_path):
    out = tmp_path / "dyn"
    args = ("dynamics", "--variant", "nope-causal", "--task", "addition", "--layers", "1", "--d-model", "32",
            "--steps", "12", "--checkpoints", "3", "--sequences", "40", "--out", str(out), "--quiet")
    code, text, err = run_cli(*args)
    assert code == 0, err
    assert text.startswith("| claim |") and "inconclusive" in text and "4 snapshots per run" in text  # one seed
    run = out / "runs" / "nope-causal-seed0"
    assert [step for step, _ in list_snapshots(run)] == [0, 1, 3, 12]
    for name in ("metrics", "probes", "entropy", "rebound", "decodable"):
        assert {(out / "tables" / f"{name}{suffix}").is_file() for suffix in (".csv", ".md", ".json")} == {True}
    assert read_table(out / "tables" / "entropy.json").equals(training_dynamics(run, n_sequences=40,
                                                                                quiet=True).entropy)
    assert {p.name for p in (out / "figures").iterdir()} >= {
        f"{name}_nope-causal.html" for name in ("training_curves", "probe_accuracy", "attention_entropy",
                                                "attention_patterns")}
    summary = (out / "summary.md").read_text()
    assert "nope-causal on addition" in summary and "uniform attention: 1.591 nats" in summary
    before = (out / "summary.md").read_bytes(), (out / "tables" / "metrics.csv").read_bytes()
    measured = {path: path.stat().st_mtime_ns for path in (run / "measures").iterdir()}
    code, _, err = run_cli(*args)  # the study output rule: a rerun resumes, it neither refuses nor re-measures
    assert code == 0, err
    assert ((out / "summary.md").read_bytes(), (out / "tables" / "metrics.csv").read_bytes()) == before
    assert {path: path.stat().st_mtime_ns for path in measured} == measured
    code, _, err = run_cli(*args, "--force")
    assert code == 0, err
    assert {path: path.stat().st_mtime_ns for path in measured} != measured  # measured again
    assert (out / "tables" / "metrics.csv").read_bytes() == before[1]  # same seed, same numbers


@pytest.mark.slow
def test_several_variants_and_seeds_in_one_study(run_cli, tmp_path):
    out = tmp_path / "study"
    code, text, err = run_cli("dynamics", "--variant", "nope-causal", "--variant", "learned-causal", "--task",
                              "addition", "--layers", "1", "--d-model", "32", "--steps", "6", "--checkpoints", "2",
                              "--seeds", "2", "--sequences", "24", "--out", str(out), "--executor", "serial", "--quiet",
                              "--constant-lr-control")
    assert code == 0, err
    control = json.loads((out / "runs" / "nope-causal@constant-lr-seed1" / "run.json").read_text())
    assert control["settings"]["lr_schedule"] == "constant" and control["config"]["seed"] == 1
    claims = read_table(out / "tables" / "claims.json")
    assert set(claims["claim"].str.split(",").str[0]) == {"nope-causal", "learned-causal", "nope-causal@constant-lr",
                                                          "learned-causal@constant-lr"}
    assert {p.name for p in (out / "runs").iterdir()} == {f"{v}{c}-seed{s}" for v in ("nope-causal", "learned-causal")
                                                          for c in ("", "@constant-lr") for s in (0, 1)}
    metrics = read_table(out / "tables" / "metrics.json")
    assert set(zip(metrics["variant"], metrics["seed"])) == {(v + c, s) for v in ("nope-causal", "learned-causal")
                                                             for c in ("", "@constant-lr") for s in (0, 1)}
    alone = training_dynamics(out / "runs" / "learned-causal-seed1", n_sequences=24, quiet=True)
    pd.testing.assert_frame_equal(metrics[(metrics["variant"] == "learned-causal") & (metrics["seed"] == 1)]
                                  .reset_index(drop=True), alone.metrics)
    assert {"probe_accuracy_nope-causal.html", "probe_accuracy_learned-causal.html"} <= {
        p.name for p in (out / "figures").iterdir()}
    rebound = read_table(out / "tables" / "rebound.json")
    assert len(rebound) == 4 * 2 * 1 * 6  # runs × seeds × layers × measures (all, loss-bearing, rest; raw, normalised)


def test_cli_rejects_bad_schedules(run_cli, tmp_path):
    base = ("dynamics", "--variant", "nope-causal", "--task", "addition", "--layers", "1", "--d-model", "32",
            "--quiet")
    code, _, err = run_cli(*base, "--checkpoints", "0", "--out", str(tmp_path / "a"))
    assert code == 2 and "--checkpoints must be >= 1, got 0" in err
    code, _, err = run_cli(*base, "--steps", "5", "--checkpoints", "9", "--out", str(tmp_path / "b"))
    assert code == 2 and "checkpoints must be at most the 5 training steps" in err and "got 9" in err
    code, _, err = run_cli(*base, "--steps", "0", "--out", str(tmp_path / "c"))
    assert code == 2 and "steps must be >= 1, got 0" in err
    assert not any((tmp_path / name).exists() for name in "abc")


@pytest.mark.slow
def test_cli_on_markov_adds_the_induction_analysis(run_cli, tmp_path):
    out = tmp_path / "markov"
    code, _, err = run_cli("dynamics", "--variant", "nope-causal", "--task", "markov", "--layers", "1",
                           "--d-model", "16", "--steps", "2", "--checkpoints", "1", "--sequences", "8",
                           "--out", str(out), "--quiet")
    assert code == 0, err
    run_config = json.loads((out / "runs" / "nope-causal-seed0" / "run.json").read_text())
    assert run_config["task"]["name"] == "markov" and run_config["snapshots"] == [0, 2]
    assert {key: run_config["task"][key] for key in MARKOV_TASK} == MARKOV_TASK  # loss on every token
    assert run_config["config"]["n_ctx"] == MarkovICL(**MARKOV_TASK).seq_len
    assert run_config["settings"]["batch_size"] == MARKOV_TRAINING["batch_size"]
    tables = {p.stem for p in (out / "tables").glob("induction_*.csv")}
    assert tables and {f"{name}_nope-causal" for name in tables} == {p.stem for p in (out / "figures").glob(
        "induction_*.html")}
    entropy = read_table(out / "tables" / "entropy.csv")
    assert entropy["uniform_nats"].unique().tolist() == pytest.approx([uniform_entropy_reference(99, True)])
    assert "## Induction analysis of the final models" in (out / "summary.md").read_text()
