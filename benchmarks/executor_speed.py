"""Wall time of a `poslens reproduce` study: serial at torch's default thread count vs local workers.

Runs the same study twice into fresh folders, one after the other, and prints both wall times
and their ratio:

- parallel: `--executor local --workers W --threads 1` (the default);
- serial: `--executor serial --threads T_default` (torch's default intra-op threads, what a plain
  loop over the units would use).

`--busy 1` keeps one other busy process (a `yes > /dev/null`) running for the whole
measurement, as on a shared machine; it is stopped when the script ends. `--serial-limit F`
stops the serial run once it has taken F times the parallel run's wall time: the ratio is then
reported as "> F×" (measured, not extrapolated), with the serial run's training speed so far.

    python benchmarks/executor_speed.py --preset quick --seeds 3
    python benchmarks/executor_speed.py --preset quick --seeds 1 --busy 1 --serial-limit 2.5
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from poslens.analyses.executors import usable_cores
from poslens.variants.storage import read_json


def timed(command: list[str], limit: float | None = None) -> tuple[float, bool]:
    """Wall time of `command`, and whether it finished (False: stopped at `limit` seconds)."""
    started = time.perf_counter()
    try:
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, timeout=limit)
    except subprocess.TimeoutExpired:
        return time.perf_counter() - started, False
    return time.perf_counter() - started, True


def training_progress(out: Path) -> str:
    """Steps trained and seconds per step of each run of a study folder, from its histories."""
    runs = []
    for history in sorted(out.glob("runs/*/history.json")):
        if rows := read_json(history):  # a run writes `[]` before its first evaluation
            last = rows[-1]
            runs.append(f"{history.parent.name} step {last['step']} ({last['elapsed_s'] / last['step']:.3f} s/step)")
        else:
            runs.append(f"{history.parent.name} no evaluation yet")
    return "; ".join(runs) or "no run started"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--busy", type=int, default=0, help="other busy processes running meanwhile")
    parser.add_argument("--workers", type=int, default=usable_cores())
    parser.add_argument("--serial-limit", type=float, help="stop the serial run at this multiple of the parallel time")
    args = parser.parse_args()
    default_threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {usable_cores()} usable cores, torch default threads {default_threads}, "
          f"{args.busy} busy process(es), load average {os.getloadavg()[0]:.2f} at start", flush=True)
    busy = [subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) for _ in range(args.busy)]
    study = [sys.executable, "-m", "poslens.cli", "reproduce", "--preset", args.preset, "--seeds", str(args.seeds),
             "--quiet"]
    try:
        with tempfile.TemporaryDirectory() as scratch:
            parallel, _ = timed([*study, "--out", str(Path(scratch) / "local"), "--executor", "local",
                                 "--workers", str(args.workers), "--threads", "1"])
            print(f"local, {args.workers} workers × 1 thread: {parallel:.0f} s; "
                  f"{training_progress(Path(scratch) / 'local')}", flush=True)
            limit = args.serial_limit * parallel if args.serial_limit else None
            serial, finished = timed([*study, "--out", str(Path(scratch) / "serial"), "--executor", "serial",
                                      "--threads", str(default_threads)], limit)
            print(f"serial, {default_threads} threads: {serial:.0f} s{'' if finished else ', stopped unfinished'}; "
                  f"{training_progress(Path(scratch) / 'serial')}", flush=True)
    finally:
        for process in busy:
            process.kill()
    ratio = f"**{serial / parallel:.2f}×**" if finished else f"**> {serial / parallel:.2f}×** (serial stopped)"
    serial_cell = f"{serial:.0f} s" if finished else f"> {serial:.0f} s"
    print(f"| {args.preset} | {args.seeds} | {args.busy} | {serial_cell} | {parallel:.0f} s | {ratio} |")


if __name__ == "__main__":
    main()
