"""Reading trained runs back (a run directory's task, its models grouped by variant) and caching
the measures of a run beside it, so a rerun of a study recomputes only what is missing."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from torch import Tensor

from poslens.analyses.tables import export_table, read_table
from poslens.tasks import from_record
from poslens.variants import HookedTransformer, load, task_record
from poslens.variants.storage import load_tensors, read_json, remove_temporaries, save_tensors, write_json


def load_task(run_dir: str | Path):
    """The task a run directory was trained on (an `Addition` or a `MarkovICL`); a run recorded
    before a task field existed gets the field's legacy value (`tasks.from_record`); a clear
    error if `run.json`'s task record does not describe a task.

    Args:
        run_dir: a run directory (holds `run.json`).

    Returns:
        task (Addition | MarkovICL): the task the run was trained on.
    """
    record = task_record(run_dir)
    if not isinstance(record, dict) or not isinstance(record.get("name"), str):
        raise ValueError(f"{Path(run_dir) / 'run.json'} records no task name: {record!r}")
    try:
        return from_record(record)
    except TypeError as error:  # a field the task does not have
        raise ValueError(f"{Path(run_dir) / 'run.json'} has a task record that is not a task: {error}") from None


def load_models_by_variant(directories: Sequence[str | Path], *, device: str = "cpu") -> dict[str, list[HookedTransformer]]:
    """Trained checkpoints grouped by their variant name, in the order given.

    Args:
        directories: run folders.
        device: where the models run.

    Returns:
        Variant name → its models.
    """
    grouped: dict[str, list[HookedTransformer]] = {}
    for directory in directories:
        model = load(directory, device=device)
        grouped.setdefault(model.cfg.name, []).append(model)
    return grouped


Results = dict[str, pd.DataFrame | Tensor]
STAMP = "stamp.json"
TENSORS = "tensors.safetensors"


def cached_results(directory: str | Path, stamp: dict[str, Any], compute: Callable[[], Results], *,
                   force: bool = False) -> Results:
    """`compute()`'s tables and tensors, kept in `directory` and reused while `stamp` (what they
    were computed for: preset, sizes, version...) is unchanged, unless `force`.

    Tables are stored as `.json` (`export_table`: exact floats and dtypes), tensors in one
    safetensors file, and `stamp.json` is written last: a kill mid-write leaves no stamp, so the
    results are computed again rather than read half-written.

    Args:
        directory: the cache folder (a run's `measures/`).
        stamp: what the results are computed for; a different stamp recomputes them.
        compute: returns the results when they are not cached.
        force: compute again whatever is cached.

    Returns:
        The tables and tensors, read back or computed.
    """
    directory = Path(directory)
    record = {"stamp": stamp}
    if not force and (directory / STAMP).is_file():
        saved = read_json(directory / STAMP)
        if saved.get("stamp") == json.loads(json.dumps(stamp)):
            tensors = load_tensors(directory / TENSORS) if saved["tensors"] else {}
            return {**{name: read_table(directory / f"{name}.json") for name in saved["tables"]}, **tensors}
    remove_temporaries(directory)  # what a killed unit left; this unit is its directory's only writer
    results = compute()
    tables = {name: value for name, value in results.items() if isinstance(value, pd.DataFrame)}
    tensors = {name: value for name, value in results.items() if isinstance(value, Tensor)}
    (directory / STAMP).unlink(missing_ok=True)
    for name, table in tables.items():
        export_table(table, directory / f"{name}.json", overwrite=True)
    if tensors:
        save_tensors(directory / TENSORS, tensors)
    write_json(directory / STAMP, {**record, "tables": sorted(tables), "tensors": sorted(tensors)})
    return results
