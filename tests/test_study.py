"""The study skeleton: merge order, commit, figures and report from what was committed, the
output rule (a rerun rewrites the same bytes), and docs/studies.md's examples run."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

from poslens.analyses.executors import Unit
from poslens.analyses.report import Section
from poslens.analyses.study import TENSORS, Committed, Study, check_runs, merge_results, run_study
from poslens.analyses.tables import read_table
from poslens.variants.storage import load_tensors

DOCS = Path(__file__).resolve().parents[1] / "docs" / "studies.md"


def measured(value: int) -> dict:
    """A unit: a table whose float column only survives a round trip through the disk exactly,
    a tensor, and a table only the first unit has."""
    found = {"rows": pd.DataFrame({"unit": [value, value], "third": [value / 3, -value / 3]}),
             "vector": torch.arange(3, dtype=torch.float32) * value}
    return found | ({"first_only": pd.DataFrame({"x": [1]})} if value == 3 else {})


def toy_study(seen: list[Committed]) -> Study:
    def figures(committed: Committed) -> dict[str, go.Figure]:
        seen.append(committed)
        return {"rows": go.Figure(go.Bar(y=committed.tables["rows"]["third"]))}

    return Study("toy", "Toy study", "three units", [Unit(f"u{v}", measured, {"value": v}) for v in (3, 1, 2)],
                 derive=lambda tables: {"total": pd.DataFrame({"sum": [tables["rows"]["unit"].sum()]})},
                 figures=figures, sections=lambda committed, figures: [
                     Section("Rows", figures=list(figures.values()), table=committed.tables["total"])])


def test_a_study_commits_merged_tables_and_draws_from_what_it_committed(tmp_path):
    seen: list[Committed] = []
    tables = run_study(tmp_path / "out", toy_study(seen), executor="serial", quiet=True)
    out = tmp_path / "out"
    assert list(tables["rows"]["unit"]) == [3, 3, 1, 1, 2, 2]  # the units' declared order, not their names'
    assert tables["total"]["sum"].item() == 12 and list(tables["first_only"]["x"]) == [1]
    for name, table in tables.items():
        pd.testing.assert_frame_equal(read_table(out / "tables" / f"{name}.json"), table, check_exact=True)
        assert {p.suffix for p in (out / "tables").glob(f"{name}.*")} == {".csv", ".md", ".tex", ".json"}
    [committed] = seen
    assert list(committed.tensors) == ["u3", "u1", "u2"]
    assert torch.equal(committed.tensors["u2"]["vector"], torch.tensor([0.0, 2.0, 4.0]))
    assert set(load_tensors(out / "tables" / TENSORS)) == {"u3/vector", "u1/vector", "u2/vector"}
    assert {p.name for p in (out / "figures").iterdir()} == {"rows.html", "plotly.min.js"}
    assert (out / "summary.md").read_text().startswith("# Toy study\n")
    assert "Rows" in (out / "report.html").read_text() and not (out / ".poslens.lock").exists()

    before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file() and path.suffix != ".html"}
    stamp = (out / "tables" / TENSORS).stat().st_mtime_ns
    run_study(out, toy_study(seen), executor="serial", quiet=True)  # the output rule: a rerun rewrites the same
    assert {path: path.read_bytes() for path in before} == before
    assert (out / "tables" / TENSORS).stat().st_mtime_ns == stamp  # unchanged tensors are not rewritten


def test_merge_order_does_not_depend_on_how_a_unit_ordered_its_results():
    one = {"b": pd.DataFrame({"v": [1]}), "a": pd.DataFrame({"v": [2]}), "t": torch.ones(1)}
    two = {"a": pd.DataFrame({"v": [3]}), "t": torch.zeros(1), "b": pd.DataFrame({"v": [4]})}
    tables, tensors = merge_results(["one", "two"], [one, two])
    assert list(tables) == ["a", "b"] and list(tables["a"]["v"]) == [2, 3] and list(tensors) == ["one/t", "two/t"]


def test_bad_studies_are_refused_before_anything_is_written(tmp_path):
    study = toy_study([])
    with pytest.raises(ValueError, match=r"must include \.json"):
        run_study(tmp_path / "a", Study(**{**study.__dict__, "formats": (".csv",)}), executor="serial", quiet=True)
    with pytest.raises(ValueError, match=r"need distinct variants and distinct seeds.*\['a', 'a'\]"):
        check_runs(["a", "a"], [0])
    with pytest.raises(ValueError, match="seed must be >= 0, got -1"):
        check_runs(["a"], [-1])
    assert check_runs(("a", "b"), range(2)) == (["a", "b"], [0, 1])
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("block", re.findall(r"```python\n(.*?)```", DOCS.read_text(), re.S))
def test_the_docs_examples_run(block):
    exec(compile(block, str(DOCS), "exec"), {"__name__": "docs_studies"})
