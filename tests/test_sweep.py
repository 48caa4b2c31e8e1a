"""The sweep layer: serial, local processes and Ray give the same bits; a killed or failing study resumes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from poslens.analyses import sweep
from poslens.analyses.experiments.reproduce import REPRODUCE_VARIANTS, SHIFTED, SHIFTED_VARIANTS, reproduce
from poslens.analyses.sweep import Unit, UnitsFailed, check_parallelism, run_units, usable_cores
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
    monkeypatch.setattr(sweep, "usable_cores", lambda: max(2, usable_cores()))


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
    assert {path: path.stat().st_mtime_ns for path in kept} == kept  # the finished unit was neither retrained nor re-measured
    assert_same_study(serial_study, out)


def test_parallel_settings_are_checked():
    cores = usable_cores()
    assert check_parallelism("local", None, 1) == cores and check_parallelism("serial", None, 1) == 1
    with pytest.raises(ValueError, match=rf"{cores + 1} workers × 1 threads would oversubscribe the {cores} usable cores"):
        check_parallelism("local", cores + 1, 1)
    with pytest.raises(ValueError, match=r"unknown executor 'slurm'; allowed: \['serial', 'local', 'ray'\]"):
        check_parallelism("slurm", None, 1)
    with pytest.raises(ValueError, match=r"threads must be an integer >= 1, got 0"):
        check_parallelism("local", None, 0)
    with pytest.raises(ValueError, match=r"gpus_per_unit must be >= 0 and needs executor 'ray'"):
        run_units([], executor="local", gpus_per_unit=0.5, quiet=True)
    with pytest.raises(ValueError, match=r"unit names must be distinct"):
        run_units([Unit("a", threads_and_echo, {"value": 0})] * 2, executor="serial", quiet=True)


def test_a_missing_ray_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(ValueError, match=r"the ray executor needs Ray: pip install 'poslens\[cluster\]'"):
        run_units([Unit("a", threads_and_echo, {"value": 0})], executor="ray", quiet=True)
