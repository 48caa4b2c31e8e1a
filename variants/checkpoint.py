"""Model checkpoints: `config.json` + `model.safetensors`, verified on load.

`config.json` records the variant config and the sha256 of the weights file, so `load`
refuses a truncated or altered file and a config that does not describe the weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from poslens.variants.config import VariantConfig
from poslens.variants.model import HookedTransformer, build
from poslens.variants.storage import load_tensors, read_json, save_tensors, write_json

FORMAT_VERSION = 1


def save(model: HookedTransformer, directory: str | Path) -> Path:
    """Write `model.safetensors` then `config.json` (atomically each) into `directory`."""
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
    """
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory} is not a poslens checkpoint: it has no config.json")
    record = read_json(directory / "config.json")
    if not isinstance(record, dict) or record.get("format") != FORMAT_VERSION or "config" not in record:
        raise ValueError(f"{directory / 'config.json'} is not a poslens checkpoint config (format {FORMAT_VERSION})")
    overrides = {"device": device} if dtype is None else {"device": device, "dtype": dtype}
    cfg = VariantConfig.from_json(record["config"], **overrides)
    weights = load_tensors(directory / "model.safetensors", sha256=record.get("weights_sha256"))
    model = build(cfg)
    check_state_matches(model, weights, directory)
    model.load_state_dict(weights)
    return model.eval()


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
