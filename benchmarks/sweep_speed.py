"""Wall time of a `poslens reproduce` study: serial at torch's default thread count vs local workers.

Runs the same study twice into fresh folders, one after the other, and prints both wall times
and their ratio:

- serial: `--executor serial --threads T_default` (torch's default intra-op threads, what a plain
  loop over the units would use);
- parallel: `--executor local --workers W --threads 1` (the default).

`--busy 1` keeps one other busy process (a `yes > /dev/null`) running for the whole
measurement, as on a shared machine; it is stopped when the script ends.

    python benchmarks/sweep_speed.py --preset quick --seeds 3
    python benchmarks/sweep_speed.py --preset quick --seeds 1 --busy 1
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

from poslens.analyses.sweep import usable_cores


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--busy", type=int, default=0, help="other busy processes running meanwhile")
    parser.add_argument("--workers", type=int, default=usable_cores())
    args = parser.parse_args()
    default_threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {usable_cores()} usable cores, torch default threads {default_threads}, "
          f"{args.busy} busy process(es), load average {os.getloadavg()[0]:.2f} at start", flush=True)
    busy = [subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) for _ in range(args.busy)]
    study = [sys.executable, "-m", "poslens.cli", "reproduce", "--preset", args.preset, "--seeds", str(args.seeds),
             "--quiet"]
    try:
        with tempfile.TemporaryDirectory() as scratch:
            serial = timed([*study, "--out", str(Path(scratch) / "serial"), "--executor", "serial",
                            "--threads", str(default_threads)])
            print(f"serial, {default_threads} threads: {serial:.0f} s", flush=True)
            parallel = timed([*study, "--out", str(Path(scratch) / "local"), "--executor", "local",
                              "--workers", str(args.workers), "--threads", "1"])
            print(f"local, {args.workers} workers × 1 thread: {parallel:.0f} s", flush=True)
    finally:
        for process in busy:
            process.kill()
    print(f"| {args.preset} | {args.seeds} | {args.busy} | {serial:.0f} s | {parallel:.0f} s | "
          f"**{serial / parallel:.2f}×** |")


if __name__ == "__main__":
    main()
