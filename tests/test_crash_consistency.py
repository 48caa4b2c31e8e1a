"""Crash consistency: a job SIGKILLed at a durable write point and resumed ends exactly where an
uninterrupted one does (`benchmarks/kill_points.py` is the harness; see its docstring).

Training is killed at every one of its write points, and tiny `dynamics` and `induction` studies
at every write point of their export (the merged tables, tensors, figures and report), each
compared with the uninterrupted run figures and report included. `poslens reproduce --preset
tiny` has about 430 (about 15 s each to kill and resume), so the suite covers the four stated
below and `python benchmarks/kill_points.py reproduce` kills at every one
(`benchmarks/results/kill-points.md`).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import kill_points  # noqa: E402

pytestmark = pytest.mark.slow  # every test kills and resumes real runs

REPRODUCE_POINTS = {  # why each point, and the label of the first write point it names
    "the very first write: a temporary run.json, no run.json yet (the costliest units, the shifted format's, "
    "start first)": r"write .*/runs/nope-causal@shifted-seed0/run\.json",
    "a run's final state committed, its model files not yet written": r"rename .*/runs/nope-causal\+cut0-seed0/"
                                                                      r"train_state\.safetensors",
    "a table's .csv written, its .md, .tex and .json not yet": r"rename .*/tables/probe\.csv",
    "every table committed, the block-means figure not yet": r"write .*/figures/block_means\.html",
}


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    """torch's one-time initialisation paid once in this process, not in every forked child."""
    kill_points.warm_up(tmp_path_factory.mktemp("warm"))


def test_training_killed_at_every_write_point_resumes_bitwise_identical(warm, tmp_path):
    out = tmp_path / "out"
    job = kill_points.train_job(out)
    reference, labels = kill_points.prepare(tmp_path, job, out)
    kinds = {label.split()[0] for label in labels}
    assert len(labels) >= 40 and kinds == {"write", "rename"}
    assert sum(label.endswith("/train_state.safetensors") for label in labels) == 2 * 3  # 3 commits
    result = kill_points.kill_each_point(job, out, reference, range(1, len(labels) + 1), kill_points.compare_runs,
                                         labels, quiet=True)
    assert result.points == len(labels) and result.failures == {}


def test_reproduce_killed_at_stated_points_resumes_identical(warm, tmp_path):
    out = tmp_path / "out"
    job = kill_points.reproduce_job(out)
    reference, labels = kill_points.prepare(tmp_path, job, out)
    assert len(labels) > 100
    points = [next(n for n, label in enumerate(labels, 1) if re.fullmatch(pattern, label))
              for pattern in REPRODUCE_POINTS.values()]
    assert points[0] == 1
    result = kill_points.kill_each_point(job, out, reference, points, kill_points.compare_study, labels, quiet=True)
    assert result.points == len(REPRODUCE_POINTS) and result.failures == {}
    assert kill_points.compare_study(reference, reference) == []


@pytest.mark.parametrize("study", ["dynamics", "induction"])
def test_a_study_killed_at_every_export_write_point_resumes_identical(warm, tmp_path, study):
    out = tmp_path / "out"
    job = kill_points.study_job(study, out)
    reference, _ = kill_points.prepare(tmp_path, job, out)
    start = kill_points.finished_runs(reference)
    labels = kill_points.export_points(job, out, start, tmp_path / "export.log")
    written = {label.split(" ", 1)[1].removeprefix(f"{out}/") for label in labels}
    assert {"tables/claims.json" if study == "dynamics" else "tables/roles.json", "report.html",
            "summary.md"} <= written and not any(name.startswith("runs/") for name in written)
    assert labels[-1].endswith("summary.md")
    result = kill_points.kill_each_point(job, out, reference, range(1, len(labels) + 1), kill_points.compare_study,
                                         labels, quiet=True, start=start)
    assert result.points == len(labels) and result.failures == {}
    # complete but unmarked outputs (the uninterrupted run's own folder): a rerun neither refuses nor re-measures
    measured = {path: path.stat().st_mtime_ns for path in reference.glob("runs/*/measures/*")}
    assert os.waitstatus_to_exitcode(kill_points.in_child(kill_points.study_job(study, reference))) == 0
    assert {path: path.stat().st_mtime_ns for path in measured} == measured


def test_the_comparisons_see_what_a_bad_resume_leaves(warm, tmp_path):
    out = tmp_path / "out"
    reference, _ = kill_points.prepare(tmp_path, kill_points.train_job(out), out)
    for damage, expected in (
        (lambda run: (run / ".run.json.abcdefgh.tmp").write_text("{}"), "extra ['.run.json.abcdefgh.tmp']"),
        (lambda run: (run / "model.safetensors").write_bytes((run / "model.safetensors").read_bytes()[:-1] + b"\0"),
         "model.safetensors differs"),
        (lambda run: (run / "history.json").write_text((run / "history.json").read_text().replace(
            '"step": 8', '"step": 9')), "history.json differs"),
        (lambda run: shutil.rmtree(run / "checkpoints" / "step-000007"), "missing ['checkpoints/step-000007'"),
    ):
        copy = shutil.copytree(reference, tmp_path / "copy", dirs_exist_ok=False)
        damage(copy)
        assert any(expected in problem for problem in kill_points.compare_runs(reference, copy)), expected
        shutil.rmtree(copy)
    table = "| variant | this_session_s | exact_match |\n| --- | ---: | ---: |\n| a | 1.5 | 0.25 |\n"
    assert kill_points.masked(table, ".md") == kill_points.masked(table.replace("1.5", "9.75"), ".md")
    assert kill_points.masked(table, ".md") != kill_points.masked(table.replace("0.25", "0.5"), ".md")
    tex = "\\toprule\nvariant & this\\_session\\_s \\\\\na & 1.5 \\\\\n"
    assert kill_points.masked(tex, ".tex") == kill_points.masked(tex.replace("1.5", "2"), ".tex")


def test_the_study_comparison_masks_plotly_ids_and_nothing_else(tmp_path):
    page = '<div id="{}"></div><script>Plotly.newPlot("{}", [{{"z": [[{}]]}}])</script>'
    ids = ("0b6f2c1e-8d4a-4f3b-9c2d-1a2b3c4d5e6f", "9f8e7d6c-5b4a-4392-8171-6f5e4d3c2b1a")

    def folder(name: str, element: str, value: str) -> Path:
        root = tmp_path / name
        (root / "figures").mkdir(parents=True)
        (root / "tables").mkdir()
        (root / "tables" / "claims.json").write_text('{"data": [{"value": 1.0}]}')
        for path in (root / "figures" / "block_means.html", root / "report.html"):
            path.write_text(page.format(element, element, value))
        (root / "summary.md").write_text("# study\n")
        return root

    reference = folder("reference", ids[0], "0.25")
    assert kill_points.compare_study(reference, folder("other-ids", ids[1], "0.25")) == []
    assert kill_points.compare_study(reference, folder("other-values", ids[1], "0.5")) == [
        "figures/block_means.html differs", "report.html differs"]
    stray = folder("stray", ids[0], "0.25")
    (stray / "tables" / ".claims.json.abcdefgh.tmp").write_text("{}")
    assert kill_points.compare_study(reference, stray) == [
        "tables/ holds other files: missing [], extra ['.claims.json.abcdefgh.tmp']"]
