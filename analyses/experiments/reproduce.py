"""`poslens reproduce`: the paper's experiment set, end to end, resumable and parallel.

Trains NoPE-causal with residual cuts none / {0} / {0,1}, learned-PE causal and
NoPE-bidirectional on 3-digit addition (several seeds), runs on each the invariance check, the
probe sweep with controls, correlation structure, residual cuts, activation patching and the
position swap, then merges the runs into `tables/`, `figures/`, one offline `report.html` and
`summary.md`. Each (variant, seed) is an independent unit of `analyses.sweep`; finished runs
and their measures are reused, so a killed study, rerun, does only what is missing.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import plotly.offline
import torch
from torch import Tensor

from poslens.analyses.experiments.presets import PRESETS, REPRODUCE_VARIANTS, ReproducePreset
from poslens.analyses.figures import file_name, write_figure
from poslens.analyses.figures.correlation import correlation_heatmap
from poslens.analyses.figures.patching import patching_heatmap, residual_cut_delta_figure
from poslens.analyses.figures.probes import probe_accuracy_figure
from poslens.analyses.measures.correlation import block_diagonality, full_correlation, position_correlation
from poslens.analyses.measures.interventions import position_swap, residual_cut_effects
from poslens.analyses.measures.invariance import permutation_test
from poslens.analyses.measures.patching import activation_patching
from poslens.analyses.measures.probe_sweep import probe_sweep
from poslens.analyses.runs import cached_results
from poslens.analyses.sweep import Unit, run_units
from poslens.analyses.tables import export_tables, render_table, seed_summary, side_by_side
from poslens.hooks import capture_residuals
from poslens.tasks import Addition
from poslens.variants import HookedTransformer, TrainResult, build, load, preset, train
from poslens.variants.locking import holds_lock
from poslens.variants.storage import atomic_write

ANALYSIS_VERSION = 1
"""Bumped whenever a per-run measure changes, so runs measured before are measured again."""


@holds_lock("out_dir", clean=(".", "tables", "figures"))  # one writer; a killed one's temporaries removed
def reproduce(out_dir: str | Path = "runs/reproduce", *, preset_name: str = "quick", seeds: int = 1,
              force: bool = False, device: str = "cpu", quiet: bool = False, executor: str = "local",
              workers: int | None = None, threads: int = 1, ray_address: str | None = None,
              gpus_per_unit: float = 0.0) -> dict[str, pd.DataFrame]:
    """Run (or resume) the whole experiment into `out_dir`; returns the merged tables.

    Every (variant, seed) is one unit of `analyses.sweep`: it trains its run (resumably) into
    `out_dir/runs/<variant>-seed<k>/` and measures it there (cached in `measures/`), on the
    `executor` chosen (`serial`, `local` processes, or `ray`; see `run_units`). The merged
    tables, figures, `summary.md` and `report.html` are written here, by this process alone.
    `force` measures every run again (trained weights are never deleted).
    """
    if preset_name not in PRESETS:
        raise ValueError(f"unknown preset {preset_name!r}; allowed: {sorted(PRESETS)}")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be an integer >= 1, got {seeds!r}")
    out_dir = Path(out_dir)
    units = [Unit(f"{variant}-seed{seed}", measure_run,
                  {"run_dir": str(out_dir / "runs" / f"{variant}-seed{seed}"), "variant": variant, "seed": seed,
                   "preset_name": preset_name, "device": "cuda" if gpus_per_unit else device, "force": force})
             for variant in REPRODUCE_VARIANTS for seed in range(seeds)]
    sweep = run_units(units, executor=executor, workers=workers, threads=threads, ray_address=ray_address,
                      gpus_per_unit=gpus_per_unit, desc="reproduce", quiet=quiet)
    sweep.raise_failures()
    runs = [sweep.results[unit.name] for unit in units]
    tables = {name: pd.concat([run[name] for run in runs], ignore_index=True) for name in RUN_TABLES}
    for name, table in tables.items():
        export_tables(table, out_dir / "tables", name, overwrite=True)  # merged anew from the runs on every call
    figures = _figures(tables, runs, out_dir / "figures")
    _write_report(out_dir, figures, tables, preset_name, seeds)
    return tables


RUN_TABLES = ("training", "invariance", "probe", "correlation", "residual_cuts", "activation_patching",
              "position_swap")


def measure_run(run_dir: str, variant: str, seed: int, preset_name: str, device: str = "cpu",
                force: bool = False) -> dict[str, pd.DataFrame | Tensor]:
    """One unit of `reproduce`: train (or resume) `variant` with `seed` into `run_dir`, then
    measure it: every table of `RUN_TABLES` (each with `variant` and `seed` columns) and the
    |corr| matrices the report draws (`corr:<site>`). Cached in `run_dir/measures/`."""
    settings, task = PRESETS[preset_name], Addition()
    cfg = preset(variant, task=task, seed=seed, device=device, **settings.model)
    result = train(cfg, task, out_dir=run_dir, resume=True, quiet=True, seed=seed, **settings.training)
    stamp = {"preset": preset_name, "version": ANALYSIS_VERSION}
    return cached_results(Path(run_dir) / "measures", stamp, lambda: _measures(result, variant, seed, settings, task),
                          force=force)


def _measures(result: TrainResult, variant: str, seed: int, settings: ReproducePreset,
              task: Addition) -> dict[str, pd.DataFrame | Tensor]:
    model = result.model.eval()
    labels = {"variant": variant, "seed": seed}
    final = result.history[-1]
    training = pd.DataFrame([{**labels, "steps": final["step"], "exact_match": final["exact_match"],
                              "test_loss": final["test_loss"]}])
    prompts = task.test_set()[:32, : task.prompt_len]
    in_float64 = {"random": build(dataclasses.replace(model.cfg, dtype=torch.float64)),
                  "trained": load(result.out_dir, dtype=torch.float64)}
    invariance = pd.concat([permutation_test(candidate, prompts, n_perms=10).assign(weights=weights, seed=seed)
                            for weights, candidate in in_float64.items()], ignore_index=True)
    tables = {
        "training": training,
        "invariance": invariance,
        "probe": probe_sweep({variant: [model]}, task, n_sequences=settings.n_probe_sequences, quiet=True),
        "correlation": _correlations(model, task, settings.n_probe_sequences, labels),
        "residual_cuts": residual_cut_effects(model, task, n_sequences=settings.n_probe_sequences).assign(**labels),
        "activation_patching": activation_patching(model, task, n_sequences=settings.n_patch_sequences).assign(
            **labels),
        "position_swap": position_swap(model, task, n_sequences=settings.n_patch_sequences * 2).assign(**labels),
    }
    tokens = task.test_set()[: settings.n_probe_sequences]
    sites = [f"blocks.{block}.hook_resid_post" for block in paper_blocks(model.cfg.n_layers)]
    capture = capture_residuals(model, tokens, sites=sites)
    return {**tables, **{f"corr:{site}": position_correlation(capture[site]).float() for site in sites}}


def _correlations(model: HookedTransformer, task: Addition, n_sequences: int, labels: dict) -> pd.DataFrame:
    """Block-diagonality of every block output, trained and at random init (same seed)."""
    tokens = task.test_set()[:n_sequences]
    sites = [f"blocks.{block}.hook_resid_post" for block in range(model.cfg.n_layers)]
    rows = []
    for weights, candidate in (("trained", model), ("random_init", build(model.cfg))):
        capture = capture_residuals(candidate, tokens, sites=sites)
        rows += [{**labels, "site": site, "weights": weights,
                  "block_diagonality": block_diagonality(full_correlation(capture[site]), model.cfg.d_model)}
                 for site in sites]
    return pd.DataFrame(rows)


def paper_blocks(n_layers: int) -> list[int]:
    """Blocks whose outputs the paper shows (layers 1, 3, 6 of 6), scaled to `n_layers`."""
    return sorted({0, (n_layers - 1) // 2, n_layers - 1})


def _write(figure: go.Figure, directory: Path, name: str) -> go.Figure:
    """Write one of this run's figures (recomputed on every run, so replacing the last run's copy)."""
    write_figure(figure, directory / f"{file_name(name)}.html", overwrite=True, standalone=False)
    return figure


def _figures(tables: dict[str, pd.DataFrame], runs: list[dict], directory: Path) -> list[go.Figure]:
    figures = [_write(probe_accuracy_figure(tables["probe"]), directory, "probe_accuracy")]
    first_runs = {run["training"]["variant"].iloc[0]: run for run in reversed(runs)}  # each variant's first seed
    for variant, run in reversed(first_runs.items()):
        for key in sorted(name for name in run if name.startswith("corr:")):
            site = key.removeprefix("corr:")
            figures.append(_write(correlation_heatmap(run[key], f"|corr| positions × positions, {variant}, {site}"),
                                  directory, f"correlation_{variant}_{site}"))
        patch = run["activation_patching"]
        figures.append(_write(patching_heatmap(patch, "resid_pre", f"activation patching (resid_pre), {variant}"),
                              directory, f"patching_{variant}"))
    cuts = seed_summary(tables["residual_cuts"], ["variant", "block", "sublayer"], ["delta_exact_match"])
    figures.append(_write(residual_cut_delta_figure(cuts), directory, "residual_cuts"))
    return figures


def _write_report(out_dir: Path, figures: list[go.Figure], tables: dict[str, pd.DataFrame], preset_name: str,
                  seeds: int) -> None:
    probe = tables["probe"]
    correlation = seed_summary(tables["correlation"], ["variant", "site", "weights"], ["block_diagonality"])
    cuts = seed_summary(tables["residual_cuts"], ["variant", "block", "sublayer"],
                       ["exact_match", "delta_exact_match", "delta_probe_accuracy"])
    swaps = seed_summary(tables["position_swap"], ["variant", "site"], ["follows_swap", "keeps_original"])
    sections = {
        "Training (exact match on held-out operand pairs)": tables["training"],
        "Invariance of the last position's logits to permutations of earlier tokens": tables["invariance"],
        "Position-probe accuracy per site (trained, untrained twin, token identity, chance)": side_by_side(probe),
        "Block-diagonality of block outputs (mean and std over seeds)": correlation,
        "Residual connections removed at inference (mean and std over seeds)": cuts,
        "Position swap at each site (mean and std over seeds)": swaps,
    }
    summary = [f"# poslens reproduce ({preset_name} preset, {seeds} seed(s))\n"]
    summary += [f"## {title}\n\n{render_table(table, 'md')}" for title, table in sections.items()]
    atomic_write(out_dir / "summary.md", "\n".join(summary))
    body = "".join(f"<h2>{title}</h2>{table.to_html(index=table.index.name is not None)}"
                   for title, table in sections.items())
    body += "".join(figure.to_html(full_html=False, include_plotlyjs=False) for figure in figures)
    html = (f"<!doctype html><html><head><meta charset='utf-8'><title>poslens reproduce</title>"
            f"<script type='text/javascript'>{plotly.offline.get_plotlyjs()}</script></head>"
            f"<body><h1>poslens reproduce ({preset_name}, {seeds} seed(s))</h1>{body}</body></html>")
    atomic_write(out_dir / "report.html", html)
