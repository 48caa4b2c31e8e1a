"""Model checkpoints: `config.json` + `model.safetensors`, verified on load.

`config.json` records the variant config and the sha256 of the weights file, so `load`
refuses a truncated or altered file and a config that does not describe the weights. A
checkpoint whose `config.json` records no digest (made by hand or by another tool) is refused
too; `restamp` records the digest of the weights as they are, once you trust them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from poslens.variants.config import VariantConfig
from poslens.variants.model import HookedTransformer, build
from poslens.variants.storage import load_tensors, read_json, save_tensors, write_json

FORMAT_VERSION = 1


def save(model: HookedTransformer, directory: str | Path) -> Path:
    """Write `model.safetensors` then `config.json` (atomically each) into `directory`.

    Args:
        model: the model to save.
        directory: the folder to write into (created if missing).

    Returns:
        `directory` as a `Path`.
    """
    directory = Path(directory)
    digest = save_tensors(directory / "model.safetensors", model.state_dict())
    write_json(
        directory / "config.json",
        {"format": FORMAT_VERSION, "config": model.cfg.to_json(), "weights_sha256": digest},
    )
    return directory


def load(directory: str | Path, *, device: str = "cpu", dtype: torch.dtype | None = None) -> HookedTransformer:
    """The model saved in `directory`, in eval mode; a clear error if anything does not match.

    `dtype` (e.g. `torch.float64`) loads the weights into a model of that precision.

    Args:
        directory: a run or checkpoint folder holding `config.json` and `model.safetensors`.
        device: where the model runs (`cpu`, `cuda`, ...; those this torch offers).
        dtype: the precision to load the weights in; default the saved config's.

    Returns:
        The `HookedTransformer`, in eval mode.
    """
    directory = Path(directory)
    record = _read_config(directory)
    if not isinstance(record.get("weights_sha256"), str):
        raise ValueError(f"{directory / 'config.json'} records no weights_sha256, so {directory / 'model.safetensors'} "
                         f"cannot be verified; if you trust the weights, record their digest with "
                         f"`poslens restamp {directory}` (poslens.variants.checkpoint.restamp)")
    overrides = {"device": device} if dtype is None else {"device": device, "dtype": dtype}
    cfg = VariantConfig.from_json(record["config"], **overrides)
    weights = load_tensors(directory / "model.safetensors", sha256=record["weights_sha256"])
    model = build(cfg)
    check_state_matches(model, weights, directory)
    model.load_state_dict(weights)
    return model.eval()


def restamp(directory: str | Path) -> bool:
    """Record the sha256 of `directory/model.safetensors` in its `config.json` (for checkpoints
    written without one), after checking that the file is valid safetensors holding exactly the
    tensors the config describes. Returns whether anything was written; a digest already
    recorded is checked, never replaced."""
    directory = Path(directory)
    record = _read_config(directory)
    if isinstance(record.get("weights_sha256"), str):
        load(directory)  # verifies the recorded digest
        return False
    cfg = VariantConfig.from_json(record["config"])
    digest = hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest()
    check_state_matches(build(cfg), load_tensors(directory / "model.safetensors", sha256=digest), directory)
    write_json(directory / "config.json", {**record, "weights_sha256": digest})
    return True


def _read_config(directory: Path) -> dict:
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory} is not a poslens checkpoint: it has no config.json")
    record = read_json(directory / "config.json")
    if not isinstance(record, dict) or record.get("format") != FORMAT_VERSION or "config" not in record:
        raise ValueError(f"{directory / 'config.json'} is not a poslens checkpoint config (format {FORMAT_VERSION})")
    unknown = sorted(set(record) - {"format", "config", "weights_sha256"})
    if unknown:
        raise ValueError(f"{directory / 'config.json'} has unexpected fields {unknown}; "
                         "allowed: ['config', 'format', 'weights_sha256']")
    return record


def check_state_matches(module: nn.Module, weights: dict, source: str | Path) -> None:
    """Raise a `ValueError` listing every missing, unexpected or mis-shaped tensor."""
    expected = {name: tuple(tensor.shape) for name, tensor in module.state_dict().items()}
    found = {name: tuple(tensor.shape) for name, tensor in weights.items()}
    problems = [f"missing {name}" for name in sorted(expected.keys() - found.keys())]
    problems += [f"unexpected {name}" for name in sorted(found.keys() - expected.keys())]
    problems += [
        f"{name} has shape {found[name]}, config expects {expected[name]}"
        for name in sorted(expected.keys() & found.keys())
        if expected[name] != found[name]
    ]
    if problems:
        raise ValueError(f"weights in {source} do not match the config: " + "; ".join(problems))
