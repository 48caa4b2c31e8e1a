"""The executors: serial, local processes and Ray give the same bits; a killed or failing study resumes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from poslens.analyses import executors
from poslens.analyses.executors import Unit, UnitsFailed, check_parallelism, run_units, usable_cores
from poslens.analyses.experiments.reproduce import REPRODUCE_VARIANTS, SHIFTED, SHIFTED_VARIANTS, reproduce
from poslens.analyses.tables import read_table

UNITS = len(REPRODUCE_VARIANTS) + len(SHIFTED_VARIANTS)  # one seed of the tiny preset
TABLES = ("training", "invariance", "probe", "correlation", "residual_cuts", "activation_patching", "position_swap")


def threads_and_echo(value: int) -> tuple[int, int]:
    """A unit: the torch thread count it ran with, and its input."""
    return torch.get_num_threads(), value


def fails_on(value: int, bad: int) -> int:
    if value == bad:
        raise ValueError(f"unit {value} refuses")
    return value * 10


def assert_same_study(left: Path, right: Path) -> None:
    """Every merged table equal and every trained weight file byte-identical."""
    for name in TABLES:
        pd.testing.assert_frame_equal(read_table(left / "tables" / f"{name}.json"),
                                      read_table(right / "tables" / f"{name}.json"), check_exact=True)
    weights = sorted((left / "runs").glob("*/model.safetensors"))
    assert len(weights) == UNITS
    for path in weights:
        assert path.read_bytes() == (right / path.relative_to(left)).read_bytes(), path


@pytest.fixture
def two_cores(monkeypatch):
    """Two local workers even where this process may use one core (they then share it): these tests
    are about what the workers compute, not about how fast."""
    monkeypatch.setattr(executors, "usable_cores", lambda: max(2, usable_cores()))


@pytest.fixture(scope="module")
def serial_study(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("serial") / "study"
    reproduce(out, preset_name="tiny", executor="serial", quiet=True)
    return out


@pytest.mark.cluster
@pytest.mark.slow
def test_local_workers_and_a_ray_cluster_give_the_serial_bits(serial_study, tmp_path, two_cores):
    reproduce(tmp_path / "local", preset_name="tiny", executor="local", workers=2, quiet=True)
    assert_same_study(serial_study, tmp_path / "local")
    ray = pytest.importorskip("ray", reason="the Ray executor needs the cluster extra: pip install -e '.[cluster]'")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import this test module
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        reproduce(tmp_path / "ray", preset_name="tiny", executor="ray", quiet=True)
        result = run_units([Unit(f"u{i}", threads_and_echo, {"value": i}) for i in range(3)], executor="ray",
                           threads=1, quiet=True)
    finally:
        ray.shutdown()
    assert_same_study(serial_study, tmp_path / "ray")
    assert result.results == {f"u{i}": (1, i) for i in range(3)}, result.failures


@pytest.mark.parametrize("executor, workers", [("serial", None), pytest.param("local", 2, marks=pytest.mark.slow)])
def test_every_unit_runs_with_the_threads_asked_for(executor, workers, two_cores):
    result = run_units([Unit(f"u{i}", threads_and_echo, {"value": i}) for i in range(3)], executor=executor,
                       workers=workers, threads=1, quiet=True)
    assert result.results == {f"u{i}": (1, i) for i in range(3)}


@pytest.mark.slow  # worker processes
def test_a_failing_unit_is_reported_by_name_while_the_others_finish(two_cores):
    units = [Unit(f"u{i}", fails_on, {"value": i, "bad": 1}) for i in range(4)]
    for executor in ("serial", "local"):
        result = run_units(units, executor=executor, workers=2 if executor == "local" else None, quiet=True)
        assert result.results == {"u0": 0, "u2": 20, "u3": 30}
        assert result.failures == {"u1": "ValueError: unit 1 refuses"}
        with pytest.raises(UnitsFailed, match=r"1 of 4 units failed \(u1: ValueError: unit 1 refuses\)"):
            result.raise_failures()


@pytest.mark.slow
def test_a_study_with_a_broken_run_finishes_the_others(tmp_path, run_cli):
    out = tmp_path / "study"
    (out / "runs" / "nope-causal+cut0-seed0").mkdir(parents=True)
    (out / "runs" / "nope-causal+cut0-seed0" / "notes.txt").write_text("not a run")
    code, _, err = run_cli("reproduce", "--preset", "tiny", "--out", str(out), "--executor", "serial", "--quiet")
    assert code == 2 and f"1 of {UNITS} units failed (nope-causal+cut0-seed0: FileExistsError:" in err
    finished = sorted(path.parent.parent.name for path in out.glob("runs/*/measures/stamp.json"))
    assert finished == sorted(["learned-causal-seed0", "nope-bidirectional-seed0", "nope-causal+cut0,1-seed0",
                               "nope-causal-seed0", *(f"{variant}{SHIFTED}-seed0" for variant in SHIFTED_VARIANTS)])


@pytest.mark.slow
def test_a_killed_study_trains_only_what_is_missing(serial_study, tmp_path):
    out = tmp_path / "killed"
    command = [sys.executable, "-P", "-m", "poslens.cli", "reproduce", "--preset", "tiny", "--out", str(out),
               "--executor", "serial", "--quiet"]
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    first = out / "runs" / "nope-causal-seed0"
    deadline = time.monotonic() + 120
    while not (first / "measures" / "stamp.json").exists() and process.poll() is None:
        assert time.monotonic() < deadline, "the first unit did not finish in time"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (out / "tables").exists()  # killed before the merge
    kept = {path: path.stat().st_mtime_ns for path in first.rglob("*") if path.is_file()}
    reproduce(out, preset_name="tiny", executor="serial", quiet=True)
    # the finished unit was neither retrained nor re-measured
    assert {path: path.stat().st_mtime_ns for path in kept} == kept
    assert_same_study(serial_study, out)


def test_parallel_settings_are_checked():
    cores = usable_cores()
    assert check_parallelism("local", None, 1) == cores and check_parallelism("serial", None, 1) == 1
    with pytest.raises(ValueError,
                       match=rf"{cores + 1} workers × 1 threads would oversubscribe the {cores} usable cores"):
        check_parallelism("local", cores + 1, 1)
    with pytest.raises(ValueError, match=r"unknown executor 'slurm'; allowed: \['serial', 'local', 'ray'\]"):
        check_parallelism("slurm", None, 1)
    with pytest.raises(ValueError, match=rf"threads must be an integer from 1 to {cores} \(the cores this process"):
        check_parallelism("local", None, 0)
    with pytest.raises(ValueError, match=rf"threads must be an integer from 1 to {cores} .*, got 999"):
        check_parallelism("serial", None, 999)
    with pytest.raises(ValueError, match=r"gpus_per_unit needs executor 'ray', got 0.5 with 'local'"):
        run_units([], executor="local", gpus_per_unit=0.5, quiet=True)
    with pytest.raises(ValueError, match=r"gpus_per_unit must be 0, a fraction up to 1 or a whole number, got 1.5"):
        run_units([], executor="ray", gpus_per_unit=1.5, quiet=True)
    with pytest.raises(ValueError, match=r"unit names must be distinct"):
        run_units([Unit("a", threads_and_echo, {"value": 0})] * 2, executor="serial", quiet=True)


def test_a_missing_ray_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(ValueError, match=r"the ray executor needs Ray: pip install 'poslens\[cluster\]'"):
        run_units([Unit("a", threads_and_echo, {"value": 0})], executor="ray", quiet=True)


def dies_by(value: int, signals: dict[int, int]) -> int:
    """A unit whose worker process is killed by `signals[value]`, if given (as the OOM killer would)."""
    if value in signals:
        os.kill(os.getpid(), signals[value])
        time.sleep(10)
    return value


def session_processes(session: int) -> list[int]:
    """Live (not zombie) processes of session `session`, from /proc."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


def wait_for(condition, what: str, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen in {timeout} s"
        time.sleep(0.05)


def test_a_killed_worker_is_named_once_and_the_other_units_finish(two_cores):
    kills = {1: signal.SIGKILL, 2: signal.SIGTERM}
    result = run_units([Unit(f"u{i}", dies_by, {"value": i, "signals": kills}) for i in range(4)], executor="local",
                       workers=2, quiet=True)
    assert result.results == {"u0": 0, "u3": 3}
    assert set(result.failures) == {"u1", "u2"}
    assert re.fullmatch(r"its worker process \(PID \d+\) was killed by SIGKILL \(what the out-of-memory killer sends "
                        r"when memory runs out\)", result.failures["u1"])
    assert re.fullmatch(r"its worker process \(PID \d+\) was killed by SIGTERM", result.failures["u2"])


def test_signals_stop_the_whole_study_at_several_moments_and_it_resumes_identically(serial_study, tmp_path):
    out = tmp_path / "stopped"
    for stop, ready in ((signal.SIGHUP, "runs/*/run.json"),  # a run just started
                        (signal.SIGTERM, "runs/*/train_state.safetensors"),  # while units train
                        (signal.SIGINT, "runs/*/measures/stamp.json")):  # a unit finished, others still running
        process = subprocess.Popen([sys.executable, "-P", "-m", "poslens.cli", "reproduce", "--preset", "tiny",
                                    "--out", str(out), "--quiet"], start_new_session=True,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                   env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            before = set(out.glob(ready))
            wait_for(lambda: set(out.glob(ready)) - before or process.poll() is not None, f"a new {ready}")
            assert process.poll() is None, process.stderr.read()
            os.kill(process.pid, stop)
            _, err = process.communicate(timeout=60)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
        name = signal.Signals(stop).name
        assert (process.returncode, err) == (128 + stop, f"poslens reproduce: stopped by {name}; rerun the same "
                                                         "command to resume\n")  # one line: no traceback, no leak
        wait_for(lambda pid=process.pid: not session_processes(pid), "every worker gone", timeout=10)
        assert not (out / ".poslens.lock").exists() and not (out / "tables").exists()
    reproduce(out, preset_name="tiny", quiet=True)
    assert_same_study(serial_study, out)
