"""Reading trained runs back (a run directory's task, its models grouped by variant) and caching
the measures of a run beside it, bound to the run's weights and the analysis version, so a rerun
of a study recomputes only what is missing and never reads results that belong to other weights."""

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
from poslens.variants.checkpoint import checkpoint_digest
from poslens.variants.storage import (
    file_digest,
    json_digest,
    load_tensors,
    read_json,
    remove_temporaries,
    save_tensors,
    write_json,
)
from poslens.variants.training import list_snapshots


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
        found = f"fields {sorted(record)}" if isinstance(record, dict) else f"a {type(record).__name__}"
        raise ValueError(f"{Path(run_dir) / 'run.json'} records no task name (its task record has {found})")
    try:
        return from_record(record)
    except TypeError as error:  # a field the task does not have
        raise ValueError(f"{Path(run_dir) / 'run.json'} has a task record that is not a task: {error}") from None


def load_models_by_variant(directories: Sequence[str | Path], *,
                           device: str = "cpu") -> dict[str, list[HookedTransformer]]:
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
                   weights: str | Path, force: bool = False) -> Results:
    """`compute()`'s tables and tensors, kept in `directory` and reused only while they belong to
    what they were computed from, unless `force`.

    The cache is bound to `stamp` (what they were computed for: preset, sizes, and the analysis
    `version`, which it must name) and to the verified digests of the checkpoints in `weights`
    (its model and its snapshots, `checkpoint.checkpoint_digest`), and records the sha256 of every
    file it holds and of its own record. A cache made for other weights, by another analysis
    version, or edited (a table, the tensors or `stamp.json`) is computed again, never read.
    Tables are stored as `.json` (`export_table`: exact floats and dtypes), tensors in one
    safetensors file, and `stamp.json` is written last: a kill mid-write leaves no stamp, so the
    results are computed again rather than read half-written. What is returned is always read
    back from `directory`, so a study gets the same values whether a run was measured now or
    before (nothing of the computation's in-memory state, such as a tensor's dtype or a
    table's dict order, leaks into what the study merges).

    Args:
        directory: the cache folder (a run's `measures/`); only this unit writes it.
        stamp: JSON-able settings of the analysis, including its `version`.
        compute: the analysis, returning tables (`DataFrame`) and tensors by name.
        weights: the run directory whose checkpoints the results are computed from.
        force: compute again even if the cache is valid.

    Returns:
        The tables and tensors by name.

    Raises:
        ValueError: `stamp` names no version, or a checkpoint in `weights` fails verification.
    """
    if "version" not in stamp:
        raise ValueError(f"the stamp of the cache in {directory} names no analysis version ('version'); one is "
                         "needed so that results of an older analysis are never reused")
    directory = Path(directory)
    record = {"stamp": json.loads(json.dumps(stamp)), "weights": _checkpoint_digests(weights)}
    cached = None if force else _read_cache(directory, record)
    if cached is not None:
        return cached
    remove_temporaries(directory)  # what a killed unit left; this unit is its directory's only writer
    results = compute()
    tables = {name: value for name, value in results.items() if isinstance(value, pd.DataFrame)}
    tensors = {name: value for name, value in results.items() if isinstance(value, Tensor)}
    (directory / STAMP).unlink(missing_ok=True)
    files = {f"{name}.json": file_digest(export_table(table, directory / f"{name}.json", overwrite=True))
             for name, table in tables.items()}
    if tensors:
        files[TENSORS] = save_tensors(directory / TENSORS, tensors)
    saved = {**record, "tables": sorted(tables), "tensors": sorted(tensors), "files": files}
    write_json(directory / STAMP, {**saved, "sha256": json_digest(saved)})
    committed = _read_cache(directory, record)  # what was committed, the same whether computed now or before
    if committed is None:
        raise ValueError(f"the measures just written to {directory} do not read back intact; is something else "
                         "writing there?")
    return committed


def _checkpoint_digests(run_dir: str | Path) -> dict[str, str]:
    """The verified digest of a run's model and of each of its snapshots, by relative path."""
    run_dir = Path(run_dir)
    found = {".": checkpoint_digest(run_dir)}
    for _, path in list_snapshots(run_dir):
        found[path.relative_to(run_dir).as_posix()] = checkpoint_digest(path)
    return found


def _read_cache(directory: Path, record: dict) -> Results | None:
    """The cached results if `directory` holds an intact cache made for `record`, else None."""
    try:
        saved = read_json(directory / STAMP)
    except (FileNotFoundError, ValueError):
        return None
    if not isinstance(saved, dict) or saved.get("sha256") != json_digest({k: v for k, v in saved.items()
                                                                         if k != "sha256"}):
        return None  # none, an older format, or edited
    if {key: saved.get(key) for key in record} != record or not isinstance(saved.get("files"), dict):
        return None  # made for other weights, settings or analysis version
    for name, digest in saved["files"].items():
        path = directory / name
        if not path.is_file() or file_digest(path) != digest:
            return None  # a table or the tensors were edited or lost
    tensors = load_tensors(directory / TENSORS, sha256=saved["files"][TENSORS]) if saved["tensors"] else {}
    return {**{name: read_table(directory / f"{name}.json") for name in saved["tables"]},
            **{name: tensors[name] for name in saved["tensors"]}}  # in the stamp's (sorted) order
