"""Crash-safe file writing, pickle-free tensor files, and early checks of output paths.

Every file poslens writes goes through `atomic_write`: the bytes land in a temporary file
beside the target (`.NAME.XXXXXXXX.tmp`), are fsynced, renamed over it, and the directory is
fsynced, so a kill at any moment leaves either the old file or the new one, never half of
either (a dead writer's temporaries are removed by `remove_temporaries` once its successor
holds the directory's lock, `variants.locking`). Tensors are stored with safetensors only;
nothing is ever unpickled. JSON is strict: NaN and infinities are refused, not written.

Crash tests: every durable write point (a temporary file complete, before its rename; a
rename done) is counted per process. With `POSLENS_KILL_AT=N` in the environment the process
SIGKILLs itself at its N-th point; with `POSLENS_WRITE_LOG=FILE` it appends one line per
point (`N rename PATH`) to FILE. `benchmarks/kill_points.py` and the tests use both to kill a
run at every point in turn.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

KILL_AT_ENV = "POSLENS_KILL_AT"
WRITE_LOG_ENV = "POSLENS_WRITE_LOG"
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.[A-Za-z0-9_]{8}\.tmp")
_points = {"pid": os.getpid(), "count": 0}


def _file_mode() -> int:
    """The mode `open()` would give a new file (0o666 less the umask); `mkstemp` alone gives 0o600."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _file_mode()


def write_point(kind: str, path: str | os.PathLike) -> None:
    """Count one durable write point of this process (a forked child counts from 1 again), log
    it and die there if the crash-test environment variables ask for it (see the module doc)."""
    if _points["pid"] != os.getpid():
        _points.update(pid=os.getpid(), count=0)
    _points["count"] += 1
    if log := os.environ.get(WRITE_LOG_ENV):
        with open(log, "a", encoding="utf-8") as handle:
            handle.write(f"{_points['count']} {kind} {path}\n")
    if os.environ.get(KILL_AT_ENV) == str(_points["count"]):
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync_directory(directory: Path) -> None:
    """Make a rename in `directory` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_rename(source: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Rename `source` (a complete file or folder) to `target` in one step, durably."""
    target = Path(target)
    os.replace(source, target)
    write_point("rename", target)
    _fsync_directory(target.parent)
    return target


def temporary_name(path: Path) -> str:
    """The prefix of the temporaries `atomic_write` and folder writers create for `path`."""
    return f".{path.name}."


def atomic_write(path: str | os.PathLike, data: bytes | str, *, overwrite: bool = True) -> Path:
    """Write `data` to `path` atomically; with `overwrite=False` refuse an existing file."""
    path = refuse_existing(Path(path), overwrite=overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temporary_name(path), suffix=".tmp")
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            write_point("write", path)
            os.fsync(handle.fileno())
        atomic_rename(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def remove_temporaries(directory: str | os.PathLike) -> list[str]:
    """Delete the temporaries (`.NAME.XXXXXXXX.tmp`, files or folders) that a killed writer left
    directly in `directory`; returns their names. Only call it while holding the directory's
    lock, so that no live writer's temporary is touched."""
    directory = Path(directory)
    removed = []
    for path in sorted(directory.iterdir()) if directory.is_dir() else []:
        if not _TEMPORARY.fullmatch(path.name):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        removed.append(path.name)
    return removed


def is_temporary(name: str) -> bool:
    """Whether a file name is one of poslens's write temporaries."""
    return _TEMPORARY.fullmatch(name) is not None


def dumps_json(obj: Any) -> str:
    """`obj` as pretty, key-sorted, strict JSON (NaN and infinities are an error naming them)."""
    try:
        return json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n"
    except ValueError as error:
        raise ValueError(f"refusing to write non-finite numbers (NaN or infinity) as JSON: {error}") from error


def write_json(path: str | os.PathLike, obj: Any, *, overwrite: bool = True) -> Path:
    """Atomically write `obj` as pretty, key-sorted, strict JSON."""
    return atomic_write(path, dumps_json(obj), overwrite=overwrite)


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


def read_tensors(path: str | os.PathLike, *, sha256: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors (sorted by name, the same order in every process) and the metadata (`{}` if
    none) of a safetensors file, never unpickling; its digest is checked when one is given."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    payload = path.read_bytes()
    if sha256 is not None and hashlib.sha256(payload).hexdigest() != sha256:
        raise ValueError(f"{path} is corrupted: its sha256 does not match the one recorded when it was written")
    try:
        tensors = load_safetensors_bytes(payload)
        header = json.loads(payload[8 : 8 + int.from_bytes(payload[:8], "little")])
    except (SafetensorError, ValueError) as error:
        raise ValueError(f"{path} is not a valid safetensors file (corrupted?): {error}") from error
    # sorted by name: safetensors hands them over in an order that changes from process to process
    return dict(sorted(tensors.items())), header.get("__metadata__") or {}


def load_tensors(path: str | os.PathLike, *, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Read a safetensors file (never pickle), checking its digest when one is given."""
    return read_tensors(path, sha256=sha256)[0]


def content_digest(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """sha256 of tensors (names, dtypes, shapes, bytes) and string metadata, independent of how a
    file lays them out, so a file can carry the digest of its own contents in its metadata."""
    digest = hashlib.sha256(json.dumps(metadata, sort_keys=True).encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"\0{name}\0{tensor.dtype}\0{list(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_output_dir(path: str | os.PathLike) -> Path:
    """Fail early, before any work, unless `path` is a directory poslens can write into (or
    create): it must not be a file, and the directory (or its nearest existing parent) must
    accept a new file, which is tried, not guessed from permission bits."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} is a file; a directory is expected here")
    _try_write(_nearest_existing(path))
    return path


def check_output_file(path: str | os.PathLike, *, overwrite: bool = True, option: str = "") -> Path:
    """Fail early unless a file could be written at `path`: not a directory, its folder writable,
    and (unless `overwrite`) no file there yet.

    Args:
        path: the file to be written.
        overwrite: whether an existing file may be replaced.
        option: how a command-line user asks for `overwrite` (e.g. `--overwrite`), named in the error.

    Returns:
        `path` as a `Path`.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; a file name is expected here")
    refuse_existing(path, overwrite=overwrite, option=option)
    check_output_dir(path.parent)
    return path


def refuse_existing(path: Path, *, overwrite: bool, option: str = "") -> Path:
    """`path`, unless it exists and `overwrite` is false: then a `FileExistsError` saying how to
    replace it (`option`: the command-line flag that sets `overwrite`, if any)."""
    if not overwrite and path.exists():
        raise FileExistsError(f"{path} already exists; pass overwrite=True{f' ({option})' if option else ''} "
                              "to replace it")
    return path


def _nearest_existing(path: Path) -> Path:
    """`path` or its nearest existing ancestor, which must be a directory."""
    candidate = path
    while not candidate.exists():  # ends at "." or "/" at the latest
        candidate = candidate.parent
    if not candidate.is_dir():
        raise NotADirectoryError(f"{candidate} is a file, so {path} cannot be a directory")
    return candidate


def _try_write(directory: Path) -> None:
    try:
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".poslens-write-check.", suffix=".tmp")
    except OSError as error:
        raise PermissionError(f"cannot write into {directory}: {error.strerror}") from None
    os.close(fd)
    os.unlink(probe)
