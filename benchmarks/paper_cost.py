"""What one seed of `poslens reproduce --preset paper` costs here, from a short run of one variant.

    python benchmarks/paper_cost.py [--variant nope-causal] [--steps 200] [--threads 1] [--device cpu]
        [--presets quick,paper]

`--presets paper --steps 6000` times one whole paper-preset unit instead of extrapolating.

The paper preset (6 blocks, d_model 128, 6,000 AdamW steps of batch 256) takes hours per run on a
CPU, so this times `--steps` training steps of `--variant` at the paper sizes (`train` as
`reproduce` calls it, evaluations included), then every per-run measure of `reproduce`
(`measure_trained`) at the paper's sample sizes on that model (the measures' cost does not depend
on how far training went). It prints the cost of one unit, extrapolated to the preset's 6,000
steps, and of one seed of the whole study (every variant of `reproduce`, fixed and shifted
format, each costed as this unit: an upper bound, since shifted-format units skip the
interventions), and as the peer: the same extrapolation for the quick preset, whose measured wall times are in
`benchmarks/RESULTS.md`.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from poslens.analyses.experiments.presets import PRESETS, REPRODUCE_VARIANTS
from poslens.analyses.experiments.reproduce import SHIFTED_VARIANTS, measure_trained
from poslens.tasks import Addition
from poslens.variants import train, variant_config


def unit_cost(preset_name: str, variant: str, steps: int, device: str, folder: Path) -> tuple[float, float]:
    """Seconds per training step and seconds for the measures, at `preset_name`'s sizes."""
    settings, task = PRESETS[preset_name], Addition()
    cfg = variant_config(variant, task=task, seed=0, device=device, **settings.model)
    started = time.perf_counter()
    result = train(cfg, task, out_dir=folder / preset_name, quiet=True, seed=0,
                   **{**settings.training, "steps": steps})
    trained = time.perf_counter()
    measure_trained(result, variant, 0, settings, task)
    return (trained - started) / steps, time.perf_counter() - trained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="nope-causal")
    parser.add_argument("--steps", type=int, default=200, help="training steps timed per preset")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--presets", default="quick,paper", help="comma-separated presets to time, in order")
    args = parser.parse_args()
    presets = args.presets.split(",")
    if unknown := [name for name in presets if name not in PRESETS]:
        parser.error(f"unknown variant_config(s) {unknown}; allowed: {sorted(PRESETS)}")
    torch.set_num_threads(args.threads)
    print(f"$ python {shlex.join(sys.argv)}")
    print(f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} CPUs ({platform.machine()}), "
          f"device {args.device}; load average {os.getloadavg()[0]:.1f} at start")
    units = len(REPRODUCE_VARIANTS) + len(SHIFTED_VARIANTS)
    with tempfile.TemporaryDirectory() as folder:
        for name in presets:
            per_step, measures = unit_cost(name, args.variant, args.steps, args.device, Path(folder))
            unit = per_step * PRESETS[name].steps + measures
            print(f"{name:>5}: {per_step * 1e3:6.0f} ms/step x {PRESETS[name].steps} steps "
                  f"+ measures {measures:5.0f} s "
                  f"= {unit / 60:5.1f} min per unit; one seed ({units} units) {units * unit / 3600:5.2f} h of one "
                  f"{'core' if args.device == 'cpu' else 'device'}")
    print(f"load average {os.getloadavg()[0]:.1f} at end")


if __name__ == "__main__":
    main()
