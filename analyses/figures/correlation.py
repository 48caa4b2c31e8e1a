"""Heatmaps of |corr| matrices (`analyses.measures.correlation`)."""

from __future__ import annotations

import plotly.graph_objects as go
from jaxtyping import Float
from torch import Tensor


def correlation_heatmap(matrix: Float[Tensor, "row col"], title: str, tick_every: int = 1) -> go.Figure:
    """A [0, 1] heatmap of an |corr| matrix (rows top to bottom, as the paper draws them)."""
    figure = go.Figure(go.Heatmap(z=matrix.float().numpy(), zmin=0, zmax=1, colorscale="Viridis",
                                  colorbar={"title": "|corr|"}))
    figure.update_layout(title=title, yaxis={"autorange": "reversed", "scaleanchor": "x"}, width=560, height=520)
    if tick_every > 1:
        ticks = list(range(0, matrix.shape[0], tick_every))
        labels = [str(i // tick_every) for i in ticks]
        figure.update_xaxes(tickvals=ticks, ticktext=labels, title="position")
        figure.update_yaxes(tickvals=ticks, ticktext=labels, title="position")
    return figure
