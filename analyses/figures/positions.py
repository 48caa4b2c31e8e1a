"""Figures of the position-id edits (`analyses.measures.positions`): what the answer and a probe do
when a model is told other positions. Rows an architecture fixes are left out, never drawn as a result."""

from __future__ import annotations

from itertools import cycle

import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative

from poslens.analyses.figures.reproduce import _mean_lines, _site_order
from poslens.analyses.tables import seed_summary


def position_edit_figure(task: pd.DataFrame, value: str = "exact_match") -> go.Figure:
    """Bars of `value` (exact match, or `keeps_answer`; for a language model `agreement`) per edit,
    one group per variant, mean ± sd over seeds (a table without `variant` / `seed` is one model);
    edits whose outcome the architecture fixes are left out.

    Args:
        task: a `position_task` or `position_lm` table (with `variant` and `seed` when several runs).
        value: the column drawn.

    Returns:
        The figure.
    """
    rows = task.assign(**{column: task.get(column, default) for column, default in (("variant", "model"),
                                                                                   ("seed", 0))})
    summary = seed_summary(rows[~rows["fixed_by_construction"]], ["variant", "edit"], [value])
    figure = go.Figure()
    for (variant, group), colour in zip(summary.groupby("variant", sort=False), cycle(qualitative.Plotly)):
        figure.add_trace(go.Bar(x=group["edit"], y=group[f"{value}_mean"], name=variant, marker_color=colour,
                                error_y={"type": "data", "array": group[f"{value}_std"].fillna(0).to_numpy()}))
    figure.update_layout(barmode="group", title=f"{value.replace('_', ' ')} when the position ids are edited "
                                                "(mean ± sd over seeds; edits fixed by the architecture left out)",
                         xaxis_title="edit of the position ids", yaxis={"title": value.replace("_", " "),
                                                                        "range": [0, 1.02]})
    return figure


def position_readout_figure(readout: pd.DataFrame, variant: str | None = None) -> go.Figure:
    """For one variant (or a table of one model), the share of moved tokens a position probe reads at
    their told position or at their real index: one line per (edit, reading) across the sites,
    mean ± sd over seeds; rows the architecture fixes are left out.

    Args:
        readout: a `position_readout` table.
        variant: the variant drawn (default: the table has no `variant` column, or one variant).

    Returns:
        The figure.
    """
    rows = readout if variant is None or "variant" not in readout else readout[readout["variant"] == variant]
    rows = rows[~rows["fixed_by_construction"]].assign(seed=rows.get("seed", 0))
    long = rows.melt(id_vars=["seed", "site", "edit"], value_vars=["reads_told", "reads_index"], var_name="reading",
                     value_name="share")
    figure = _mean_lines(long, "site", "share", ["edit", "reading"], order=_site_order(rows["site"]))
    figure.update_layout(title=f"{variant or 'model'}: what a position probe reads from tokens told another position",
                         xaxis_title="site read", yaxis={"title": "share of moved tokens", "range": [0, 1.02]})
    return figure
