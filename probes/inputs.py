"""Conversion and validation of probe inputs, with errors that name the offending value.

Probes accept torch tensors or numpy arrays; everything downstream works on tensors, on the
device the tensor is on (numpy arrays are CPU tensors). An activation array is either
`[site, n_tokens, d_model]` or one site's `[n_tokens, d_model]`.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

ArrayLike = Tensor | np.ndarray


class NotFittedError(ValueError, AttributeError):
    """A probe was asked to predict or score before `fit` (a `ValueError`, as in scikit-learn)."""


def as_tensor(values: ArrayLike, name: str) -> Tensor:
    """`values` as a tensor, left where it is (a tensor keeps its device; anything else becomes a CPU
    tensor), without copying when it already is one."""
    if isinstance(values, Tensor):
        return values
    try:
        return torch.as_tensor(values)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"{name} must be a tensor or array of numbers, got {type(values).__name__}") from error


def activations(X: Float[ArrayLike, "*site n_tokens d_model"]) -> tuple[Float[Tensor, "site n_tokens d_model"], bool]:
    """`X` with a site axis, and whether the caller gave a single site (2-D input)."""
    X = as_tensor(X, "X")
    if X.ndim not in (2, 3):
        raise ValueError(
            f"X must be [site, n_tokens, d_model] or [n_tokens, d_model], got {X.ndim}-D shape {tuple(X.shape)}"
        )
    if X.numel() == 0:
        raise ValueError(f"X is empty: shape {tuple(X.shape)}")
    if X.is_complex() or X.dtype == torch.bool:
        raise ValueError(f"X must hold real numbers, got dtype {X.dtype}")
    if X.is_floating_point() and not all(torch.isfinite(bound) for bound in torch.aminmax(X)):  # NaN propagates
        first = tuple(int(i) for i in (~torch.isfinite(X)).nonzero()[0])
        raise ValueError(f"X contains non-finite values: X{list(first)} = {X[first].item()}")
    single = X.ndim == 2
    return (X.unsqueeze(0) if single else X), single


def class_labels(y: Int[ArrayLike, " n_tokens"], n_tokens: int) -> Int[Tensor, " n_tokens"]:
    """`y` as int64 class labels, one non-negative integer per token."""
    y = _labels(y, n_tokens)
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        bad = y[y != y.round()] if y.is_floating_point() else y
        example = f" (e.g. {bad[0].item()})" if len(bad) else ""
        raise ValueError(f"y must hold integer class labels, got dtype {y.dtype}{example}")
    if (y < 0).any():
        raise ValueError(f"class labels must be >= 0, got {y.min().item()}")
    return y.long()


def real_targets(y: Float[ArrayLike, " n_tokens"], n_tokens: int) -> Float[Tensor, " n_tokens"]:
    """`y` as float64 regression targets, one finite number per token."""
    y = _labels(y, n_tokens)
    if y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"y must hold real numbers, got dtype {y.dtype}")
    y = y.double()
    if not torch.isfinite(y).all():
        raise ValueError(f"y contains non-finite values: y[{int((~torch.isfinite(y)).nonzero()[0])}] = "
                         f"{y[~torch.isfinite(y)][0].item()}")
    return y


def positive(value: float, name: str) -> float:
    """`value` if it is a finite number > 0."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0 < value < float("inf"):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


def positive_int(value: int, name: str) -> int:
    """`value` if it is an integer >= 1."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value}")
    return int(value)


def _labels(y: ArrayLike, n_tokens: int) -> Tensor:
    y = as_tensor(y, "y")
    if y.ndim != 1:
        raise ValueError(f"y must be 1-D [n_tokens], got shape {tuple(y.shape)}")
    if len(y) != n_tokens:
        raise ValueError(f"X has {n_tokens} tokens but y has {len(y)} labels")
    return y
