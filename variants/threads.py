"""How many threads torch uses: one stated policy for every command and entry point that trains or measures.

The policy (`resolve_threads`):

- `threads` given (`--threads N`, `threads=N`): exactly N torch intra-op threads, refused unless
  1 <= N <= the cores this process may use (its affinity mask; `usable_cores`);
- not given: the number pinned by an enclosing `torch_threads` block (a study's worker pins its
  unit's `--threads`), else `DEFAULT_THREADS` = 1.

Why 1 by default and not "every core": torch's multi-threaded operations wait at every barrier
for all their threads, so on a machine with other work a two-thread run waits for the thread the
scheduler gave away and collapses (`poslens train --steps 150` took 157 s with torch's default of
two threads next to other work, 8.7 s at one thread). One thread never collapses, and on a quiet
2-core machine it costs at most torch's two-thread speed-up (about 1.6× on the quick model); ask
for it with `--threads 2`. The default does not look at the machine's load either, because a
run's numbers depend on its thread count: the same settings, seed and threads give the same bits,
so a default that followed the load would make the same command give different numbers on a
busy and a quiet day.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

DEFAULT_THREADS = 1
_pinned: list[int] = []  # the thread counts of the enclosing `torch_threads` blocks, innermost last


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's total)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check_threads(threads: Any, *, cores: int | None = None, name: str = "threads") -> int:
    """`threads` if it is an integer from 1 to `cores` (default: `usable_cores()`), else a `ValueError`
    naming the value and the usable core count.

    Args:
        threads: the requested torch thread count.
        cores: the most threads allowed (the cores of the machine the work runs on).
        name: how the message names the setting (e.g. `--threads`).

    Returns:
        `threads`, checked.
    """
    cores = usable_cores() if cores is None else cores
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= cores:
        raise ValueError(f"{name} must be an integer from 1 to {cores} (the cores this process may use), "
                         f"got {threads!r}")
    return threads


def resolve_threads(threads: int | None = None) -> int:
    """The torch thread count the policy of this module gives (see the module docstring).

    Args:
        threads: an explicit thread count, or None for the policy's default.

    Returns:
        The checked thread count: `threads`, else the enclosing `torch_threads` block's, else 1.
    """
    if threads is None:
        return _pinned[-1] if _pinned else DEFAULT_THREADS
    return check_threads(threads)


@contextmanager
def torch_threads(threads: int | None = None) -> Iterator[int]:
    """Run the block with torch pinned to `resolve_threads(threads)` intra-op threads, restored after.

    Args:
        threads: the thread count, or None for the policy's default.

    Returns:
        A context manager yielding the thread count in force.

    Example: `with torch_threads(2): probe_table(...)`.
    """
    count = resolve_threads(threads)
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    _pinned.append(count)
    try:
        yield count
    finally:
        _pinned.pop()
        torch.set_num_threads(previous)


def uses_threads(function: Callable) -> Callable:
    """Give `function` a keyword `threads=None` and run it inside `torch_threads(threads)`.

    Args:
        function: an entry point that trains or measures.

    Returns:
        The wrapped function; its signature shows the added `threads` keyword.
    """

    @functools.wraps(function)
    def pinned(*args, threads: int | None = None, **kwargs):
        with torch_threads(threads):
            return function(*args, **kwargs)

    signature = inspect.signature(function)
    extra = inspect.Parameter("threads", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="int | None")
    parameters = list(signature.parameters.values())
    at = next((i for i, p in enumerate(parameters) if p.kind == inspect.Parameter.VAR_KEYWORD), len(parameters))
    widened = signature.replace(parameters=[*parameters[:at], extra, *parameters[at:]])
    # inspect.signature reads __signature__, which typeshed's type of a functools.wraps wrapper does not declare.
    pinned.__signature__ = widened  # type: ignore[attr-defined]
    return pinned
