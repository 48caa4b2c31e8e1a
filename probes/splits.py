"""Train/test splits by sequence, and the flattening of `[sequence, position]` activations into tokens.

Tokens of one sequence share context, so splitting by token would let a probe be tested on
the neighbours of what it was trained on; every split here puts a whole sequence on one side.
"""

from __future__ import annotations

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor

from poslens.probes.inputs import ArrayLike, as_tensor, positive_int


def split_by_sequence(n_sequences: int, test_fraction: float = 0.25, seed: int = 0) -> tuple[
        Int[Tensor, " n_train"], Int[Tensor, " n_test"]]:
    """Sorted train and test sequence indices: a random partition of `range(n_sequences)`, the
    same for the same `seed`, with at least one sequence on each side.

    Args:
        n_sequences: how many sequences there are.
        test_fraction: the share of sequences held out.
        seed: fixes the partition.

    Returns:
        `(train, test)`: sorted sequence indices.
    """
    n_sequences = positive_int(n_sequences, "n_sequences")
    if n_sequences < 2:
        raise ValueError(f"need at least 2 sequences to split, got n_sequences={n_sequences}")
    if not isinstance(test_fraction, (int, float)) or not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be strictly between 0 and 1, got {test_fraction!r}")
    n_test = min(max(round(n_sequences * test_fraction), 1), n_sequences - 1)
    order = torch.randperm(n_sequences, generator=torch.Generator().manual_seed(seed))
    return order[n_test:].sort().values, order[:n_test].sort().values


def flatten_tokens(activations: Float[ArrayLike, "site sequence position d_model"], sequences: Int[ArrayLike, " n"],
                   labels: Int[ArrayLike, "*sequence position"] | None = None) -> tuple[
        Float[Tensor, "site n_tokens d_model"], Int[Tensor, " n_tokens"]]:
    """The tokens of `sequences` as probe inputs, sequence-major: `[site, n_tokens, d_model]`
    activations and one label per token.

    `labels` defaults to the position itself; give `[position]` labels shared by all sequences
    (a role per position) or `[sequence, position]` labels (a digit value per token).

    Args:
        activations: `[site, sequence, position, d_model]`, as `capture_residuals` gives.
        sequences: the sequence indices to take (e.g. one side of `split_by_sequence`).
        labels: per-token labels; default the position.

    Returns:
        `(X, y)`: `[site, n_tokens, d_model]` features and `[n_tokens]` labels.
    """
    activations = as_tensor(activations, "activations")
    if activations.ndim != 4:
        raise ValueError(
            f"activations must be [site, sequence, position, d_model], got shape {tuple(activations.shape)}")
    sequences = _sequence_indices(sequences, activations.shape[1])
    n_positions = activations.shape[2]
    X = einops.rearrange(activations[:, sequences],
                         "site sequence position d_model -> site (sequence position) d_model")
    labels = torch.arange(n_positions) if labels is None else as_tensor(labels, "labels")
    if labels.shape == (n_positions,):
        return X, einops.repeat(labels, "position -> (sequence position)", sequence=len(sequences))
    if labels.shape == activations.shape[1:3]:
        return X, einops.rearrange(labels[sequences], "sequence position -> (sequence position)")
    raise ValueError(f"labels must be [position] = ({n_positions},) or [sequence, position] = "
                     f"{tuple(activations.shape[1:3])}, got shape {tuple(labels.shape)}")


def split_tokens(activations: Float[ArrayLike, "site sequence position d_model"],
                 split: tuple[Int[ArrayLike, " n_train"], Int[ArrayLike, " n_test"]],
                 labels: Int[ArrayLike, "*sequence position"] | None = None) -> tuple[
        tuple[Float[Tensor, "site n_train_tokens d_model"], Int[Tensor, " n_train_tokens"]],
        tuple[Float[Tensor, "site n_test_tokens d_model"], Int[Tensor, " n_test_tokens"]]]:
    """The two sides of a `split_by_sequence` split as probe inputs (the capture → split → fit
    recipe's middle step, written once).

    Args:
        activations: `[site, sequence, position, d_model]`, e.g. `hooks.capture_residuals(...).activations`.
        split: `(train, test)` sequence indices, as `split_by_sequence` returns them.
        labels: as in `flatten_tokens` (default: the position).

    Returns:
        `((X_train, y_train), (X_test, y_test))`, each as `flatten_tokens` returns it.
    """
    train, test = split
    return flatten_tokens(activations, train, labels), flatten_tokens(activations, test, labels)


def _sequence_indices(sequences: Int[ArrayLike, " n"], n_sequences: int) -> Int[Tensor, " n"]:
    sequences = as_tensor(sequences, "sequences")
    if sequences.ndim != 1 or len(sequences) == 0 or sequences.is_floating_point() or sequences.dtype == torch.bool:
        raise ValueError("sequences must be a non-empty 1-D array of integer indices, got shape "
                         f"{tuple(sequences.shape)} of {str(sequences.dtype).removeprefix('torch.')}")
    outside = sequences[(sequences < 0) | (sequences >= n_sequences)]
    if len(outside):
        raise ValueError(f"sequence index {outside[0].item()} is outside range({n_sequences})")
    return sequences.long()
