"""Figures of training dynamics: curves over training steps on a log axis, attention patterns with a step slider."""

from __future__ import annotations

import math
from itertools import cycle

import pandas as pd
import plotly.graph_objects as go
from jaxtyping import Float
from plotly.colors import qualitative
from plotly.subplots import make_subplots
from torch import Tensor

from poslens.analyses.measures.entropy import ENTROPY_COLUMNS, PROBE_STEP_COLUMNS
from poslens.analyses.tables import check_columns

INIT_X = 0.5  # where step 0 sits on a log step axis (which has no 0)
METRIC_COLUMNS = ("variant", "seed", "step", "test_loss", "token_accuracy", "exact_match")


def _step_x(steps: pd.Series) -> pd.Series:
    """Steps on a log axis: step 0 (the initial weights) is drawn at `INIT_X` and labelled 0."""
    return steps.astype(float).where(steps > 0, INIT_X)


def _log_step_axis(figure: go.Figure, steps: pd.Series, **where) -> None:
    top = max(1, int(steps.max()))
    powers = [10**k for k in range(int(math.log10(top)) + 1)]
    figure.update_xaxes(type="log", title="training step (log; 0 = initial weights)",
                        tickvals=[INIT_X, *powers], ticktext=["0", *map(str, powers)], **where)


def training_curves_figure(metrics: pd.DataFrame) -> go.Figure:
    """Held-out loss (left) and accuracy (right: exact match, per-token) against step, log x
    axis; the mean over seeds when the table holds several."""
    check_columns(metrics, METRIC_COLUMNS, "metrics")
    mean = metrics.groupby("step", sort=True)[["test_loss", "token_accuracy", "exact_match"]].mean().reset_index()
    figure = make_subplots(rows=1, cols=2, subplot_titles=("held-out loss (answer tokens)", "held-out accuracy"))
    x = _step_x(mean["step"])
    figure.add_trace(go.Scatter(x=x, y=mean["test_loss"], name="test loss", mode="lines+markers"), row=1, col=1)
    for column, dash in (("exact_match", "solid"), ("token_accuracy", "dash")):
        figure.add_trace(go.Scatter(x=x, y=mean[column], name=column.replace("_", " "), mode="lines+markers",
                                    line={"dash": dash}), row=1, col=2)
    _log_step_axis(figure, mean["step"])
    figure.update_yaxes(title="cross-entropy (nats)", row=1, col=1)
    figure.update_yaxes(title="accuracy", range=[0, 1.02], row=1, col=2)
    figure.update_layout(title="task loss and accuracy over training")
    return figure


def probe_dynamics_figure(probes: pd.DataFrame) -> go.Figure:
    """Position-probe accuracy at each residual site against step (log x axis), with the
    token-identity bar (dashed) and chance (dotted); the mean over seeds."""
    check_columns(probes, PROBE_STEP_COLUMNS, "probes")
    rows = probes[(probes["probe"] == "position") & (probes["metric"] == "accuracy")]
    mean = rows.groupby(["baseline", "layer", "site", "step"], sort=True)["value"].mean().reset_index()
    figure = go.Figure()
    trained = mean[mean["baseline"] == "trained"]
    sites = trained.drop_duplicates("site").sort_values("layer")["site"]
    for site, colour in zip(sites, cycle(qualitative.Plotly)):
        curve = trained[trained["site"] == site]
        figure.add_trace(go.Scatter(x=_step_x(curve["step"]), y=curve["value"], name=site, mode="lines+markers",
                                    line={"color": colour}))
    for baseline, dash in (("token_identity", "dash"), ("chance", "dot")):
        bar = mean[mean["baseline"] == baseline].groupby("step", sort=True)["value"].mean()
        if not bar.empty:
            figure.add_trace(go.Scatter(x=_step_x(bar.index.to_series()), y=bar.to_numpy(), mode="lines",
                                        name=baseline.replace("_", " "), line={"color": "grey", "dash": dash}))
    _log_step_axis(figure, mean["step"])
    figure.update_layout(title="position-probe accuracy per site over training", yaxis={"title": "accuracy",
                                                                                         "range": [0, 1.02]})
    return figure


def entropy_figure(entropy: pd.DataFrame) -> go.Figure:
    """Attention entropy per layer against step (log x axis): JoMA's measure in nats (left,
    with the uniform-attention reference dashed) and the normalised one (right, uniform = 1).
    Thick lines are the mean over heads, thin ones each head; the mean over seeds."""
    check_columns(entropy, ENTROPY_COLUMNS, "entropy")
    per_head = entropy.groupby(["layer", "head", "step"], sort=True)[
        ["entropy_nats", "entropy_normalised"]].mean().reset_index()
    per_layer = per_head.groupby(["layer", "step"], sort=True)[["entropy_nats", "entropy_normalised"]].mean()
    per_layer = per_layer.reset_index()
    figure = make_subplots(rows=1, cols=2, subplot_titles=(
        "entropy, nats (JoMA: −Σ p log(p + 1e-8), mean over queries)", "normalised by ln(visible keys)"))
    for col, column in ((1, "entropy_nats"), (2, "entropy_normalised")):
        for layer, colour in zip(sorted(per_layer["layer"].unique()), cycle(qualitative.Plotly)):
            for head, curve in per_head[per_head["layer"] == layer].groupby("head"):
                figure.add_trace(go.Scatter(x=_step_x(curve["step"]), y=curve[column], mode="lines",
                                            line={"color": colour, "width": 1}, opacity=0.35, legendgroup=str(layer),
                                            showlegend=False, name=f"layer {layer} head {head}"), row=1, col=col)
            curve = per_layer[per_layer["layer"] == layer]
            figure.add_trace(go.Scatter(x=_step_x(curve["step"]), y=curve[column], mode="lines+markers",
                                        line={"color": colour, "width": 3}, legendgroup=str(layer),
                                        showlegend=col == 1, name=f"layer {layer} (mean over heads)"), row=1, col=col)
    reference = {1: float(entropy["uniform_nats"].mean()), 2: 1.0}
    for col, value in reference.items():
        figure.add_hline(y=value, line={"color": "grey", "dash": "dash"}, row=1, col=col,
                         annotation_text=f"uniform attention ({value:.3f})")
    _log_step_axis(figure, entropy["step"])
    figure.update_yaxes(title="nats", rangemode="tozero", row=1, col=1)
    figure.update_yaxes(title="entropy / ln(visible keys)", range=[0, 1.05], row=1, col=2)
    figure.update_layout(title="attention entropy over training")
    return figure


def entropy_split_figure(entropy: pd.DataFrame) -> go.Figure:
    """JoMA's entropy (nats) per layer against step, over the loss-bearing queries (solid) and over
    the rest (dashed); the mean over heads and
    seeds. Only the loss-bearing queries get a gradient from the loss."""
    check_columns(entropy, ("layer", "step", "entropy_nats_loss", "entropy_nats_rest"), "entropy")
    per_layer = entropy.groupby(["layer", "step"], sort=True)[["entropy_nats_loss", "entropy_nats_rest"]].mean()
    per_layer = per_layer.reset_index()
    figure = go.Figure()
    for layer, colour in zip(sorted(per_layer["layer"].unique()), cycle(qualitative.Plotly)):
        curve = per_layer[per_layer["layer"] == layer]
        for column, dash, kind in (("entropy_nats_loss", "solid", "loss-bearing queries"),
                                   ("entropy_nats_rest", "dash", "other queries")):
            figure.add_trace(go.Scatter(x=_step_x(curve["step"]), y=curve[column], mode="lines+markers",
                                        line={"color": colour, "dash": dash}, name=f"layer {layer}, {kind}"))
    _log_step_axis(figure, per_layer["step"])
    figure.update_layout(title="attention entropy over loss-bearing queries and the rest (nats, mean over heads)",
                         yaxis={"title": "nats", "rangemode": "tozero"})
    return figure


def attention_pattern_figure(patterns: Float[Tensor, "step layer head query key"], steps: list[int]) -> go.Figure:
    """Mean attention pattern of every layer (rows) and head (columns), one heatmap each, with
    a slider over the training steps (plotly frames)."""
    if patterns.ndim != 5 or len(steps) != patterns.shape[0]:
        raise ValueError(f"patterns must be [step, layer, head, query, key] with one step per entry of steps; "
                         f"got shape {tuple(patterns.shape)} and {len(steps)} steps")
    n_layers, n_heads = patterns.shape[1:3]
    figure = make_subplots(rows=n_layers, cols=n_heads, subplot_titles=[
        f"layer {layer} head {head}" for layer in range(n_layers) for head in range(n_heads)])

    def heatmaps(index: int) -> list[go.Heatmap]:
        return [go.Heatmap(z=patterns[index, layer, head].round(decimals=4).numpy(), coloraxis="coloraxis")
                for layer in range(n_layers) for head in range(n_heads)]

    for trace, (layer, head) in zip(heatmaps(0), [(layer, head) for layer in range(n_layers)
                                                  for head in range(n_heads)]):
        figure.add_trace(trace, row=layer + 1, col=head + 1)
    figure.frames = [go.Frame(data=heatmaps(index), name=str(step), traces=list(range(n_layers * n_heads)))
                     for index, step in enumerate(steps)]
    slider = {"active": 0, "currentvalue": {"prefix": "step "}, "pad": {"t": 50}, "steps": [
        {"label": str(step), "method": "animate",
         "args": [[str(step)], {"mode": "immediate", "frame": {"duration": 0, "redraw": True},
                                "transition": {"duration": 0}}]} for step in steps]}
    figure.update_yaxes(autorange="reversed", title_text="query")
    figure.update_xaxes(title_text="key")
    figure.update_layout(title="mean attention pattern over training (drag the step slider)",
                         coloraxis={"colorscale": "Viridis", "cmin": 0, "cmax": 1}, sliders=[slider],
                         height=max(400, 260 * n_layers))
    return figure
