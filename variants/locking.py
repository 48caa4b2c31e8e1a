"""One writer per output directory: an exclusive lock held for as long as a process writes it.

`locked_directory(path)` locks `path/.poslens.lock` (creating `path` after
`storage.check_output_dir`), records the holder's PID in it, and removes poslens's write
temporaries that a killed writer left there (`storage.remove_temporaries`): holding the lock
proves no live writer owns them. A second writer is refused at once with `DirectoryLocked`,
naming the holder's PID. The operating system drops the lock when its holder dies (even by
SIGKILL), so a lock file left by a dead process is simply taken over. Training locks its run
directory; `reproduce`, `dynamics` and `induction` lock their output folder (`holds_lock`).

The lock is `filelock`'s native lock on a descriptor we open ourselves (`flock` on Unix,
`LockFileEx` on Windows), so poslens imports and locks where `fcntl` does not exist. We open
the descriptor because `filelock.FileLock` follows a symbolic link: the lock file is opened with
`O_NOFOLLOW` where the platform has it and accepted only if it is a regular file that is still
the one at its path, so a planted `.poslens.lock` link is refused and its target never written.
Before anything is touched, the directory and its subfolders must be real folders
(`storage.check_real_folders`), and an optional `check` may refuse the directory.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import inspect
import os
import stat
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from filelock import lock_descriptor, unlock_descriptor

from poslens.variants.storage import check_output_dir, check_real_folders, remove_temporaries

LOCK_FILE = ".poslens.lock"
_OPEN_FLAGS = (os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
               | getattr(os, "O_BINARY", 0))


class DirectoryLocked(RuntimeError):
    """Another live process is writing the directory."""


@contextmanager
def locked_directory(directory: str | os.PathLike, *, clean: Sequence[str] = (".",),
                     check: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Hold the exclusive lock on `directory` for the `with` block.

    Args:
        directory: the output folder; created if missing, and removed again if the block leaves
            it empty. It, and every folder inside it, must be a real folder, not a symbolic link.
        clean: subfolders (relative paths) whose leftover temporaries are removed on entry.
        check: called with the directory once the lock is held and before any temporary is
            removed; it raises to refuse a directory that is not this writer's, so that a refusal
            touches nothing.

    Returns:
        A context manager yielding the directory's path.

    Raises:
        DirectoryLocked: another live process holds the lock (its PID is named).
        ValueError: the directory, a folder inside it or its lock file is a symbolic link, or the
            lock file is not a regular file.
    """
    check_real_folders(directory)  # first: the write check below would write through a linked output folder
    directory = check_output_dir(directory)
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    fd = _acquire(path)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        if check is not None:
            check(directory)
        for folder in clean:
            remove_temporaries(directory / folder)
        yield directory
    finally:
        _release(fd, path)
        if created:  # e.g. the call was refused: leave no empty directory behind
            with contextlib.suppress(OSError):
                directory.rmdir()  # fails, as it should, unless the directory is empty


def _acquire(path: Path) -> int:
    """An open, exclusively locked descriptor of the regular lock file at `path`."""
    while True:
        fd = _open_lock_file(path)
        try:
            locked = lock_descriptor(fd, blocking=False)
        except OSError as error:
            os.close(fd)
            raise OSError(error.errno, f"cannot be locked here: {error.strerror or error}", str(path)) from None
        if not locked:
            holder = _holder(fd)
            os.close(fd)
            raise DirectoryLocked(f"{path.parent} is being written by another poslens process "
                                  f"({holder}); wait for it to finish or use another directory")
        if _still_at(fd, path):  # else the holder removed the file while we opened it: lock the new one
            return fd
        os.close(fd)


def _open_lock_file(path: Path) -> int:
    """`path` opened for reading and writing without following a link; a regular file or refused."""
    refusal = (f"{path} is not a regular file (a symbolic link, a folder or a device?); poslens's lock file must be "
               "one: remove it, or choose another output folder")
    try:
        fd = os.open(path, _OPEN_FLAGS, 0o644)
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            raise ValueError(refusal) from None
        raise
    if not _still_at(fd, path):  # a platform without O_NOFOLLOW followed a link, or it is not a file
        os.close(fd)
        raise ValueError(refusal)
    return fd


def _still_at(fd: int, path: Path) -> bool:
    """Whether `fd` is a regular file and the very file now at `path` (not a link to it)."""
    try:
        at_path = os.lstat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return stat.S_ISREG(at_path.st_mode) and (opened.st_dev, opened.st_ino) == (at_path.st_dev, at_path.st_ino)


def _release(fd: int, path: Path) -> None:
    """Remove the lock file, then unlock and close it: whoever opened the file meanwhile sees it gone
    (Windows cannot remove an open file: there it is removed after closing, if no one holds it)."""
    try:
        path.unlink(missing_ok=True)
        removed = True
    except PermissionError:
        removed = False
    with contextlib.suppress(OSError):
        unlock_descriptor(fd)
    os.close(fd)
    if not removed:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)


def _holder(fd: int) -> str:
    """'PID N' as the holder recorded it in the lock file open at `fd`."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        pid = os.read(fd, 32).decode("ascii", "replace").strip()
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
