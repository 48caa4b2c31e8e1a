"""The `poslens` console script: thin wrappers, clear errors, machine-readable output."""

import io
import json

import pandas as pd


def test_train_then_invariance_on_the_checkpoint(run_cli, tmp_path):
    out = tmp_path / "run"
    code, text, _ = run_cli("train", "--variant", "nope-causal", "--layers", "1", "--d-model", "32", "--steps", "6",
                        "--batch-size", "16", "--out", str(out), "--quiet")
    assert code == 0 and "nope-causal on addition: step 6" in text
    assert {"config.json", "model.safetensors", "run.json", "history.json"} <= {p.name for p in out.iterdir()}
    code, text, err = run_cli("train", "--variant", "nope-causal", "--layers", "1", "--d-model", "32", "--steps", "6",
                          "--batch-size", "16", "--out", str(out), "--quiet")
    assert code == 2 and "already holds a training run" in err
    code, text, _ = run_cli("invariance", "--checkpoint", str(out), "--variant", "nope-causal", "--layers", "2",
                        "--perms", "3", "--format", "json")
    rows = json.loads(text)["data"]
    assert code == 0 and [row["invariant"] for row in rows] == [False, True]


def test_invariance_formats_and_errors(run_cli):
    code, text, _ = run_cli("invariance", "--variant", "nope-bidirectional", "--layers", "1", "--perms", "2", "--format", "csv")
    table = pd.read_csv(io.StringIO(text))
    assert code == 0 and table["variant"].tolist() == ["nope-bidirectional"] and table["invariant"].tolist() == [True]
    code, text, _ = run_cli("invariance", "--variant", "nope-causal", "--layers", "2", "--perms", "2", "--format", "md")
    assert code == 0 and text.startswith("| variant |") and "| nope-causal |" in text
    code, _, err = run_cli("invariance", "--variant", "nope-sideways")
    assert code == 2 and "unknown variant 'nope-sideways'; allowed:" in err
    code, _, err = run_cli("train", "--variant", "nope-causal+cut9", "--out", "unused")
    assert code == 2 and "residual cut block 9 is out of range; allowed: 0..3" in err


def test_probe_writes_the_table_and_never_overwrites(run_cli, tmp_path):
    runs = []
    for variant in ("nope-causal", "learned-causal"):
        runs.append(str(tmp_path / variant))
        assert run_cli("train", "--variant", variant, "--layers", "1", "--d-model", "32", "--steps", "4",
                   "--batch-size", "16", "--out", runs[-1], "--quiet")[0] == 0
    table_path, figure_path = tmp_path / "probe.csv", tmp_path / "probe.html"
    code, text, _ = run_cli("probe", *runs, "--out", str(table_path), "--sequences", "40", "--control", "chance",
                        "random_init", "--figure", str(figure_path), "--quiet")
    assert code == 0 and "| site | nope-causal | nope-causal (random init) | learned-causal |" in text
    table = pd.read_csv(table_path)
    assert set(table["variant"]) == {"nope-causal", "learned-causal"}
    assert set(table["baseline"]) == {"trained", "chance", "random_init"}
    assert "plotly" in figure_path.read_text()
    before = table_path.read_bytes()
    code, _, err = run_cli("probe", *runs, "--out", str(table_path), "--sequences", "40", "--quiet")
    assert code == 2 and "already exists" in err and table_path.read_bytes() == before
    code, _, err = run_cli("probe", *runs, "--out", str(tmp_path / "probe.xlsx"), "--sequences", "40", "--quiet")
    assert code == 2 and "'.xlsx'" in err
