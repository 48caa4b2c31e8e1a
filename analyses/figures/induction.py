"""Figures of the induction analysis (`analyses.measures.induction`): one per table."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go


def _head_label(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


def offset_profile_figure(table: pd.DataFrame) -> go.Figure:
    """Heatmap of attention mass by head (rows) and relative offset (columns)."""
    table = table.sort_values(["layer", "head", "offset"])
    labels = [_head_label(layer, head)
              for layer, head in table[["layer", "head"]].drop_duplicates().itertuples(index=False)]
    mass = table["mass"].to_numpy().reshape(len(labels), -1)
    figure = go.Figure(go.Heatmap(z=mass, x=sorted(table["offset"].unique()), y=labels, zmin=0, zmax=1,
                                  colorscale="Viridis", colorbar={"title": "mass"}))
    chance = table["chance"].iloc[0]
    figure.update_layout(title=f"Attention mass by relative offset (query − key); uniform attention: {chance:.3f}",
                         xaxis_title="offset", yaxis={"title": "head", "autorange": "reversed"})
    return figure


def _bars(table: pd.DataFrame, group: str, value: str, title: str, y_title: str) -> go.Figure:
    """Grouped bars per head, one trace per value of `group`, with sem error bars and chance markers."""
    figure = go.Figure()
    for name, rows in table.groupby(group, sort=False):
        labels = [_head_label(layer, head) for layer, head in zip(rows["layer"], rows["head"])]
        figure.add_bar(x=labels, y=rows[value], name=str(name), offsetgroup=str(name),
                       error_y={"type": "data", "array": rows["sem"].fillna(0).to_numpy()})
        figure.add_scatter(x=labels, y=rows["chance"], mode="markers", name=f"{name} (chance)",
                           marker={"symbol": "line-ew-open", "size": 18, "color": "grey"}, offsetgroup=str(name))
    figure.update_layout(title=title, barmode="group", scattermode="group", xaxis_title="head",
                         yaxis={"title": y_title, "range": [0, 1]})
    return figure


def parent_match_figure(table: pd.DataFrame) -> go.Figure:
    """Parent-match score of every head by context length matched, uniform attention marked."""
    return _bars(table.assign(n_parents=table["n_parents"].map(lambda n: f"{n} parent(s)")), "n_parents", "score",
                 "Last-position attention on keys that follow an earlier occurrence of its context", "attention mass")


def head_scores_figure(table: pd.DataFrame) -> go.Figure:
    """Previous-token and induction scores (ours and TransformerLens's) on repeated random sequences."""
    return _bars(table, "score_name", "value", "Head scores on repeated random sequences", "score")


def icl_loss_figure(table: pd.DataFrame) -> go.Figure:
    """Last-token loss of the model beside the reference predictors."""
    figure = go.Figure(go.Bar(x=table["predictor"], y=table["loss"], error_y={"type": "data", "array": table["sem"]}))
    figure.update_layout(title="In-context loss of the last token", xaxis_title="predictor",
                         yaxis_title="cross-entropy (nats)")
    return figure


def induction_figures(tables: dict[str, pd.DataFrame]) -> dict[str, go.Figure]:
    """One figure per table of an `InductionReport`, under the table's name."""
    return {"offset_profile": offset_profile_figure(tables["offset_profile"]),
            "parent_match": parent_match_figure(tables["parent_match"]),
            "head_scores": head_scores_figure(tables["head_scores"]),
            "icl_loss": icl_loss_figure(tables["icl_loss"])}
