"""Attention entropy and when position becomes decodable: measures over a run's snapshots.

- `attention_entropy`: the Shannon entropy in nats of each query's attention row, defined as
  in the JoMA paper's code (Tian et al. 2023): `-(p * log(p + 1e-8))` summed over keys,
  averaged over queries and sequences, *not* normalised; beside it, labelled as such, the same
  entropy divided by the log of the number of keys the query can see (1 for uniform
  attention, 0 for attention on one key). Either can be averaged over a subset of queries:
  JoMA averages every query, but the loss of an answer-only task falls on a few of them
  (`loss_queries`: the queries that predict answer tokens), and a query no loss reaches gets
  gradient only through what later layers read from it, so `attention_summary` also reports
  the entropy of loss-bearing queries and of the rest separately.
- `uniform_entropy_reference(T, causal)`: JoMA's entropy of uniform attention over T
  positions: the mean over queries t = 1..T of ln t causally (2.632 nats for T = 35), ln T
  bidirectionally.
- `entropy_rebound`: each layer's minimum-entropy step and how far entropy rises after it
  (JoMA's "attention becomes sparse, then dense"), and `dip_and_rise`, a test statistic for it
  that a flat or falling curve cannot pass (cross-fitted against the snapshot noise).
- `decodable_steps`: the first step at which each site's position probe beats token identity
  by a stated margin.

Tables (tidy, one measurement per row; `variant` and `seed` columns let runs be concatenated):

- `probes`: step, then the probe schema of `analyses.tables.PROBE_COLUMNS`.
- `entropy`: variant, seed, step, layer, head, entropy_nats (JoMA's definition),
  entropy_normalised (divided by ln(visible keys)), uniform_nats (the uniform-attention
  reference in nats; the normalised reference is 1); with `loss_queries` also the
  `ENTROPY_SPLIT_COLUMNS` (entropy_nats_loss, entropy_nats_rest, entropy_normalised_loss,
  entropy_normalised_rest), which `entropy_rebound` reads when present.
- `rebound` (`entropy_rebound`) and `decodable` (`decodable_steps`): see those functions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import einops
import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from poslens.analyses.tables import PROBE_COLUMNS, check_columns
from poslens.hooks import capture_patterns
from poslens.variants import HookedTransformer
from poslens.variants.training import Task

ENTROPY_EPS = 1e-8  # inside the log, as in JoMA's code
DECODABLE_MARGINS = (0.05, 0.5)
PROBE_STEP_COLUMNS = ("step", *PROBE_COLUMNS)
ENTROPY_COLUMNS = ("variant", "seed", "step", "layer", "head", "entropy_nats", "entropy_normalised", "uniform_nats")
ENTROPY_SPLIT_COLUMNS = ("entropy_nats_loss", "entropy_nats_rest", "entropy_normalised_loss", "entropy_normalised_rest")
REBOUND_COLUMNS = ("variant", "seed", "layer", "measure", "initial", "min_step", "min", "final_step", "final",
                   "rebound", "rebound_fraction", "dip", "rise", "noise", "rebound_excess")
NOISE_PER_MEDIAN = 1 / (0.6745 * math.sqrt(6))
"""σ of white noise per median |second difference|: a second difference of white noise has sd σ·√6
and the median of a half-normal is 0.6745 of its sd."""
DECODABLE_COLUMNS = ("variant", "seed", "site", "layer", "margin", "token_identity", "step", "accuracy_at_step",
                     "final_accuracy")



class AttentionEntropy(NamedTuple):
    """Per-head attention entropy: JoMA's raw nats and, separately, normalised by ln(visible keys)."""

    nats: Float[Tensor, " head"]
    normalised: Float[Tensor, " head"]


def attention_entropy(pattern: Float[Tensor, "batch head query key"], *, causal: bool,
                      queries: Sequence[int] | None = None) -> AttentionEntropy:
    """Entropy of attention patterns, per head, averaged over `queries` (default: every query)
    and the batch.

    `nats` is JoMA's measure: `-(p * log(p + 1e-8)).sum(key)` per query row, then the mean
    over the queries and sequences, not normalised. `normalised` divides each row's entropy by
    ln of the number of keys that query can see (query q sees q + 1 keys when `causal`, all of
    them otherwise) before averaging, so uniform attention scores 1 at every query. A query
    that sees a single key (the first one, causally) has entropy exactly 0 whatever the
    weights, and 0/ln 1 is undefined, so those rows are left out of the normalised mean
    (they stay in `nats`, as in JoMA); with no query seeing two keys it is NaN, and both are
    NaN for an empty `queries`.

    Args:
        pattern: attention patterns `[batch, head, query, key]`.
        causal: whether query q sees only keys 0..q.
        queries: the query positions to average over; default all.

    Returns:
        An `AttentionEntropy` with `nats` and `normalised` per head.
    """
    if pattern.ndim != 4:
        raise ValueError(f"pattern must be [batch, head, query, key], got shape {tuple(pattern.shape)}")
    n_query, n_key = pattern.shape[-2:]
    if causal and n_query != n_key:
        raise ValueError(f"a causal pattern must be square (query = key positions), got {n_query} × {n_key}")
    chosen = _query_mask(n_query, queries)
    p = pattern.double()
    rows: Float[Tensor, "batch head query"] = -(p * torch.log(p + ENTROPY_EPS)).sum(-1)
    visible = torch.arange(1, n_query + 1, dtype=torch.float64) if causal else torch.full((n_query,), float(n_key))
    informative = chosen & (visible > 1)
    normalised = rows[..., informative] / visible[informative].log()
    return AttentionEntropy(nats=einops.reduce(rows[..., chosen], "batch head query -> head", "mean"),
                            normalised=einops.reduce(normalised, "batch head query -> head", "mean"))


def _query_mask(n_query: int, queries: Sequence[int] | None) -> Bool[Tensor, " query"]:
    """A mask of `queries` (all when None) among `n_query` query positions."""
    mask = torch.zeros(n_query, dtype=torch.bool)
    chosen = list(range(n_query)) if queries is None else list(queries)
    outside = [query for query in chosen if not (isinstance(query, int) and 0 <= query < n_query)]
    if outside:
        raise ValueError(f"queries must be positions in 0..{n_query - 1}, got {outside}")
    mask[chosen] = True
    return mask


def loss_queries(task: Task) -> list[int]:
    """The query positions of a training input (`tokens[:, :-1]`) whose predictions the loss is
    on: `prompt_len − 1` .. `seq_len − 2`, each predicting the next (answer) token."""
    return list(range(task.prompt_len - 1, task.seq_len - 1))


def uniform_entropy_reference(n_ctx: int, causal: bool, queries: Sequence[int] | None = None) -> float:
    """JoMA's entropy (nats) of uniform attention over `n_ctx` positions, averaged over
    `queries` (default: all): ln(q + 1) at query q when causal (it sees q + 1 keys), ln T
    bidirectionally. Over all queries causally it is the mean of ln t for t = 1..T."""
    if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 1:
        raise ValueError(f"n_ctx must be an integer >= 1, got {n_ctx!r}")
    if queries is None:
        return math.lgamma(n_ctx + 1) / n_ctx if causal else math.log(n_ctx)
    chosen = _query_mask(n_ctx, queries).nonzero().flatten()
    visible = (chosen + 1).double() if causal else torch.full((len(chosen),), float(n_ctx), dtype=torch.float64)
    return float(visible.log().mean())


@torch.no_grad()
def attention_summary(model: HookedTransformer, tokens: Int[Tensor, "batch pos"], *, batch_size: int = 256,
                      loss_queries: Sequence[int] | None = None
                      ) -> tuple[pd.DataFrame, Float[Tensor, "layer head query key"]]:
    """Per layer and head: `attention_entropy` over `tokens` (rows layer, head, entropy_nats,
    entropy_normalised; with `loss_queries`, e.g. `loss_queries(task)` for training inputs
    `tokens[:, :-1]`, also the `ENTROPY_SPLIT_COLUMNS`: the same over those queries and over
    the rest), and the mean attention pattern over the sequences."""
    causal = model.cfg.attention_dir == "causal"
    n_query = tokens.shape[1]
    groups = {"": None}
    if loss_queries is not None:
        loss = _query_mask(n_query, loss_queries)
        groups |= {"_loss": loss.nonzero().flatten().tolist(), "_rest": (~loss).nonzero().flatten().tolist()}
    totals: dict[str, Tensor] = {}
    patterns = 0.0
    for chunk in tokens.split(batch_size):
        stacked = capture_patterns(model, chunk)[1].cpu()  # [layer, batch, head, query, key]
        for suffix, queries in groups.items():
            entropies = [attention_entropy(pattern, causal=causal, queries=queries) for pattern in stacked]
            for measure in AttentionEntropy._fields:
                per_head = torch.stack([getattr(entropy, measure) for entropy in entropies]) * len(chunk)
                totals[f"entropy_{measure}{suffix}"] = totals.get(f"entropy_{measure}{suffix}", 0.0) + per_head
        patterns = patterns + einops.reduce(stacked.double(), "layer batch head query key -> layer head query key",
                                            "sum")
    rows = [{"layer": layer, "head": head,
             **{name: float(total[layer, head] / len(tokens)) for name, total in totals.items()}}
            for layer in range(model.cfg.n_layers) for head in range(model.cfg.n_heads)]
    columns = ["layer", "head", "entropy_nats", "entropy_normalised"] + (
        list(ENTROPY_SPLIT_COLUMNS) if loss_queries is not None else [])
    return pd.DataFrame(rows)[columns], (patterns / len(tokens)).float()


def entropy_rebound(entropy: pd.DataFrame, *, per_head: bool = False) -> pd.DataFrame:
    """Each layer's lowest-entropy step and the rebound after it ("sparse, then dense").

    Per run (variant, seed), layer and measure (`nats`, JoMA's, and `normalised`, then
    `nats_loss`, `nats_rest`, `normalised_loss` and `normalised_rest` where the table has the
    `ENTROPY_SPLIT_COLUMNS`), on the
    layer's entropy averaged over heads (or, with `per_head`, for each head: a `head` column
    follows `layer`): `initial` (at the first step), `min_step` and `min`, `final_step` and
    `final`, `rebound` = final − min, and `rebound_fraction` = rebound / (initial − min), the
    share of the initial drop won back (above 1 when entropy ends above where it started; NaN
    when it never fell below its initial value). `rebound` is >= 0 by construction and needs
    no fall, so it is descriptive only; the test statistic is `dip_and_rise`'s
    `rebound_excess` (with `dip`, `rise` and `noise`). Columns `REBOUND_COLUMNS` (+ `head`).

    Args:
        entropy: the entropy table over steps (`training_dynamics(...).entropy`).
        per_head: one row per head instead of the layer's mean.

    Returns:
        The rebound table, columns `REBOUND_COLUMNS` (+ `head`).
    """
    check_columns(entropy, ENTROPY_COLUMNS, "entropy")
    unit = ["layer", "head"] if per_head else ["layer"]
    measures = ["nats", "normalised"] + [column.removeprefix("entropy_") for column in ENTROPY_SPLIT_COLUMNS
                                         if column in entropy]
    curves = entropy.groupby(["variant", "seed", *unit, "step"], sort=True)[
        [f"entropy_{measure}" for measure in measures]].mean().reset_index()
    rows = []
    for keys, curve in curves.groupby(["variant", "seed", *unit], sort=True):
        curve = curve.sort_values("step")
        for measure in measures:
            values = curve[f"entropy_{measure}"].to_numpy()
            lowest = int(values.argmin())
            drop = values[0] - values[lowest]
            rebound = values[-1] - values[lowest]
            rows.append({**dict(zip(["variant", "seed", *unit], keys)), "measure": measure,
                         "initial": values[0], "min_step": int(curve["step"].iloc[lowest]), "min": values[lowest],
                         "final_step": int(curve["step"].iloc[-1]), "final": values[-1], "rebound": rebound,
                         "rebound_fraction": rebound / drop if drop > 0 else float("nan"),
                         **dip_and_rise(values)})
    columns = [*REBOUND_COLUMNS[:3], *(["head"] if per_head else []), *REBOUND_COLUMNS[3:]]
    return pd.DataFrame(rows, columns=columns)


def dip_and_rise(values) -> dict[str, float]:
    """A dip and a rise of one curve (snapshots in step order), each against the
    snapshot-to-snapshot noise, without the bias of reading a minimum off the same noise.

    The minimum is *located* on the odd snapshots and *read* on the even ones (the mean of the
    even neighbours of the odd minimum), so noise that picks the minimum does not also deepen
    it: `dip` = first snapshot − that low, `rise` = last even snapshot − that low. `noise` is
    the snapshot-to-snapshot sd, from the median |second difference| (robust to the few large
    ones a real dip makes; a smooth trend only adds to it). `rebound_excess` =
    min(dip, rise) − noise: > 0 when entropy fell and rose again, each by more than the noise.
    For a flat curve its expectation is below 0 (the smaller of two zero-mean differences,
    minus the noise); for a curve that only falls, `rise` <= 0 up to noise. NaN with fewer
    than 4 snapshots.

    Args:
        values: one curve's values in step order.

    Returns:
        dip, rise, noise and rebound_excess.
    """
    values = np.asarray(values, dtype=float)
    if len(values) < 4:
        return dict.fromkeys(("dip", "rise", "noise", "rebound_excess"), math.nan)
    odd = np.arange(1, len(values), 2)
    lowest = int(odd[values[odd].argmin()])
    low = values[[index for index in (lowest - 1, lowest + 1) if index < len(values)]].mean()
    last_even = (len(values) - 1) // 2 * 2
    dip, rise = values[0] - low, values[last_even] - low
    noise = float(np.median(np.abs(np.diff(values, 2)))) * NOISE_PER_MEDIAN
    return {"dip": float(dip), "rise": float(rise), "noise": noise, "rebound_excess": float(min(dip, rise) - noise)}


def decodable_steps(probes: pd.DataFrame, margins: tuple[float, ...] = DECODABLE_MARGINS) -> pd.DataFrame:
    """First step at which position is *decodable* at each site: the trained position probe's
    accuracy is at least the token-identity probe's plus `margin`.

    One row per run (variant, seed), site and margin: `token_identity` (the bar, at that
    step's data; it does not depend on the model), `step` (NaN if never within the run),
    `accuracy_at_step` and `final_accuracy`. Step 0 is the untrained model, so a site that is
    decodable at step 0 carries a position signal before any training. Columns
    `DECODABLE_COLUMNS`.

    Args:
        probes: the probe table over steps (`training_dynamics(...).probes`).
        margins: how far above token identity counts as decodable.

    Returns:
        One row per run, site and margin, columns `DECODABLE_COLUMNS`.
    """
    check_columns(probes, PROBE_STEP_COLUMNS, "probes")
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
