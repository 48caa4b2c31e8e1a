"""Baselines that say what a probe's accuracy means.

A probe reading position from a token's activation may instead be reading the token itself
(some tokens only ever occur at some positions). The controls bound that: Hewitt & Liang's
control task and selectivity, the best accuracy reachable from token identity alone, and the
chance levels of classification (majority class) and regression (a uniform random guess), and the
bag-of-prefix bar: what one causal NoPE layer can compute from content alone.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from poslens.probes.inputs import ArrayLike, as_tensor, positive_int
from poslens.probes.logistic import PositionProbe

MAX_ONE_HOT_TYPES = 512  # token types up to which the token-identity baseline is a probe on the one-hot token


def control_labels(token_ids: Int[ArrayLike, "*tokens"], labels: Int[ArrayLike, "*tokens"], seed: int = 0) -> Int[
        Tensor, "*tokens"]:
    """Hewitt & Liang (2019) control task: every token type gets one random label, drawn from the
    empirical distribution of `labels` and kept wherever the type occurs, so the only way to
    predict it is to memorise token identity. Same `seed`, same labels.

    Args:
        token_ids: every token's id.
        labels: the real labels (same shape), whose distribution the control labels follow.
        seed: fixes the draw.

    Returns:
        The control label of every token, shaped like `labels`.
    """
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
    label from the representation rather than memorising token identity.

    Args:
        task_accuracy: the probe's accuracy on the real labels.
        control_accuracy: the same probe's accuracy on `control_labels`.

    Returns:
        Their difference (a tensor for tensors).
    """
    return task_accuracy - control_accuracy


def token_identity_baseline(token_ids: Int[ArrayLike, "sequence *position"],
                            labels: Int[ArrayLike, "sequence *position"], train_idx: Int[ArrayLike, " n_train"],
                            test_idx: Int[ArrayLike, " n_test"], *,
                            C: float = 1.0) -> float:
    """Test accuracy of `token_identity_predictions`: the best a probe does from token identity
    alone, the bar a probe of the residual stream has to clear.

    `train_idx` and `test_idx` index the leading axis (sequences of `[sequence, position]`
    arrays, as `split_by_sequence` gives, or tokens of flat arrays).

    Args:
        token_ids: the tokens' ids.
        labels: the labels to predict, shaped like `token_ids`.
        train_idx: the training sequences (or tokens).
        test_idx: the test sequences (or tokens).
        C: the inverse L2 strength of the one-hot probe.

    Returns:
        The test accuracy.
    """
    predicted = token_identity_predictions(token_ids, labels, train_idx, test_idx, C=C)
    return (predicted == _integers(labels, "labels")[_integers(test_idx, "test_idx")].flatten()).double().mean().item()


def token_identity_predictions(token_ids: Int[ArrayLike, "sequence *position"],
                               labels: Int[ArrayLike, "sequence *position"], train_idx: Int[ArrayLike, " n_train"],
                               test_idx: Int[ArrayLike, " n_test"], *, C: float = 1.0) -> Int[Tensor, " n_test_tokens"]:
    """The label a probe that sees only each token's id predicts for every test token (flattened
    in the order of `test_idx`, sequence-major).

    Up to `MAX_ONE_HOT_TYPES` token types it is a `PositionProbe` on the one-hot token; with more
    (a language model's vocabulary, where that probe would have a weight per type and class) it
    is what such a probe converges to with enough data: the most frequent training label of the
    token's type (the smallest on a tie), and the most frequent label overall for a type never
    seen in training.

    Args:
        token_ids: the tokens' ids.
        labels: the labels to predict, shaped like `token_ids`.
        train_idx: the training sequences (or tokens).
        test_idx: the test sequences (or tokens).
        C: the inverse L2 strength of the one-hot probe.

    Returns:
        The predicted label of every test token.
    """
    token_ids, labels = _integers(token_ids, "token_ids"), _integers(labels, "labels")
    if token_ids.shape != labels.shape:
        raise ValueError(f"token_ids {tuple(token_ids.shape)} and labels {tuple(labels.shape)} differ in shape")
    train_idx, test_idx = _integers(train_idx, "train_idx"), _integers(test_idx, "test_idx")
    types, type_ids = torch.unique(token_ids, return_inverse=True)
    train_types, train_labels = type_ids[train_idx].flatten(), labels[train_idx].flatten()
    if len(types) <= MAX_ONE_HOT_TYPES:
        def one_hot(rows: Tensor) -> Tensor:
            return torch.nn.functional.one_hot(type_ids[rows].flatten(), len(types)).float()

        return PositionProbe(C=C).fit(one_hot(train_idx), train_labels).predict(one_hot(test_idx))
    n_labels = int(labels.max()) + 1
    counts = torch.zeros(len(types), n_labels, dtype=torch.long, device=labels.device).index_put_(
        (train_types, train_labels), torch.ones_like(train_labels), accumulate=True)
    overall = torch.bincount(train_labels, minlength=n_labels).argmax()
    majority = torch.where(counts.sum(1) > 0, counts.argmax(1), overall)
    return majority[type_ids[test_idx].flatten()]


def bag_of_prefix_features(
        token_ids: Int[ArrayLike, "sequence position"]) -> Float[Tensor, "sequence position feature"]:
    """What one causal NoPE attention layer can know of a token from content alone: its own
    type (one-hot) and the share of each token type among the tokens up to and including it.

    Causal attention without positions averages over the visible prefix, so its output is a
    function of the prefix's *proportions* of token types (scaling every count leaves it
    unchanged), not of the raw counts, whose sum would be the position itself. Proportions
    still reveal position wherever a type of known count sits in the prefix (the `+` of
    `ddd+ddd=` is 1/(t + 1) of it), which is exactly what such a layer could read.

    Args:
        token_ids: `[sequence, position]` token ids.

    Returns:
        `[sequence, position, 2 × types]`: the one-hot token, then the prefix shares.
    """
    token_ids = _integers(token_ids, "token_ids")
    if token_ids.ndim != 2 or token_ids.numel() == 0:
        raise ValueError(f"token_ids must be a non-empty [sequence, position] array, "
                         f"got shape {tuple(token_ids.shape)}")
    type_ids = torch.unique(token_ids, return_inverse=True)[1]
    one_hot = torch.nn.functional.one_hot(type_ids).float()
    seen = torch.arange(1, token_ids.shape[1] + 1, dtype=torch.float32)[None, :, None]
    return torch.cat([one_hot, one_hot.cumsum(1) / seen], dim=-1)


def bag_of_prefix_predictions(token_ids: Int[ArrayLike, "sequence position"],
                              labels: Int[ArrayLike, "sequence position"], train_idx: Int[ArrayLike, " n_train"],
                              test_idx: Int[ArrayLike, " n_test"], *, C: float = 1.0) -> Int[Tensor, " n_test_tokens"]:
    """The label a `PositionProbe` fed only `bag_of_prefix_features` predicts for every test
    token (sequences split by `train_idx`/`test_idx`, flattened sequence-major): the bar a
    representation must beat to carry position beyond content.

    Args:
        token_ids: `[sequence, position]` token ids.
        labels: `[sequence, position]` integer labels (e.g. positions).
        train_idx: the training sequences.
        test_idx: the test sequences.
        C: inverse L2 strength of the probe.

    Returns:
        The predicted label of every test token.
    """
    features, labels = bag_of_prefix_features(token_ids), _integers(labels, "labels")
    if labels.shape != features.shape[:2]:
        raise ValueError(f"token_ids {tuple(features.shape[:2])} and labels {tuple(labels.shape)} differ in shape")
    train_idx, test_idx = _integers(train_idx, "train_idx"), _integers(test_idx, "test_idx")
    return PositionProbe(C=C).fit(features[train_idx].flatten(0, 1), labels[train_idx].flatten()).predict(
        features[test_idx].flatten(0, 1))


def chance_accuracy(labels: Int[ArrayLike, "*tokens"]) -> float:
    """Accuracy of always predicting the most frequent label.

    Args:
        labels: every token's label.

    Returns:
        The majority class's share.
    """
    labels = _integers(labels, "labels")
    if labels.numel() == 0:
        raise ValueError("labels is empty")
    return torch.unique(labels, return_counts=True)[1].max().item() / labels.numel()


def random_guess_mad(n_positions: int) -> float:
    """Mean absolute distance between two independent uniform draws from `n_positions` positions,
    (T² − 1) / 3T: the error of guessing a position at random (3.97 for T = 12).

    Args:
        n_positions: the number of positions T.

    Returns:
        (T² − 1) / 3T.
    """
    n_positions = positive_int(n_positions, "n_positions")
    return (n_positions**2 - 1) / (3 * n_positions)


def _integers(values: ArrayLike, name: str) -> Tensor:
    values = as_tensor(values, name)
    if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
        raise ValueError(f"{name} must hold integers, got dtype {values.dtype}")
    return values.long()
