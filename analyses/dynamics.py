"""Training dynamics: walk a run's snapshots and watch position and attention take shape.

For every snapshot a run kept (`train(..., snapshots=K)`, see `variants.training`) this
measures, on the task's first `n_sequences` held-out sequences:

- task loss and accuracy (`variants.training.evaluate`);
- position-probe accuracy at every residual site, with the token-identity and chance bars
  (`analyses.probe_sweep.probe_sweep`; the step-0 snapshot *is* the random-init model);
- attention entropy per layer and head, defined as in the JoMA paper's code (Tian et al.
  2023): the Shannon entropy in nats of each query's attention row, `-(p * log(p + 1e-8))`
  summed over keys, averaged over queries and sequences, *not* normalised; beside it,
  labelled as such, the same entropy divided by the log of the number of keys the query
  can see (1 for uniform attention, 0 for attention on one key).

The entropy is measured on the model's training input (the sequence without its last token,
what `train` feeds the model). The reference for uniform attention over T positions is
`uniform_entropy_reference(T, causal)`: the mean over queries t = 1..T of ln t for causal
attention (query t sees t keys; 2.632 nats for T = 35), ln T for bidirectional attention.

`entropy_rebound` names each layer's minimum-entropy step and how far entropy rises after it
(JoMA's "attention becomes sparse, then dense"); `decodable_steps` names the first step at
which each site's position probe beats token identity by a stated margin. `write_dynamics`
is the whole `poslens dynamics` job: train with snapshots (resumably), measure, write tables,
figures and a summary.

Tables (tidy, one measurement per row; `variant` and `seed` columns let runs be concatenated):

- `metrics`: variant, seed, step, test_loss, token_accuracy, exact_match.
- `probes`: step, then the probe schema of `analyses.tables.PROBE_COLUMNS` (variant, seed,
  site, layer, probe, metric, value, baseline), baselines `trained`, `token_identity` and
  `chance`; the rows of one step form a valid probe table.
- `entropy`: variant, seed, step, layer, head, entropy_nats (JoMA's definition),
  entropy_normalised (divided by ln(visible keys)), uniform_nats (the uniform-attention
  reference in nats; the normalised reference is 1).
- `rebound` (`entropy_rebound`) and `decodable` (`decodable_steps`): see those functions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import cycle
from pathlib import Path
from typing import NamedTuple

import einops
import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float, Int
from plotly.colors import qualitative
from plotly.subplots import make_subplots
from torch import Tensor
from tqdm.auto import tqdm

from analyses.induction import (
    MARKOV_MODEL,
    MARKOV_TASK,
    MARKOV_TRAINING,
    InductionReport,
    induction_analysis,
)
from analyses.probe_sweep import probe_sweep
from analyses.reproduce import PRESETS, write_figure
from analyses.tables import PROBE_COLUMNS, export_table, render_table
from hooks import capture_patterns
from tasks import Task, make_task
from variants import HookedTransformer, VariantConfig, load, load_task, preset, train
from variants.storage import atomic_write
from variants.training import evaluate, list_snapshots

ENTROPY_EPS = 1e-8  # inside the log, as in JoMA's code
INIT_X = 0.5  # where step 0 sits on a log step axis (which has no 0)
DECODABLE_MARGINS = (0.05, 0.5)
DEFAULT_SEQUENCES = {"addition": 1000, "markov": 200}
DYNAMICS_TASKS = ("addition", "markov")
TABLE_SUFFIXES = (".csv", ".md", ".json")
METRIC_COLUMNS = ("variant", "seed", "step", "test_loss", "token_accuracy", "exact_match")
PROBE_STEP_COLUMNS = ("step", *PROBE_COLUMNS)
ENTROPY_COLUMNS = ("variant", "seed", "step", "layer", "head", "entropy_nats", "entropy_normalised", "uniform_nats")
REBOUND_COLUMNS = ("variant", "seed", "layer", "measure", "initial", "min_step", "min", "final_step", "final",
                   "rebound", "rebound_fraction")
DECODABLE_COLUMNS = ("variant", "seed", "site", "layer", "margin", "token_identity", "step", "accuracy_at_step",
                     "final_accuracy")


class AttentionEntropy(NamedTuple):
    """Per-head attention entropy: JoMA's raw nats and, separately, normalised by ln(visible keys)."""

    nats: Float[Tensor, " head"]
    normalised: Float[Tensor, " head"]


def attention_entropy(pattern: Float[Tensor, "batch head query key"], *, causal: bool) -> AttentionEntropy:
    """Entropy of attention patterns, per head, averaged over queries and the batch.

    `nats` is JoMA's measure: `-(p * log(p + 1e-8)).sum(key)` per query row, then the mean
    over every query and sequence, not normalised. `normalised` divides each row's entropy by
    ln of the number of keys that query can see (query q sees q + 1 keys when `causal`, all of
    them otherwise) before averaging, so uniform attention scores 1 at every query. A query
    that sees a single key (the first one, causally) has entropy exactly 0 whatever the
    weights, and 0/ln 1 is undefined, so those rows are left out of the normalised mean
    (they stay in `nats`, as in JoMA); with no query seeing two keys it is NaN.
    """
    if pattern.ndim != 4:
        raise ValueError(f"pattern must be [batch, head, query, key], got shape {tuple(pattern.shape)}")
    n_query, n_key = pattern.shape[-2:]
    if causal and n_query != n_key:
        raise ValueError(f"a causal pattern must be square (query = key positions), got {n_query} × {n_key}")
    p = pattern.double()
    rows: Float[Tensor, "batch head query"] = -(p * torch.log(p + ENTROPY_EPS)).sum(-1)
    visible = torch.arange(1, n_query + 1, dtype=torch.float64) if causal else torch.full((n_query,), float(n_key))
    informative = visible > 1
    normalised = rows[..., informative] / visible[informative].log()
    return AttentionEntropy(nats=einops.reduce(rows, "batch head query -> head", "mean"),
                            normalised=einops.reduce(normalised, "batch head query -> head", "mean"))


def uniform_entropy_reference(n_ctx: int, causal: bool) -> float:
    """JoMA's entropy (nats) of uniform attention over `n_ctx` positions: the mean over queries
    t = 1..T of ln t when causal (query t sees t keys), ln T when bidirectional."""
    if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 1:
        raise ValueError(f"n_ctx must be an integer >= 1, got {n_ctx!r}")
    return math.lgamma(n_ctx + 1) / n_ctx if causal else math.log(n_ctx)


@torch.no_grad()
def attention_summary(model: HookedTransformer, tokens: Int[Tensor, "batch pos"], *, batch_size: int = 256
                      ) -> tuple[pd.DataFrame, Float[Tensor, "layer head query key"]]:
    """Per layer and head: `attention_entropy` over `tokens` (rows layer, head, entropy_nats,
    entropy_normalised), and the mean attention pattern over the sequences."""
    causal = model.cfg.attention_dir == "causal"
    nats = normalised = patterns = 0.0
    for chunk in tokens.split(batch_size):
        stacked = capture_patterns(model, chunk)[1].cpu()  # [layer, batch, head, query, key]
        entropies = [attention_entropy(pattern, causal=causal) for pattern in stacked]
        nats = nats + torch.stack([e.nats for e in entropies]) * len(chunk)
        normalised = normalised + torch.stack([e.normalised for e in entropies]) * len(chunk)
        patterns = patterns + einops.reduce(stacked.double(), "layer batch head query key -> layer head query key",
                                            "sum")
    nats, normalised, patterns = nats / len(tokens), normalised / len(tokens), patterns / len(tokens)
    rows = [{"layer": layer, "head": head, "entropy_nats": float(nats[layer, head]),
             "entropy_normalised": float(normalised[layer, head])}
            for layer in range(model.cfg.n_layers) for head in range(model.cfg.n_heads)]
    return pd.DataFrame(rows), patterns.float()


def entropy_rebound(entropy: pd.DataFrame, *, per_head: bool = False) -> pd.DataFrame:
    """Each layer's lowest-entropy step and the rebound after it ("sparse, then dense").

    Per run (variant, seed), layer and measure (`nats`, JoMA's, and `normalised`), on the
    layer's entropy averaged over heads (or, with `per_head`, for each head: a `head` column
    follows `layer`): `initial` (at the first step), `min_step` and `min`, `final_step` and
    `final`, `rebound` = final − min, and `rebound_fraction` = rebound / (initial − min), the
    share of the initial drop won back (above 1 when entropy ends above where it started; NaN
    when it never fell below its initial value). Columns `REBOUND_COLUMNS` (+ `head`).
    """
    _check_columns(entropy, ENTROPY_COLUMNS, "entropy")
    unit = ["layer", "head"] if per_head else ["layer"]
    curves = entropy.groupby(["variant", "seed", *unit, "step"], sort=True)[
        ["entropy_nats", "entropy_normalised"]].mean().reset_index()
    rows = []
    for keys, curve in curves.groupby(["variant", "seed", *unit], sort=True):
        curve = curve.sort_values("step")
        for measure in ("nats", "normalised"):
            values = curve[f"entropy_{measure}"].to_numpy()
            lowest = int(values.argmin())
            drop = values[0] - values[lowest]
            rebound = values[-1] - values[lowest]
            rows.append({**dict(zip(["variant", "seed", *unit], keys)), "measure": measure,
                         "initial": values[0], "min_step": int(curve["step"].iloc[lowest]), "min": values[lowest],
                         "final_step": int(curve["step"].iloc[-1]), "final": values[-1], "rebound": rebound,
                         "rebound_fraction": rebound / drop if drop > 0 else float("nan")})
    columns = [*REBOUND_COLUMNS[:3], *(["head"] if per_head else []), *REBOUND_COLUMNS[3:]]
    return pd.DataFrame(rows, columns=columns)


def decodable_steps(probes: pd.DataFrame, margins: tuple[float, ...] = DECODABLE_MARGINS) -> pd.DataFrame:
    """First step at which position is *decodable* at each site: the trained position probe's
    accuracy is at least the token-identity probe's plus `margin`.

    One row per run (variant, seed), site and margin: `token_identity` (the bar, at that
    step's data; it does not depend on the model), `step` (NaN if never within the run),
    `accuracy_at_step` and `final_accuracy`. Step 0 is the untrained model, so a site that is
    decodable at step 0 carries a position signal before any training. Columns
    `DECODABLE_COLUMNS`.
    """
    _check_columns(probes, PROBE_STEP_COLUMNS, "probes")
    position = probes[(probes["probe"] == "position") & (probes["metric"] == "accuracy")]
    keys = ["variant", "seed", "site", "layer", "step"]
    wide = position.pivot_table(index=keys, columns="baseline", values="value").reset_index()
    missing = {"trained", "token_identity"} - set(wide.columns)
    if missing:
        raise ValueError(f"probes table lacks the {sorted(missing)} position-accuracy rows decodable_steps needs")
    rows = []
    for (variant, seed, site, layer), curve in wide.groupby(["variant", "seed", "site", "layer"], sort=False):
        curve = curve.sort_values("step")
        for margin in margins:
            hits = curve[curve["trained"] >= curve["token_identity"] + margin]
            first = hits.iloc[0] if not hits.empty else None
            rows.append({"variant": variant, "seed": seed, "site": site, "layer": layer, "margin": margin,
                         "token_identity": curve["token_identity"].iloc[-1],
                         "step": float("nan") if first is None else float(first["step"]),
                         "accuracy_at_step": float("nan") if first is None else first["trained"],
                         "final_accuracy": curve["trained"].iloc[-1]})
    return pd.DataFrame(rows, columns=list(DECODABLE_COLUMNS)).sort_values(["variant", "seed", "margin", "layer"],
                                                                            ignore_index=True)


def _check_columns(df: pd.DataFrame, columns: tuple[str, ...], name: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{name} table lacks columns {missing}; expected {list(columns)}")
    if df.empty:
        raise ValueError(f"{name} table is empty")


@dataclass
class DynamicsResult:
    """What `training_dynamics` measured on one run (see the module docstring for the tables)."""

    run_dir: Path
    steps: list[int]
    metrics: pd.DataFrame
    probes: pd.DataFrame
    entropy: pd.DataFrame
    patterns: Float[Tensor, "step layer head query key"]  # mean attention over the sequences
    uniform_nats: float
    induction: InductionReport | None = field(default=None)  # on the final model (markov only)

    @property
    def rebound(self) -> pd.DataFrame:
        return entropy_rebound(self.entropy)

    @property
    def decodable(self) -> pd.DataFrame:
        return decodable_steps(self.probes)

    def tables(self) -> dict[str, pd.DataFrame]:
        return {"metrics": self.metrics, "probes": self.probes, "entropy": self.entropy, "rebound": self.rebound,
                "decodable": self.decodable}

    def figures(self) -> dict[str, go.Figure]:
        return {"training_curves": training_curves_figure(self.metrics),
                "probe_accuracy": probe_dynamics_figure(self.probes),
                "attention_entropy": entropy_figure(self.entropy),
                "attention_patterns": attention_pattern_figure(self.patterns, self.steps)}


def training_dynamics(run_dir: str | Path, *, n_sequences: int = 1000, device: str = "cpu",
                      quiet: bool = False) -> DynamicsResult:
    """Measure every snapshot of the run in `run_dir` (loss, accuracy, probes, attention entropy).

    All measures use the task's first `n_sequences` held-out sequences; probes are trained on
    three quarters of them and tested on the rest, split by sequence.
    """
    run_dir = Path(run_dir)
    snapshots = list_snapshots(run_dir)
    if not snapshots:
        raise ValueError(f"{run_dir} has no snapshots; train it with train(..., snapshots=K) "
                         "or `poslens dynamics`")
    if isinstance(n_sequences, bool) or not isinstance(n_sequences, int) or n_sequences < 4:
        raise ValueError(f"n_sequences must be an integer >= 4 (probes split by sequence), got {n_sequences!r}")
    task = load_task(run_dir)
    tokens = task.test_set()[:n_sequences]
    metrics, probes, entropy, patterns = [], [], [], []
    for step, path in tqdm(snapshots, desc="dynamics", disable=quiet):
        model = load(path, device=device)
        common = {"variant": model.cfg.name, "seed": model.cfg.seed, "step": step}
        metrics.append({**common, **evaluate(model, task, tokens)})
        table = probe_sweep({model.cfg.name: [model]}, task, n_sequences=n_sequences,
                            controls=("token_identity", "chance"), quiet=True)
        probes.append(table.assign(step=step))
        heads, pattern = attention_summary(model, tokens[:, :-1])
        entropy.append(heads.assign(**common))
        patterns.append(pattern)
    causal = model.cfg.attention_dir == "causal"
    uniform = uniform_entropy_reference(task.seq_len - 1, causal)
    entropy_table = pd.concat(entropy, ignore_index=True).assign(uniform_nats=uniform)
    return DynamicsResult(
        run_dir=run_dir, steps=[step for step, _ in snapshots],
        metrics=pd.DataFrame(metrics, columns=list(METRIC_COLUMNS)),
        probes=pd.concat(probes, ignore_index=True)[list(PROBE_STEP_COLUMNS)],
        entropy=entropy_table[list(ENTROPY_COLUMNS)], patterns=torch.stack(patterns), uniform_nats=uniform)


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
    _check_columns(metrics, METRIC_COLUMNS, "metrics")
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
    _check_columns(probes, PROBE_STEP_COLUMNS, "probes")
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
    _check_columns(entropy, ENTROPY_COLUMNS, "entropy")
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


def _run_config(variant: str, task: Task, *, steps: int | None, n_layers: int | None, d_model: int | None,
                seed: int, device: str) -> tuple[VariantConfig, dict]:
    """The config and `train` settings of a dynamics run: the reproduce `quick` sizes on
    addition, `analyses.induction`'s MARKOV_MODEL / MARKOV_TRAINING on markov; given sizes win."""
    sizes = {key: value for key, value in (("n_layers", n_layers), ("d_model", d_model)) if value is not None}
    if task.name == "addition":
        quick = PRESETS["quick"]
        model = {"n_layers": quick.n_layers, "d_model": quick.d_model, "d_head": quick.d_head}
        settings = {"steps": quick.steps, "batch_size": quick.batch_size}
    else:
        model, settings = dict(MARKOV_MODEL), dict(MARKOV_TRAINING)
        if d_model is not None:  # the head count then follows from d_head
            model.pop("n_heads", None)
    cfg = preset(variant, **{"n_ctx": task.seq_len, **model, **sizes, "alphabet": task.alphabet, "seed": seed,
                             "device": device})
    return cfg, {**settings, **({} if steps is None else {"steps": steps}), "seed": seed}


def write_dynamics(out_dir: str | Path, *, variant: str, task: str, checkpoints: int = 12, steps: int | None = None,
                   n_layers: int | None = None, d_model: int | None = None, seed: int = 0,
                   n_sequences: int | None = None, device: str = "cpu", quiet: bool = False,
                   force: bool = False) -> DynamicsResult:
    """`poslens dynamics`: train `variant` on `task` into `out_dir/run` with step 0 and
    `checkpoints` log-spaced snapshots (resuming a killed run), run `training_dynamics`, and
    write `out_dir/tables/*.{csv,md,json}`, `out_dir/figures/*.html` and `out_dir/summary.md`.

    On markov the task is `MarkovICL(**MARKOV_TASK)` (loss on every token drawn from the table:
    with the last token alone the 2-layer model did not learn in budget, benchmarks/RESULTS.md), and
    the final model also goes through `analyses.induction.induction_analysis`
    (on `n_sequences` sequences), whose tables and figures are written with an `induction_`
    prefix. Finished outputs are never overwritten: if any exist, this refuses before training
    unless `force=True`, which recomputes the analyses (the trained run is always kept and
    resumed, never retrained).
    """
    if task not in DYNAMICS_TASKS:
        raise ValueError(f"unknown task {task!r}; allowed: {list(DYNAMICS_TASKS)}")
    if isinstance(checkpoints, bool) or not isinstance(checkpoints, int) or checkpoints < 1:
        raise ValueError(f"checkpoints must be an integer >= 1 (log-spaced snapshots besides step 0), "
                         f"got {checkpoints!r}")
    out_dir = Path(out_dir)
    outputs = [out_dir / name for name in ("summary.md", "tables", "figures")]
    existing = [path.name for path in outputs if path.exists()]
    if existing and not force:
        raise FileExistsError(f"{out_dir} already holds dynamics outputs ({', '.join(existing)}); "
                              "pass force=True (--force) to recompute them (the trained run is kept)")
    task_obj = make_task(task, **(MARKOV_TASK if task == "markov" else {}))
    n_sequences = DEFAULT_SEQUENCES[task] if n_sequences is None else n_sequences
    cfg, settings = _run_config(variant, task_obj, steps=steps, n_layers=n_layers, d_model=d_model, seed=seed,
                                device=device)
    trained = train(cfg, task_obj, out_dir=out_dir / "run", resume=True, quiet=quiet, snapshots=checkpoints,
                    **settings)
    result = training_dynamics(out_dir / "run", n_sequences=n_sequences, device=device, quiet=quiet)
    tables, figures = result.tables(), result.figures()
    if task == "markov":
        result.induction = induction_analysis(trained.model, task_obj, n_sequences=n_sequences, quiet=quiet)
        tables |= {f"induction_{name}": table for name, table in result.induction.tables.items()}
        figures |= {f"induction_{name}": figure for name, figure in result.induction.figures.items()}
    for name, table in tables.items():
        for suffix in TABLE_SUFFIXES:
            export_table(table, out_dir / "tables" / f"{name}{suffix}", overwrite=force)
    for name, figure in figures.items():
        write_figure(figure, out_dir / "figures", name)
    atomic_write(out_dir / "summary.md", _summary(result, cfg, settings, task), overwrite=force)
    return result


def _summary(result: DynamicsResult, cfg: VariantConfig, settings: dict, task: str) -> str:
    """A short Markdown summary: the run, the final metrics, the entropy rebound, decodability."""
    final = result.metrics.iloc[-1]
    rebound = result.rebound
    decodable = result.decodable
    lines = [
        f"# poslens dynamics: {cfg.name} on {task}\n",
        f"{cfg.n_layers} blocks, d_model {cfg.d_model}, {cfg.n_heads} heads; {settings['steps']} steps, batch "
        f"{settings['batch_size']}, seed {cfg.seed}; snapshots at steps {result.steps}.\n",
        f"Final held-out loss {final['test_loss']:.4f}, exact match {final['exact_match']:.3f}, "
        f"token accuracy {final['token_accuracy']:.3f}.\n",
        f"## Attention entropy: minimum and rebound per layer (mean over heads)\n\nJoMA's measure in nats "
        f"(uniform attention: {result.uniform_nats:.3f} nats) and normalised by ln(visible keys) (uniform: 1).\n",
        render_table(rebound.drop(columns=["variant", "seed"]), "md"),
        "## First step at which position is decodable (probe ≥ token identity + margin; NaN: never)\n",
        render_table(decodable.drop(columns=["variant", "seed"]), "md"),
    ]
    if result.induction is not None:
        facts = "".join(f"- {key}: {value}\n" for key, value in result.induction.summary.items())
        lines.append(f"## Induction analysis of the final model\n\n{facts}")
    return "\n".join(lines)
