"""The one skeleton of every multi-run study (`reproduce`, `dynamics`, `induction`).

An experiment declares a `Study`: its units (each trains one run and measures it, an
`analyses.executors.Unit` whose function caches its tables and tensors in the run's folder with
`analyses.runs.cached_results`) and what it makes of their results: the tables it derives from
the merged ones (`derive`: claims, summaries), its `figures` and its report `sections`.
`run_study` does everything else, the same way for every study:

1. holds the output folder's lock (`variants.locking`: one writer; a killed writer's temporaries
   removed);
2. runs the units with the chosen executor (`analyses.executors.run_units`); a unit whose measures
   are already stamped in its run folder reads them back and neither trains nor measures;
3. merges each table over the units in their declared order and commits it to
   `tables/NAME.{formats}`, and every unit's tensors to `tables/tensors.safetensors` (as
   `UNIT/NAME`); then the derived tables, computed from the merged tables as committed;
4. reads the committed tables and tensors back and draws every figure (`figures/NAME.html`)
   and the report (`report.html`, `summary.md`) from them, never from what happens to be in
   memory.

The output rule, one for every study: the merged outputs are a function of the runs' committed
measures and every call writes them anew, so rerunning the same command resumes a killed
study (only what is missing is trained and measured) and ends with the same bytes as an
uninterrupted run, whether the kill came during training, measuring or export. Passing
`force` to the units measures every run again; trained weights are never deleted.

Adding a measure to an experiment is one edit (its unit function returns one more table,
under a bumped `ANALYSIS_VERSION`), two with a figure or a report section; see docs/studies.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import torch
from torch import Tensor

from poslens.analyses.executors import Unit, run_units
from poslens.analyses.figures import write_figure
from poslens.analyses.report import Section, write_report
from poslens.analyses.tables import EXPORT_SUFFIXES, export_tables, read_table
from poslens.variants.config import check_integer
from poslens.variants.locking import locked_directory
from poslens.variants.storage import load_tensors, save_tensors

TENSORS = "tensors.safetensors"
"""The committed tensors of a study, in `OUT/tables/`: each unit's tensor NAME as `UNIT/NAME`."""


@dataclass(frozen=True)
class Committed:
    """What a study committed, read back from its output folder: every table by name, and each
    unit's tensors by unit name (in the units' declared order) and tensor name."""

    tables: dict[str, pd.DataFrame]
    tensors: dict[str, dict[str, Tensor]] = field(default_factory=dict)


@dataclass(frozen=True)
class Study:
    """What an experiment declares; `run_study` does the rest (see the module docstring).

    Attributes:
        name: the study's name, for the progress bar.
        title: the report's title.
        meta: one paragraph under the title (sizes, seeds, samples).
        units: one per run, in the order their rows appear in the merged tables; each returns
            `{name: DataFrame | Tensor}`.
        derive: tables computed from the merged tables (claims...), committed beside them.
        figures: the figures, from the committed tables and tensors; written to `figures/`.
        sections: the report's sections, from the committed state and the figures.
        formats: the formats every table is exported in (`.json` is always one of them: it is
            what the figures and the report are drawn from).
        alerts: lines a reader must see before any result (runs that missed a criterion...),
            from the committed state; listed at the top of the report.
    """

    name: str
    title: str
    meta: str
    units: Sequence[Unit]
    derive: Callable[[dict[str, pd.DataFrame]], dict[str, pd.DataFrame]]
    figures: Callable[[Committed], dict[str, go.Figure]]
    sections: Callable[[Committed, dict[str, go.Figure]], list[Section]]
    formats: tuple[str, ...] = EXPORT_SUFFIXES
    alerts: Callable[[Committed], list[str]] = lambda committed: []


def run_study(out_dir: str | Path, study: Study, *, quiet: bool = False,
              **executor_options: Any) -> dict[str, pd.DataFrame]:
    """Run (or resume) `study` into `out_dir` and write its merged outputs.

    Args:
        out_dir: the study's folder: `runs/` (written by the units), `tables/`, `figures/`,
            `report.html` and `summary.md` (written here, under the folder's lock).
        study: the experiment's declaration.
        quiet: no progress bar.
        **executor_options: the executor settings of `analyses.executors.run_units` (executor, workers,
            threads, ray_address, gpus_per_unit).

    Returns:
        Every committed table by name, as read back from `out_dir/tables/`.

    Raises:
        analyses.executors.UnitsFailed: some units failed (each named with its error); the others'
            results are kept in their run folders and nothing merged is written.
    """
    if ".json" not in study.formats:
        raise ValueError(f"a study's tables must include .json (the committed form), got {study.formats}")
    out_dir = Path(out_dir)
    with locked_directory(out_dir, clean=(".", "tables", "figures")):
        done = run_units(study.units, desc=study.name, quiet=quiet, **executor_options)
        done.raise_failures()
        results = [done.results[unit.name] for unit in study.units]
        tables, tensors = merge_results([unit.name for unit in study.units], results)
        directory = out_dir / "tables"
        merged = _commit(tables, directory, study.formats)
        if tensors:
            _commit_tensors(tensors, directory / TENSORS)
        grouped = split_tensors(load_tensors(directory / TENSORS)) if tensors else {}
        committed = Committed({**merged, **_commit(study.derive(merged), directory, study.formats)},
                              {unit.name: grouped[unit.name] for unit in study.units if unit.name in grouped})
        figures = study.figures(committed)
        for name, figure in figures.items():
            write_figure(figure, out_dir / "figures" / f"{name}.html", overwrite=True, standalone=False)
        write_report(out_dir, study.title, study.meta, study.sections(committed, figures), study.alerts(committed))
    return committed.tables


def merge_results(names: Sequence[str], results: Sequence[dict[str, Any]]) -> tuple[dict[str, pd.DataFrame],
                                                                                    dict[str, Tensor]]:
    """The units' tables concatenated by name (rows in unit order; names sorted, so the order
    does not depend on whether a unit's results were computed or read back) and their tensors
    flattened to `UNIT/NAME`.

    Args:
        names: the units' names, in their declared order.
        results: each unit's `{name: DataFrame | Tensor}`, in the same order.

    Returns:
        `(tables, tensors)`.
    """
    table_names = sorted({name for result in results for name, value in result.items()
                          if isinstance(value, pd.DataFrame)})
    tables = {name: pd.concat([result[name] for result in results if name in result], ignore_index=True)
              for name in table_names}
    tensors = {f"{unit}/{name}": result[name] for unit, result in zip(names, results)
               for name in sorted(result) if isinstance(result[name], Tensor)}
    return tables, tensors


def split_tensors(flat: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """`UNIT/NAME` tensors grouped by unit and name.

    Args:
        flat: tensors named `UNIT/NAME`, as `merge_results` makes them.

    Returns:
        `{unit: {name: tensor}}`, in the order the units first appear in `flat`.
    """
    grouped: dict[str, dict[str, Tensor]] = {}
    for key, tensor in flat.items():
        unit, name = key.split("/", 1)
        grouped.setdefault(unit, {})[name] = tensor
    return grouped


def _commit(tables: dict[str, pd.DataFrame], directory: Path, formats: tuple[str, ...]) -> dict[str, pd.DataFrame]:
    """Export every table in `formats` (replacing what a previous call wrote) and read each back
    from its `.json`: what is returned is exactly what was committed."""
    for name, table in tables.items():
        export_tables(table, directory, name, formats=formats, overwrite=True)
    return {name: read_table(directory / f"{name}.json") for name in tables}


def _commit_tensors(tensors: dict[str, Tensor], path: Path) -> None:
    """Save `tensors` at `path` unless it already holds exactly them (a rerun then leaves the file
    alone, so its timestamp still says when the runs' measures last changed)."""
    if path.is_file():
        try:
            old = load_tensors(path)
        except ValueError:  # not a readable safetensors file: replaced below
            old = {}
        if list(old) == sorted(tensors) and all(old[name].dtype == tensor.dtype and old[name].shape == tensor.shape
                                                and torch.equal(old[name], tensor) for name, tensor in tensors.items()):
            return
    save_tensors(path, tensors)


def check_runs(variants: Sequence[str], seeds: Sequence[int]) -> tuple[list[str], list[int]]:
    """The variants and seeds of a study as lists, after checking them.

    Args:
        variants: variant names, at least one, distinct.
        seeds: integer seeds >= 0, at least one, distinct.

    Returns:
        `(variants, seeds)` as lists.
    """
    variants, seeds = list(variants), list(seeds)
    if not variants or not seeds or len(set(variants)) != len(variants) or len(set(seeds)) != len(seeds):
        raise ValueError(f"need distinct variants and distinct seeds, at least one of each; got {variants}, {seeds}")
    for seed in seeds:
        check_integer("seed", seed, minimum=0)
    return variants, seeds
