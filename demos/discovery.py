"""Which checkpoints the addition demo can show: found in a folder (a checkpoint, a `poslens
reproduce` output or a folder of runs), fixed-format addition runs kept and the others named
with the reason, and the built-in model trained on first use."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from poslens.analyses.runs import load_task
from poslens.tasks import Addition
from poslens.variants import train, variant_config

# The built-in model: NoPE-causal (the variant the demo is about) at the default (quick preset) size,
# trained once into DEFAULT_MODEL_DIR (resumable); 1500 steps reached 100% held-out exact match at
# step 1250 (its training curve is in benchmarks/RESULTS.md).
DEFAULT_MODEL_DIR = Path("runs/demo-default")
DEFAULT_VARIANT = "nope-causal"
DEFAULT_STEPS = 1500


def discover_models(directory: str | Path) -> dict[str, Path]:
    """Checkpoint folders by name: `directory` itself if it is one (holds `config.json`), else
    the `runs/<name>/` folders of a `poslens reproduce` output, else its checkpoint subfolders.

    Args:
        directory: a checkpoint, a `reproduce` output or a folder of checkpoints.

    Returns:
        Name → checkpoint folder.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory} is not a folder; give a reproduce output folder or a checkpoint folder")
    if not directory.is_dir():
        raise FileNotFoundError(f"model folder {directory} does not exist")
    if (directory / "config.json").is_file():
        return {directory.name: directory}
    parent = directory / "runs" if (directory / "runs").is_dir() else directory
    found = {child.name: child for child in sorted(parent.iterdir()) if (child / "config.json").is_file()}
    if not found:
        raise FileNotFoundError(f"{directory} holds no poslens checkpoint: expected config.json in it, in "
                                "runs/<name>/ (a reproduce output) or in its subfolders")
    return found


def unsupported_reason(directory: str | Path) -> str | None:
    """Why the demo cannot show the run in `directory`: its prompts and heatmaps need every role at a
    fixed position, so only fixed-format addition runs (not `Addition(max_shift=P)`) are shown.

    Args:
        directory: a run directory (holds `run.json`).

    Returns:
        What rules the run out ("was trained on ..."), or None for a fixed-format addition run.
    """
    task = load_task(directory)
    if not isinstance(task, Addition):
        return f"was trained on {task.name!r}; the demo needs an 'addition' model"
    if task.max_shift:
        return (f"was trained on the shifted format (max_shift={task.max_shift}), whose positions have no fixed "
                "role; the demo needs a fixed-format addition model")
    return None


def demo_models(paths: Mapping[str, str | Path]) -> tuple[dict[str, Path], dict[str, str]]:
    """Split checkpoints (as `discover_models` returns them) into those the demo shows and those it skips.

    A `poslens reproduce` output holds shifted-format runs beside the fixed-format ones.

    Args:
        paths: run name → checkpoint folder.

    Returns:
        `(shown, skipped)`: name → folder of the runs the demo can show, and name → the reason
        each other run is skipped.

    Raises:
        ValueError: when no run is left to show (the message lists every reason).
    """
    reasons = {name: unsupported_reason(path) for name, path in paths.items()}
    shown = {name: Path(path) for name, path in paths.items() if reasons[name] is None}
    skipped = {name: reason for name, reason in reasons.items() if reason is not None}
    if not shown:
        raise ValueError("no model the demo can show: " + "; ".join(f"{paths[name]} {reason}"
                                                                    for name, reason in skipped.items()))
    return shown, skipped


def default_model(out_dir: str | Path = DEFAULT_MODEL_DIR, *, device: str = "cpu", quiet: bool = False) -> Path:
    """The built-in demo model's folder, trained there first if needed (an interrupted run resumes)."""
    task = Addition()
    train(variant_config(DEFAULT_VARIANT, task=task, device=device), task, out_dir=out_dir, resume=True, quiet=quiet,
          steps=DEFAULT_STEPS)
    return Path(out_dir)
