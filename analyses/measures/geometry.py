"""Position-sensitive geometry of the residual stream: variance by position and cosine adjacency.

A correlation across examples (`analyses.measures.correlation`) is blind to anything that is
the same in every example, which is exactly where an absolute-position signal lives. The two
measures here read the hidden states of each sequence directly, and both work on random-init
models as well as trained ones.

- **Variance by position** (Chi et al. 2023): v(t) = the variance across the d_model dimensions
  of the hidden vector at position t, averaged over examples. Near-uniform causal attention
  averages t value vectors, so the attention output's variance shrinks roughly as σ²/t: a
  latent position signal even at random initialisation. Score: `variance_slope`, the
  least-squares slope of ln v(t) against ln t (t = position + 1): −1 for σ²/t, 0 when the
  variance does not depend on position.
- **Cosine adjacency** (Zuo, Guerzhoy & Guerzhoy 2025): C[t, u] = the mean over examples of
  cos(h_t, h_u), and c(k) = the mean of C[t, t + k] over t, the similarity of hidden states k
  positions apart. Score: `adjacency`, the mean cosine of adjacent pairs (k = 1) minus the mean
  cosine of all pairs at least two apart (each pair once): > 0 when neighbours are more alike
  than distant positions.

Both scores come with a null from shuffling the positions within each sequence independently
(`n_shuffles` draws): the same vectors with no order, for which every score is 0 in
expectation; `excess` = value − null mean and `z` = excess / null sd. The null does not remove
what the token layout puts there: in `ddd+ddd=` positions 3 and 7 always hold `+` and `=`, so
even token embeddings score something. Read a model's scores beside its `embed` site (token
identity alone in a NoPE model), its random-init twin, and the shifted task format
(`Addition(max_shift=...)`), where position and token are no longer tied.
"""

from __future__ import annotations

from typing import NamedTuple

import einops
import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from scipy.stats import linregress
from torch import Tensor

from poslens.analyses.stats import against_null
from poslens.hooks import capture_residuals
from poslens.variants import HookedTransformer

VARIANCE_COLUMNS = ("site", "position", "variance")
COSINE_COLUMNS = ("site", "offset", "cosine")
SCORE_COLUMNS = ("site", "score", "value", "null_mean", "null_sd", "excess", "z", "n_examples", "n_shuffles")


def _check(acts: Tensor) -> Float[Tensor, "example pos d_model"]:
    if acts.ndim != 3 or acts.shape[0] < 1 or acts.shape[1] < 3:
        raise ValueError(f"need activations [example >= 1, pos >= 3, d_model], got shape {tuple(acts.shape)}")
    return acts.double()


def variance_by_position(acts: Float[Tensor, "example pos d_model"]) -> Float[Tensor, " pos"]:
    """v(t): the variance across dimensions of each hidden vector, averaged over examples."""
    return _check(acts).var(dim=-1, unbiased=False).mean(0)


def variance_slope(variance: Float[Tensor, " pos"]) -> float:
    """Least-squares slope of ln v(t) on ln t, t = position + 1 (−1 for v ∝ 1/t; NaN if some v(t) is 0)."""
    if (variance <= 0).any():
        return float("nan")
    t = np.arange(1, len(variance) + 1)
    return float(linregress(np.log(t), variance.log().numpy()).slope)


def cosine_matrix(acts: Float[Tensor, "example pos d_model"]) -> Float[Tensor, "pos pos"]:
    """C[t, u]: the mean over examples of cos(h_t, h_u) (a zero vector has cosine 0 with everything)."""
    unit = torch.nn.functional.normalize(_check(acts), dim=-1)
    return einops.einsum(unit, unit, "example p d, example q d -> p q") / acts.shape[0]


def cosine_by_offset(cosines: Float[Tensor, "pos pos"]) -> Float[Tensor, " offset"]:
    """c(k) for k = 1..pos − 1: the mean of C[t, t + k] over t."""
    return torch.stack([cosines.diagonal(offset).mean() for offset in range(1, len(cosines))])


def adjacency(cosines: Float[Tensor, "pos pos"]) -> float:
    """Mean cosine of adjacent positions − mean cosine of pairs at least two apart (each pair once)."""
    offset = torch.arange(len(cosines))[None, :] - torch.arange(len(cosines))[:, None]
    return float(cosines[offset == 1].mean() - cosines[offset >= 2].mean())


def _shuffle_positions(acts: Float[Tensor, "example pos d_model"], generator: torch.Generator
                       ) -> Float[Tensor, "example pos d_model"]:
    """`acts` with the positions of every example permuted independently."""
    order = torch.rand(acts.shape[:2], generator=generator).argsort(1)
    return acts.gather(1, einops.repeat(order, "example pos -> example pos d", d=acts.shape[2]))


SCORES = {"variance_slope": lambda acts: variance_slope(variance_by_position(acts)),
          "adjacency": lambda acts: adjacency(cosine_matrix(acts))}


def geometry_scores(acts: Float[Tensor, "example pos d_model"], *, n_shuffles: int = 20, seed: int = 0) -> list[dict]:
    """`variance_slope` and `adjacency` of `acts`, each against the within-sequence position-shuffle null."""
    if isinstance(n_shuffles, bool) or not isinstance(n_shuffles, int) or n_shuffles < 2:
        raise ValueError(f"n_shuffles must be an integer >= 2 (the null needs a spread), got {n_shuffles!r}")
    acts = _check(acts)
    generator = torch.Generator().manual_seed(seed)
    shuffled = [_shuffle_positions(acts, generator) for _ in range(n_shuffles)]
    return [{"score": name, **against_null(score(acts), [score(draw) for draw in shuffled]),
             "n_examples": acts.shape[0], "n_shuffles": n_shuffles} for name, score in SCORES.items()]


class GeometryTables(NamedTuple):
    """`variance` (site, position, variance), `cosine` (site, offset, cosine) and `scores`
    (site, score, value, null_mean, null_sd, excess, z, n_examples, n_shuffles)."""

    variance: pd.DataFrame
    cosine: pd.DataFrame
    scores: pd.DataFrame


def position_geometry(model: HookedTransformer, tokens: Int[Tensor, "example pos"], *, sites: list[str] | None = None,
                      n_shuffles: int = 20, seed: int = 0) -> GeometryTables:
    """Variance by position, cosine by offset and both scores with their nulls at every residual
    site (or `sites`) of `model` on `tokens` (give held-out prompts, e.g. a `task.sample_test`).

    Args:
        model: the model.
        tokens: held-out prompts.
        sites: the residual sites; default all.
        n_shuffles: draws of each null.
        seed: fixes the nulls.

    Returns:
        `GeometryTables`: variance, cosine and score tables.
    """
    capture = capture_residuals(model, tokens, sites=sites)
    variance, cosine, scores = [], [], []
    for site in capture.sites:
        acts = capture[site]
        variance += [{"site": site, "position": position, "variance": float(value)}
                     for position, value in enumerate(variance_by_position(acts))]
        cosine += [{"site": site, "offset": offset, "cosine": float(value)}
                   for offset, value in enumerate(cosine_by_offset(cosine_matrix(acts)), start=1)]
        scores += [{"site": site, **row} for row in geometry_scores(acts, n_shuffles=n_shuffles, seed=seed)]
    return GeometryTables(pd.DataFrame(variance, columns=list(VARIANCE_COLUMNS)),
                          pd.DataFrame(cosine, columns=list(COSINE_COLUMNS)),
                          pd.DataFrame(scores, columns=list(SCORE_COLUMNS)))
