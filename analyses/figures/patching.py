"""Figures of activation patching and residual cuts (`analyses.measures.patching`, `.cut_effects`)."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go


def patching_heatmap(table: pd.DataFrame, site: str = "resid_pre", title: str = "") -> go.Figure:
    """Layer × position heatmap of one site's restoration metric (1 = clean, 0 = corrupted).

    Args:
        table: a patching table (`patch_table`, `activation_patching`).
        site: the site to draw.
        title: the figure's title.

    Returns:
        The plotly figure.
    """
    grid = table[table["site"] == site].pivot(index="layer", columns="position", values="value")
    roles = table.drop_duplicates("position").set_index("position")["role"]
    figure = go.Figure(go.Heatmap(z=grid.to_numpy(), x=[f"{p}:{roles[p]}" for p in grid.columns], y=list(grid.index),
                                  zmid=0, colorscale="RdBu", colorbar={"title": "normalised<br>logit diff"}))
    figure.update_layout(title=title or f"activation patching, {site}", xaxis_title="position:role",
                         yaxis_title="layer", yaxis={"autorange": "reversed"})
    return figure


def residual_cut_delta_figure(summary: pd.DataFrame) -> go.Figure:
    """Grouped bars of the change in exact match per residual cut, one colour per variant, from a
    `seed_summary` of `residual_cut_effects` tables (columns variant, block, sublayer,
    delta_exact_match_mean, delta_exact_match_std)."""
    figure = go.Figure([go.Bar(name=variant, x=[f"{b}:{s}" for b, s in zip(group["block"], group["sublayer"])],
                               y=group["delta_exact_match_mean"],
                               error_y={"type": "data", "array": group["delta_exact_match_std"].fillna(0)})
                        for variant, group in summary.groupby("variant", sort=False)])
    figure.update_layout(title="change in exact match when a residual connection is removed at inference "
                               "(mean ± std over seeds)",
                         xaxis_title="block:sublayer", yaxis_title="Δ exact match", barmode="group")
    return figure
