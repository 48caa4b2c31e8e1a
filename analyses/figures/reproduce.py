"""Figures of `poslens reproduce`, drawn from its merged tables (means over seeds, with their spread).

Each function takes the tidy tables `reproduce` writes and returns one plotly figure; cells an
architecture fixes (`fixed_by_construction`) are left blank, never drawn as a result.
"""

from __future__ import annotations

from itertools import cycle

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots
from torch import Tensor

from poslens.analyses.tables import seed_summary


def _site_order(sites: pd.Series) -> list[str]:
    return sorted(set(sites), key=lambda site: (-1, 0) if site == "embed" else (int(site.split(".")[1]),
                                                                               ("pre", "mid", "post").index(
                                                                                   site.rsplit("_", 1)[1])))


def _mean_lines(table: pd.DataFrame, x: str, value: str, group: list[str], order: list | None = None) -> go.Figure:
    """One line per `group` of the mean of `value` over seeds against `x`, ± one sample sd."""
    summary = seed_summary(table, [*group, x], [value])
    figure = go.Figure()
    for (key, rows), colour in zip(summary.groupby(group, sort=False), cycle(qualitative.Plotly)):
        if order is not None:
            rows = rows.set_index(x).reindex(order).reset_index()
        name = " · ".join(map(str, key if isinstance(key, tuple) else (key,)))
        figure.add_trace(go.Scatter(x=rows[x], y=rows[f"{value}_mean"], name=name, mode="lines+markers",
                                    line={"color": colour, "dash": "dash" if "random" in name else "solid"},
                                    error_y={"type": "data", "array": rows[f"{value}_std"].fillna(0).to_numpy()}))
    return figure


def convergence_figure(curves: pd.DataFrame) -> go.Figure:
    """Held-out exact match against training step, per variant (mean ± sd over seeds)."""
    figure = _mean_lines(curves, "step", "exact_match", ["variant"])
    figure.update_layout(title="held-out exact match during training (mean ± sd over seeds)",
                         xaxis_title="training step", yaxis={"title": "exact match", "range": [0, 1.02]})
    return figure


def score_by_site_figure(table: pd.DataFrame, score: str, title: str, y_title: str) -> go.Figure:
    """A structure score's excess over its null at every site, per variant, trained (solid) and at
    random initialisation (dashed); mean ± sd over seeds."""
    rows = table[table["score"] == score]
    figure = _mean_lines(rows, "site", "excess", ["variant", "weights"], order=_site_order(rows["site"]))
    figure.add_hline(y=0, line={"color": "grey", "dash": "dot"})
    figure.update_layout(title=title, xaxis_title="site", yaxis_title=y_title)
    return figure


def block_means_figure(matrices: dict[str, dict[str, Tensor]], title: str) -> go.Figure:
    """Heatmaps of mean |corr| per (position, position) block: rows = variants, columns = sites
    (`matrices[variant][site]`), on one colour scale up to the largest off-diagonal mean."""
    variants, sites = list(matrices), list(next(iter(matrices.values())))
    figure = make_subplots(rows=len(variants), cols=len(sites), subplot_titles=[
        f"{variant}, {site}" for variant in variants for site in sites], horizontal_spacing=0.04,
                           vertical_spacing=0.08)
    off_diagonal = [m.float().numpy()[~np.eye(len(m), dtype=bool)] for v in matrices.values() for m in v.values()]
    top = float(np.nanmax(np.concatenate(off_diagonal))) if off_diagonal else 1.0
    for row, variant in enumerate(variants, start=1):
        for col, site in enumerate(sites, start=1):
            figure.add_trace(go.Heatmap(z=matrices[variant][site].float().numpy(), coloraxis="coloraxis"),
                             row=row, col=col)
    figure.update_yaxes(autorange="reversed")
    figure.update_layout(title=title, coloraxis={"colorscale": "Viridis", "cmin": 0, "cmax": top,
                                                 "colorbar": {"title": "mean |corr|"}},
                         height=300 * len(variants) + 80)
    return figure


def patching_mean_heatmap(table: pd.DataFrame, variant: str, site: str = "resid_pre") -> go.Figure:
    """Layer × position heatmap of the restoration metric at `site`, the mean over seeds; cells the
    architecture fixes are blank."""
    rows = table[(table["variant"] == variant) & (table["site"] == site)]
    rows = rows.assign(value=rows["value"].where(~rows["fixed_by_construction"]))
    grid = rows.groupby(["layer", "position"])["value"].mean().unstack("position")
    roles = rows.drop_duplicates("position").set_index("position")["role"]
    figure = go.Figure(go.Heatmap(z=grid.to_numpy(), x=[f"{p}:{roles[p]}" for p in grid.columns], y=list(grid.index),
                                  zmid=0, colorscale="RdBu", colorbar={"title": "restored"}))
    figure.update_layout(title=f"activation patching ({site}), {variant}: mean over seeds; blank = fixed by the "
                               "architecture", xaxis_title="position:role", yaxis={"title": "layer",
                                                                                  "autorange": "reversed"})
    return figure


def patching_directions_figure(table: pd.DataFrame, variant: str, corruption: str = "swap", digit: str = "s0",
                               site: str = "resid_pre") -> go.Figure:
    """`patching_mean_heatmap` of a `patching_effects` table side by side for each direction
    (denoise: share restored; noise: share destroyed), for one variant, corruption and answer digit.

    Args:
        table: the merged `patching_effects` table (columns of `PATCHING_EFFECT_COLUMNS`, `variant`, `seed`).
        variant: the variant drawn.
        corruption: `swap` or `permute`.
        digit: the answer digit's role (`s0` .. `s3`; the carry is the last).
        site: the residual site drawn.

    Returns:
        The plotly figure, one heatmap per direction.
    """
    chosen = table[(table["corruption"] == corruption) & (table["digit"] == digit)]
    directions = list(pd.unique(chosen["direction"]))
    figure = make_subplots(rows=1, cols=len(directions), subplot_titles=directions, shared_yaxes=True)
    for column, direction in enumerate(directions, start=1):
        heatmap = patching_mean_heatmap(chosen[chosen["direction"] == direction], variant, site).data[0]
        figure.add_trace(heatmap.update(coloraxis="coloraxis"), row=1, col=column)
    figure.update_layout(title=f"patching both ways ({site}, {corruption}, answer digit {digit}), {variant}: mean over "
                               "seeds; blank = fixed by the architecture",
                         coloraxis={"colorscale": "RdBu", "cmid": 0, "colorbar": {"title": "share"}},
                         yaxis={"title": "layer", "autorange": "reversed"})
    return figure


def swap_figure(swaps: pd.DataFrame) -> go.Figure:
    """After exchanging two positions' vectors at each site: share of answers that follow the swap
    (solid) or keep the original (dashed), per variant, mean ± sd over seeds; sites where the
    architecture fixes the answer are left out."""
    informative = swaps[~swaps["fixed_by_construction"]]
    order = _site_order(swaps["site"])
    long = informative.melt(id_vars=["variant", "seed", "site"], value_vars=["follows_swap", "keeps_original"],
                            var_name="reading", value_name="share")
    figure = _mean_lines(long, "site", "share", ["variant", "reading"], order=order)
    figure.update_layout(title="position swap: does the answer follow the swapped vectors? (fixed sites left out)",
                         xaxis_title="site of the swap", yaxis={"title": "share of answers", "range": [0, 1.02]})
    return figure


def swap_readout_figure(readout: pd.DataFrame, variant: str) -> go.Figure:
    """For one variant: after a swap at the first site, the share of swapped columns a position probe
    reads at their original position vs at their new index, at every later site (mean over seeds
    and the two columns); the architecture-fixed readings are left out."""
    rows = readout[(readout["variant"] == variant) & ~readout["fixed_by_construction"]]
    first = _site_order(rows["swap_site"])[0] if not rows.empty else None
    rows = rows[rows["swap_site"] == first]
    long = rows.melt(id_vars=["seed", "site"], value_vars=["reads_origin", "reads_index"], var_name="reading",
                     value_name="share")
    figure = _mean_lines(long, "site", "share", ["reading"], order=_site_order(rows["site"]))
    figure.update_layout(title=f"{variant}: swap at {first}; what a position probe reads from the swapped columns",
                         xaxis_title="site read", yaxis={"title": "share of prompts", "range": [0, 1.02]})
    return figure
