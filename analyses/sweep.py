"""Run a study's independent units one after another, in a local process pool, or on a Ray cluster.

A study is a list of `Unit`s: each trains one (variant, seed) run and measures it, and returns
small results (tables) that the experiment merges. Units never share state, so the executor
only decides where they run:

- `serial`: in this process, one after another;
- `local` (the default): a pool of `workers` processes on this machine;
- `ray`: one Ray task per unit, on the cluster at `ray_address` (`auto` finds a running one)
  or on a Ray instance started here. Ray is the optional `cluster` extra and is imported only
  when chosen.

Every unit runs with torch pinned to `threads` intra-op threads, whatever the executor, so a
unit's numbers depend on its settings, seed and thread count only: serial, local and Ray give
bitwise-identical weights and tables. Results travel back to the driver, which writes every
merged output; units write only their own run directory, which must be on a path every worker
sees (on a cluster, a shared filesystem). A unit that fails is reported by name with its error
while the others finish.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

EXECUTORS = ("serial", "local", "ray")


@dataclass(frozen=True)
class Unit:
    """One independent piece of a study: `function(**kwargs)`, where `function` is a module-level
    function (so a worker process or a Ray task can import it by name)."""

    name: str
    function: Callable[..., Any]
    kwargs: Mapping[str, Any] = field(default_factory=dict)


class UnitsFailed(RuntimeError):
    """Some units of a study failed; the message names each with its error."""


@dataclass
class SweepResult:
    """Each unit's return value by name, and the error text of each unit that failed."""

    results: dict[str, Any]
    failures: dict[str, str]

    def raise_failures(self) -> None:
        """`UnitsFailed` naming every failed unit and its error, if any failed."""
        if self.failures:
            listed = "; ".join(f"{name}: {error}" for name, error in self.failures.items())
            raise UnitsFailed(f"{len(self.failures)} of {len(self.failures) + len(self.results)} units failed "
                               f"({listed}); the others' results are kept, so a rerun does only the failed ones")


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's total)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check_parallelism(executor: str, workers: int | None, threads: int) -> int:
    """The number of workers to use, after checking the settings: `local` defaults to as many
    workers as fit the usable cores at `threads` threads each, and never oversubscribes them."""
    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor {executor!r}; allowed: {list(EXECUTORS)}")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
    cores = usable_cores()
    if workers is None:
        return max(1, cores // threads) if executor != "serial" else 1
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    if executor == "local" and workers * threads > cores:
        raise ValueError(f"{workers} workers × {threads} threads would oversubscribe the {cores} usable cores; "
                         f"use at most {max(1, cores // threads)} workers at {threads} thread(s)")
    return workers


def run_units(units: Sequence[Unit], *, executor: str = "local", workers: int | None = None, threads: int = 1,
              ray_address: str | None = None, gpus_per_unit: float = 0.0, desc: str = "units",
              quiet: bool = False) -> SweepResult:
    """Run every unit with `executor` (see the module docstring); one progress bar over units.

    `workers` is the pool size (`local`; default: usable cores // `threads`) or the number of
    CPUs of a Ray instance started here; `gpus_per_unit` is each Ray task's GPU share (a fraction
    packs several small models on one GPU).

    Args:
        units: the units to run.
        executor: `serial`, `local` or `ray`.
        workers: the pool size, or a local Ray instance's CPUs.
        threads: torch threads per unit.
        ray_address: a running Ray cluster (`auto`, `HOST:PORT`); default a local instance.
        gpus_per_unit: each Ray task's GPU share.
        desc: the progress bar's label.
        quiet: no progress bar.

    Returns:
        A `SweepResult`: each unit's return value and each failure, by name.
    """
    names = [unit.name for unit in units]
    if len(set(names)) != len(names):
        raise ValueError(f"unit names must be distinct, got {names}")
    workers = check_parallelism(executor, workers, threads)
    if gpus_per_unit < 0 or (gpus_per_unit and executor != "ray"):
        raise ValueError(f"gpus_per_unit must be >= 0 and needs executor 'ray', got {gpus_per_unit!r} "
                         f"with {executor!r}")
    if executor != "ray" and ray_address is not None:
        raise ValueError(f"ray_address is for executor 'ray', got executor {executor!r}")
    runner = {"serial": _serial, "local": _local, "ray": _ray}[executor]
    results, failures = {}, {}
    progress = tqdm(total=len(units), desc=desc, disable=quiet)
    with progress:
        for name, ok, value in runner(list(units), workers=workers, threads=threads, ray_address=ray_address,
                                      gpus_per_unit=gpus_per_unit):
            (results if ok else failures)[name] = value
            progress.update()
            progress.set_postfix(done=len(results), failed=len(failures),
                                 running=min(workers, len(units) - len(results) - len(failures)))
    return SweepResult(results, failures)


Outcome = tuple[str, bool, Any]  # (unit name, succeeded, return value or error text)


def _error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _call(function: Callable[..., Any], kwargs: Mapping[str, Any], threads: int) -> Any:
    """Run one unit with torch pinned to `threads` threads (what every executor's worker does)."""
    torch.set_num_threads(threads)
    return function(**kwargs)


@contextmanager
def _pinned_threads(threads: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _serial(units: list[Unit], *, threads: int, **_: Any) -> Iterator[Outcome]:
    with _pinned_threads(threads):
        for unit in units:
            try:
                yield unit.name, True, unit.function(**unit.kwargs)
            except Exception as error:  # a unit's failure is reported, the study goes on
                yield unit.name, False, _error_text(error)


def _local(units: list[Unit], *, workers: int, threads: int, **_: Any) -> Iterator[Outcome]:
    # spawn, not fork: a forked child inherits torch's thread pools mid-state and can deadlock
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(units)) or 1, mp_context=context) as pool:
        pending: dict[Future, str] = {pool.submit(_call, unit.function, unit.kwargs, threads): unit.name
                                      for unit in units}
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                name = pending.pop(future)
                error = future.exception()
                yield (name, True, future.result()) if error is None else (name, False, _error_text(error))


def _ray(units: list[Unit], *, workers: int, threads: int, ray_address: str | None, gpus_per_unit: float,
         **_: Any) -> Iterator[Outcome]:
    try:
        import ray
    except ImportError as error:
        raise ValueError(f"the ray executor needs Ray: pip install 'poslens[cluster]' ({error})") from error
    started_here = not ray.is_initialized()
    if started_here:
        options = {"address": ray_address} if ray_address else {"num_cpus": workers * threads}
        ray.init(**options, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        task = ray.remote(num_cpus=threads, num_gpus=gpus_per_unit)(_call)
        pending = {task.remote(unit.function, unit.kwargs, threads): unit.name for unit in units}
        while pending:
            [ready], _ = ray.wait(list(pending), num_returns=1)
            name = pending.pop(ready)
            try:
                yield name, True, ray.get(ready)
            except ray.exceptions.RayTaskError as error:
                yield name, False, _error_text(error.cause) if error.cause is not None else str(error)
    finally:
        if started_here:
            ray.shutdown()

