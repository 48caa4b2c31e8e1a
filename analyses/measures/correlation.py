"""Correlation structure of a residual site across examples: the paper's |corr| matrices.

Zuo & Guerzhoy show absolute correlation matrices of output embeddings from layers 1, 3 and 6
of NoPE models, with and without residual connections, and read "vertical slices" from how
block-diagonal they are: if position k's column keeps its own information, the dimensions of
position k correlate with each other more than with other positions' dimensions. Here that
reading becomes numbers beside the pictures (`analyses.figures.correlation`):

- `block_means`: the positions × positions matrix of mean |corr| per (position, position)
  block, the matrix both scores are computed from and the one the heatmap draws;
- `block_contrast`: mean |corr| inside position blocks − mean |corr| between positions (0 for
  no structure at any sample size, since sampling noise lifts both alike);
- `block_diagonality`: the share of off-diagonal |corr| mass inside blocks (the older score;
  sampling noise dilutes it, so it grows with the number of examples);
- `block_scores`: both, each against a null from shuffling examples independently per
  feature (what pure noise at this sample size scores), as excess over the null mean and z.

What these cannot see: a correlation across examples is blind to anything constant across
examples, so a per-position mean offset or scale (where an absolute-position signal, or Chi
et al.'s variance shrinkage, would live) leaves every score here unchanged. Position-sensitive
measures are in `analyses.measures.geometry`.
"""

from __future__ import annotations

import einops
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from poslens.analyses.stats import against_null

BLOCK_SCORE_COLUMNS = ("score", "value", "null_mean", "null_sd", "excess", "z", "n_examples", "n_shuffles")


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
    ordered position-major: rows/columns `pos * d_model + dim`.

    Args:
        acts: one site's activations `[example, pos, d_model]`.

    Returns:
        The `[pos * d_model, pos * d_model]` matrix of |corr|.
    """
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


def _check_full(full: Tensor, d_model: int) -> None:
    if not isinstance(d_model, int) or d_model < 1:
        raise ValueError(f"d_model must be a positive integer, got {d_model!r}")
    n_pos = full.shape[0] // d_model if full.ndim == 2 else 0
    if full.ndim != 2 or full.shape[0] != full.shape[1] or n_pos * d_model != full.shape[0]:
        raise ValueError(f"expected a square [pos*d_model, pos*d_model] matrix with d_model={d_model}, "
                         f"got shape {tuple(full.shape)}")


def block_means(full: Float[Tensor, "pos_dim pos_dim"], d_model: int) -> Float[Tensor, "pos pos"]:
    """Mean |corr| of each (position p, position q) d_model × d_model block of `full`; a
    diagonal block leaves out its self-correlations (NaN when d_model = 1: nothing is left)."""
    _check_full(full, d_model)
    blocks = einops.rearrange(full.clone().fill_diagonal_(0), "(p i) (q j) -> p q i j", i=d_model, j=d_model)
    sums = einops.reduce(blocks, "p q i j -> p q", "sum")
    counts = torch.full_like(sums, float(d_model * d_model)).fill_diagonal_(float(d_model * (d_model - 1)))
    return sums / counts


def block_contrast(full: Float[Tensor, "pos_dim pos_dim"], d_model: int) -> float:
    """Mean |corr| inside position blocks (off the diagonal) − mean |corr| between positions:
    the diagonal of `block_means` against its off-diagonal. 0 when positions are no more
    correlated within than across; about ρ − sqrt(2 / (π n)) for a within-block correlation ρ
    well above the noise of n examples, so nearly independent of n."""
    means = block_means(full, d_model)
    off = ~torch.eye(len(means), dtype=torch.bool)
    return float(means.diagonal().mean() - means[off].mean()) if len(means) > 1 else float("nan")


def block_diagonality(full: Float[Tensor, "pos_dim pos_dim"], d_model: int) -> float:
    """Share of off-diagonal |corr| mass that lies inside each position's own d_model × d_model
    block. 1 means positions are uncorrelated with each other; uniformly spread correlation
    gives (d_model - 1) / (n_pos * d_model - 1), about 1/n_pos. Self-correlations (the
    diagonal, always 1) are left out so they cannot inflate the score. Sampling noise adds
    |corr| ≈ sqrt(2 / (π n)) everywhere, so the share of a fixed structure grows with n:
    compare it with its null (`block_scores`), not across sample sizes.

    Args:
        full: a `full_correlation` matrix.
        d_model: the width of each position's block.

    Returns:
        The share, in [0, 1].
    """
    _check_full(full, d_model)
    position = torch.arange(full.shape[0]) // d_model
    same_block = position[:, None] == position[None, :]
    off_diagonal = full.clone().fill_diagonal_(0)
    total = off_diagonal.sum()
    return float(off_diagonal[same_block].sum() / total) if total > 0 else float("nan")


def _shuffle_examples(acts: Float[Tensor, "example pos d_model"], generator: torch.Generator
                      ) -> Float[Tensor, "example pos d_model"]:
    """`acts` with the examples permuted independently for every (position, dimension) feature."""
    flat = einops.rearrange(acts, "example pos d -> example (pos d)")
    order = torch.stack([torch.randperm(flat.shape[0], generator=generator) for _ in range(flat.shape[1])], dim=1)
    return einops.rearrange(flat.gather(0, order), "example (pos d) -> example pos d", pos=acts.shape[1])


def block_scores(acts: Float[Tensor, "example pos d_model"], *, n_shuffles: int = 10, seed: int = 0) -> pd.DataFrame:
    """`block_contrast` and `block_diagonality` of `acts`, each against a null from shuffling
    examples independently per feature (`n_shuffles` draws, seeded): what features with no
    correlation at all score at this number of examples. One row per score (columns
    `BLOCK_SCORE_COLUMNS`): value, null_mean, null_sd, excess = value − null_mean, z =
    excess / null_sd.

    Args:
        acts: one site's activations `[example, pos, d_model]`.
        n_shuffles: draws of the null.
        seed: fixes the shuffles.

    Returns:
        The scores with their nulls, columns `BLOCK_SCORE_COLUMNS`.
    """
    if isinstance(n_shuffles, bool) or not isinstance(n_shuffles, int) or n_shuffles < 2:
        raise ValueError(f"n_shuffles must be an integer >= 2 (the null needs a spread), got {n_shuffles!r}")
    d_model = acts.shape[-1] if acts.ndim == 3 else 0
    scores = {"contrast": block_contrast, "share": block_diagonality}
    observed = full_correlation(acts)
    generator = torch.Generator().manual_seed(seed)
    nulls = [full_correlation(_shuffle_examples(acts, generator)) for _ in range(n_shuffles)]
    rows = [{"score": name, **against_null(score(observed, d_model), [score(matrix, d_model) for matrix in nulls]),
             "n_examples": acts.shape[0], "n_shuffles": n_shuffles} for name, score in scores.items()]
    return pd.DataFrame(rows, columns=list(BLOCK_SCORE_COLUMNS))
