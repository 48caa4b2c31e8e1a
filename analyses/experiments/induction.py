"""`poslens induction`: train on n-gram Markov in-context learning and find the induction circuit.

Each (variant, seed) is a unit of `analyses.sweep`: it trains on `MarkovICL(**MARKOV_TASK)` with
the presets' `MARKOV_MODEL` / `MARKOV_TRAINING` into `out_dir/runs/<variant>-seed<k>/` and runs
`analyses.measures.induction.induction_analysis` on the final model (Chen et al.'s copier and
classifier roles, head scores, the loss against the Bayes-optimal predictors). The merged
tables carry `variant` and `seed`; figures are drawn per variant from its first seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from poslens.analyses.experiments.presets import MARKOV_MODEL, MARKOV_TASK, MARKOV_TRAINING
from poslens.analyses.figures import file_name, write_figure
from poslens.analyses.figures.induction import induction_figures
from poslens.analyses.measures.induction import TABLE_COLUMNS, induction_analysis, summarise
from poslens.analyses.runs import cached_results
from poslens.analyses.sweep import Unit, run_units
from poslens.analyses.tables import export_tables, render_table, seed_summary
from poslens.tasks import MarkovICL
from poslens.variants import TrainSettings, preset, train
from poslens.variants.locking import holds_lock
from poslens.variants.storage import atomic_write

ANALYSIS_VERSION = 1
"""Bumped whenever the per-run analysis changes, so runs measured before are measured again."""
TABLE_FORMATS = (".csv", ".md", ".json")


def induction_run(run_dir: str, variant: str, seed: int, n_sequences: int, steps: int | None = None,
                  device: str = "cpu", force: bool = False) -> dict[str, pd.DataFrame]:
    """One unit of `write_induction`: train (or resume) `variant` with `seed` on Markov ICL into
    `run_dir`, then its induction analysis (tables with `variant` and `seed`), cached in
    `run_dir/measures/`."""
    task = MarkovICL(**MARKOV_TASK)
    cfg = preset(variant, task=task, seed=seed, device=device, **MARKOV_MODEL)
    settings = {**MARKOV_TRAINING, **({} if steps is None else {"steps": steps}), "seed": seed}
    trained = train(cfg, task, out_dir=run_dir, resume=True, quiet=True, **settings)

    def measure() -> dict[str, pd.DataFrame]:
        report = induction_analysis(trained.model, task, n_sequences=n_sequences)
        return {name: table.assign(variant=variant, seed=seed) for name, table in report.tables.items()}

    stamp = {"n_sequences": n_sequences, "version": ANALYSIS_VERSION}
    return cached_results(Path(run_dir) / "measures", stamp, measure, force=force)


@holds_lock("out_dir", clean=(".", "tables", "figures"))  # one writer; a killed one's temporaries removed
def write_induction(out_dir: str | Path, *, variants: Sequence[str], seeds: Sequence[int] = (0,),
                    n_sequences: int = 1000, steps: int | None = None, device: str = "cpu", quiet: bool = False,
                    force: bool = False, **sweep: Any) -> dict[str, pd.DataFrame]:
    """The whole `poslens induction` job: one `induction_run` per (variant, seed) (`sweep` takes
    the executor settings of `analyses.sweep.run_units`), then `out_dir/tables/*.{csv,md,json}`
    (the induction tables merged, plus `roles`: each run's copier heads, best parent-matching
    head and loss gap to Bayes), `out_dir/figures/` and `out_dir/summary.md`. Existing outputs
    are refused unless `force`, which measures the runs again (trained runs are kept).

    Args:
        out_dir: the study's folder.
        variants: variant names.
        seeds: the seeds.
        n_sequences: fresh sequences measured per run.
        steps: optimiser steps; default `MARKOV_TRAINING`'s.
        device: where the units run.
        quiet: no progress bars.
        force: measure finished runs again.
        **sweep: executor settings of `run_units`.

    Returns:
        The merged tables by name.
    """
    variants, seeds = list(variants), list(seeds)
    if not variants or not seeds or len(set(variants)) != len(variants) or len(set(seeds)) != len(seeds):
        raise ValueError(f"need distinct variants and distinct seeds, at least one of each; got {variants}, {seeds}")
    if isinstance(n_sequences, bool) or not isinstance(n_sequences, int) or n_sequences < 1:
        raise ValueError(f"n_sequences must be an integer >= 1, got {n_sequences!r}")
    task = MarkovICL(**MARKOV_TASK)
    for variant in variants:  # bad settings are refused here, before any unit starts
        preset(variant, task=task, **MARKOV_MODEL)
        TrainSettings(**{**MARKOV_TRAINING, **({} if steps is None else {"steps": steps})})
    out_dir = Path(out_dir)
    existing = [name for name in ("summary.md", "tables", "figures") if (out_dir / name).exists()]
    if existing and not force:
        raise FileExistsError(f"{out_dir} already holds induction outputs ({', '.join(existing)}); "
                              "pass force=True (--force) to recompute them (the trained runs are kept)")
    units = [Unit(f"{variant}-seed{seed}", induction_run,
                  {"run_dir": str(out_dir / "runs" / f"{variant}-seed{seed}"), "variant": variant, "seed": seed,
                   "n_sequences": n_sequences, "steps": steps, "device": device, "force": force})
             for variant in variants for seed in seeds]
    study = run_units(units, desc="induction", quiet=quiet, **sweep)
    study.raise_failures()
    runs = [study.results[unit.name] for unit in units]
    tables = {name: pd.concat([run[name] for run in runs], ignore_index=True) for name in TABLE_COLUMNS}
    tables["roles"] = pd.DataFrame([{"variant": unit.kwargs["variant"], "seed": unit.kwargs["seed"],
                                     **_flat(summarise(run, task.n_parents))} for unit, run in zip(units, runs)])
    for name, table in tables.items():
        export_tables(table, out_dir / "tables", name, formats=TABLE_FORMATS, overwrite=force)
    for unit, run in zip(units, runs):
        if unit.kwargs["seed"] == seeds[0]:
            for name, figure in induction_figures(run).items():
                write_figure(figure, out_dir / "figures" / f"{name}_{file_name(unit.kwargs['variant'])}.html",
                             overwrite=force, standalone=False)
    atomic_write(out_dir / "summary.md", _summary(tables, variants, seeds), overwrite=force)
    return tables


def _flat(summary: dict[str, Any]) -> dict[str, Any]:
    """A `summarise` result as one table row: copiers as `L0H1@1` text, the winner's fields inlined."""
    winner = summary["parent_match_winner"]
    return {"copiers": " ".join(f"L0H{c['head']}@{c['offset']}" for c in summary["copiers"]),
            "classifier": f"L{winner['layer']}H{winner['head']}", "parent_match": winner["score"],
            "parent_match_chance": winner["chance"],
            **{key: summary[key] for key in ("model_loss", "bayes_posterior_loss", "true_table_loss", "gap_to_bayes",
                                             "gap_sem")}}


def _summary(tables: dict[str, pd.DataFrame], variants: list[str], seeds: list[int]) -> str:
    roles = tables["roles"]
    over_seeds = seed_summary(roles, ["variant"], ["model_loss", "bayes_posterior_loss", "gap_to_bayes",
                                                   "parent_match"])
    return "\n".join([
        f"# poslens induction: {', '.join(variants)} on Markov ICL, seeds {seeds}\n",
        "## Each run: copier heads (layer 0 head @ offset), the best parent-matching head, loss against Bayes\n",
        render_table(roles, "md"),
        "## Over seeds (mean, sample std, n)\n",
        render_table(over_seeds, "md"),
    ])
