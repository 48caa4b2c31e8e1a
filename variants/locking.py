"""One writer per output directory: an exclusive lock held for as long as a process writes it.

`locked_directory(path)` takes an `fcntl.flock` on `path/.poslens.lock` (creating `path` after
`storage.check_output_dir`), records the holder's PID in it, and removes poslens's write
temporaries that a killed writer left there (`storage.remove_temporaries`): holding the lock
proves no live writer owns them. A second writer is refused at once with `DirectoryLocked`,
naming the holder's PID. The kernel drops a flock when its holder dies (even by SIGKILL), so a
lock file left by a dead process is simply taken over. Training locks its run directory;
`reproduce` and `dynamics` lock their output folder (`holds_lock`).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import inspect
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from poslens.variants.storage import check_output_dir, remove_temporaries

LOCK_FILE = ".poslens.lock"


class DirectoryLocked(RuntimeError):
    """Another live process is writing the directory."""


@contextmanager
def locked_directory(directory: str | os.PathLike, *, clean: Sequence[str] = (".",)) -> Iterator[Path]:
    """Hold the exclusive lock on `directory` (created if missing, and removed again if the block
    leaves it empty) for the `with` block; on entry remove leftover temporaries in `directory`'s
    subfolders `clean` (relative paths)."""
    directory = check_output_dir(directory)
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    fd = _acquire(path)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        for folder in clean:
            remove_temporaries(directory / folder)
        yield directory
    finally:
        path.unlink(missing_ok=True)  # before the unlock: whoever opened this file meanwhile sees it gone
        os.close(fd)
        if created:  # e.g. the call was refused: leave no empty directory behind
            with contextlib.suppress(OSError):
                directory.rmdir()  # fails, as it should, unless the directory is empty


def _acquire(path: Path) -> int:
    """An open, exclusively flocked descriptor of the lock file at `path`."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DirectoryLocked(f"{path.parent} is being written by another poslens process "
                                  f"({_holder(path)}); wait for it to finish or use another directory") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:  # else the holder removed the file while we opened it: lock the new one
            return fd
        os.close(fd)


def _holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        pid = ""
    return f"PID {pid}" if pid.isdigit() else "PID not recorded yet"


def holds_lock(parameter: str, *, clean: Sequence[str] = (".",)) -> Callable:
    """Decorate a function so that it runs holding `locked_directory` on its argument `parameter`."""

    def decorate(function: Callable) -> Callable:
        signature = inspect.signature(function)

        @functools.wraps(function)
        def locked(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            with locked_directory(bound.arguments[parameter], clean=clean):
                return function(*args, **kwargs)

        return locked

    return decorate
