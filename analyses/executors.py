"""Run a study's independent units one after another, in local worker processes, or on a Ray cluster.

A study is a list of `Unit`s: each trains one (variant, seed) run and measures it, and returns
small results (tables) that the experiment merges. Units never share state, so the executor
only decides where they run:

- `serial`: in this process, one after another;
- `local` (the default): `workers` worker processes on this machine;
- `ray`: one Ray task per unit, on the cluster at `ray_address` (`auto` finds a running one)
  or on a Ray instance started here. Ray is the optional `cluster` extra and is imported only
  when chosen.

Every unit runs with torch pinned to `threads` intra-op threads (`variants.threads`), whatever
the executor, so a unit's numbers depend on its settings, seed and thread count only: serial,
local and Ray give bitwise-identical weights and tables. Results travel back to the driver, which
writes every merged output; units write only their own run directory, which must be on a path
every worker sees (on a cluster, a shared filesystem). A unit that fails is reported by name
with its error while the others finish.

Stopping. Every setting (threads, workers, GPUs, the cluster's address and resources) is checked
before the first unit starts. The local workers are this module's own small pool rather than
`concurrent.futures.ProcessPoolExecutor`, for three reasons: a worker that dies (the OOM killer's
SIGKILL, a signal) fails only the unit it was running, named with the signal, and the study goes
on (the executor's pool breaks and reports the same `BrokenProcessPool` once per pending unit);
the driver knows each worker's process, so when it stops (an exception, Ctrl-C, or SIGTERM/SIGHUP
under `variants.processes.stop_on_signals`) it terminates exactly its workers (not its whole process group, which
in a script can hold the shell that started it) and waits for them; and each worker dies with
its driver even when the driver is killed with SIGKILL: on Linux the worker asks the kernel for
a parent-death signal (`prctl(PR_SET_PDEATHSIG, SIGKILL)`), elsewhere a watchdog thread polls
the parent's PID. Workers ignore SIGINT and SIGHUP (a terminal sends them to the whole
foreground group); their driver stops them. Ray tasks of a stopped study are cancelled.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from typing import Any

from tqdm.auto import tqdm
from tqdm.std import tqdm as tqdm_base  # every tqdm class's base: its lock is theirs

from poslens.variants.processes import die_with_parent
from poslens.variants.threads import check_threads, torch_threads, usable_cores

EXECUTORS = ("serial", "local", "ray")
CONNECT_TIMEOUT_S = 5.0  # how long a cluster address may take to accept a connection


@dataclass(frozen=True)
class Unit:
    """One independent piece of a study: `function(**kwargs)`, where `function` is a module-level
    function (so a worker process or a Ray task can import it by name). `cost` is its expected
    cost relative to the others: executors start the costliest units first, so the last round
    leaves few cores idle (ties keep their order; results never depend on the order)."""

    name: str
    function: Callable[..., Any]
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    cost: float = 1.0


class UnitsFailed(RuntimeError):
    """Some units of a study failed; the message names each with its error."""


@dataclass
class UnitResults:
    """Each unit's return value by name, and the error text of each unit that failed."""

    results: dict[str, Any]
    failures: dict[str, str]

    def raise_failures(self) -> None:
        """`UnitsFailed` naming every failed unit and its error, if any failed."""
        if self.failures:
            listed = "; ".join(f"{name}: {error}" for name, error in self.failures.items())
            raise UnitsFailed(f"{len(self.failures)} of {len(self.failures) + len(self.results)} units failed "
                               f"({listed}); the others' results are kept, so a rerun does only the failed ones")


def check_parallelism(executor: str, workers: int | None, threads: int, *, ray_address: str | None = None) -> int:
    """The number of workers to use, after checking the settings: `local` defaults to as many
    workers as fit the usable cores at `threads` threads each, and never oversubscribes them.

    Args:
        executor: one of `EXECUTORS`.
        workers: the requested workers, or None for the default.
        threads: torch threads per unit: 1 to this machine's usable cores, except on a Ray cluster
            elsewhere (`ray_address` given), whose nodes are checked once it is reached.
        ray_address: the Ray cluster's address, if any.

    Returns:
        The worker count.
    """
    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor {executor!r}; allowed: {list(EXECUTORS)}")
    if executor == "ray" and ray_address is not None:  # the cluster's nodes are checked once it is reached
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
    else:
        check_threads(threads)
    cores = usable_cores()
    if workers is None:
        return max(1, cores // threads) if executor != "serial" else 1
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    if executor == "local" and workers * threads > cores:
        raise ValueError(f"{workers} workers × {threads} threads would oversubscribe the {cores} usable cores; "
                         f"use at most {max(1, cores // threads)} workers at {threads} thread(s)")
    return workers


def check_gpus(executor: str, gpus_per_unit: Any, ray_address: str | None) -> float:
    """`gpus_per_unit` if it is a share Ray can schedule (0, a fraction up to 1, or a whole number) on
    executor `ray`, and, for a Ray instance started here, this machine has a GPU.

    Args:
        executor: one of `EXECUTORS`.
        gpus_per_unit: each unit's GPU share.
        ray_address: the Ray cluster's address (whose GPUs are checked once it is reached), if any.

    Returns:
        `gpus_per_unit`, checked.
    """
    number = not isinstance(gpus_per_unit, bool) and isinstance(gpus_per_unit, (int, float))
    if not number or not 0 <= gpus_per_unit < float("inf") or (gpus_per_unit > 1 and gpus_per_unit % 1):
        raise ValueError(f"gpus_per_unit must be 0, a fraction up to 1 or a whole number, got {gpus_per_unit!r}")
    if gpus_per_unit and executor != "ray":
        raise ValueError(f"gpus_per_unit needs executor 'ray', got {gpus_per_unit!r} with {executor!r}")
    if gpus_per_unit and ray_address is None:
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"gpus_per_unit {gpus_per_unit} asks for a GPU, and this machine has none that torch "
                             "can use; leave it at 0 to run on CPUs, or give --ray-address of a cluster with GPUs")
    return float(gpus_per_unit)


def check_ray_address(address: str | None) -> None:
    """Refuse a cluster address that does not accept a connection within `CONNECT_TIMEOUT_S` (what
    `ray.init` would otherwise retry for minutes). `None`, `auto` and `local` are left to Ray.

    Args:
        address: `host:port`, `ray://host:port`, `auto`, `local` or None.
    """
    if address is None or address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"ray_address must be 'auto', 'local', HOST:PORT or ray://HOST:PORT, got {address!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as error:
        reason = (f"no answer within {CONNECT_TIMEOUT_S:g} s" if isinstance(error, TimeoutError)
                  else error.strerror or type(error).__name__)
        raise ValueError(f"no Ray cluster answers at {address} ({reason}); start one "
                         "with `ray start --head`, or leave ray_address out to start one here") from None


def check_executor(executor: str, workers: int | None, threads: int, ray_address: str | None,
                   gpus_per_unit: float) -> tuple[int, float]:
    """Check every executor setting before any work: threads and workers against the usable cores
    (`check_parallelism`), the GPU share (`check_gpus`), and that a cluster address answers
    (`check_ray_address`). The cluster's own resources are checked once Ray has reached it.

    Args:
        executor, workers, threads, ray_address, gpus_per_unit: as for `run_units`.

    Returns:
        The worker count and the GPU share to use.
    """
    workers = check_parallelism(executor, workers, threads, ray_address=ray_address)
    gpus_per_unit = check_gpus(executor, gpus_per_unit, ray_address)
    if executor != "ray" and ray_address is not None:
        raise ValueError(f"ray_address is for executor 'ray', got executor {executor!r}")
    check_ray_address(ray_address)
    return workers, gpus_per_unit


def run_units(units: Sequence[Unit], *, executor: str = "local", workers: int | None = None, threads: int = 1,
              ray_address: str | None = None, gpus_per_unit: float = 0.0, desc: str = "units",
              quiet: bool = False) -> UnitResults:
    """Run every unit with `executor` (see the module docstring); one progress bar over units.

    Args:
        units: the study's units (distinct names).
        executor: `serial`, `local` or `ray`.
        workers: the pool size (`local`; default: usable cores // `threads`) or the number of CPUs
            of a Ray instance started here.
        threads: torch threads per unit.
        ray_address: a running Ray cluster (`ray`), or None to start one here.
        gpus_per_unit: each Ray task's GPU share (a fraction packs several small models on one GPU).
        desc: the progress bar's label.
        quiet: no progress bar.

    Returns:
        The units' results and failures, by name.
    """
    names = [unit.name for unit in units]
    if len(set(names)) != len(names):
        raise ValueError(f"unit names must be distinct, got {names}")
    workers, gpus_per_unit = check_executor(executor, workers, threads, ray_address, gpus_per_unit)
    runner = {"serial": _serial, "local": _local, "ray": _ray}[executor]
    results, failures = {}, {}
    progress = tqdm(total=len(units), desc=desc, disable=quiet)
    outcomes = runner(sorted(units, key=lambda unit: -unit.cost), workers=workers, threads=threads,
                      ray_address=ray_address, gpus_per_unit=gpus_per_unit)
    with progress, closing(outcomes):  # closing: a stop here stops the executor's workers at once
        for name, ok, value in outcomes:
            (results if ok else failures)[name] = value
            progress.update()
            progress.set_postfix(done=len(results), failed=len(failures),
                                 running=min(workers, len(units) - len(results) - len(failures)))
    return UnitResults(results, failures)


Outcome = tuple[str, bool, Any]  # (unit name, succeeded, return value or error text)


def _error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _call(function: Callable[..., Any], kwargs: Mapping[str, Any], threads: int) -> Any:
    """Run one unit with torch pinned to `threads` threads (what every executor's worker does)."""
    with torch_threads(threads):
        return function(**kwargs)


def _serial(units: list[Unit], *, threads: int, **_: Any) -> Iterator[Outcome]:
    for unit in units:
        try:
            yield unit.name, True, _call(unit.function, unit.kwargs, threads)
        except Exception as error:  # a unit's failure is reported, the study goes on
            yield unit.name, False, _error_text(error)


def _exit_on(signum: int, _frame: Any) -> None:
    """SIGTERM in a worker: exit through Python's shutdown, so that the semaphores its unit created
    (tqdm's lock) are unregistered and the resource tracker has nothing to warn about."""
    raise SystemExit(128 + signum)


def _worker(connection: Any, parent: int) -> None:
    """A local worker: run the units it is sent (function, kwargs, threads) until sent None."""
    die_with_parent(parent)
    for signum in (signal.SIGINT, signal.SIGHUP):  # sent to the whole terminal group: the driver stops us
        signal.signal(signum, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_on)
    tqdm_base.set_lock(threading.RLock())  # no cross-process semaphore (a SIGKILL would leak it): bars stay here
    while True:
        try:
            job = connection.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        try:
            outcome = (True, _call(*job))
        except Exception as error:  # a unit's failure is reported, the worker goes on
            outcome = (False, _error_text(error))
        try:
            connection.send(outcome)
        except Exception as error:  # e.g. a result that cannot be pickled
            connection.send((False, f"its result could not be sent back ({_error_text(error)})"))


def _death(process: Any) -> str:
    """Why worker `process` ended, in words."""
    process.join(timeout=5)
    code = process.exitcode
    if code is not None and (code < 0 or code - 128 in (signal.SIGTERM, signal.SIGHUP)):  # 128 + n: `_exit_on`
        name = signal.Signals(-code if code < 0 else code - 128).name
        why = " (what the out-of-memory killer sends when memory runs out)" if code == -signal.SIGKILL else ""
        return f"its worker process (PID {process.pid}) was killed by {name}{why}"
    return f"its worker process (PID {process.pid}) exited with code {code} before returning a result"


def _local(units: list[Unit], *, workers: int, threads: int, **_: Any) -> Iterator[Outcome]:
    # spawn, not fork: a forked child inherits torch's thread pools mid-state and can deadlock
    context = multiprocessing.get_context("spawn")
    waiting, idle, busy = list(units), [], {}  # busy: driver's end of a worker's pipe -> (process, unit)
    started: list[Any] = []
    stopped = True  # until the loop finishes normally, leaving means stopping every worker at once
    try:
        while waiting or busy:
            while waiting and len(busy) < workers:
                if idle:
                    process, connection = idle.pop()
                else:
                    connection, child = context.Pipe()
                    process = context.Process(target=_worker, args=(child, os.getpid()), daemon=True,
                                              name="poslens-worker")
                    process.start()
                    child.close()
                    started.append(process)
                unit = waiting.pop(0)
                try:
                    connection.send((unit.function, unit.kwargs, threads))
                except (BrokenPipeError, ConnectionResetError):
                    yield unit.name, False, _death(process)
                    continue
                except Exception as error:  # the unit's arguments cannot be sent
                    idle.append((process, connection))
                    yield unit.name, False, f"its arguments could not be sent to a worker ({_error_text(error)})"
                    continue
                busy[connection] = (process, unit)
            for connection in wait(list(busy)):
                process, unit = busy.pop(connection)
                try:
                    ok, value = connection.recv()
                except (EOFError, OSError):  # the worker died during the unit
                    connection.close()
                    yield unit.name, False, _death(process)
                    continue
                idle.append((process, connection))
                yield unit.name, ok, value
        stopped = False
    finally:
        for _process, connection in idle:
            try:
                connection.send(None)
            except OSError:
                pass
        for process in started:
            if stopped and process.is_alive():
                process.terminate()
        for process in started:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join()


def _ray_resources(ray: Any, address: str | None, threads: int, gpus_per_unit: float) -> None:
    """Refuse, before any task is submitted, settings that no node of the cluster can run (a task
    that asks for more than any node has waits forever in Ray's queue)."""
    where = f"the Ray cluster at {address}" if address else "the Ray instance started here"
    nodes = [node.get("Resources", {}) for node in ray.nodes() if node.get("Alive")]
    cpus = max((node.get("CPU", 0) for node in nodes), default=0)
    if cpus < threads:
        raise ValueError(f"threads {threads} needs a node with {threads} CPUs, and the largest node of {where} "
                         f"has {cpus:g}")
    gpus = max((node.get("GPU", 0) for node in nodes), default=0)
    if gpus_per_unit and gpus < min(gpus_per_unit, 1):
        raise ValueError(f"gpus_per_unit {gpus_per_unit:g} needs a GPU, and no node of {where} has one "
                         f"(largest: {gpus:g} GPUs)")


def _ray(units: list[Unit], *, workers: int, threads: int, ray_address: str | None, gpus_per_unit: float,
         **_: Any) -> Iterator[Outcome]:
    try:
        import ray
    except ImportError as error:
        raise ValueError(f"the ray executor needs Ray: pip install 'poslens[cluster]' ({error})") from error
    started_here = not ray.is_initialized()
    if started_here:
        options = {"address": ray_address} if ray_address else {"num_cpus": workers * threads}
        try:
            ray.init(**options, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        except ConnectionError as error:
            raise ValueError(f"cannot reach a Ray cluster at {ray_address}: {error}") from None
    pending: dict[Any, str] = {}
    try:
        _ray_resources(ray, ray_address, threads, gpus_per_unit)
        task = ray.remote(num_cpus=threads, num_gpus=gpus_per_unit)(_call)
        pending = {task.remote(unit.function, unit.kwargs, threads): unit.name for unit in units}
        while pending:
            [ready], _ = ray.wait(list(pending), num_returns=1)
            name = pending.pop(ready)
            try:
                yield name, True, ray.get(ready)
            except ray.exceptions.RayTaskError as error:
                yield name, False, _error_text(error.cause) if error.cause is not None else str(error)
            except ray.exceptions.RayError as error:  # its worker died (the OOM killer, a signal, a lost node)
                yield name, False, f"its Ray task failed ({type(error).__name__}: {str(error).splitlines()[0]})"
    finally:
        for reference in pending:  # a stopped study: its tasks must not go on writing
            ray.cancel(reference, force=True)
        if started_here:
            ray.shutdown()
