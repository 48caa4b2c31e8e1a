"""`poslens train` on a quiet machine and beside one other busy process, at the thread policy's default.

Runs the same short quick-size training (4 blocks, d_model 64, batch 256; `--steps` optimiser
steps) into fresh folders, first quiet, then with `--busy` other busy processes (`yes >
/dev/null`, each started under `timeout` so that it ends even if this script is killed, and
stopped when its measurement ends), and prints the training time of each (`elapsed_s` of the
run's history, so the interpreter's start is left out), the whole command's wall time, and the
busy / quiet ratio. The goal of issue 20 is a ratio within 1.5.

`--threads N` runs the same pair at N torch threads instead of the default; `--threads 0`
adds a pair at every core (torch's own default before the thread policy) for comparison.

    python benchmarks/busy_train.py                      # the default policy (1 thread), 150 steps
    python benchmarks/busy_train.py --steps 300 --threads 0
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from poslens.variants.storage import read_json
from poslens.variants.threads import usable_cores


def train_once(out: Path, steps: int, threads: int | None) -> tuple[float, float]:
    """(training seconds from the run's history, whole command's wall seconds) of one `poslens train`."""
    command = [sys.executable, "-P", "-m", "poslens.cli", "train", "--variant", "nope-causal", "--steps", str(steps),
               "--out", str(out), "--quiet", *(["--threads", str(threads)] if threads else [])]
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return read_json(out / "history.json")[-1]["elapsed_s"], time.perf_counter() - started


def busy_processes(count: int, limit_s: int) -> list[subprocess.Popen]:
    """`count` processes that keep one core each busy for at most `limit_s` seconds."""
    return [subprocess.Popen(["timeout", str(limit_s), "yes"], stdout=subprocess.DEVNULL) for _ in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--busy", type=int, default=1, help="other busy processes during the busy run (default 1)")
    parser.add_argument("--threads", type=int, help="torch threads (default: the policy's; 0 adds every core)")
    parser.add_argument("--limit", type=int, default=900, help="seconds after which a busy process ends on its own")
    args = parser.parse_args()
    settings = [args.threads or None] + ([usable_cores()] if args.threads == 0 else [])
    print(f"{usable_cores()} usable cores, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}, "
          f"{args.steps} steps, {args.busy} busy process(es)")
    print("| threads | quiet training s | busy training s | busy / quiet | quiet wall s | busy wall s |")
    print("| --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as folder:
        for threads in settings:
            quiet = train_once(Path(folder) / f"quiet-{threads}", args.steps, threads)
            others = busy_processes(args.busy, args.limit)
            try:
                busy = train_once(Path(folder) / f"busy-{threads}", args.steps, threads)
            finally:
                for process in others:
                    process.kill()
                    process.wait()
            print(f"| {threads or 'default (1)'} | {quiet[0]:.1f} | {busy[0]:.1f} | {busy[0] / quiet[0]:.2f} | "
                  f"{quiet[1]:.1f} | {busy[1]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
