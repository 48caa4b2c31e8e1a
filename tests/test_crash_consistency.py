"""Crash consistency: a job SIGKILLed at a durable write point and resumed ends exactly where an
uninterrupted one does (`benchmarks/kill_points.py` is the harness; see its docstring).

Training is killed at every one of its write points. `poslens reproduce --preset tiny` has
about 170 (about 15 s each to kill and resume), so the suite covers the three stated below and
`python benchmarks/kill_points.py reproduce` sweeps them all (`benchmarks/RESULTS.md`).
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import kill_points  # noqa: E402

pytestmark = pytest.mark.slow  # every test kills and resumes real runs

REPRODUCE_POINTS = {  # why each point, and the label of the first write point it names
    "the very first write: a temporary run.json, no run.json yet": r"write .*/runs/nope-causal-seed0/run\.json",
    "a run's final state committed, its model files not yet written": r"rename .*/runs/nope-causal\+cut0-seed0/"
                                                                      r"train_state\.safetensors",
    "a table's .csv written, its .md, .tex and .json not yet": r"rename .*/tables/probe\.csv",
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
    result = kill_points.sweep(job, out, reference, range(1, len(labels) + 1), kill_points.compare_runs, labels,
                               quiet=True)
    assert result.points == len(labels) and result.failures == {}


def test_reproduce_killed_at_stated_points_resumes_identical(warm, tmp_path):
    out = tmp_path / "out"
    job = kill_points.reproduce_job(out)
    reference, labels = kill_points.prepare(tmp_path, job, out)
    assert len(labels) > 100
    points = [next(n for n, label in enumerate(labels, 1) if re.fullmatch(pattern, label))
              for pattern in REPRODUCE_POINTS.values()]
    assert points[0] == 1
    result = kill_points.sweep(job, out, reference, points, kill_points.compare_reproduce, labels, quiet=True)
    assert result.points == len(REPRODUCE_POINTS) and result.failures == {}
    assert kill_points.compare_reproduce(reference, reference) == []


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
