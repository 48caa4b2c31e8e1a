"""Wall time of the main job, `poslens reproduce`, end to end, as a new user runs it.

    python benchmarks/main_job.py [--out DIR] [--preset NAME] [--seeds N] [--keep]

Runs `poslens reproduce --out DIR` (with no other option unless `--preset` / `--seeds` are
given: the built-in default) in a fresh folder, and prints its wall time, the CPU time of it and
its workers, the peak memory of its largest process, the machine's load before and after, and
the verdict of every claim in `tables/claims.csv`. The goal for the default on a quiet 2-core
machine: at most 15 minutes, and no claim left inconclusive for lack of seeds.
"""

from __future__ import annotations

import argparse
import os
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="output folder (default: a fresh temporary one, removed unless --keep)")
    parser.add_argument("--preset", help="a preset other than the default")
    parser.add_argument("--seeds", type=int, help="seeds other than the preset's")
    parser.add_argument("--keep", action="store_true", help="keep the temporary output folder")
    args = parser.parse_args()
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="poslens-main-job-")) / "reproduce"
    if out.exists() and any(out.iterdir()):
        parser.error(f"{out} is not empty: the timing needs a fresh folder")
    command = [sys.executable, "-m", "poslens.cli", "reproduce", "--out", str(out), "--quiet"]
    command += ["--preset", args.preset] if args.preset else []
    command += ["--seeds", str(args.seeds)] if args.seeds else []
    load_before = os.getloadavg()[0]
    print("command:", shlex.join(command), f"(load average before {load_before:.2f}, {os.cpu_count()} CPUs)",
          flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    claims = pd.read_csv(out / "tables" / "claims.csv")
    print(f"wall {wall:.0f} s ({wall / 60:.1f} min); CPU {usage.ru_utime + usage.ru_stime:.0f} s; peak RSS of the "
          f"largest process {usage.ru_maxrss / 1024:.0f} MB; load average after {os.getloadavg()[0]:.2f}")
    print(f"goal <= 15 min: {'met' if wall <= 900 else 'NOT met'}")
    print(claims["verdict"].value_counts().to_string())
    for row in claims.itertuples():
        print(f"- [{row.verdict}] {row.claim} (n {row.n}; {row.test})")
    if not args.out and not args.keep:
        shutil.rmtree(out.parent)


if __name__ == "__main__":
    main()
