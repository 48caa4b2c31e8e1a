"""The `poslens` console script: thin wrappers, clear errors, machine-readable output."""

import io
import json
import os
import shutil
import tempfile
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pandas as pd
import pytest
import torch

from poslens.cli import error_line, main


def test_train_then_invariance_on_the_checkpoint(run_cli, tmp_path):
    out = tmp_path / "run"
    code, text, _ = run_cli("train", "--variant", "nope-causal", "--layers", "1", "--d-model", "32", "--steps", "6",
                        "--batch-size", "16", "--out", str(out), "--quiet")
    assert code == 0 and "nope-causal on addition: step 6" in text
    assert {"config.json", "model.safetensors", "run.json", "history.json"} <= {p.name for p in out.iterdir()}
    code, text, err = run_cli("train", "--variant", "nope-causal", "--layers", "1", "--d-model", "32", "--steps", "6",
                          "--batch-size", "16", "--out", str(out), "--quiet")
    assert code == 2 and "already holds a training run" in err
    code, text, _ = run_cli("invariance", "--checkpoint", str(out), "--variant", "nope-causal", "--layers", "2",
                        "--perms", "3", "--format", "json")
    rows = json.loads(text)["data"]
    assert code == 0 and [row["invariant"] for row in rows] == [False, True]


def test_invariance_formats_and_errors(run_cli):
    code, text, _ = run_cli("invariance", "--variant", "nope-bidirectional", "--layers", "1", "--perms", "2",
                            "--format", "csv")
    table = pd.read_csv(io.StringIO(text))
    assert code == 0 and table["variant"].tolist() == ["nope-bidirectional"] and table["invariant"].tolist() == [True]
    code, text, _ = run_cli("invariance", "--variant", "nope-causal", "--layers", "2", "--perms", "2", "--format", "md")
    assert code == 0 and text.startswith("| variant |") and "| nope-causal |" in text
    code, _, err = run_cli("invariance", "--variant", "nope-sideways")
    assert code == 2 and "unknown variant 'nope-sideways'; allowed:" in err
    code, _, err = run_cli("train", "--variant", "nope-causal+cut9", "--out", "unused")
    assert code == 2 and "residual cut block 9 is out of range; allowed: 0..3" in err


def test_probe_writes_the_table_and_never_overwrites(run_cli, tmp_path):
    runs = []
    for variant in ("nope-causal", "learned-causal"):
        runs.append(str(tmp_path / variant))
        assert run_cli("train", "--variant", variant, "--layers", "1", "--d-model", "32", "--steps", "4",
                   "--batch-size", "16", "--out", runs[-1], "--quiet")[0] == 0
    table_path, figure_path = tmp_path / "probe.csv", tmp_path / "probe.html"
    code, text, _ = run_cli("probe", *runs, "--out", str(table_path), "--sequences", "40", "--control", "chance",
                        "random_init", "--figure", str(figure_path), "--quiet")
    assert code == 0 and "| site | nope-causal | nope-causal (random init) | learned-causal |" in text
    table = pd.read_csv(table_path)
    assert set(table["variant"]) == {"nope-causal", "learned-causal"}
    assert set(table["baseline"]) == {"trained", "chance", "random_init"}
    pages = sorted(path.name for path in tmp_path.glob("probe*.html"))
    assert pages == ["probe.html", "probe.learned-causal.by_position.html", "probe.nope-causal.by_position.html"]
    for page in pages:  # one shared offline copy of plotly.js beside them, not one each
        text = (tmp_path / page).read_text()
        assert '<script charset="utf-8" src="plotly.min.js">' in text and len(text) < 500_000, page
    assert "plotly.js" in (tmp_path / "plotly.min.js").read_text()[:1000]
    before = table_path.read_bytes()
    code, _, err = run_cli("probe", *runs, "--out", str(table_path), "--sequences", "40", "--quiet")
    assert code == 2 and "already exists" in err and table_path.read_bytes() == before
    code, _, err = run_cli("probe", *runs, "--out", str(tmp_path / "probe.xlsx"), "--sequences", "40", "--quiet")
    assert code == 2 and "'.xlsx'" in err


def run_cli_unprivileged(*argv: str) -> tuple[int, str]:
    """`poslens ARGV...` in a forked child that runs as `nobody` when we are root (so that a
    read-only directory is read-only to it, as to any user); (exit code, stderr)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            err = io.StringIO()
            with redirect_stderr(err), redirect_stdout(io.StringIO()):
                code = main(list(argv))
            os.write(write, err.getvalue().encode())
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as pipe:
        err = pipe.read()
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), err


@pytest.fixture
def read_only_dir():
    """A directory nobody but root may write (world-readable, so `nobody` can reach it)."""
    directory = Path(tempfile.mkdtemp())
    directory.chmod(0o555)
    yield directory
    directory.chmod(0o755)
    shutil.rmtree(directory)


@pytest.mark.parametrize("argv", [
    ("train", "--variant", "nope-causal", "--out"),
    ("reproduce", "--preset", "tiny", "--out"),
    ("dynamics", "--variant", "nope-causal", "--task", "addition", "--out"),
    ("demo", "--models", "unused", "--static"),
])
def test_a_read_only_output_is_one_line_before_any_work(argv, read_only_dir):
    target = read_only_dir / ("page.html" if argv[0] == "demo" else "out")
    code, err = run_cli_unprivileged(*argv, str(target), "--quiet")
    assert code == 2 and err == f"poslens {argv[0]}: error: cannot write into {read_only_dir}: Permission denied\n"
    assert list(read_only_dir.iterdir()) == []


def test_path_errors_device_and_settings_are_one_line(run_cli, tmp_path, trained_runs):
    (tmp_path / "file").write_text("x")
    (tmp_path / "table.csv").mkdir()
    run = str(trained_runs[("nope-causal", 1)])
    for argv, message in (
        (("train", "--variant", "nope-causal", "--out", str(tmp_path / "file")),
         f"{tmp_path / 'file'} is a file; a directory is expected here"),
        (("reproduce", "--out", str(tmp_path / "file" / "sub")), f"{tmp_path / 'file'} is a file, so "),
        (("probe", run, "--out", str(tmp_path / "table.csv")), "table.csv is a directory; a file name is expected"),
        (("probe", run, "--out", str(tmp_path / "file" / "p.csv")), f"{tmp_path / 'file'} is a file; a directory is"),
        (("probe", run, "--out", str(tmp_path / "p.csv"), "--figure", str(tmp_path / "p.png")),
         "p.png must end in one of ['.html', '.htm']"),
        (("train", "--variant", "nope-causal", "--lr", "inf", "--out", str(tmp_path / "r")),
         "--lr must be a finite number > 0 and <= 10, got inf"),
        (("invariance", "--checkpoint", str(tmp_path / "missing")), "has no config.json"),
    ):
        code, _, err = run_cli(*argv, "--quiet") if argv[0] != "invariance" else run_cli(*argv)
        assert code == 2 and err.startswith(f"poslens {argv[0]}: error: ") and message in err, (argv, err)
        assert err.count("\n") == 1
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "r").exists()
    for command in (("train", "--variant", "nope-causal", "--out", "x"), ("reproduce",),
                    ("dynamics", "--variant", "nope-causal", "--task", "addition", "--out", "x"), ("demo",)):
        for device in ("tpu", f"cuda:{torch.cuda.device_count()}"):
            code, _, err = run_cli(*command, "--device", device)
            assert code == 2 and f"device '{device}' is not available here; allowed: ['cpu'" in err, command


def test_a_run_record_with_an_unexpected_field_is_named(run_cli, tmp_path, trained_runs):
    run = shutil.copytree(trained_runs[("nope-causal", 1)], tmp_path / "run")
    record = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**record, "bogus": 1}))
    code, _, err = run_cli("probe", str(run), "--out", str(tmp_path / "p.csv"), "--quiet")
    assert code == 2 and f"{run / 'run.json'} has unexpected fields ['bogus']; allowed: [" in err
    (run / "run.json").write_text(json.dumps({**record, "task": {**record["task"], "bogus": 1}}))
    code, _, err = run_cli("probe", str(run), "--out", str(tmp_path / "p.csv"), "--quiet")
    assert code == 2 and "has a task record that is not a task: " in err and "'bogus'" in err


def test_os_errors_become_one_line_naming_the_path():
    assert error_line(PermissionError(13, "Permission denied", "/data/run")) == "/data/run: Permission denied"
    assert (error_line(OSError(30, "Read-only file system", "/ro/x", None, "/ro/y"))
            == "/ro/x -> /ro/y: Read-only file system")
    assert error_line(NotADirectoryError("runs/x is a file; a directory is expected here")) == (
        "runs/x is a file; a directory is expected here")
