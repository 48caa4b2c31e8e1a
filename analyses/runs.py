"""Reading trained runs back: a run directory's task and its model, grouped by variant."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from poslens.tasks import make_task
from poslens.variants import HookedTransformer, load, task_record


def load_task(run_dir: str | Path):
    """The task a run directory was trained on (an `Addition` or a `MarkovICL`); a clear error if
    `run.json`'s task record does not describe one."""
    record = task_record(run_dir)
    if not isinstance(record, dict) or not isinstance(record.get("name"), str):
        raise ValueError(f"{Path(run_dir) / 'run.json'} records no task name: {record!r}")
    try:
        return make_task(**record)
    except TypeError as error:  # a field the task does not have
        raise ValueError(f"{Path(run_dir) / 'run.json'} has a task record that is not a task: {error}") from None


def load_models_by_variant(directories: Sequence[str | Path], *, device: str = "cpu") -> dict[str, list[HookedTransformer]]:
    """Trained checkpoints grouped by their variant name, in the order given."""
    grouped: dict[str, list[HookedTransformer]] = {}
    for directory in directories:
        model = load(directory, device=device)
        grouped.setdefault(model.cfg.name, []).append(model)
    return grouped
