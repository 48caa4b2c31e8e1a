"""Figures of the position-sensitive geometry measures (`analyses.measures.geometry`).

Both draw one line per site (and per variant, when the table has a `variant` column, averaged
over seeds when it has a `seed` column): variance by position on log-log axes, where
Chi et al.'s σ²/t shrinkage is a line of slope −1, and mean cosine similarity against the
offset k between positions, which falls with k when neighbours are more alike.
"""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go


def _lines(table: pd.DataFrame, x: str, y: str) -> go.Figure:
    keys = [column for column in ("variant", "site") if column in table]
    means = table.groupby([*keys, x], sort=False)[y].mean().reset_index()
    figure = go.Figure()
    for key, rows in means.groupby(keys, sort=False):
        name = " ".join(map(str, key if isinstance(key, tuple) else (key,)))
        figure.add_trace(go.Scatter(x=rows[x], y=rows[y], name=name, mode="lines+markers"))
    return figure


def variance_figure(table: pd.DataFrame, title: str = "variance across dimensions by position") -> go.Figure:
    """Lines of v(t) against position + 1 on log-log axes, from a `position_geometry(...).variance` table."""
    figure = _lines(table.assign(t=table["position"] + 1), "t", "variance")
    figure.update_layout(title=title, xaxis={"title": "position + 1", "type": "log"},
                         yaxis={"title": "variance across d_model (mean over examples)", "type": "log"})
    return figure


def cosine_figure(table: pd.DataFrame, title: str = "cosine similarity by offset") -> go.Figure:
    """Lines of c(k) against the offset k, from a `position_geometry(...).cosine` table."""
    figure = _lines(table, "offset", "cosine")
    figure.update_layout(title=title, xaxis={"title": "offset k between positions", "dtick": 1},
                         yaxis={"title": "mean cos(h_t, h_t+k)"})
    return figure
