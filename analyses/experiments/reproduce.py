"""`poslens reproduce`: the paper's experiment set, end to end, resumable.

Trains NoPE-causal with residual cuts none / {0} / {0,1}, learned-PE causal and
NoPE-bidirectional on 3-digit addition (several seeds), then runs the invariance check, the
probe sweep with controls, correlation matrices, residual-cut and activation patching, and
writes `tables/`, `figures/`, one offline `report.html` and `summary.md`. Finished training
runs and tables are reused; `force=True` recomputes the analyses (delete a run directory to
retrain it: trained weights are never deleted by poslens).
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import plotly.offline
from tqdm.auto import tqdm

from poslens.analyses.experiments.presets import PRESETS, REPRODUCE_VARIANTS
from poslens.analyses.figures import file_name, write_figure
from poslens.analyses.figures.correlation import correlation_heatmap
from poslens.analyses.figures.patching import patching_heatmap, residual_cut_delta_figure
from poslens.analyses.figures.probes import probe_accuracy_figure
from poslens.analyses.measures.correlation import block_diagonality, full_correlation, position_correlation
from poslens.analyses.measures.interventions import position_swap, residual_cut_effects
from poslens.analyses.measures.invariance import invariance_table
from poslens.analyses.measures.patching import activation_patching
from poslens.analyses.measures.probe_sweep import probe_sweep
from poslens.analyses.tables import export_tables, read_table, render_table, seed_summary, side_by_side, tables_complete
from poslens.hooks import capture_residuals
from poslens.tasks import Addition
from poslens.variants import HookedTransformer, build, preset, train
from poslens.variants.locking import holds_lock
from poslens.variants.storage import atomic_write, read_json, write_json


@holds_lock("out_dir", clean=(".", "tables", "figures"))  # one writer; a killed one's temporaries removed
def reproduce(out_dir: str | Path = "runs/reproduce", *, preset_name: str = "quick", seeds: int = 1,
              force: bool = False, device: str = "cpu", quiet: bool = False) -> dict[str, pd.DataFrame]:
    """Run (or resume) the whole experiment into `out_dir`; returns the headline tables."""
    if preset_name not in PRESETS:
        raise ValueError(f"unknown preset {preset_name!r}; allowed: {sorted(PRESETS)}")
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds!r}")
    settings, task = PRESETS[preset_name], Addition()
    out_dir = Path(out_dir)
    tables_dir, figures_dir = out_dir / "tables", out_dir / "figures"

    models: dict[str, list[HookedTransformer]] = {}
    training_rows, run_dirs = [], []
    for variant, seed in tqdm([(v, s) for v in REPRODUCE_VARIANTS for s in range(seeds)], desc="train", disable=quiet):
        run_dirs.append(out_dir / "runs" / f"{variant}-seed{seed}")
        started = time.perf_counter()
        cfg = preset(variant, task=task, seed=seed, device=device, **settings.model)
        result = train(cfg, task, out_dir=run_dirs[-1], resume=True, quiet=True, seed=seed, **settings.training)
        models.setdefault(variant, []).append(result.model.eval())
        final = result.history[-1]
        training_rows.append({"variant": variant, "seed": seed, "steps": final["step"],
                              "exact_match": final["exact_match"], "test_loss": final["test_loss"],
                              "this_session_s": time.perf_counter() - started})

    manifest = {"preset": preset_name, "seeds": seeds, "variants": list(REPRODUCE_VARIANTS)}
    stale = (tables_dir / "manifest.json").exists() and read_json(tables_dir / "manifest.json") != manifest
    if stale and not quiet:
        tqdm.write(f"{tables_dir} was computed for {read_json(tables_dir / 'manifest.json')}; recomputing for {manifest}")

    def stage(name: str, compute) -> pd.DataFrame:
        if tables_complete(tables_dir, name) and not (force or stale):
            return read_table(tables_dir / f"{name}.csv")
        table = compute()
        export_tables(table, tables_dir, name, overwrite=True)  # this run's own output, recomputed
        return table

    def every_seed(analysis, runs_per_variant: int | None = None) -> pd.DataFrame:
        return pd.concat([analysis(model).assign(variant=variant, seed=model.cfg.seed)
                          for variant, runs in models.items() for model in runs[:runs_per_variant]],
                         ignore_index=True)

    stages = tqdm(total=6, desc="analyses", disable=quiet)
    tables = {"training": stage("training", lambda: pd.DataFrame(training_rows))}
    stages.update()
    tables["invariance"] = stage("invariance", lambda: invariance_table(
        [v for v in REPRODUCE_VARIANTS if "+" not in v], run_dirs, n_layers=settings.n_layers, n_sequences=32, n_perms=10))
    stages.update()
    tables["probe"] = stage("probe", lambda: probe_sweep(models, task, n_sequences=settings.n_probe_sequences,
                                                         quiet=True))
    stages.update()
    tables["correlation"] = stage("correlation", lambda: _correlations(models, task, settings.n_probe_sequences))
    stages.update()
    tables["residual_cuts"] = stage("residual_cuts", lambda: every_seed(
        lambda model: residual_cut_effects(model, task, n_sequences=settings.n_probe_sequences)))
    stages.update()
    tables["activation_patching"] = stage("activation_patching", lambda: every_seed(
        lambda model: activation_patching(model, task, n_sequences=settings.n_patch_sequences), runs_per_variant=1))
    tables["position_swap"] = stage("position_swap", lambda: every_seed(
        lambda model: position_swap(model, task, n_sequences=settings.n_patch_sequences * 2)))
    stages.update()
    stages.close()
    write_json(tables_dir / "manifest.json", manifest)

    figures = _figures(tables, models, task, settings.n_probe_sequences, figures_dir)
    _write_report(out_dir, figures, tables, preset_name, seeds)
    return tables


def _correlations(models: dict[str, list[HookedTransformer]], task: Addition, n_sequences: int) -> pd.DataFrame:
    """Block-diagonality of every block output, trained and at random init (same seed)."""
    tokens = task.test_set()[:n_sequences]
    rows = []
    for variant, runs in models.items():
        for model in runs:
            for weights, candidate in (("trained", model), ("random_init", build(model.cfg))):
                sites = [f"blocks.{block}.hook_resid_post" for block in range(model.cfg.n_layers)]
                capture = capture_residuals(candidate, tokens, sites=sites)
                for site in sites:
                    full = full_correlation(capture[site])
                    rows.append({"variant": variant, "seed": model.cfg.seed, "site": site, "weights": weights,
                                 "block_diagonality": block_diagonality(full, model.cfg.d_model)})
    return pd.DataFrame(rows)


def paper_blocks(n_layers: int) -> list[int]:
    """Blocks whose outputs the paper shows (layers 1, 3, 6 of 6), scaled to `n_layers`."""
    return sorted({0, (n_layers - 1) // 2, n_layers - 1})


def _write(figure: go.Figure, directory: Path, name: str) -> go.Figure:
    """Write one of this run's figures (recomputed on every run, so replacing the last run's copy)."""
    write_figure(figure, directory / f"{file_name(name)}.html", overwrite=True, standalone=False)
    return figure


def _figures(tables: dict[str, pd.DataFrame], models: dict[str, list[HookedTransformer]], task: Addition,
             n_sequences: int, directory: Path) -> list[go.Figure]:
    figures = [_write(probe_accuracy_figure(tables["probe"]), directory, "probe_accuracy")]
    tokens = task.test_set()[:n_sequences]
    for variant, runs in models.items():
        model = runs[0]
        sites = [f"blocks.{block}.hook_resid_post" for block in paper_blocks(model.cfg.n_layers)]
        capture = capture_residuals(model, tokens, sites=sites)
        for site in sites:
            figures.append(_write(correlation_heatmap(
                position_correlation(capture[site]), f"|corr| positions × positions, {variant}, {site}"),
                directory, f"correlation_{variant}_{site}"))
        patch = tables["activation_patching"]
        figures.append(_write(patching_heatmap(patch[patch["variant"] == variant], "resid_pre",
                                                      f"activation patching (resid_pre), {variant}"),
                                     directory, f"patching_{variant}"))
    cuts = seed_summary(tables["residual_cuts"], ["variant", "block", "sublayer"], ["delta_exact_match"])
    cut_figure = residual_cut_delta_figure(cuts)
    figures.append(_write(cut_figure, directory, "residual_cuts"))
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
