"""Processes: workers die with their driver (SIGKILL included), executor settings are refused before any
work, and a stopped `poslens train` releases its run and resumes to the bits of an uninterrupted one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from poslens.analyses import executors
from poslens.analyses.executors import Unit, check_executor, run_units
from poslens.variants.processes import Stopped, die_with_parent, stop_on_signals


def is_gone(pid: int) -> bool:
    """Whether process `pid` has ended (a zombie waiting for its reaper counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; elsewhere the watchdog is used")
def test_workers_die_with_a_driver_killed_by_sigkill(tmp_path):
    (tmp_path / "naps.py").write_text(textwrap.dedent("""
        import os, time

        def nap(log):
            with open(log, "a") as handle:
                handle.write(f"{os.getpid()}\\n")
            time.sleep(300)
    """))
    log = tmp_path / "pids"
    driver = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        from poslens.analyses import executors
        from naps import nap
        executors.usable_cores = lambda: 2  # two workers even on one core: this is about their lives, not speed
        executors.run_units([executors.Unit(f"u{{i}}", nap, {{"log": {str(log)!r}}}) for i in range(2)],
                            executor="local", workers=2, quiet=True)
    """)
    process = subprocess.Popen([sys.executable, "-P", "-c", driver], start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (log.exists() and len(log.read_text().split()) == 2):
            assert time.monotonic() < deadline and process.poll() is None, "the workers did not start"
            time.sleep(0.05)
        workers = [int(pid) for pid in log.read_text().split()]
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        deadline = time.monotonic() + 10
        while not all(map(is_gone, workers)):
            assert time.monotonic() < deadline, "a worker outlived its driver"
            time.sleep(0.05)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


def test_the_parent_death_mechanism_is_the_kernels_on_linux():
    assert die_with_parent(os.getppid()) == ("prctl" if sys.platform.startswith("linux") else "watchdog")


def test_a_signal_raises_stopped_and_the_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Stopped) as stopped, stop_on_signals():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler interrupts this
    assert (stopped.value.signum, stopped.value.name) == (signal.SIGTERM, "SIGTERM")
    assert isinstance(stopped.value, KeyboardInterrupt)  # what cleans up after Ctrl-C cleans up after it
    assert signal.getsignal(signal.SIGTERM) is before


def test_executor_settings_are_refused_before_any_work(monkeypatch):
    started = time.monotonic()
    with pytest.raises(ValueError, match=r"no Ray cluster answers at 127.0.0.1:1 \(Connection refused\)"):
        check_executor("ray", None, 1, "127.0.0.1:1", 0.0)
    assert time.monotonic() - started < executors.CONNECT_TIMEOUT_S + 1
    with pytest.raises(ValueError, match=r"ray_address must be 'auto', 'local', HOST:PORT or ray://HOST:PORT"):
        check_executor("ray", None, 1, "nowhere", 0.0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"gpus_per_unit 0.25 asks for a GPU, and this machine has none"):
        check_executor("ray", None, 1, None, 0.25)
    cores = executors.usable_cores()
    with pytest.raises(ValueError, match=rf"threads must be an integer from 1 to {cores} \(the cores this process may "
                                         r"use\), got 999"):
        check_executor("local", None, 999, None, 0.0)


def test_a_ray_cluster_without_the_resources_is_refused_before_any_task():
    import ray  # the `cluster` extra the test command installs

    ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        with pytest.raises(ValueError, match=r"threads 2 needs a node with 2 CPUs, and the largest node of the Ray "
                                             r"instance started here has 1"):
            executors._ray_resources(ray, None, 2, 0.0)
        with pytest.raises(ValueError, match=r"gpus_per_unit 0.5 needs a GPU, and no node of the Ray cluster at "
                                             r"HEAD:6379 has one \(largest: 0 GPUs\)"):
            executors._ray_resources(ray, "HEAD:6379", 1, 0.5)
        result = run_units([Unit("u", dict, {"a": 3})], executor="ray", threads=1, quiet=True)
        assert result.results == {"u": {"a": 3}}
    finally:
        ray.shutdown()


def test_sighup_stops_train_which_resumes_to_the_uninterrupted_bits(tmp_path, run_cli):
    argv = ["train", "--variant", "nope-causal", "--layers", "1", "--d-model", "32", "--steps", "1000", "--batch-size",
            "8", "--quiet"]
    stopped, straight = tmp_path / "stopped", tmp_path / "straight"
    process = subprocess.Popen([sys.executable, "-P", "-m", "poslens.cli", *argv, "--out", str(stopped)],
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (stopped / "train_state.safetensors").exists():
        assert time.monotonic() < deadline and process.poll() is None, "no checkpoint was written"
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGHUP)
    _, err = process.communicate(timeout=60)
    assert (process.returncode, err) == (128 + signal.SIGHUP,
                                         "poslens train: stopped by SIGHUP; rerun with --resume to continue\n")
    assert not (stopped / ".poslens.lock").exists()
    assert run_cli(*argv, "--out", str(stopped), "--resume")[0] == 0
    assert run_cli(*argv, "--out", str(straight))[0] == 0
    assert (stopped / "model.safetensors").read_bytes() == (straight / "model.safetensors").read_bytes()


def test_a_full_disk_names_the_file_being_written(tmp_path, monkeypatch):
    import errno

    from poslens.cli import error_line
    from poslens.variants import storage

    def full(_fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(storage.os, "fsync", full)
    with pytest.raises(OSError) as raised:
        storage.atomic_write(tmp_path / "table.csv", "a,b\n")
    assert error_line(raised.value) == f"{tmp_path / 'table.csv'}: No space left on device"
    assert list(tmp_path.iterdir()) == []  # the temporary is gone


def test_numeric_options_are_checked_with_their_range_before_any_work(run_cli, tmp_path, trained_runs):
    run, out, file = str(trained_runs[("nope-causal", 1)]), str(tmp_path / "out"), tmp_path / "file"
    file.write_text("x")
    train = ("train", "--variant", "nope-causal", "--out", out, "--quiet")
    for argv, message in (
        (("probe", run, "--out", f"{out}.csv", "--max-len", "0"), "--max-len must be >= 1, got 0"),
        (("probe", run, "--out", f"{out}.csv", "--sequences", "0"), "--sequences must be >= 1, got 0"),
        ((*train, "--seed", "99999999999999999999"), "--seed must be an integer from 0 to 4294967295, got 9999"),
        ((*train, "--lr", "1e308"), "--lr must be a finite number > 0 and <= 10, got 1e+308"),
        ((*train, "--steps", "0"), "--steps must be >= 1, got 0"),
        ((*train, "--d-model", "100000000"), "a 4-block d_model 100000000 model (480,000,007,800,000,012 weights) "
                                             "cannot fit: training it at batch size 256 needs about"),
        ((*train, "--batch-size", "100000000"), "cannot fit: training it at batch size 100000000 needs about 22,47"),
        ((*train, "--layers", "100000"), "a 100000-block d_model 64 model (4,998,401,676 weights) cannot fit"),
        (("dynamics", "--variant", "nope-causal", "--task", "addition", "--checkpoints", "100000", "--out", out),
         "checkpoints must be at most the 2500 training steps (each snapshot is a distinct step), got 100000"),
        (("reproduce", "--seeds", "0", "--out", out), "--seeds must be >= 1, got 0"),
        (("reproduce", "--workers", "0", "--out", out), "--workers must be >= 1, got 0"),
        (("demo", "--models", str(file), "--static", f"{out}.html"), f"{file} is not a folder; give a reproduce"),
    ):
        code, _, err = run_cli(*argv)
        assert code == 2 and err.startswith(f"poslens {argv[0]}: error: ") and message in err, (argv, err)
        assert err.count("\n") == 1, err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["file"]
