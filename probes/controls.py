"""Baselines that say what a probe's accuracy means.

A probe reading position from a token's activation may instead be reading the token itself
(some tokens only ever occur at some positions). The controls bound that: Hewitt & Liang's
control task and selectivity, the best accuracy reachable from token identity alone, and the
chance levels of classification (majority class) and regression (a uniform random guess).
"""

from __future__ import annotations

import torch
from jaxtyping import Int
from torch import Tensor

from poslens.probes.inputs import ArrayLike, as_tensor, positive_int
from poslens.probes.logistic import PositionProbe


def control_labels(token_ids: Int[ArrayLike, "*tokens"], labels: Int[ArrayLike, "*tokens"], seed: int = 0) -> Int[
        Tensor, "*tokens"]:
    """Hewitt & Liang (2019) control task: every token type gets one random label, drawn from the
    empirical distribution of `labels` and kept wherever the type occurs, so the only way to
    predict it is to memorise token identity. Same `seed`, same labels."""
    token_ids, labels = _integers(token_ids, "token_ids"), _integers(labels, "labels")
    if token_ids.shape != labels.shape:
        raise ValueError(f"token_ids {tuple(token_ids.shape)} and labels {tuple(labels.shape)} differ in shape")
    if token_ids.numel() == 0:
        raise ValueError("token_ids is empty")
    types, type_of_token = torch.unique(token_ids, return_inverse=True)
    generator = torch.Generator().manual_seed(seed)
    pool = labels.flatten()
    label_of_type = pool[torch.randint(len(pool), (len(types),), generator=generator)]
    return label_of_type[type_of_token]


def selectivity(task_accuracy: Tensor | float, control_accuracy: Tensor | float) -> Tensor | float:
    """Hewitt & Liang's selectivity, task minus control accuracy: high when the probe reads the
    label from the representation rather than memorising token identity."""
    return task_accuracy - control_accuracy


def token_identity_baseline(token_ids: Int[ArrayLike, "sequence *position"],
                            labels: Int[ArrayLike, "sequence *position"], train_idx: Int[ArrayLike, " n_train"], test_idx: Int[ArrayLike, " n_test"], *,
                            C: float = 1.0) -> float:
    """Test accuracy of a `PositionProbe` that sees only a one-hot of each token's id: the best a
    probe does from token identity alone, the bar a probe of the residual stream has to clear.

    `train_idx` and `test_idx` index the leading axis (sequences of `[sequence, position]`
    arrays, as `split_by_sequence` gives, or tokens of flat arrays)."""
    token_ids, labels = _integers(token_ids, "token_ids"), _integers(labels, "labels")
    if token_ids.shape != labels.shape:
        raise ValueError(f"token_ids {tuple(token_ids.shape)} and labels {tuple(labels.shape)} differ in shape")
    n_types = int(token_ids.max()) + 1
    train_idx, test_idx = _integers(train_idx, "train_idx"), _integers(test_idx, "test_idx")

    def one_hot(rows: Tensor) -> Tensor:
        return torch.nn.functional.one_hot(token_ids[rows].flatten(), n_types).float()

    probe = PositionProbe(C=C).fit(one_hot(train_idx), labels[train_idx].flatten())
    return probe.score(one_hot(test_idx), labels[test_idx].flatten())


def chance_accuracy(labels: Int[ArrayLike, "*tokens"]) -> float:
    """Accuracy of always predicting the most frequent label."""
    labels = _integers(labels, "labels")
    if labels.numel() == 0:
        raise ValueError("labels is empty")
    return torch.unique(labels, return_counts=True)[1].max().item() / labels.numel()


def random_guess_mad(n_positions: int) -> float:
    """Mean absolute distance between two independent uniform draws from `n_positions` positions,
    (T² − 1) / 3T: the error of guessing a position at random (3.97 for T = 12)."""
    n_positions = positive_int(n_positions, "n_positions")
    return (n_positions**2 - 1) / (3 * n_positions)


def _integers(values: ArrayLike, name: str) -> Tensor:
    values = as_tensor(values, name)
    if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
        raise ValueError(f"{name} must hold integers, got dtype {values.dtype}")
    return values.long()
