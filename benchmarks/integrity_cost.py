"""What the integrity checks cost: taking and releasing a folder's lock (filelock on a descriptor opened without
following links, against a bare `fcntl.flock`), the symlink walk of a large output tree, `load` with its config
digest, and a measures-cache hit (every checkpoint digest and file digest verified).

    python benchmarks/integrity_cost.py [--repeats 200] [--runs 50] [--snapshots 13]

Prints a markdown table (median of the repeats, in milliseconds). Everything is built in a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from poslens.analyses.runs import cached_results
from poslens.tasks import Addition
from poslens.variants import load, locking, train, variant_config
from poslens.variants.locking import locked_directory
from poslens.variants.storage import check_real_folders


def median_ms(job: Callable[[], object], repeats: int) -> float:
    """The median wall time of `job()` over `repeats` calls, in milliseconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        job()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def bare_flock(path: Path) -> None:
    """What the lock cost before filelock: open, flock, unlock, close (Unix only)."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--runs", type=int, default=50, help="run folders in the synthetic output tree")
    parser.add_argument("--snapshots", type=int, default=13, help="snapshot folders per run")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="integrity-cost-"))
    tree = root / "out"
    for run in range(args.runs):
        for step in range(args.snapshots):
            (tree / "runs" / f"run-{run}" / "checkpoints" / f"step-{step:06d}").mkdir(parents=True)
    (root / "locked").mkdir()
    run_dir = root / "run"
    task = Addition()
    cfg = variant_config("nope-causal", task=task, n_layers=2, d_model=32, d_head=8, d_mlp=64)
    train(cfg, task, out_dir=run_dir, steps=max(4, args.snapshots), batch_size=8, warmup_steps=1, quiet=True,
          snapshots=args.snapshots)
    stamp = {"version": 1}
    measures = {"table": pd.DataFrame({"x": range(100)})}
    cached_results(run_dir / "measures", stamp, lambda: measures, weights=run_dir)
    rows = [
        ("lock taken and released (`locked_directory` on an existing empty folder)",
         median_ms(lambda: _lock_once(root / "locked"), args.repeats)),
        ("its lock primitive: open without following links, filelock, identity check, unlock (now)",
         median_ms(lambda: locking._release(locking._acquire(root / "new.lock"), root / "new.lock"), args.repeats)),
        ("the lock primitive before: open, `fcntl.flock`, unlock, close",
         median_ms(lambda: bare_flock(root / "bare.lock"), args.repeats)),
        (f"symlink walk of {args.runs} runs × {args.snapshots} snapshot folders",
         median_ms(lambda: check_real_folders(tree), max(1, args.repeats // 10))),
        ("`load` of a tiny run (config and weights digests checked)", median_ms(lambda: load(run_dir), args.repeats)),
        (f"measures-cache hit ({args.snapshots + 1} checkpoints and the files verified)",
         median_ms(lambda: cached_results(run_dir / "measures", stamp, lambda: measures, weights=run_dir),
                   max(1, args.repeats // 10))),
    ]
    print("| operation | median ms |\n| --- | ---: |")
    for name, value in rows:
        print(f"| {name} | {value:.3f} |")


def _lock_once(directory: Path) -> None:
    with locked_directory(directory):
        pass


if __name__ == "__main__":
    main()
