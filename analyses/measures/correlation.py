"""Correlation structure of a residual site across examples: the paper's |corr| matrices.

Zuo & Guerzhoy show absolute correlation matrices of output embeddings from layers 1, 3 and 6
of NoPE models, with and without residual connections, and read "vertical slices" from how
block-diagonal they are: if position k's column keeps its own information, the dimensions of
position k correlate with each other more than with other positions' dimensions. Here that
reading becomes a number, `block_diagonality`, beside the pictures
(`analyses.figures.correlation`).
"""

from __future__ import annotations

import einops
import torch
from jaxtyping import Float
from torch import Tensor


def _standardise(x: Float[Tensor, "example feature"]) -> Float[Tensor, "example feature"]:
    """Zero mean, unit variance per feature over examples; constant features (detected
    exactly, not by a rounded std) become all zeros: their correlation with anything is
    undefined and reported as 0."""
    centred = x - x.mean(0)
    std = centred.pow(2).mean(0).sqrt()
    varies = ~(x == x[0]).all(0)
    return torch.where(varies, centred / std.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(centred))


def full_correlation(acts: Float[Tensor, "example pos d_model"]) -> Float[Tensor, "pos_dim pos_dim"]:
    """|Pearson correlation| across examples between every (position, dimension) feature,
    ordered position-major: rows/columns `pos * d_model + dim`."""
    if acts.ndim != 3 or acts.shape[0] < 2:
        raise ValueError(f"need activations [example >= 2, pos, d_model], got shape {tuple(acts.shape)}")
    z = _standardise(einops.rearrange(acts.double(), "example pos d -> example (pos d)"))
    return (z.T @ z / z.shape[0]).abs()


def position_correlation(acts: Float[Tensor, "example pos d_model"]) -> Float[Tensor, "pos pos"]:
    """Positions × positions: the mean over dimensions of |corr| between position p's and
    position q's value of the same dimension."""
    if acts.ndim != 3 or acts.shape[0] < 2:
        raise ValueError(f"need activations [example >= 2, pos, d_model], got shape {tuple(acts.shape)}")
    z = einops.rearrange(_standardise(einops.rearrange(acts.double(), "e p d -> e (p d)")), "e (p d) -> d e p",
                         p=acts.shape[1])
    return (einops.einsum(z, z, "d e p, d e q -> d p q") / acts.shape[0]).abs().mean(0)


def block_diagonality(full: Float[Tensor, "pos_dim pos_dim"], d_model: int) -> float:
    """Share of off-diagonal |corr| mass that lies inside each position's own d_model × d_model
    block. 1 means positions are uncorrelated with each other; uniformly spread correlation
    gives (d_model - 1) / (n_pos * d_model - 1), about 1/n_pos. Self-correlations (the
    diagonal, always 1) are left out so they cannot inflate the score."""
    if not isinstance(d_model, int) or d_model < 1:
        raise ValueError(f"d_model must be a positive integer, got {d_model!r}")
    n_pos = full.shape[0] // d_model if full.ndim == 2 else 0
    if full.ndim != 2 or full.shape[0] != full.shape[1] or n_pos * d_model != full.shape[0]:
        raise ValueError(f"expected a square [pos*d_model, pos*d_model] matrix with d_model={d_model}, "
                         f"got shape {tuple(full.shape)}")
    position = torch.arange(full.shape[0]) // d_model
    same_block = position[:, None] == position[None, :]
    off_diagonal = full.clone().fill_diagonal_(0)
    total = off_diagonal.sum()
    return float(off_diagonal[same_block].sum() / total) if total > 0 else float("nan")
