"""Induction heads on n-gram Markov in-context learning (Chen et al. 2024; docs/background.md).

A 2-layer model trained on `MarkovICL` must infer each sequence's own transition table in
context. Chen et al. find three roles: layer-1 heads are *copiers* (each attends to one
fixed relative offset, copying one parent into the position), the MLP *selects* the true
parents, and a layer-2 head is the *classifier*: the last position attends to earlier
positions whose parents match its own next-token context and reads the token there.
`induction_analysis` measures each role on a trained model, beside the standard head scores
on repeated random sequences and the loss of the Bayes-optimal predictors.

Conventions (all patterns are `[batch, head, query, key]`, rows summing to 1):

- *offset profile*: attention mass at key = query − d, for d = 0..max_offset, averaged over
  queries q ≥ max_offset (so every offset is visible to every query counted).
- *parent match*: the last position (index T − 1 of a T-token input) predicts token T from
  its parents `tokens[T − n : T]` (its own token and the n − 1 before it). The informative
  keys are the positions right *after* an earlier occurrence of that context, because the
  token there was drawn from the same row of the table: key j matches when
  `tokens[j − n : j] == tokens[T − n : T]`, n ≤ j ≤ T − 1. (Matching against the last
  position's *own* context `tokens[T − 1 − n : T − 1]` instead would find the tokens drawn
  from the row of the current token, which is already known, and always the last position
  itself.)
- *previous-token score*: mean over queries q ≥ 1 of A[q, q − 1]; 1 for a perfect head.
- *second-half induction score*: on `r + r` with |r| = N (optionally after a BOS token), the
  mean over the last N queries q of A[q, q − N + 1], the position after the query token's
  first occurrence; 1 for a perfect induction head. TransformerLens's `detect_head` "mul"
  score divides by all attention, first-half queries included, so a perfect induction head
  gets only ≈ 0.5 there; with a 3-token vocabulary its duplicate-token detection pattern also
  marks about a third of all earlier keys, so a uniform head already scores ≈ 1/3. Both are
  reported, under different names.

Every score comes with `chance`: the same score for uniform attention over the visible keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import einops
import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens.head_detector import (
    compute_head_attention_similarity_score,
    detect_head,
    get_induction_head_detection_pattern,
    get_previous_token_head_detection_pattern,
)

from poslens.hooks import capture_patterns
from poslens.tasks import MarkovICL
from poslens.variants import HookedTransformer

HEAD_SCORES = ("previous_token", "induction_second_half", "tl_previous_token_head", "tl_induction_head")
COPIER_THRESHOLD = 0.5
TABLE_COLUMNS = {
    "offset_profile": ["layer", "head", "offset", "mass", "sem", "chance"],
    "parent_match": ["layer", "head", "n_parents", "score", "sem", "chance"],
    "head_scores": ["layer", "head", "score_name", "value", "sem", "chance"],
    "icl_loss": ["predictor", "loss", "sem", "gap_to_bayes", "gap_sem"],
}
"""The tidy schema of `InductionReport.tables`. `sem` is the standard error over sequences
(NaN where a score is one number for the whole set, as TransformerLens's are); `chance` is the
score of uniform attention over the visible keys. `parent_match.n_parents` is the length of
the context matched (1..the task's n_parents; shorter contexts are weaker, looser matches).
`icl_loss.loss` is the mean cross-entropy (nats) of the last token; `gap_to_bayes` is
loss − the `bayes_posterior` loss on the same sequences, `gap_sem` its paired standard error."""


@dataclass
class InductionReport:
    """Tables (schema `TABLE_COLUMNS`) and a `summary` of the roles found
    (`analyses.figures.induction.induction_figures` draws the tables)."""

    tables: dict[str, pd.DataFrame]
    summary: dict[str, Any] = field(default_factory=dict)


def uniform_pattern(n_pos: int, causal: bool = True) -> Float[Tensor, "1 1 query key"]:
    """Uniform attention over the visible keys: the `chance` reference of every score."""
    visible = torch.ones(n_pos, n_pos, dtype=torch.float64)
    visible = visible.tril() if causal else visible
    return (visible / visible.sum(-1, keepdim=True))[None, None]


def _check_pattern(pattern: Tensor, min_pos: int = 2) -> None:
    if pattern.ndim != 4 or pattern.shape[-1] != pattern.shape[-2] or pattern.shape[-1] < min_pos:
        raise ValueError(f"pattern must be [batch, head, query, key] with query == key >= {min_pos}, "
                         f"got shape {tuple(pattern.shape)}")


def offset_profile(pattern: Float[Tensor, "batch head query key"],
                   max_offset: int) -> Float[Tensor, "batch head offset"]:
    """Attention mass at key = query − d for d = 0..max_offset, mean over queries q ≥ max_offset."""
    _check_pattern(pattern)
    if not isinstance(max_offset, int) or not 0 <= max_offset < pattern.shape[-1]:
        raise ValueError(f"max_offset must be an integer in 0..{pattern.shape[-1] - 1}, got {max_offset!r}")
    diagonals = [pattern.diagonal(offset=-d, dim1=-2, dim2=-1)[..., max_offset - d:] for d in range(max_offset + 1)]
    return torch.stack(diagonals, dim=-1).mean(-2)


def previous_token_score(pattern: Float[Tensor, "batch head query key"]) -> Float[Tensor, "batch head"]:
    """Mean over queries q ≥ 1 of A[q, q − 1]."""
    _check_pattern(pattern)
    return pattern.diagonal(offset=-1, dim1=-2, dim2=-1).mean(-1)


def induction_score_second_half(pattern: Float[Tensor, "batch head query key"],
                                half_len: int) -> Float[Tensor, "batch head"]:
    """Mean over the last `half_len` queries q of A[q, q − half_len + 1] (inputs `[BOS] + r + r`
    or `r + r`, |r| = half_len): the key right after the query token's first occurrence."""
    _check_pattern(pattern)
    n_pos = pattern.shape[-1]
    if not isinstance(half_len, int) or not 1 <= half_len <= n_pos // 2:
        raise ValueError(f"half_len must be an integer in 1..{n_pos // 2} for {n_pos} positions, got {half_len!r}")
    targets = pattern.diagonal(offset=-(half_len - 1), dim1=-2, dim2=-1)
    return targets[..., -half_len:].mean(-1)


def _context_ids(tokens: Int[Tensor, "batch pos"], n_parents: int, vocab: int) -> Int[Tensor, "batch pos"]:
    """Base-`vocab` number of `tokens[i - n_parents : i]` at every i ≥ n_parents (most distant
    parent first, as `MarkovICL` indexes its tables); −1 where i has fewer parents."""
    ids = torch.full_like(tokens, -1)
    if n_parents == 0:
        return ids.fill_(0)
    windows = tokens.unfold(1, n_parents, 1)[:, :-1]
    weights = vocab ** torch.arange(n_parents - 1, -1, -1, device=tokens.device)
    ids[:, n_parents:] = (windows * weights).sum(-1)
    return ids


def parent_match_score(pattern: Float[Tensor, "batch head query key"], tokens: Int[Tensor, "batch pos"],
                       n_parents: int) -> Float[Tensor, "batch head"]:
    """Attention mass from the last query on keys j with `tokens[j-n:j] == tokens[T-n:T]`
    (n = `n_parents`, T = number of positions): the positions that follow an earlier occurrence
    of the context the last position must continue. NaN for a sequence with no such key."""
    _check_pattern(pattern)
    n_pos = pattern.shape[-1]
    if tokens.ndim != 2 or tokens.shape != (pattern.shape[0], n_pos):
        raise ValueError(f"tokens must be [batch, pos] = {(pattern.shape[0], n_pos)}, got {tuple(tokens.shape)}")
    if not isinstance(n_parents, int) or not 1 <= n_parents < n_pos:
        raise ValueError(f"n_parents must be an integer in 1..{n_pos - 1}, got {n_parents!r}")
    vocab = int(tokens.max()) + 1
    extended = torch.cat([tokens, tokens[:, :1]], dim=1)  # a dummy next token, so position T has a context id
    ids = _context_ids(extended, n_parents, vocab)
    matches = (ids[:, :n_pos] == ids[:, n_pos:]) & (ids[:, :n_pos] >= 0)
    mass = einops.einsum(pattern[:, :, -1, :], matches.to(pattern.dtype), "batch head key, batch key -> batch head")
    return mass.masked_fill(~matches.any(-1, keepdim=True), float("nan"))


def context_count_loss(tokens: Int[Tensor, "batch length"], n_parents: int, alpha: float,
                       vocab: int) -> Float[Tensor, "batch"]:
    """Cross-entropy of each sequence's last token under the Dirichlet(alpha)-multinomial
    posterior predictive of the transitions seen in context from the same `n_parents`-token
    context (`n_parents = 0`: the in-context unigram counts). With the task's own number of
    parents and alpha this is the Bayes-optimal predictor for `MarkovICL` data."""
    if not isinstance(n_parents, int) or not 0 <= n_parents < tokens.shape[1] - 1:
        raise ValueError(f"n_parents must be an integer in 0..{tokens.shape[1] - 2}, got {n_parents!r}")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha!r}")
    ids = _context_ids(tokens, n_parents, vocab)
    seen = (ids[:, :-1] == ids[:, -1:]) & (ids[:, :-1] >= 0)
    counts = einops.einsum(F.one_hot(tokens[:, :-1], vocab).double(), seen.double(),
                           "batch pos vocab, batch pos -> batch vocab")
    predictive = (counts + alpha) / (counts.sum(-1, keepdim=True) + vocab * alpha)
    return -predictive.gather(1, tokens[:, -1:]).squeeze(1).log()


def bayes_optimal_loss(tokens: Int[Tensor, "batch length"], tables: Float[Tensor, "batch context vocab"],
                       alpha: float) -> dict[str, Float[Tensor, "batch"]]:
    """Cross-entropy of each sequence's last token under the two references of Chen et al.:
    `bayes_posterior` (the prior alpha known, the table inferred from the context's counts;
    the best any model can do on average) and `true_table` (the sampled table itself)."""
    if tables.ndim != 3 or tables.shape[0] != tokens.shape[0]:
        raise ValueError(f"tables must be [batch={tokens.shape[0]}, vocab**n_parents, vocab], "
                         f"got {tuple(tables.shape)}")
    vocab = tables.shape[-1]
    n_parents = round(math.log(tables.shape[1], vocab))
    if vocab**n_parents != tables.shape[1]:
        raise ValueError(f"tables must be [batch={tokens.shape[0]}, vocab**n_parents, vocab], "
                         f"got {tuple(tables.shape)}")
    last_context = _context_ids(tokens, n_parents, vocab)[:, -1]
    true_p = tables[torch.arange(len(tokens)), last_context, tokens[:, -1]].double()
    return {"bayes_posterior": context_count_loss(tokens, n_parents, alpha, vocab), "true_table": -true_p.log()}


def repeated_random_tokens(vocab: int, half_len: int, n_sequences: int, seed: int) -> Int[Tensor, "batch pos"]:
    """`r + r` with r uniform over `vocab` tokens, |r| = `half_len` (no BOS: poslens tasks have none)."""
    generator = torch.Generator().manual_seed(seed)
    first = torch.randint(vocab, (n_sequences, half_len), generator=generator)
    return torch.cat([first, first], dim=1)


def _rows(values: Float[Tensor, "layer batch head *rest"], chance: Tensor, **labels: list) -> list[dict]:
    """Tidy rows: mean and sem over the batch (NaNs ignored) per (layer, head, *labels)."""
    values = values.double()
    finite = ~values.isnan()
    count = finite.sum(1)
    mean = values.nan_to_num().sum(1) / count
    var = ((values - mean[:, None]).nan_to_num() ** 2).sum(1) / (count - 1).clamp_min(1)
    sem = (var / count).sqrt()
    rows = []
    for index in torch.cartesian_prod(*(torch.arange(n) for n in mean.shape)).reshape(-1, mean.ndim).tolist():
        row = {"layer": index[0], "head": index[1],
               **{name: label[index[2 + i]] for i, (name, label) in enumerate(labels.items())}}
        row.update(value=float(mean[tuple(index)]), sem=float(sem[tuple(index)]),
                   chance=float(chance[tuple(index[2:])]))
        rows.append(row)
    return rows


def _tl_scores(model: HookedTransformer, tokens: Int[Tensor, "batch pos"]) -> dict[str, tuple[Tensor, float]]:
    """TransformerLens `detect_head` ("mul") per head, and the same score for uniform attention."""
    strings = model.to_string(tokens)
    uniform = uniform_pattern(tokens.shape[1], model.cfg.attention_dir == "causal")[0, 0]
    found = {}
    for name, detection in (("tl_previous_token_head", get_previous_token_head_detection_pattern),
                            ("tl_induction_head", get_induction_head_detection_pattern)):
        scores = detect_head(model, strings, name.removeprefix("tl_"))
        chance = sum(compute_head_attention_similarity_score(uniform, detection(row[None]).double(), exclude_bos=False,
                                                             exclude_current_token=False, error_measure="mul")
                     for row in tokens) / len(tokens)
        found[name] = (scores, chance)
    return found


@torch.no_grad()
def induction_analysis(model: HookedTransformer, task: MarkovICL, *, n_sequences: int = 1000, max_offset: int = 8,
                       n_tl_sequences: int = 100, chunk_size: int = 250, seed: int = 0,
                       quiet: bool = True) -> InductionReport:
    """Offset profiles, parent-match and head scores of every head, and the in-context loss of
    `model` against the Bayes-optimal predictors, on `n_sequences` fresh `task` sequences (and
    as many repeated random ones; TransformerLens's per-sequence `detect_head` on the first
    `n_tl_sequences`). Same seed, same numbers.

    Args:
        model: a model trained on `task`.
        task: the `MarkovICL` task.
        n_sequences: fresh sequences measured.
        max_offset: the largest relative offset in the offset profiles.
        n_tl_sequences: sequences for TransformerLens's `detect_head`.
        chunk_size: sequences per forward pass.
        seed: draws the sequences.
        quiet: no progress bars.

    Returns:
        An `InductionReport`: `tables` (columns in `TABLE_COLUMNS`) and a `summary`.
    """
    if not isinstance(task, MarkovICL):
        raise ValueError(f"induction_analysis needs a MarkovICL task, got {type(task).__name__}")
    for name, value in (("n_sequences", n_sequences), ("n_tl_sequences", n_tl_sequences), ("chunk_size", chunk_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if model.cfg.alphabet != task.alphabet or model.cfg.n_ctx < task.length - 1:
        raise ValueError(f"model (alphabet {model.cfg.alphabet!r}, n_ctx {model.cfg.n_ctx}) does not fit the task "
                         f"(alphabet {task.alphabet!r}, {task.length - 1} input tokens)")
    was_training = model.training
    model.eval()
    try:
        return _analyse(model, task, n_sequences=n_sequences, max_offset=max_offset, n_tl_sequences=n_tl_sequences,
                        chunk_size=chunk_size, seed=seed, quiet=quiet)
    finally:
        model.train(was_training)


def _analyse(model: HookedTransformer, task: MarkovICL, *, n_sequences: int, max_offset: int, n_tl_sequences: int,
             chunk_size: int, seed: int, quiet: bool) -> InductionReport:
    tokens, tables = task.sample(n_sequences, seed=2 * seed)  # even seeds: never drawn by training
    half_len = min(task.length - 1, model.cfg.n_ctx - 1) // 2  # detect_head needs seq_len < n_ctx
    repeated = repeated_random_tokens(task.vocab, half_len, n_sequences, seed=seed)
    causal = model.cfg.attention_dir == "causal"
    parents = list(range(1, task.n_parents + 1))
    offsets, matches, losses, prev, induction = [], [], [], [], []
    for data, rep in tqdm(list(zip(tokens.split(chunk_size), repeated.split(chunk_size))), desc="induction analysis",
                          disable=quiet):
        data = data.to(model.cfg.device)
        inputs = data[:, :-1]
        logits, patterns = capture_patterns(model, inputs)
        offsets.append(offset_profile(patterns.flatten(0, 1), max_offset).unflatten(0, patterns.shape[:2]))
        matches.append(torch.stack([parent_match_score(patterns.flatten(0, 1), inputs.repeat(len(patterns), 1), n)
                                    .unflatten(0, patterns.shape[:2]) for n in parents], dim=-1))
        losses.append(F.cross_entropy(logits[:, -1].double(), data[:, -1], reduction="none").cpu())
        rep_patterns = capture_patterns(model, rep)[1].flatten(0, 1)
        prev.append(previous_token_score(rep_patterns).unflatten(0, patterns.shape[:2]))
        induction.append(induction_score_second_half(rep_patterns, half_len).unflatten(0, patterns.shape[:2]))

    n_inputs = task.length - 1
    uniform = uniform_pattern(n_inputs, causal)
    offset_rows = _rows(torch.cat(offsets, 1).cpu(), offset_profile(uniform, max_offset)[0, 0],
                        offset=list(range(max_offset + 1)))
    chance_match = torch.stack([parent_match_score(uniform.expand(len(tokens), 1, -1, -1), tokens[:, :-1], n)
                                .nanmean() for n in parents])
    match_rows = _rows(torch.cat(matches, 1).cpu(), chance_match, n_parents=parents)
    uniform_rep = uniform_pattern(2 * half_len, causal)
    head_rows = _rows(torch.stack([torch.cat(prev, 1), torch.cat(induction, 1)], dim=-1).cpu(),
                      torch.cat([previous_token_score(uniform_rep)[0],
                                 induction_score_second_half(uniform_rep, half_len)[0]]),
                      score_name=list(HEAD_SCORES[:2]))
    for name, (scores, chance) in _tl_scores(model, repeated[:n_tl_sequences].to(model.cfg.device)).items():
        head_rows += [{"layer": layer, "head": head, "score_name": name, "value": float(scores[layer, head]),
                       "sem": float("nan"), "chance": chance}
                      for layer in range(model.cfg.n_layers) for head in range(model.cfg.n_heads)]

    tables_out = {
        "offset_profile": pd.DataFrame(offset_rows).rename(columns={"value": "mass"}),
        "parent_match": pd.DataFrame(match_rows).rename(columns={"value": "score"}),
        "head_scores": pd.DataFrame(head_rows),
        "icl_loss": icl_loss_table(torch.cat(losses), tokens, tables, task),
    }
    tables_out = {name: table[TABLE_COLUMNS[name]] for name, table in tables_out.items()}
    return InductionReport(tables_out, summarise(tables_out, task.n_parents))


def icl_loss_table(model_loss: Float[Tensor, "batch"], tokens: Int[Tensor, "batch length"],
                   tables: Float[Tensor, "batch context vocab"], task: MarkovICL) -> pd.DataFrame:
    """The model's last-token loss beside uniform, in-context unigram / bigram counts (Dirichlet
    predictive with 0 / 1 parents, the latter only when the task has more than one), the
    Bayes posterior and the true table, all on the same sequences (`TABLE_COLUMNS["icl_loss"]`)."""
    bayes = bayes_optimal_loss(tokens, tables, task.alpha)
    per_sequence = {"model": model_loss.double(), "uniform": torch.full_like(bayes["true_table"], math.log(task.vocab)),
                    "unigram": context_count_loss(tokens, 0, task.alpha, task.vocab)}
    if task.n_parents > 1:
        per_sequence["bigram"] = context_count_loss(tokens, 1, task.alpha, task.vocab)
    per_sequence.update(bayes)
    n = len(tokens)
    rows = []
    for predictor, loss in per_sequence.items():
        gap = loss - bayes["bayes_posterior"]
        rows.append({"predictor": predictor, "loss": float(loss.mean()), "sem": float(loss.std() / math.sqrt(n)),
                     "gap_to_bayes": float(gap.mean()), "gap_sem": float(gap.std() / math.sqrt(n))})
    return pd.DataFrame(rows, columns=TABLE_COLUMNS["icl_loss"])


def summarise(tables: dict[str, pd.DataFrame], n_parents: int) -> dict[str, Any]:
    """Which layer-1 heads copy which offset (≥ `COPIER_THRESHOLD` of their attention at one
    offset ≥ 1), the last layer's best parent-matching head, and the loss gap to Bayes."""
    offsets = tables["offset_profile"]
    first = offsets[(offsets["layer"] == 0) & (offsets["offset"] >= 1)]
    peaks = first.loc[first.groupby("head")["mass"].idxmax()]
    copiers = [{"head": int(row.head), "offset": int(row.offset), "mass": row.mass}
               for row in peaks.itertuples() if row.mass >= COPIER_THRESHOLD]
    match = tables["parent_match"]
    last = match[(match["layer"] == match["layer"].max()) & (match["n_parents"] == n_parents)]
    winner = last.loc[last["score"].idxmax()]
    loss = tables["icl_loss"].set_index("predictor")
    return {
        "copiers": copiers,
        "parent_match_winner": {"layer": int(winner["layer"]), "head": int(winner["head"]),
                                "score": float(winner["score"]), "chance": float(winner["chance"])},
        "model_loss": float(loss.loc["model", "loss"]),
        "bayes_posterior_loss": float(loss.loc["bayes_posterior", "loss"]),
        "true_table_loss": float(loss.loc["true_table", "loss"]),
        "gap_to_bayes": float(loss.loc["model", "gap_to_bayes"]),
        "gap_sem": float(loss.loc["model", "gap_sem"]),
    }
