"""What every probe shares: per-site standardisation learnt at `fit`, the site-axis convention, and
scikit-learn's parameter protocol (`get_params` / `set_params`, so `sklearn.base.clone` works).

Standardising each feature (mean 0, std 1 over the training tokens of its site) makes one
regularisation strength mean the same thing at every site, whatever the scale of the residual
stream there. Features that are constant in training keep scale 1 instead of dividing by zero.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from poslens.probes.inputs import ArrayLike, NotFittedError, activations


class SiteProbe:
    """Base class: stores `mean_` and `scale_` (`[site, 1, d_model]`) and checks later inputs against them."""

    dtype: torch.dtype

    @classmethod
    def _param_names(cls) -> list[str]:
        """The constructor's parameters, which are also the estimator's attributes (scikit-learn's convention)."""
        return [name for name in inspect.signature(cls.__init__).parameters if name != "self"]

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor parameters and their current values."""
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params: Any) -> SiteProbe:
        """Set constructor parameters (validated at the next `fit`); an unknown name is an error naming the allowed ones."""
        unknown = sorted(set(params) - set(self._param_names()))
        if unknown:
            raise ValueError(f"unknown parameters {unknown} for {type(self).__name__}; allowed: {self._param_names()}")
        for name, value in params.items():
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.get_params().items())})"

    def _standardise_fit(self, X: Float[Tensor, "site n_tokens d_model"], *, ones_row: bool = False) -> Float[
            Tensor, "site features n_tokens"]:
        """Standardised training activations, feature-major so that every product a fit needs reads
        them contiguously; with `ones_row`, a last constant feature of ones (to carry a bias)."""
        n_sites, n_tokens, d_model = X.shape
        mean = X.mean(1, keepdim=True, dtype=self.dtype)
        Zt = torch.empty(n_sites, d_model + ones_row, n_tokens, dtype=self.dtype)
        features = torch.sub(X.mT, mean.mT, out=Zt[:, :d_model])
        scale = torch.linalg.vector_norm(features, dim=-1, keepdim=True).mT / n_tokens**0.5
        constant = scale <= 10 * torch.finfo(self.dtype).eps * mean.abs().clamp_min(1)
        self.mean_, self.scale_ = mean, torch.where(constant, torch.ones_like(scale), scale)
        self.n_sites_, self.n_features_in_ = n_sites, d_model
        features.div_(self.scale_.mT)
        if ones_row:
            Zt[:, d_model] = 1
        return Zt

    def _standardise(self, X: Float[ArrayLike, "*site n_tokens d_model"]) -> tuple[
            Float[Tensor, "site n_tokens d_model"], bool]:
        """`X` standardised with the training statistics, and whether it was one site's 2-D array."""
        if not hasattr(self, "mean_"):
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet; call fit(X, y) first")
        X, single = activations(X)
        if X.shape[2] != self.n_features_in_:
            raise ValueError(f"X has {X.shape[2]} features but the probe was fitted on {self.n_features_in_}")
        if X.shape[0] != self.n_sites_:
            given = "one site's [n_tokens, d_model] array" if single else f"{X.shape[0]} site(s)"
            raise ValueError(f"X is {given} but the probe was fitted on {self.n_sites_} site(s)")
        return (X.to(self.dtype) - self.mean_).div_(self.scale_), single
