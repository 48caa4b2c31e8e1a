"""Model checkpoints: `config.json` + `model.safetensors`, verified on load.

`config.json` records the variant config, the sha256 of the weights file (`weights_sha256`)
and the sha256 of the checkpoint as a whole (`sha256`: of the config and the weights digest
together, as canonical JSON), so `load` refuses a truncated or altered weights file, a config
that does not describe the weights, and a config edited after it was saved (changing
`attention_dir` from causal to bidirectional would otherwise load a different model under the
same name). A checkpoint whose `config.json` records no digest (made by hand, by another tool or
by a poslens from before configs were verified) is refused too; `restamp` records the digests of
the checkpoint as it is, once you trust it. `checkpoint_digest` is the verified digest that
caches of measures made from the checkpoint are bound to (`analyses.runs.cached_results`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from poslens.variants.config import VariantConfig
from poslens.variants.model import HookedTransformer, build
from poslens.variants.storage import file_digest, json_digest, load_tensors, read_json, save_tensors, write_json

FORMAT_VERSION = 1
FIELDS = ("config", "format", "sha256", "weights_sha256")


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
    write_json(directory / "config.json", _stamped({"format": FORMAT_VERSION, "config": model.cfg.to_json(),
                                                    "weights_sha256": digest}))
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
    record = _verified_record(directory)
    overrides = {"device": device} if dtype is None else {"device": device, "dtype": dtype}
    cfg = _config(record, directory, **overrides)
    weights = load_tensors(directory / "model.safetensors", sha256=record["weights_sha256"])
    model = build(cfg)
    check_state_matches(model, weights, directory)
    model.load_state_dict(weights)
    return model.eval()


def checkpoint_digest(directory: str | Path) -> str:
    """The digest of the checkpoint in `directory` (its config and weights together), after
    verifying both against it, without building the model.

    Args:
        directory: a checkpoint (a run directory or a snapshot).

    Returns:
        The `sha256` recorded in its `config.json`.

    Raises:
        ValueError: the config was edited, the weights differ from their digest, or no digest is
            recorded (see `restamp`).
    """
    directory = Path(directory)
    record = _verified_record(directory)
    if file_digest(directory / "model.safetensors") != record["weights_sha256"]:
        raise ValueError(f"{directory / 'model.safetensors'} is corrupted: its sha256 does not match the one recorded "
                         "when it was written")
    return record["sha256"]


def restamp(directory: str | Path) -> bool:
    """Record the digests of a checkpoint written without them (`weights_sha256`, then `sha256` of
    config and weights together), after checking that `model.safetensors` is valid safetensors
    holding exactly the tensors the config describes (and, where a weights digest is recorded,
    that the file still matches it). Returns whether anything was written; digests already
    recorded are checked, never replaced, so an edited config stays refused."""
    directory = Path(directory)
    record = _read_config(directory)
    if "sha256" in record:
        load(directory)  # verifies both recorded digests
        return False
    cfg = _config(record, directory)
    recorded = record.get("weights_sha256")
    digest = recorded if isinstance(recorded, str) else file_digest(directory / "model.safetensors")
    check_state_matches(build(cfg), load_tensors(directory / "model.safetensors", sha256=digest), directory)
    write_json(directory / "config.json", _stamped({**record, "weights_sha256": digest}))
    return True


def _digest(record: dict) -> str:
    """sha256 of a checkpoint record without its own `sha256`, as canonical JSON."""
    return json_digest({key: value for key, value in record.items() if key != "sha256"})


def _stamped(record: dict) -> dict:
    return {**record, "sha256": _digest(record)}


def _verified_record(directory: Path) -> dict:
    """`config.json`'s record, refused unless it carries both digests and its own is right."""
    record = _read_config(directory)
    path = directory / "config.json"
    if not isinstance(record.get("weights_sha256"), str):
        raise ValueError(f"{path} records no weights_sha256, so {directory / 'model.safetensors'} "
                         f"cannot be verified; if you trust the weights, record their digest with "
                         f"`poslens restamp {directory}` (poslens.variants.checkpoint.restamp)")
    if not isinstance(record.get("sha256"), str):
        raise ValueError(f"{path} records no sha256 of its config and weights (it was written by an older poslens "
                         f"or by hand), so its config cannot be verified; if you trust it, record the digest with "
                         f"`poslens restamp {directory}`")
    if record["sha256"] != _digest(record):
        raise ValueError(f"{path} was edited after it was saved: its contents do not match the sha256 recorded in it, "
                         f"so it may no longer describe the weights beside it; restore the original (resuming the "
                         f"run rewrites it from its training state) or train again")
    return record


def _config(record: dict, directory: Path, **overrides) -> VariantConfig:
    """The `VariantConfig` of a checkpoint record, with a one-line error naming the file."""
    try:
        return VariantConfig.from_json(record["config"], **overrides)
    except (TypeError, KeyError) as error:
        raise ValueError(f"{directory / 'config.json'} holds a config poslens cannot read: {error}") from None


def _read_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a poslens checkpoint: it has no config.json")
    record = read_json(path)
    if not isinstance(record, dict) or record.get("format") != FORMAT_VERSION or "config" not in record:
        found = (f"a JSON {_json_type(record)}" if not isinstance(record, dict) else
                 f"format {json.dumps(record.get('format'))}" if record.get("format") != FORMAT_VERSION else
                 "no config")
        raise ValueError(f"{path} is not a poslens checkpoint config: expected a JSON object with format "
                         f"{FORMAT_VERSION} and a config, found {found}")
    if not isinstance(record["config"], dict):
        raise ValueError(f"{path} is not a poslens checkpoint config: its config must be a JSON object, found a JSON "
                         f"{_json_type(record['config'])}")
    unknown = sorted(set(record) - set(FIELDS))
    if unknown:
        raise ValueError(f"{path} has unexpected fields {unknown}; allowed: {list(FIELDS)}")
    return record


def _json_type(value) -> str:
    """The JSON name of a parsed value's type (array, string, number...)."""
    names = {list: "array", str: "string", bool: "boolean", int: "number", float: "number", type(None): "null",
             dict: "object"}
    return names.get(type(value), type(value).__name__)


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
