"""Capturing every residual site vs a plain forward pass over the same data (goal: ≤ 1.3×).

    python benchmarks/capture_overhead.py [--variant nope-causal] [--layers 6] [--sequences 8192]

Both sides run the same model on the same held-out addition sequences, batch by batch;
the capture side also writes every site's activations into one preallocated CPU tensor.
Runs alternate (plain, capture, plain, ...) and the medians are compared.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from poslens.hooks import capture_residuals, residual_sites
from poslens.tasks import Addition
from poslens.variants import build, variant_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="nope-causal")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--sequences", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    task = Addition(n_test=args.sequences)
    model = build(variant_config(args.variant, task=task, n_layers=args.layers, d_model=args.d_model,
                                 device=args.device)).eval()
    tokens = task.test_set()

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    @torch.no_grad()
    def plain() -> None:
        for batch in tokens.split(args.batch_size):
            model(batch.to(args.device))
        sync()

    def capture() -> None:
        capture_residuals(model, tokens, batch_size=args.batch_size)
        sync()

    timings: dict[str, list[float]] = {"plain forward": [], "capture all sites": []}
    for _ in range(args.repeats + 1):  # the first round warms up and is dropped
        for name, run in (("plain forward", plain), ("capture all sites", capture)):
            start = time.perf_counter()
            run()
            timings[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(times[1:]) for name, times in timings.items()}
    n_sites = len(residual_sites(model))
    print(f"$ python {' '.join(sys.argv)}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}; "
          f"{args.variant}, {args.layers} layers, d_model {args.d_model}, {args.sequences} sequences × "
          f"{task.seq_len} tokens, batch {args.batch_size}, {n_sites} sites")
    for name, seconds in medians.items():
        print(f"{name:>18}: {seconds * 1e3:8.1f} ms (median of {args.repeats})")
    print(f"capture / plain = {medians['capture all sites'] / medians['plain forward']:.2f}× (goal ≤ 1.3×)")


if __name__ == "__main__":
    main()
