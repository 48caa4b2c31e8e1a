"""`poslens reproduce` end to end on the tiny preset: every output file, every table's schema, resume."""

import re

import pandas as pd
import pytest

from poslens.analyses.claims import CLAIM_TABLE_COLUMNS
from poslens.analyses.experiments.presets import REPRODUCE_VARIANTS, SHIFTED, SHIFTED_VARIANTS
from poslens.analyses.measures.correlation import BLOCK_SCORE_COLUMNS
from poslens.analyses.measures.geometry import COSINE_COLUMNS, SCORE_COLUMNS, VARIANCE_COLUMNS
from poslens.analyses.measures.patching import ACTIVATION_PATCHING_COLUMNS
from poslens.analyses.measures.patching_directions import PATCHING_EFFECT_COLUMNS
from poslens.analyses.measures.positions import READOUT_COLUMNS, TASK_COLUMNS
from poslens.analyses.measures.probe_sweep import PROBE_POSITION_COLUMNS
from poslens.analyses.measures.shift import SHIFT_COLUMNS
from poslens.analyses.measures.swaps import SWAP_COLUMNS, SWAP_READOUT_COLUMNS
from poslens.analyses.measures.symmetry import SYMMETRY_COLUMNS
from poslens.analyses.plan import REPRODUCE_PLAN
from poslens.analyses.tables import PROBE_COLUMNS, read_table, validate_probe_table
from poslens.cli import main

TABLES = {
    "training": ["variant", "seed", "steps", "exact_match", "test_loss", "mean_exact_match", "steps_to_criterion",
                 "learned"],
    "curves": ["step", "exact_match", "test_loss", "variant", "seed"],
    "invariance": ["variant", "n_layers", "dtype", "n_sequences", "n_perms", "max_abs_delta", "mean_abs_delta",
                   "tolerance", "invariant", "weights", "seed"],
    "probe": list(PROBE_COLUMNS),
    "probe_by_position": list(PROBE_POSITION_COLUMNS),
    "correlation": [*BLOCK_SCORE_COLUMNS, "site", "weights", "variant", "seed"],
    "geometry": [*SCORE_COLUMNS, "weights", "variant", "seed"],
    "variance": [*VARIANCE_COLUMNS, "weights", "variant", "seed"],
    "cosine": [*COSINE_COLUMNS, "weights", "variant", "seed"],
    "residual_cuts": ["block", "sublayer", "exact_match", "answer_logprob", "probe_accuracy", "delta_exact_match",
                      "delta_answer_logprob", "delta_probe_accuracy", "variant", "seed"],
    "activation_patching": [*ACTIVATION_PATCHING_COLUMNS, "variant", "seed"],
    "patching_effects": [*PATCHING_EFFECT_COLUMNS, "variant", "seed"],
    "position_swap": [*SWAP_COLUMNS, "variant", "seed"],
    "swap_readout": [*SWAP_READOUT_COLUMNS, "variant", "seed"],
    "symmetry": [*SYMMETRY_COLUMNS, "seed"],  # `variant` is the run the twins belong to
    "shift_probe": [*SHIFT_COLUMNS, "variant", "seed"],
    "claims": list(CLAIM_TABLE_COLUMNS),
    "position_task": [*TASK_COLUMNS, "variant", "seed"],
    "position_readout": [*READOUT_COLUMNS, "variant", "seed"],
}
VARIANTS = [*REPRODUCE_VARIANTS, *(f"{variant}{SHIFTED}" for variant in SHIFTED_VARIANTS)]


TINY = ("reproduce", "--preset", "tiny", "--executor", "serial", "--quiet")  # executors agree: tests/test_sweep.py


@pytest.mark.slow
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
    assert list(training["variant"]) == VARIANTS
    for name in ("invariance", "residual_cuts", "activation_patching", "position_swap", "swap_readout",
                 "position_task", "patching_effects"):
        assert list(pd.unique(read_table(out / "tables" / f"{name}.csv")["variant"])) == list(REPRODUCE_VARIANTS)
    probe = read_table(out / "tables" / "probe.csv")
    assert set(probe.loc[probe["probe"] == "role", "variant"]) == {f"{v}{SHIFTED}" for v in SHIFTED_VARIANTS}
    assert "role_identity" in set(probe.loc[probe["variant"].str.endswith(SHIFTED), "baseline"])
    claims = read_table(out / "tables" / "claims.csv")
    assert set(claims["verdict"]) <= {"supported", "contradicted", "inconclusive", "secondary"}
    assert len(claims) == len(REPRODUCE_PLAN.claims)
    symmetry = claims[claims["section"] == "symmetry"]
    assert list(symmetry["verdict"]) == ["supported"] * 4  # exact checks: they hold on one seed too
    one_seed = claims[claims["n"] == "1 seed"]
    assert len(one_seed) >= 10 and one_seed["value"].notna().all()
    assert one_seed["note"].str.contains("n = 1 cannot decide this claim|not testable with this measure").all()
    invariance = read_table(out / "tables" / "invariance.csv").set_index(["variant", "weights"])["invariant"]
    assert invariance["nope-bidirectional", "trained"] and invariance["nope-bidirectional", "random"]
    assert not invariance["nope-causal", "trained"] and not invariance["learned-causal", "random"]
    figures = {path.name for path in (out / "figures").iterdir()}
    assert {"plotly.min.js", "probe_accuracy.html", "residual_cuts.html", "patching_nope.html", "block_means.html",
            "patching_directions.html",
            "swap_readout.html"} <= figures
    report = (out / "report.html").read_text()
    # One offline plotly.js for the whole folder: the report and every figure page load figures/plotly.min.js.
    assert re.findall(r"<script[^>]*src=[^>]*>", report) == ["<script charset='utf-8' src='figures/plotly.min.js'>"]
    assert len(report) < 4_000_000
    assert sum(path.stat().st_size > 4_000_000 for path in out.rglob("*")) == 1  # the one copy of plotly.js
    assert report.index("Claims and verdicts") < report.index("<h2 id=\"s1\">")  # the verdicts come first
    summary = (out / "summary.md").read_text()
    assert "## Analysis plan, version 3" in summary and "dtype" not in summary and "Name:" not in summary
    assert "**Read first:**" in summary and "below the 0.99 criterion" in summary  # 40 tiny steps learn nothing
    assert summary.startswith("# poslens reproduce (tiny preset, 1 seed(s))") and "| nope-causal+cut0,1 |" in summary
    assert summary.index("## Claims and verdicts") < summary.index("## Symmetry")

    stamps = {path: path.stat().st_mtime_ns for path in out.rglob("*.safetensors")}
    probe_before = (out / "tables" / "probe.csv").read_bytes()
    assert main([*TINY, "--seeds", "1", "--out", str(out)]) == 0
    assert {path: path.stat().st_mtime_ns for path in out.rglob("*.safetensors")} == stamps  # nothing retrained
    assert (out / "tables" / "probe.csv").read_bytes() == probe_before
    pd.testing.assert_frame_equal(read_table(out / "tables" / "training.csv"), training)

    assert main([*TINY, "--seeds", "2", "--out", str(out)]) == 0
    runs = {path: stamp for path, stamp in stamps.items() if "runs" in path.relative_to(out).parts}
    assert runs and {path: path.stat().st_mtime_ns for path in runs} == runs  # seed 0's runs reused (the merged
    # tables/tensors.safetensors gains seed 1's)
    for name in ("training", "residual_cuts", "position_swap"):  # tables made for one seed are recomputed
        assert set(read_table(out / "tables" / f"{name}.csv")["seed"]) == {0, 1}, name
    assert "2 seed(s)" in (out / "summary.md").read_text()


def test_reproduce_rejects_bad_arguments(tmp_path):
    assert main(["reproduce", "--seeds", "0", "--out", str(tmp_path)]) == 2
