"""Processes that stop cleanly: signals that unwind like Ctrl-C, and children that die with their parent.

`stop_on_signals` turns SIGTERM (a batch scheduler, `timeout`, systemd), SIGHUP (a closed
terminal) and SIGINT (Ctrl-C) into `Stopped`, a `KeyboardInterrupt`, so every `finally` runs:
locks are released (`variants.locking`), a study's workers are terminated (`analyses.executors`), and
the `poslens` command prints one line and exits with 128 + the signal's number.
`die_with_parent` makes a worker process die with its parent, even when the parent is killed
with SIGKILL: on Linux with the kernel's parent-death signal (`prctl(PR_SET_PDEATHSIG)`),
elsewhere with a watchdog thread polling the parent's PID.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


class Stopped(KeyboardInterrupt):
    """The process was asked to stop by `signum` (see `stop_on_signals`); code that cleans up
    after Ctrl-C cleans up after SIGTERM and SIGHUP the same way."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.name = signal.Signals(signum).name


@contextmanager
def stop_on_signals(signums: Sequence[int] = STOP_SIGNALS) -> Iterator[None]:
    """Within the block, SIGTERM, SIGHUP and SIGINT raise `Stopped` in the main thread, so every
    `finally` runs: locks are released and `run_units` stops its workers. Once one has arrived the
    others are ignored until the block ends (so the clean-up is not interrupted half way); the
    previous handlers are restored after. Outside the main thread this does nothing.

    Args:
        signums: the signals that stop the block.

    Returns:
        A context manager.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, _frame: Any) -> None:
        for other in signums:
            signal.signal(other, signal.SIG_IGN)
        raise Stopped(signum)

    previous = {signum: signal.signal(signum, stop) for signum in signums}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def die_with_parent(parent: int) -> str:
    """Make this process die when process `parent` does, SIGKILL of the parent included.

    Args:
        parent: the PID of the parent this process must not outlive.

    Returns:
        The mechanism used: `prctl` (Linux's parent-death signal) or `watchdog` (a thread that
        polls the parent's PID every second).
    """
    mechanism = "watchdog"
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0) == 0:
            mechanism = "prctl"
    if os.getppid() != parent:  # the parent died before the call could take effect
        os._exit(1)
    if mechanism == "watchdog":
        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, name="poslens-parent-watchdog", daemon=True).start()
    return mechanism
