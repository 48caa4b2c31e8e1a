"""`poslens reproduce` end to end on the tiny preset: every output file, every table's schema, resume."""

import pandas as pd

from poslens.analyses.experiments.presets import REPRODUCE_VARIANTS
from poslens.analyses.tables import PROBE_COLUMNS, read_table, validate_probe_table
from poslens.cli import main

TABLES = {
    "training": ["variant", "seed", "steps", "exact_match", "test_loss"],
    "invariance": ["variant", "n_layers", "dtype", "n_sequences", "n_perms", "max_abs_delta", "mean_abs_delta",
                   "tolerance", "invariant", "weights", "seed"],
    "probe": list(PROBE_COLUMNS),
    "correlation": ["variant", "seed", "site", "weights", "block_diagonality"],
    "residual_cuts": ["block", "sublayer", "exact_match", "answer_logprob", "probe_accuracy", "delta_exact_match",
                      "delta_answer_logprob", "delta_probe_accuracy", "variant", "seed"],
    "activation_patching": ["site", "layer", "position", "role", "value", "fixed_by_construction", "variant", "seed"],
    "position_swap": ["site", "follows_swap", "keeps_original", "n_sequences", "fixed_by_construction", "variant",
                      "seed"],
}


TINY = ("reproduce", "--preset", "tiny", "--executor", "serial", "--quiet")  # executors agree: tests/test_sweep.py


def test_reproduce_tiny_writes_everything_and_resumes(tmp_path):
    out = tmp_path / "repro"
    assert main([*TINY, "--seeds", "1", "--out", str(out)]) == 0
    for name, columns in TABLES.items():
        for suffix in (".csv", ".md", ".tex", ".json"):
            assert (out / "tables" / f"{name}{suffix}").stat().st_size > 0, (name, suffix)
        table = read_table(out / "tables" / f"{name}.csv")
        assert list(table.columns) == columns, name
    validate_probe_table(read_table(out / "tables" / "probe.json"))
    training = read_table(out / "tables" / "training.csv")
    assert list(training["variant"]) == list(REPRODUCE_VARIANTS)
    invariance = read_table(out / "tables" / "invariance.csv").set_index(["variant", "weights"])["invariant"]
    assert invariance["nope-bidirectional", "trained"] and invariance["nope-bidirectional", "random"]
    assert not invariance["nope-causal", "trained"] and not invariance["learned-causal", "random"]
    figures = {path.name for path in (out / "figures").iterdir()}
    assert {"plotly.min.js", "probe_accuracy.html", "residual_cuts.html", "patching_nope-causal.html"} <= figures
    report = (out / "report.html").read_text()
    assert report.count("<script type='text/javascript'>") == 1 and "<script src=" not in report
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# poslens reproduce (tiny preset, 1 seed(s))") and "| nope-causal+cut0,1 |" in summary

    stamps = {path: path.stat().st_mtime_ns for path in out.rglob("*.safetensors")}
    probe_before = (out / "tables" / "probe.csv").read_bytes()
    assert main([*TINY, "--seeds", "1", "--out", str(out)]) == 0
    assert {path: path.stat().st_mtime_ns for path in out.rglob("*.safetensors")} == stamps  # nothing retrained
    assert (out / "tables" / "probe.csv").read_bytes() == probe_before
    pd.testing.assert_frame_equal(read_table(out / "tables" / "training.csv"), training)

    assert main([*TINY, "--seeds", "2", "--out", str(out)]) == 0
    assert {path: path.stat().st_mtime_ns for path in stamps} == stamps  # seed 0 reused
    for name in ("training", "residual_cuts", "position_swap"):  # tables made for one seed are recomputed
        assert set(read_table(out / "tables" / f"{name}.csv")["seed"]) == {0, 1}, name
    assert "2 seed(s)" in (out / "summary.md").read_text()


def test_reproduce_rejects_bad_arguments(tmp_path):
    assert main(["reproduce", "--seeds", "0", "--out", str(tmp_path)]) == 2
