"""Crash-safe file writing, pickle-free tensor files, and early checks of output paths.

Every file poslens writes goes through `atomic_write`: the bytes land in a temporary file
beside the target (`.NAME.poslens-XXXXXXXX.tmp`), are fsynced, renamed over it, and the directory
is fsynced, so a kill at any moment leaves either the old file or the new one, never half of
either (a dead writer's temporaries are removed by `remove_temporaries` once its successor
holds the directory's lock, `variants.locking`). Tensors are stored with safetensors only;
nothing is ever unpickled. JSON is strict: NaN and infinities are refused, not written.

**Only poslens's own files are removed.** A temporary carries poslens's mark in its name
(`.poslens-` before its random part); a temporary folder (`temporary_folder`) also holds a
marker file (`.poslens-temporary`) until it is renamed into place. `remove_temporaries` removes
marked regular files and marked folders that hold the marker, nothing else: never a symbolic
link, never a folder without the marker, never anything named like a temporary by someone else
(`.notes.txt.ab12cd34.tmp`). The folders poslens locks must be real folders, not symbolic links,
all the way down (`check_real_folders`): a link is refused by name before anything is touched,
rather than resolved, so that no write or cleanup can land outside the output folder.

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
import stat
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

KILL_AT_ENV = "POSLENS_KILL_AT"
WRITE_LOG_ENV = "POSLENS_WRITE_LOG"
TEMPORARY_MARK = "poslens-"  # in every temporary's name, before mkstemp's 8 random characters
FOLDER_MARKER = ".poslens-temporary"  # inside a temporary folder until it is renamed into place
_TEMPORARY = re.compile(rf"\.(?P<name>.+)\.{TEMPORARY_MARK}[a-z0-9_]{{8}}\.tmp")
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
    """The prefix of the temporaries `atomic_write` and `temporary_folder` create for `path`."""
    return f".{path.name}.{TEMPORARY_MARK}"


def temporary_folder(final: str | os.PathLike) -> Path:
    """A new, marked temporary folder beside `final` (mode 0o755, holding `FOLDER_MARKER`), to be
    filled and then renamed into place with `commit_folder`.

    Args:
        final: the folder's final path; its parent is created if missing.

    Returns:
        The temporary folder's path (`.NAME.poslens-XXXXXXXX.tmp`).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(dir=final.parent, prefix=temporary_name(final), suffix=".tmp"))
    folder.chmod(0o755)  # mkdtemp's 0700 would make the folder private to its writer
    (folder / FOLDER_MARKER).write_text("a poslens temporary folder; removed when its writer is gone\n")
    return folder


def commit_folder(folder: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Rename a filled `temporary_folder` to `final` in one step, durably, without its marker.

    Args:
        folder: the temporary folder, as `temporary_folder` returned it.
        final: its final path.

    Returns:
        `final`.
    """
    (Path(folder) / FOLDER_MARKER).unlink()
    return atomic_rename(folder, final)


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
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError) and error.filename is None:  # a full disk: name the file it was writing
            raise OSError(error.errno, error.strerror or str(error), str(path)) from error
        raise
    return path


def remove_temporaries(directory: str | os.PathLike) -> list[str]:
    """Delete the temporaries that a killed writer left directly in `directory`: regular files
    named `.NAME.poslens-XXXXXXXX.tmp`, and real folders of that name holding `FOLDER_MARKER`.
    Anything else is left alone (a symbolic link, a folder without the marker, a file merely named
    like a temporary). Only call it while holding the directory's lock, so that no live writer's
    temporary is touched.

    Args:
        directory: the folder to clean (nothing happens if it is not a real folder).

    Returns:
        The names of the removed temporaries, sorted.
    """
    directory = Path(directory)
    removed: list[str] = []
    if directory.is_symlink() or not directory.is_dir():
        return removed
    for path in sorted(directory.iterdir()):
        if not _TEMPORARY.fullmatch(path.name):
            continue
        kind = os.lstat(path).st_mode
        if stat.S_ISREG(kind):
            path.unlink()
        elif stat.S_ISDIR(kind) and stat.S_ISREG(_lstat_mode(path / FOLDER_MARKER)):
            shutil.rmtree(path)  # a folder poslens created: rmtree never follows the links inside it
        else:
            continue
        removed.append(path.name)
    return removed


def _lstat_mode(path: Path) -> int:
    """`path`'s mode without following a link (0 if it does not exist)."""
    try:
        return os.lstat(path).st_mode
    except FileNotFoundError:
        return 0


def check_real_folders(directory: str | os.PathLike) -> None:
    """Refuse, naming it, a `directory` that is a symbolic link or holds one to a folder at any depth,
    so that nothing poslens writes or cleans up in it can land outside it. Links to files are
    left alone: poslens replaces a file by renaming over it, which replaces a link, never its target.

    Args:
        directory: an output folder (which need not exist yet).

    Raises:
        ValueError: naming the first link found and where it points.
    """
    directory = Path(directory)
    links = [directory] if directory.is_symlink() else []
    if not links and directory.is_dir():
        for parent, folders, _ in os.walk(directory):  # never follows links
            links = [Path(parent, name) for name in sorted(folders) if Path(parent, name).is_symlink()]
            if links:
                break
    if links:
        raise ValueError(f"{links[0]} is a symbolic link (to {os.readlink(links[0])}); poslens writes only into real "
                         "folders inside its output, so it does not follow it: replace the link by a folder, or "
                         "choose another output folder")


def is_temporary(name: str) -> bool:
    """Whether a file name is one of poslens's write temporaries."""
    return _TEMPORARY.fullmatch(name) is not None


def dumps_json(obj: Any) -> str:
    """`obj` as pretty, key-sorted, strict JSON (NaN and infinities are an error naming them)."""
    try:
        return json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n"
    except ValueError as error:
        raise ValueError(f"refusing to write non-finite numbers (NaN or infinity) as JSON: {error}") from error


def json_digest(obj: Any) -> str:
    """sha256 of `obj` as canonical JSON (sorted keys, no spaces): the same for the same content,
    however a file holding it is laid out.

    Args:
        obj: anything `json.dumps` takes.

    Returns:
        The hex digest.
    """
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def file_digest(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


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
        fd, probe = tempfile.mkstemp(dir=directory, prefix=temporary_name(Path("write-check")), suffix=".tmp")
    except OSError as error:
        raise PermissionError(f"cannot write into {directory}: {error.strerror}") from None
    os.close(fd)
    os.unlink(probe)
