"""One writer per output directory: a second process is refused naming the holder, a dead holder's lock is
taken over."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
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


def tree(root: Path) -> dict[str, bytes | None]:
    """Every entry under `root` (links not followed): a file's bytes, None for a folder, the target of a link."""
    return {str(path.relative_to(root)): (os.readlink(path).encode() if path.is_symlink() else
                                          None if path.is_dir() else path.read_bytes())
            for path in sorted(root.rglob("*"))}


TRAIN = ("train", "--variant", "nope-causal", "--layers", "1", "--d-model", "32", "--steps", "2", "--batch-size", "4",
         "--quiet")


def test_a_refused_train_out_touches_nothing_that_was_there(tmp_path, run_cli):
    """The issue's case: a folder holding `.notes.txt.ab12cd34.tmp` and `.photos.20240101.tmp/` is refused
    and both survive; so does a poslens-marked temporary, since the refusal comes before any cleanup."""
    out = tmp_path / "mine"
    (out / ".photos.20240101.tmp").mkdir(parents=True)
    (out / ".photos.20240101.tmp" / "beach.jpg").write_bytes(b"jpeg")
    (out / ".notes.txt.ab12cd34.tmp").write_text("my notes")
    (out / ".x.poslens-abcd1234.tmp").write_text("looks like ours")
    before = tree(out)
    code, _, err = run_cli(*TRAIN, "--out", str(out))
    assert code == 2 and err == f"poslens train: error: {out} exists and is not empty; choose a new directory for a " \
                                "training run\n"
    assert tree(out) == before


def test_a_symlinked_output_folder_or_subfolder_is_refused_before_anything_is_touched(tmp_path, run_cli):
    """The issue's case: `OUT/tables` a link to a folder elsewhere; `reproduce --out OUT` is refused naming
    it, and nothing there (a file, a folder, a claims.csv, even a poslens-marked temporary) is touched."""
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "folder").mkdir(parents=True)
    (elsewhere / "folder" / "data.txt").write_text("data")
    (elsewhere / "claims.csv").write_text("their claims")
    (elsewhere / ".claims.csv.poslens-abcd1234.tmp").write_text("x")
    out = tmp_path / "out"
    out.mkdir()
    (out / "tables").symlink_to(elsewhere, target_is_directory=True)
    before = tree(elsewhere)
    code, _, err = run_cli("reproduce", "--preset", "tiny", "--out", str(out), "--quiet")
    assert code == 2 and err.startswith(f"poslens reproduce: error: {out}/tables is a symbolic link (to {elsewhere})")
    assert err.count("\n") == 1 and tree(elsewhere) == before and sorted(p.name for p in out.iterdir()) == ["tables"]
    (tmp_path / "linked").symlink_to(tmp_path / "real", target_is_directory=True)
    (tmp_path / "real").mkdir()
    real_before = os.stat(tmp_path / "real").st_mtime_ns
    code, _, err = run_cli(*TRAIN, "--out", str(tmp_path / "linked"))
    assert code == 2 and f"{tmp_path}/linked is a symbolic link" in err and list((tmp_path / "real").iterdir()) == []
    assert os.stat(tmp_path / "real").st_mtime_ns == real_before  # not even a write check went through the link


def test_a_planted_lock_that_is_not_a_regular_file_is_refused_and_its_target_untouched(tmp_path, run_cli):
    """The issue's case: `ln -s $PWD/V.txt R/.poslens.lock; poslens train ... --resume --out R` no longer writes a
    PID into V.txt; a FIFO or a folder in the lock file's place is refused too."""
    victim = tmp_path / "V.txt"
    victim.write_text("precious\n")
    run = tmp_path / "R"
    run.mkdir()
    (run / LOCK_FILE).symlink_to(victim)
    code, _, err = run_cli(*TRAIN, "--resume", "--out", str(run))
    assert code == 2 and err == (f"poslens train: error: {run / LOCK_FILE} is not a regular file (a symbolic link, a "
                                 "folder or a device?); poslens's lock file must be one: remove it, or choose another "
                                 "output folder\n")
    assert victim.read_text() == "precious\n" and (run / LOCK_FILE).is_symlink()
    for plant in (lambda path: os.mkfifo(path), lambda path: path.mkdir()):
        (run / LOCK_FILE).unlink() if (run / LOCK_FILE).is_symlink() else None
        plant(run / LOCK_FILE)
        with pytest.raises(ValueError, match="is not a regular file"), locked_directory(run):
            pass
        (run / LOCK_FILE).rmdir() if (run / LOCK_FILE).is_dir() else (run / LOCK_FILE).unlink()
        (run / LOCK_FILE).symlink_to(victim)


BLOCK_FCNTL = '''
import sys
class NoFcntl:
    def find_spec(self, name, path=None, target=None):
        if name == "fcntl":
            raise ImportError("No module named 'fcntl'")
sys.modules.pop("fcntl", None)
sys.meta_path.insert(0, NoFcntl())
'''


def test_poslens_imports_where_fcntl_does_not_exist(tmp_path):
    """As on Windows: `import fcntl` fails (a meta-path blocker in sitecustomize); poslens still imports,
    and its lock says in one line why it cannot lock here rather than failing at import."""
    (tmp_path / "sitecustomize.py").write_text(BLOCK_FCNTL)
    code = ("from poslens import build\n"
            "from poslens.cli import error_line\n"
            "from poslens.variants.locking import locked_directory\n"
            "try:\n    import fcntl\nexcept ImportError:\n    print('no fcntl')\n"
            f"try:\n    locked_directory({str(tmp_path / 'out')!r}).__enter__()\n"
            "except OSError as error:\n    print(error_line(error))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(tmp_path), os.environ.get("PYTHONPATH"))))}
    result = subprocess.run([sys.executable, "-P", "-W", "ignore", "-c", code], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["no fcntl", f"{tmp_path / 'out' / LOCK_FILE}: cannot be locked here: "
                                                  "fcntl is unavailable"]
