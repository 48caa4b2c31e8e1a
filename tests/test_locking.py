"""One writer per output directory: a second process is refused naming the holder, a dead holder's lock is taken over."""

from __future__ import annotations

import os
import signal
from contextlib import contextmanager

import torch

from poslens.variants import load, train
from poslens.variants.locking import LOCK_FILE, locked_directory
from poslens.variants.storage import read_json

SHORT = {"steps": 12, "batch_size": 16, "warmup_steps": 2, "eval_every": 6, "checkpoint_every": 5, "quiet": True}


def fork(job) -> int:
    """Run `job()` in a child process (exit code 0 if it returns); the child's PID."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            job()
            code = 0
        finally:
            os._exit(code)
    return pid


def exit_code(pid: int) -> int:
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@contextmanager
def paused_child(job_until_paused):
    """A child that runs `job_until_paused(pause)`; `pause()` tells us it got there and waits for us."""
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()

    def pause():
        os.write(ready_w, b"1")
        os.read(go_r, 1)

    pid = fork(lambda: job_until_paused(pause))
    assert os.read(ready_r, 1) == b"1"
    try:
        yield pid
    finally:
        os.write(go_w, b"1")
        for fd in (ready_r, ready_w, go_r, go_w):
            os.close(fd)


def test_a_second_writer_is_refused_and_the_first_result_is_intact(tiny, addition, tmp_path, run_cli):
    out = tmp_path / "cc"

    def first_writer(pause):
        train(tiny("nope-causal"), addition, out_dir=out, on_step=lambda step: step == 3 and pause(), **SHORT)

    with paused_child(first_writer) as pid:
        code, _, err = run_cli("train", "--variant", "nope-causal", "--layers", "2", "--d-model", "32", "--steps", "12",
                               "--seed", "1", "--out", str(out), "--quiet")
        assert code == 2 and f"{out} is being written by another poslens process (PID {pid})" in err
        assert "Traceback" not in err
    assert exit_code(pid) == 0
    record = read_json(out / "run.json")
    assert record["finished"] and record["config"]["seed"] == 0 and record["settings"]["steps"] == 12
    expected = train(tiny("nope-causal"), addition, out_dir=tmp_path / "alone", **SHORT).model
    assert all(torch.equal(t, load(out).state_dict()[n]) for n, t in expected.state_dict().items())
    assert not (out / LOCK_FILE).exists()


def test_a_dead_holders_lock_is_taken_over(tiny, addition, tmp_path):
    out = tmp_path / "run"

    def die_holding_the_lock():
        with locked_directory(out):
            (out / ".run.json.poslens-abcdefgh.tmp").write_text("half")  # as a killed writer leaves it
            os.kill(os.getpid(), signal.SIGKILL)

    pid = fork(die_holding_the_lock)
    assert os.waitpid(pid, 0)[1] & 0x7F == signal.SIGKILL
    assert (out / LOCK_FILE).read_text().strip() == str(pid)  # stale: its holder is dead
    result = train(tiny("nope-causal"), addition, out_dir=out, **SHORT)
    assert result.history[-1]["step"] == 12 and sorted(p.name for p in out.iterdir()) == [
        "config.json", "history.json", "model.safetensors", "run.json", "train_state.safetensors"]


def test_reproduce_and_dynamics_lock_their_output_folder(tmp_path, run_cli):
    out = tmp_path / "busy"

    def hold(pause):
        with locked_directory(out):
            pause()
            os._exit(0)  # leaves without releasing, as a killed holder would

    with paused_child(hold) as pid:
        for argv in (("reproduce", "--preset", "tiny"), ("dynamics", "--variant", "nope-causal", "--task", "addition")):
            code, _, err = run_cli(*argv, "--out", str(out), "--quiet")
            assert code == 2 and f"{out} is being written by another poslens process (PID {pid})" in err, argv
    assert exit_code(pid) == 0
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # the holder exited without releasing: stale
    with locked_directory(out) as directory:
        assert (directory / LOCK_FILE).read_text() == f"{os.getpid()}\n"
    assert list(out.iterdir()) == []  # released: the lock file goes with it
    with locked_directory(tmp_path / "fresh"):
        pass
    assert not (tmp_path / "fresh").exists()  # created for nothing: removed again
