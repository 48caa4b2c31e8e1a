"""Reading trained runs back: a run directory's task and its model, grouped by variant."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from poslens.tasks import from_record
from poslens.variants import HookedTransformer, load, task_record


def load_task(run_dir: str | Path):
    """The task a run directory was trained on (an `Addition` or a `MarkovICL`); a run recorded
    before a task field existed gets the field's legacy value (`tasks.from_record`)."""
    return from_record(task_record(run_dir))


def load_models_by_variant(directories: Sequence[str | Path], *, device: str = "cpu") -> dict[str, list[HookedTransformer]]:
    """Trained checkpoints grouped by their variant name, in the order given."""
    grouped: dict[str, list[HookedTransformer]] = {}
    for directory in directories:
        model = load(directory, device=device)
        grouped.setdefault(model.cfg.name, []).append(model)
    return grouped
