"""Plotly figures of probe results, built from tidy probe tables (see `analyses.tables`).

Functions return a `plotly.graph_objects.Figure` and never show or write it,
so callers decide between a notebook, an HTML report or a static image.
"""

from __future__ import annotations

from itertools import cycle

import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative, sample_colorscale

from poslens.analyses.tables import select_summary, summarise_seeds

CONTROL_SUFFIX = "_control"
CHANCE_COLOUR = "grey"
_BASELINE_DASHES = {"random_init": "dash", "token_identity": "dashdot", "control task": "longdash"}


def probe_accuracy_figure(df: pd.DataFrame, metric: str = "accuracy", probe: str = "position") -> go.Figure:
    """Probe `metric` against layer: one solid line per variant, its baselines dashed beside it.

    Each line is the mean over seeds with error bars of one sample standard
    deviation (none for a single seed). A variant's baselines (every
    ``baseline`` other than ``trained`` and ``chance``, plus the
    ``<probe>_control`` probe on the trained model when present) are dashed
    in the variant's colour, one dash pattern per baseline; chance, a
    property of the task rather than of a variant, is one grey dotted line
    (averaged over variants if several report it). The x axis is the layer
    number of `analyses.tables.site_layer`, labelled with the site names; an
    accuracy axis spans [0, 1].

    Args:
        df: a tidy probe table.
        metric: the metric to draw (`accuracy`, `mad`, ...).
        probe: the probe target (`position`, `role`).

    Returns:
        The plotly figure.
    """
    summary = summarise_seeds(df)
    trained = select_summary(summary, metric=metric, probe=probe, baseline="trained")
    summary = summary[summary["metric"] == metric]
    variants = list(pd.unique(df["variant"][df["variant"].isin(trained["variant"])]))
    figure = go.Figure()
    for variant, colour in zip(variants, cycle(qualitative.Plotly)):
        figure.add_trace(_line(trained[trained["variant"] == variant], variant, colour, "solid", variant))
        for label, rows in _baselines(summary, variant, probe):
            dash = _BASELINE_DASHES.get(label, "dash")
            figure.add_trace(_line(rows, f"{variant} ({label})", colour, dash, variant))
    chance = summary[(summary["probe"] == probe) & (summary["baseline"] == "chance")]
    if not chance.empty:
        figure.add_trace(_chance_line(chance))
    return _laid_out(figure, summary[summary["variant"].isin(variants)], metric, probe)


def _baselines(summary: pd.DataFrame, variant: str, probe: str) -> list[tuple[str, pd.DataFrame]]:
    """(legend label, rows) for each baseline of one variant, in a stable order."""
    own = summary[summary["variant"] == variant]
    same_probe = own[(own["probe"] == probe) & ~own["baseline"].isin(["trained", "chance"])]
    found = [(name, rows) for name, rows in same_probe.groupby("baseline", sort=True)]
    control = own[(own["probe"] == probe + CONTROL_SUFFIX) & (own["baseline"] == "trained")]
    if not control.empty:
        found.append(("control task", control))
    return found


def _line(rows: pd.DataFrame, name: str, colour: str, dash: str, group: str) -> go.Scatter:
    rows = rows.sort_values("layer")
    return go.Scatter(
        x=rows["layer"], y=rows["mean"], name=name, legendgroup=group, mode="lines+markers",
        line={"color": colour, "dash": dash},
        error_y={"type": "data", "array": rows["std"].to_numpy(), "visible": bool((rows["n_seeds"] > 1).any())},
    )


def _chance_line(chance: pd.DataFrame) -> go.Scatter:
    per_layer = chance.groupby("layer", sort=True)["mean"].mean()
    return go.Scatter(
        x=per_layer.index, y=per_layer.to_numpy(), name="chance", mode="lines",
        line={"color": CHANCE_COLOUR, "dash": "dot"},
    )


def _laid_out(figure: go.Figure, plotted: pd.DataFrame, metric: str, probe: str) -> go.Figure:
    """Title, axis labels, site-name ticks at their layer numbers, and [0, 1] for accuracy."""
    ticks = plotted.groupby("layer", sort=True)["site"].agg(lambda sites: " / ".join(sorted(set(sites))))
    figure.update_layout(
        title=f"{probe} probe: {metric} by layer",
        xaxis={"title": "site (layer)", "tickmode": "array", "tickvals": list(ticks.index),
               "ticktext": list(ticks), "tickangle": -30},
        yaxis={"title": metric, **({"range": [0, 1]} if metric == "accuracy" else {})},
    )
    return figure


def probe_position_figure(by_position: pd.DataFrame, variant: str, metric: str = "accuracy",
                          probe: str = "position") -> go.Figure:
    """Probe `metric` against position for one variant (a `ProbeSweep.by_position` table): one
    line per site, shallow to deep from light to dark; the random-init twin's lines (dashed, hidden
    until clicked in the legend); the token-identity and chance baselines in grey. Values are the
    mean over seeds. How a curve falls with position is Haviv et al.'s "sharp early, fuzzier late"."""
    rows = by_position[(by_position["variant"] == variant) & (by_position["metric"] == metric)
                       & (by_position["probe"] == probe)]
    if rows.empty:
        available = by_position[["variant", "probe", "metric"]].drop_duplicates().to_dict("records")
        raise ValueError(f"no rows with variant={variant!r}, probe={probe!r}, metric={metric!r}; "
                         f"available: {available}")
    mean = rows.groupby(["baseline", "layer", "site", "position"], sort=True)["value"].mean().reset_index()
    sites = mean[["layer", "site"]].drop_duplicates().sort_values(["layer", "site"])["site"].tolist()
    colours = sample_colorscale("Viridis", [0.85 * (1 - i / max(len(sites) - 1, 1)) for i in range(len(sites))])
    figure = go.Figure()
    for baseline, dash, visible in (("trained", "solid", True), ("random_init", "dash", "legendonly")):
        for site, colour in zip(sites, colours):
            line = mean[(mean["baseline"] == baseline) & (mean["site"] == site)]
            if not line.empty:
                name = site if baseline == "trained" else f"{site} (random init)"
                figure.add_trace(go.Scatter(x=line["position"], y=line["value"], name=name, mode="lines",
                                            line={"color": colour, "dash": dash}, visible=visible))
    for baseline, dash in (("token_identity", "dashdot"), ("chance", "dot")):
        line = mean[(mean["baseline"] == baseline) & (mean["site"] == sites[0])]
        if not line.empty:
            figure.add_trace(go.Scatter(x=line["position"], y=line["value"], name=baseline.replace("_", " "),
                                        mode="lines", line={"color": CHANCE_COLOUR, "dash": dash}))
    figure.update_layout(title=f"{variant}: {probe} probe {metric} by position",
                         xaxis={"title": "position"},
                         yaxis={"title": metric, **({"range": [0, 1]} if metric == "accuracy" else {})})
    return figure
