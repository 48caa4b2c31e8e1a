"""Heatmaps of |corr| matrices (`analyses.measures.correlation`).

Draw the matrix that is scored: `block_means(full_correlation(acts), d_model)`, the
positions × positions mean |corr| per block, is what `block_contrast` and `block_diagonality`
are computed from; `tick_every=d_model` labels a full (position, dimension) matrix by position.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from jaxtyping import Float
from torch import Tensor


def correlation_heatmap(matrix: Float[Tensor, "row col"], title: str, tick_every: int = 1,
                        zmax: float | None = 1.0) -> go.Figure:
    """A heatmap of an |corr| matrix (rows top to bottom, as the paper draws them), on the
    colour scale 0..`zmax` (None: 0..the matrix's largest value, for weak off-diagonal structure)."""
    z = matrix.float().numpy()
    figure = go.Figure(go.Heatmap(z=z, zmin=0, zmax=float(np.nanmax(z)) if zmax is None else zmax, colorscale="Viridis",
                                  colorbar={"title": "|corr|"}))
    figure.update_layout(title=title, yaxis={"autorange": "reversed", "scaleanchor": "x"}, width=560, height=520)
    if tick_every > 1:
        ticks = list(range(0, matrix.shape[0], tick_every))
        labels = [str(i // tick_every) for i in ticks]
        figure.update_xaxes(tickvals=ticks, ticktext=labels, title="position")
        figure.update_yaxes(tickvals=ticks, ticktext=labels, title="position")
    else:
        figure.update_xaxes(title="position")
        figure.update_yaxes(title="position")
    return figure
