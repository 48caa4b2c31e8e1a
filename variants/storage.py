"""Crash-safe file writing and pickle-free tensor files.

Every file poslens writes goes through `atomic_write`: the bytes land in a
temporary file beside the target, are fsynced, then renamed over it, so a
kill at any moment leaves either the old file or the new one, never half of
either. Tensors are stored with safetensors only; nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes


def _file_mode() -> int:
    """The mode `open()` would give a new file (0o666 less the umask); `mkstemp` alone gives 0o600."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _file_mode()


def atomic_write(path: str | os.PathLike, data: bytes | str, *, overwrite: bool = True) -> Path:
    """Write `data` to `path` atomically; with `overwrite=False` refuse an existing file."""
    path = Path(path)
    if not overwrite and path.exists():
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | os.PathLike, obj: Any, *, overwrite: bool = True) -> Path:
    """Atomically write `obj` as pretty, key-sorted JSON."""
    return atomic_write(path, json.dumps(obj, indent=2, sort_keys=True) + "\n", overwrite=overwrite)


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file, naming the file in the error if it is missing or corrupted."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON (corrupted file?): {error}") from error


def save_tensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> str:
    """Atomically write tensors as safetensors; returns the file's sha256 hex digest."""
    payload = save_safetensors_bytes({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata)
    atomic_write(path, payload)
    return hashlib.sha256(payload).hexdigest()


def load_tensors(path: str | os.PathLike, *, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Read a safetensors file (never pickle), checking its digest when one is given."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    payload = path.read_bytes()
    if sha256 is not None and hashlib.sha256(payload).hexdigest() != sha256:
        raise ValueError(f"{path} is corrupted: its sha256 does not match the one recorded when it was written")
    try:
        return load_safetensors_bytes(payload)
    except SafetensorError as error:
        raise ValueError(f"{path} is not a valid safetensors file (corrupted?): {error}") from error

