"""Position-id edits on quick-size addition models (issue 25): does a model break when told other positions?

Trains (resumably) learned-, sinusoidal- and rotary-causal models at the quick preset's size
(4 blocks, d_model 64) for `--steps` steps, then measures each with
`analyses.measures.positions.position_interventions` on 1000 held-out sums: exact match under a
global shift (+1, and +4 where the encoding is a formula), a swap of the first operand's outer
digits' ids and a repeated id, and the readout of a position probe fitted on unedited runs.
Prints the mean ± sd over seeds and writes the per-run tables to `RUNS/tables/`.

    python -P benchmarks/position_edits.py --runs runs/position-edits --seeds 2 --steps 800 [--variant ...]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch

from poslens.analyses.experiments.presets import PRESETS
from poslens.analyses.measures.positions import default_edits, position_interventions
from poslens.analyses.tables import export_tables, mean_sd_text, render_table
from poslens.tasks import Addition
from poslens.variants import train, variant_config

VARIANTS = ("learned-causal", "sinusoidal-causal", "rotary-causal")
READ_SITES = ("embed", "blocks.0.hook_resid_post", "blocks.3.hook_resid_post")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", required=True, help="folder of the training runs (reused when finished)")
    parser.add_argument("--variant", action="append", choices=VARIANTS, help="repeatable (default: all three)")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=800, help="training steps (the quick preset trains 2500)")
    parser.add_argument("--sequences", type=int, default=1000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings, task, parts = PRESETS["quick"], Addition(), {}
    for seed in range(args.seeds):
        for variant in args.variant or VARIANTS:
            started = time.perf_counter()
            cfg = variant_config(variant, task=task, seed=seed, **settings.model)
            result = train(cfg, task, out_dir=Path(args.runs) / f"{variant}-seed{seed}", resume=True, quiet=True,
                           seed=seed, steps=args.steps, batch_size=settings.batch_size)
            model = result.model.eval()
            shifts = (1,) if variant.startswith("learned") else (1, 4)
            tables = position_interventions(model, task, n_sequences=args.sequences, seed=seed,
                                            edits=default_edits(model, task.seq_len - 1, shifts=shifts))
            for name, table in tables.items():
                parts.setdefault(name, []).append(table.assign(variant=variant, seed=seed))
            print(f"{variant} seed {seed}: exact match {result.history[-1]['exact_match']:.3f} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
    merged = {name: pd.concat(tables, ignore_index=True) for name, tables in parts.items()}
    for name, table in merged.items():
        export_tables(table, Path(args.runs) / "tables", name, formats=(".csv", ".md"), overwrite=True)
    print(render_table(mean_sd_text(merged["position_task"], ["variant", "edit", "fixed_by_construction"],
                                    ["exact_match", "keeps_answer", "follows_told"]), "md"))
    readout = merged["position_readout"]
    print(render_table(mean_sd_text(readout[readout["site"].isin(READ_SITES)], ["variant", "edit", "site"],
                                    ["reads_told", "reads_index", "accuracy_unedited"]), "md"))


if __name__ == "__main__":
    main()
