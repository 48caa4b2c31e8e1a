"""A fitted probe on disk: one safetensors file, its settings as JSON in the file's metadata.

One file, so that weights and settings can never come from two different saves; written
atomically (`variants.storage.save_tensors`), never pickled. The metadata holds
`poslens_probe`, a JSON object: the format, the probe's class, its constructor parameters
(`dtype` by name) and the fitted sizes; and `sha256`, a digest of the tensors and that JSON
(`variants.storage.content_digest`), so a file altered after it was written is refused. Loading
checks the class, the format, the digest, every tensor's shape and dtype against the settings,
and any settings the caller expects; each mismatch is one clear error naming both sides.
"""

from __future__ import annotations

import json
import numbers
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from poslens.variants.storage import content_digest, dumps_json, read_tensors, save_tensors

PROBE_FORMAT = "poslens-probe/1"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}
SETTINGS_KEY, DIGEST_KEY = "poslens_probe", "sha256"


def save_probe(probe: Any, path: str | os.PathLike, tensors: dict[str, Tensor]) -> Path:
    """Write `tensors` (the probe's fitted state, copied to the CPU) and its settings to `path`.

    Args:
        probe: a fitted probe (its `get_params()` and `n_sites_` / `n_features_in_` are saved).
        path: the file to write (conventionally `.safetensors`); replaced atomically if it exists.
        tensors: the fitted tensors by attribute name.

    Returns:
        The path written.
    """
    params = {name: _json_value(name, value) for name, value in probe.get_params().items()}
    settings = {"format": PROBE_FORMAT, "class": type(probe).__name__, "params": params,
                "n_sites": int(probe.n_sites_), "n_features_in": int(probe.n_features_in_)}
    metadata = {SETTINGS_KEY: dumps_json(settings)}
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
    save_tensors(path, tensors, {**metadata, DIGEST_KEY: content_digest(tensors, metadata)})
    return Path(path)


def read_probe(path: str | os.PathLike, class_name: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The settings and tensors of a probe file, checked to be an intact save of a `class_name`.

    Args:
        path: a file written by `save_probe`.
        class_name: the class the caller loads into.

    Returns:
        `(settings, tensors)`: settings as saved, with `params["dtype"]` a `torch.dtype` again.
    """
    tensors, metadata = read_tensors(path)
    if SETTINGS_KEY not in metadata:
        raise ValueError(f"{path} is a safetensors file but not a saved poslens probe (no {SETTINGS_KEY!r} metadata)")
    try:
        settings = json.loads(metadata[SETTINGS_KEY])
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: the probe settings are not valid JSON (corrupted?): {error}") from error
    if not isinstance(settings, dict) or settings.get("format") != PROBE_FORMAT:
        found = settings.get("format") if isinstance(settings, dict) else settings
        raise ValueError(f"{path} holds probe format {found!r}; this poslens reads {PROBE_FORMAT!r}")
    if settings.get("class") != class_name:
        raise ValueError(f"{path} holds a {settings.get('class')}, not a {class_name}: load it with "
                         f"{settings.get('class')}.load")
    if metadata.get(DIGEST_KEY) != content_digest(tensors, {SETTINGS_KEY: metadata[SETTINGS_KEY]}):
        raise ValueError(f"{path} is corrupted: its contents do not match the digest recorded when it was saved")
    params = dict(settings.get("params") or {})
    if "dtype" in params:
        if params["dtype"] not in DTYPES:
            raise ValueError(f"{path}: unknown probe dtype {params['dtype']!r}; allowed: {sorted(DTYPES)}")
        params["dtype"] = DTYPES[params["dtype"]]
    return {**settings, "params": params}, tensors


def check_tensors(path: str | os.PathLike, tensors: dict[str, Tensor], expected: dict[str, tuple[tuple[int, ...],
                                                                                             torch.dtype]]) -> None:
    """Every tensor the settings call for, with the shape and dtype they imply, and nothing else.

    Args:
        path: the file, for the message.
        tensors: the tensors read.
        expected: name → (shape, dtype).
    """
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ValueError(f"{path} holds tensors {sorted(tensors)}; "
                         f"a probe with these settings needs {sorted(expected)}")
    for name, (shape, dtype) in expected.items():
        if tuple(tensors[name].shape) != shape or tensors[name].dtype != dtype:
            raise ValueError(f"{path}: {name} is {list(tensors[name].shape)} {tensors[name].dtype} but the saved "
                             f"settings call for {list(shape)} {dtype}")


def check_expected(path: str | os.PathLike, settings: dict[str, Any], expected: dict[str, Any]) -> None:
    """Refuse a file whose settings differ from what the caller expects (`C=...`, `n_sites=...`, ...).

    Args:
        path: the file, for the message.
        settings: as `read_probe` returns them.
        expected: parameter or fitted-size names and the values they must have.
    """
    saved = {**settings["params"], "n_sites": settings["n_sites"], "n_features_in": settings["n_features_in"]}
    unknown = sorted(set(expected) - set(saved))
    if unknown:
        raise ValueError(f"cannot check {unknown}: a saved probe records {sorted(saved)}")
    differ = [f"{name}={saved[name]!r} (expected {value!r})"
              for name, value in expected.items() if saved[name] != value]
    if differ:
        raise ValueError(f"{path} was saved with {', '.join(differ)}")


def _json_value(name: str, value: Any) -> Any:
    """A constructor parameter as JSON: a dtype by name, numbers as plain int / float."""
    if isinstance(value, torch.dtype):
        names = [key for key, dtype in DTYPES.items() if dtype == value]
        if not names:
            raise ValueError(f"cannot save a probe with dtype {value}; allowed: {sorted(DTYPES)}")
        return names[0]
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    raise ValueError(f"cannot save the probe parameter {name}={value!r}: not a number, None or a dtype")
