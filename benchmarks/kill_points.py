"""Kill a run at every durable write point in turn, resume it, and check it ends identical.

    python benchmarks/kill_points.py train        # every point of a tiny training (seconds)
    python benchmarks/kill_points.py reproduce    # every point of `poslens reproduce --preset tiny` (hours)
    python benchmarks/kill_points.py dynamics     # every point of a tiny `poslens dynamics` (minutes)
    python benchmarks/kill_points.py induction    # every point of a tiny `poslens induction` (minutes)
        [--every K] [--export] [--workdir DIR] [STUDY OPTIONS, e.g. --executor local --workers 1]

`variants.storage` counts the durable write points of a process (a complete temporary file
before its rename; a rename) and SIGKILLs the process at the N-th when `POSLENS_KILL_AT=N`.
For each N this script runs the job in a forked child with that variable (a study through the
command-line entry point, `poslens.cli.main`), checks that the child died by SIGKILL, resumes
the job (the same call, in a fresh child, without the variable), and compares the result with
an uninterrupted run made in the same folder first (so paths recorded in tables agree):

- training: `model.safetensors`, `config.json`, `run.json`, every snapshot and the state's
  tensors byte for byte, `history.json` value for value but for the wall-clock `elapsed_s`,
  and the same files (no leftover temporary or lock);
- a study (reproduce, dynamics, induction): every table of the uninterrupted run present in
  every format it was written in and identical (the wall-clock column `this_session_s`
  masked), the committed tensors and every trained model byte for byte, every figure,
  `report.html` and `summary.md` identical (plotly's random element ids masked), the same
  files in `figures/`, and every run's cached measures present.

`--export` tries only the points of a study's export (the merged tables, tensors, figures and
report): each try starts from the uninterrupted run's finished `runs/`, so the killed child
writes only the export, exactly as the uninterrupted job does after its last unit.

Children are forked from this process, so a job's imports are paid once; torch runs one
thread, as in the test suite. Points are counted per process: a job that spreads its writes
over worker processes is killed at the driver's points only (its export, with `--executor local`).
`tests/test_crash_consistency.py` kills the training run at every point, every export point of dynamics
and induction, and a stated selection of the reproduce points; `benchmarks/results/kill-points.md` records
the full runs over every point.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from poslens.cli import main as cli_main
from poslens.tasks import Addition
from poslens.variants import train, variant_config
from poslens.variants.storage import KILL_AT_ENV, WRITE_LOG_ENV, read_json, read_tensors

WALL_CLOCK = ("this_session_s", "elapsed_s")
TABLE_FORMATS = (".csv", ".md", ".tex", ".json")
TRAIN_SETTINGS = {"steps": 12, "batch_size": 16, "warmup_steps": 2, "eval_every": 4, "checkpoint_every": 5}
TRAIN_SNAPSHOTS = [0, 3, 7, 12]
STUDIES = {  # each study's tiny command (serial: every write point in this one process, where they are counted)
    "reproduce": ["reproduce", "--preset", "tiny"],
    "dynamics": ["dynamics", "--variant", "nope-causal", "--task", "addition", "--layers", "1", "--d-model", "32",
                 "--steps", "12", "--checkpoints", "3", "--sequences", "40"],
    "induction": ["induction", "--variant", "nope-causal", "--steps", "4", "--sequences", "8"],
}
PLOTLY_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
"""The random id plotly gives every figure's element in a page (a uuid4), masked before comparing."""


def in_child(job: Callable[[], int], env: dict[str, str] | None = None) -> int:
    """Run `job` in a forked child with `env` added to its environment and its standard output
    discarded (tracebacks still reach standard error); its wait status."""
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the caller (no test teardown, no atexit)
        code = 1
        try:
            os.environ.update(env or {})
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            code = job()
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)
    return os.waitpid(pid, 0)[1]


def write_points(job: Callable[[], int], log: Path) -> list[str]:
    """Run `job` uninterrupted in a child, logging its write points; their labels (`rename PATH`)."""
    log.unlink(missing_ok=True)
    status = in_child(job, {WRITE_LOG_ENV: str(log)})
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"the uninterrupted job failed (wait status {status})")
    return [line.split(" ", 1)[1] for line in log.read_text().splitlines()]


@dataclass
class KillRun:
    """Kill points tried and what went wrong at each (empty: every resumed run was identical)."""

    points: int = 0
    failures: dict[int, list[str]] = field(default_factory=dict)
    seconds: float = 0.0


def kill_each_point(job: Callable[[], int], out: Path, reference: Path, points: Sequence[int],
                    compare: Callable[[Path, Path], list[str]], labels: Sequence[str], quiet: bool = False,
                    start: Callable[[Path], None] | None = None) -> KillRun:
    """For each point N: kill `job` (which writes `out`) at N, resume it, compare `out` with
    `reference`. `out` starts empty, or as `start(out)` leaves it."""
    result, started = KillRun(), time.perf_counter()
    for n in points:
        shutil.rmtree(out, ignore_errors=True)
        if start is not None:
            start(out)
        status = in_child(job, {KILL_AT_ENV: str(n)})
        problems = [] if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL else [
            f"the job was not killed at point {n} (wait status {status})"]
        if not problems:
            code = os.waitstatus_to_exitcode(in_child(job))
            problems = [f"resume exited with {code}"] if code else compare(reference, out)
        result.points += 1
        if problems:
            result.failures[n] = problems
        if not quiet:
            print(f"point {n:4d} ({labels[n - 1]}): {'identical' if not problems else '; '.join(problems)}",
                  flush=True)
    result.seconds = time.perf_counter() - started
    return result


# training -----------------------------------------------------------------------------------------------------------

def train_job(out: Path) -> Callable[[], int]:
    """A tiny addition training with snapshots, evaluations and checkpoints that do not line up."""
    task = Addition(n_test=64)
    cfg = variant_config("nope-causal", task=task, n_layers=2, d_model=32, d_head=8, d_mlp=64)

    def job() -> int:
        train(cfg, task, out_dir=out, resume=True, quiet=True, snapshots=TRAIN_SNAPSHOTS, **TRAIN_SETTINGS)
        return 0

    return job


def compare_runs(reference: Path, candidate: Path) -> list[str]:
    """What differs between two training run directories (see the module docstring)."""
    problems = []
    names = {p.relative_to(reference) for p in reference.rglob("*")}
    found = {p.relative_to(candidate) for p in candidate.rglob("*")}
    if names != found:
        problems.append(f"files differ: missing {sorted(map(str, names - found))}, "
                        f"extra {sorted(map(str, found - names))}")
    for path in sorted(names & found):
        if (reference / path).is_dir() or path.name in ("history.json", "train_state.safetensors"):
            continue
        if (reference / path).read_bytes() != (candidate / path).read_bytes():
            problems.append(f"{path} differs")
    if without_wall_clock(read_json(reference / "history.json")) != without_wall_clock(
            read_json(candidate / "history.json")):
        problems.append("history.json differs")
    ref_state, new_state = (read_tensors(d / "train_state.safetensors")[0] for d in (reference, candidate))
    if ref_state.keys() != new_state.keys() or any(not torch.equal(t, new_state[k]) for k, t in ref_state.items()):
        problems.append("train_state.safetensors tensors differ")
    return problems


def without_wall_clock(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in WALL_CLOCK} for row in rows]


# studies ------------------------------------------------------------------------------------------------------------

def study_job(name: str, out: Path, extra_args: Sequence[str] = ()) -> Callable[[], int]:
    """The tiny `poslens NAME` (`STUDIES`) into `out` through the command-line entry point, with
    `--executor serial --quiet`."""
    return lambda: cli_main([*STUDIES[name], "--out", str(out), "--executor", "serial", "--quiet", *extra_args])


def reproduce_job(out: Path, extra_args: Sequence[str] = ()) -> Callable[[], int]:
    """`poslens reproduce --preset tiny --out OUT --executor serial --quiet` (`study_job`)."""
    return study_job("reproduce", out, extra_args)


def finished_runs(reference: Path) -> Callable[[Path], None]:
    """A `kill_each_point` start: `out` holding the reference's finished `runs/`, nothing merged yet."""
    return lambda out: shutil.copytree(reference / "runs", out / "runs", symlinks=True)


def compare_study(reference: Path, candidate: Path) -> list[str]:
    """What differs between two study output folders (see the module docstring)."""
    problems = []
    for folder in (".", "tables"):  # no leftover temporary, lock or stale file
        names, found = ({p.name for p in (root / folder).iterdir()} if (root / folder).is_dir() else set()
                        for root in (reference, candidate))
        if names != found:
            problems.append(f"{folder}/ holds other files: missing {sorted(names - found)}, "
                            f"extra {sorted(found - names)}")
    for path in sorted((reference / "tables").iterdir()):
        name = f"tables/{path.name}"
        if not (candidate / name).is_file():
            problems.append(f"{name} is missing")
        elif path.suffix in TABLE_FORMATS and masked(path.read_text(), path.suffix) != masked(
                (candidate / name).read_text(), path.suffix) or path.suffix not in TABLE_FORMATS and (
                path.read_bytes() != (candidate / name).read_bytes()):
            problems.append(f"{name} differs")
    for path in sorted(reference.glob("runs/*/model.safetensors")):
        twin = candidate / path.relative_to(reference)
        if not twin.is_file() or twin.read_bytes() != path.read_bytes():
            problems.append(f"{path.relative_to(reference)} differs")
    figures = sorted(p.name for p in (reference / "figures").iterdir())
    if not (candidate / "figures").is_dir() or sorted(p.name for p in (candidate / "figures").iterdir()) != figures:
        problems.append("figures/ holds other files")
    pages = [f"figures/{name}" for name in figures] + ["report.html", "summary.md"]
    for name in pages:
        if not (candidate / name).is_file():
            problems.append(f"{name} is missing")
        elif without_plotly_ids((reference / name).read_text()) != without_plotly_ids((candidate / name).read_text()):
            problems.append(f"{name} differs")
    for path in sorted(reference.glob("runs/*/measures/stamp.json")):
        if not (candidate / path.relative_to(reference)).is_file():
            problems.append(f"{path.relative_to(reference)} is missing")
    return problems


def without_plotly_ids(text: str) -> str:
    """A page with plotly's random element ids masked (the only part of a figure that is not
    a function of its data)."""
    return PLOTLY_ID.sub("ID", text)


def masked(text: str, suffix: str) -> str:
    """A table's text with its wall-clock columns' cells blanked (their values differ run to run)."""
    if suffix == ".json":
        payload = json.loads(text)
        payload["data"] = [{k: None if k in WALL_CLOCK else v for k, v in row.items()} for row in payload["data"]]
        return json.dumps(payload)
    if suffix == ".csv":
        rows = list(csv.reader(io.StringIO(text)))
        hidden = {i for i, name in enumerate(rows[0]) if name in WALL_CLOCK}
        return json.dumps([[cell for i, cell in enumerate(row) if i not in hidden] for row in rows])
    separator = " | " if suffix == ".md" else " & "
    lines = [line.strip("| ").removesuffix(r" \\").split(separator) for line in text.splitlines()]
    header = next(cells for cells in lines if len(cells) > 1)
    hidden = {i for i, name in enumerate(header) if name.replace(r"\_", "_") in WALL_CLOCK}  # LaTeX escapes _
    return json.dumps([[c for i, c in enumerate(cells) if i not in hidden] if len(cells) == len(header) else cells
                       for cells in lines])


# the kill runs --------------------------------------------------------------------------------------------------------

def warm_up(workdir: Path) -> None:
    """Pay torch's one-time lazy initialisation (its optimiser imports dynamo on the first step)
    here, once, rather than in every forked child: one tiny training in this process."""
    train_job(workdir / "warm-up")()
    shutil.rmtree(workdir / "warm-up")


def prepare(workdir: Path, job: Callable[[], int], out: Path) -> tuple[Path, list[str]]:
    """Run `job` uninterrupted into `out`, move the result to `workdir/reference`; the point labels."""
    warm_up(workdir)
    shutil.rmtree(out, ignore_errors=True)
    labels = write_points(job, workdir / "write-points.log")
    reference = workdir / "reference"
    shutil.rmtree(reference, ignore_errors=True)
    out.rename(reference)
    return reference, labels


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("job", choices=["train", *STUDIES])
    parser.add_argument("--workdir", type=Path, default=Path("runs/kill-points"))
    parser.add_argument("--every", type=int, default=1, help="try every K-th point (default: all)")
    parser.add_argument("--export", action="store_true", help="a study's export points only, from its finished runs")
    parser.add_argument("--extra-args", nargs="*", default=[], help="more arguments of the study's command (any "
                        "option this script does not know goes there too, e.g. --executor local --workers 1)")
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.job == "train":
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.extra_args = [*args.extra_args, *unknown]
    if args.export and args.job == "train":
        parser.error("--export is for a study (reproduce, dynamics, induction), not train")
    torch.set_num_threads(1)
    workdir = args.workdir.resolve() / args.job
    workdir.mkdir(parents=True, exist_ok=True)
    out = workdir / "out"
    job = train_job(out) if args.job == "train" else study_job(args.job, out, args.extra_args)
    started = time.perf_counter()
    reference, labels = prepare(workdir, job, out)
    print(f"{args.job}: {len(labels)} write points in one uninterrupted run ({time.perf_counter() - started:.1f} s)",
          flush=True)
    start = None
    if args.export:
        start = finished_runs(reference)
        labels = export_points(job, out, start, workdir / "write-points.log")
        print(f"{args.job}: {len(labels)} of them in the export", flush=True)
    compare = compare_runs if args.job == "train" else compare_study
    result = kill_each_point(job, out, reference, range(1, len(labels) + 1, args.every), compare, labels, start=start)
    print(f"{args.job}: {result.points} of {len(labels)} kill points tried, {len(result.failures)} not identical "
          f"after resume, {result.seconds:.0f} s (python {sys.version.split()[0]}, torch {torch.__version__}, "
          f"load average {os.getloadavg()[0]:.1f})")
    return 1 if result.failures else 0


def export_points(job: Callable[[], int], out: Path, start: Callable[[Path], None], log: Path) -> list[str]:
    """The write points of a study's export: `job` run uninterrupted from `start` (its finished runs)."""
    shutil.rmtree(out, ignore_errors=True)
    start(out)
    labels = write_points(job, log)
    shutil.rmtree(out)
    return labels


if __name__ == "__main__":
    raise SystemExit(main())
