"""`poslens induction`: train on n-gram Markov in-context learning and find the induction circuit.

Each (variant, seed) is a unit of `analyses.executors`: it trains on `MarkovICL(**MARKOV_TASK)` with
the presets' `MARKOV_MODEL` / `MARKOV_TRAINING` into `out_dir/runs/<variant>-seed<k>/` and runs
`analyses.measures.induction.induction_analysis` on the final model (Chen et al.'s copier and
classifier roles, head scores, the loss against the Bayes-optimal predictors). The merged
tables carry `variant` and `seed`; figures are drawn per variant from its first seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go

from poslens.analyses.executors import Unit
from poslens.analyses.experiments.presets import MARKOV_MODEL, MARKOV_TASK, MARKOV_TRAINING
from poslens.analyses.figures import file_name
from poslens.analyses.figures.induction import induction_figures
from poslens.analyses.measures.induction import TABLE_COLUMNS, induction_analysis, summarise
from poslens.analyses.report import Section
from poslens.analyses.runs import cached_results
from poslens.analyses.study import Committed, Study, check_runs, run_study
from poslens.analyses.tables import seed_summary
from poslens.tasks import MarkovICL
from poslens.variants import TrainSettings, train, variant_config
from poslens.variants.config import check_integer

ANALYSIS_VERSION = 1
"""Bumped whenever the per-run analysis changes, so runs measured before are measured again."""
TABLE_FORMATS = (".csv", ".md", ".json")


def induction_run(run_dir: str, variant: str, seed: int, n_sequences: int, steps: int | None = None,
                  device: str = "cpu", force: bool = False) -> dict[str, pd.DataFrame]:
    """One unit of `write_induction`: train (or resume) `variant` with `seed` on Markov ICL into
    `run_dir`, then its induction analysis (tables with `variant` and `seed`), cached in
    `run_dir/measures/`."""
    task = MarkovICL(**MARKOV_TASK)
    cfg = variant_config(variant, task=task, seed=seed, device=device, **MARKOV_MODEL)
    settings = {**MARKOV_TRAINING, **({} if steps is None else {"steps": steps}), "seed": seed}
    trained = train(cfg, task, out_dir=run_dir, resume=True, quiet=True, **settings)

    def measure() -> dict[str, pd.DataFrame]:
        report = induction_analysis(trained.model, task, n_sequences=n_sequences)
        return {name: table.assign(variant=variant, seed=seed) for name, table in report.tables.items()}

    stamp = {"n_sequences": n_sequences, "version": ANALYSIS_VERSION}
    return cached_results(Path(run_dir) / "measures", stamp, measure, weights=run_dir, force=force)


def write_induction(out_dir: str | Path, *, variants: Sequence[str], seeds: Sequence[int] = (0,),
                    n_sequences: int = 1000, steps: int | None = None, device: str = "cpu", quiet: bool = False,
                    force: bool = False, **executor_options: Any) -> dict[str, pd.DataFrame]:
    """The whole `poslens induction` job: one `induction_run` per (variant, seed), each a unit of
    the study (`analyses.study.run_study`), then `out_dir/tables/*.{csv,md,json}` (the induction
    tables merged, plus `roles`: each run's copier heads, best parent-matching head and loss gap
    to Bayes), `out_dir/figures/` (per variant, from its first seed), `out_dir/report.html` and
    `out_dir/summary.md`. Like every study this resumes: a rerun trains and measures only what
    is missing and writes the merged outputs anew; `force` measures every run again (trained
    runs are kept).

    Args:
        out_dir: the study's folder.
        variants: variant names (`variants.variant_config`), distinct.
        seeds: training seeds, distinct.
        n_sequences: held-out sequences the analysis reads.
        steps: training steps (None: `MARKOV_TRAINING`'s).
        device: where units run.
        quiet: no progress bar.
        force: measure every run again.
        **executor_options: `analyses.executors.run_units` settings.

    Returns:
        Every committed table by name.
    """
    variants, seeds = check_runs(variants, seeds)
    check_integer("n_sequences", n_sequences, minimum=1)
    task = MarkovICL(**MARKOV_TASK)
    for variant in variants:  # bad settings are refused here, before any unit starts
        variant_config(variant, task=task, **MARKOV_MODEL)
        TrainSettings(**{**MARKOV_TRAINING, **({} if steps is None else {"steps": steps})})
    out_dir = Path(out_dir)
    units = [Unit(f"{variant}-seed{seed}", induction_run,
                  {"run_dir": str(out_dir / "runs" / f"{variant}-seed{seed}"), "variant": variant, "seed": seed,
                   "n_sequences": n_sequences, "steps": steps, "device": device, "force": force})
             for variant in variants for seed in seeds]
    runs = [(variant, seed) for variant in variants for seed in seeds]
    study = Study("induction", f"poslens induction: {', '.join(variants)} on Markov ICL, seeds {seeds}",
                  f"{len(units)} runs; the analysis reads {n_sequences} held-out sequences of each.", units,
                  derive=partial(_roles, runs=runs, n_parents=task.n_parents),
                  figures=partial(_figures, variants=variants, first_seed=seeds[0]), sections=_sections,
                  formats=TABLE_FORMATS)
    return run_study(out_dir, study, quiet=quiet, **executor_options)


def _of_run(tables: dict[str, pd.DataFrame], variant: str, seed: int) -> dict[str, pd.DataFrame]:
    """One run's induction tables, cut from the merged ones."""
    return {name: table[(table["variant"] == variant) & (table["seed"] == seed)].reset_index(drop=True)
            for name, table in tables.items() if name in TABLE_COLUMNS}


def _roles(merged: dict[str, pd.DataFrame], runs: list[tuple[str, int]], n_parents: int) -> dict[str, pd.DataFrame]:
    """`roles`: one row per run (in the units' order), its `summarise` flattened."""
    return {"roles": pd.DataFrame([{"variant": variant, "seed": seed,
                                    **_flat(summarise(_of_run(merged, variant, seed), n_parents))}
                                   for variant, seed in runs])}


def _figures(committed: Committed, variants: list[str], first_seed: int) -> dict[str, go.Figure]:
    """Each variant's induction figures, from its first seed."""
    return {f"{name}_{file_name(variant)}": figure for variant in variants
            for name, figure in induction_figures(_of_run(committed.tables, variant, first_seed)).items()}


def _flat(summary: dict[str, Any]) -> dict[str, Any]:
    """A `summarise` result as one table row: copiers as `L0H1@1` text, the winner's fields inlined."""
    winner = summary["parent_match_winner"]
    return {"copiers": " ".join(f"L0H{c['head']}@{c['offset']}" for c in summary["copiers"]),
            "classifier": f"L{winner['layer']}H{winner['head']}", "parent_match": winner["score"],
            "parent_match_chance": winner["chance"],
            **{key: summary[key] for key in ("model_loss", "bayes_posterior_loss", "true_table_loss", "gap_to_bayes",
                                             "gap_sem")}}


def _sections(committed: Committed, figures: dict[str, go.Figure]) -> list[Section]:
    """The report: every run's roles, their mean over seeds, and the figures."""
    roles = committed.tables["roles"]
    over_seeds = seed_summary(roles, ["variant"], ["model_loss", "bayes_posterior_loss", "gap_to_bayes",
                                                   "parent_match"])
    return [
        Section("Each run: copier heads (layer 0 head @ offset), the best parent-matching head, loss against Bayes",
                table=roles, figures=list(figures.values())),
        Section("Over seeds (mean, sample std, n)", table=over_seeds),
    ]
