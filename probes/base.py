"""What every probe shares: per-site standardisation learnt at `fit`, the site-axis convention,
bounded working memory, and scikit-learn's parameter protocol (`get_params` / `set_params`, so
`sklearn.base.clone` works).

Standardising each feature (mean 0, std 1 over the training tokens of its site) makes one
regularisation strength mean the same thing at every site, whatever the scale of the residual
stream there. Features that are constant in training keep scale 1 instead of dividing by zero.

Memory: a fit works on standardised copies of the activations, so it takes sites in groups
whose working set fits in `memory_limit` bytes (at least one site at a time); sites never
interact, so the groups change nothing but the peak memory. Prediction goes site by site and
`TOKEN_CHUNK` tokens at a time, so it needs no more than the result beside its input.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from poslens.probes.inputs import ArrayLike, NotFittedError, activations, positive_int

TOKEN_CHUNK = 8192  # tokens per block when a fit or a prediction walks over tokens
DEFAULT_MEMORY_LIMIT = 2 * 1024**3


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

    def _site_groups(self, X: Tensor, bytes_per_site: int) -> list[slice]:
        """Consecutive groups of sites, each as large as `memory_limit` allows (at least one site)."""
        per_group = max(1, positive_int(self.memory_limit, "memory_limit") // max(bytes_per_site, 1))
        return [slice(start, start + per_group) for start in range(0, X.shape[0], per_group)]

    def _set_statistics(self, means: list[Tensor], scales: list[Tensor], d_model: int) -> None:
        self.mean_, self.scale_ = torch.cat(means), torch.cat(scales)
        self.n_sites_, self.n_features_in_ = len(self.mean_), d_model

    def _standardise_fit(self, X: Float[Tensor, "site n_tokens d_model"], *, ones_row: bool = False) -> tuple[
            Float[Tensor, "site features n_tokens"], Tensor, Tensor]:
        """Standardised training activations, feature-major so that every product a fit needs reads
        them contiguously (with `ones_row`, a last constant feature of ones, to carry a bias), and
        the mean and scale `[site, 1, d_model]` they were standardised with."""
        n_sites, n_tokens, d_model = X.shape
        mean = X.mean(1, keepdim=True, dtype=self.dtype)
        Zt = torch.empty(n_sites, d_model + ones_row, n_tokens, dtype=self.dtype)
        features = torch.sub(X.mT, mean.mT, out=Zt[:, :d_model])
        scale = torch.linalg.vector_norm(features, dim=-1, keepdim=True).mT / n_tokens**0.5
        constant = scale <= 10 * torch.finfo(self.dtype).eps * mean.abs().clamp_min(1)
        scale = torch.where(constant, torch.ones_like(scale), scale)
        features.div_(scale.mT)
        if ones_row:
            Zt[:, d_model] = 1
        return Zt, mean, scale

    def _checked(self, X: Float[ArrayLike, "*site n_tokens d_model"]) -> tuple[Float[Tensor, "site n_tokens d_model"],
                                                                               bool]:
        """`X` with a site axis, checked against the fit, and whether it was one site's 2-D array."""
        if not hasattr(self, "mean_"):
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet; call fit(X, y) first")
        X, single = activations(X)
        if X.shape[2] != self.n_features_in_:
            raise ValueError(f"X has {X.shape[2]} features but the probe was fitted on {self.n_features_in_}")
        if X.shape[0] != self.n_sites_:
            given = "one site's [n_tokens, d_model] array" if single else f"{X.shape[0]} site(s)"
            raise ValueError(f"X is {given} but the probe was fitted on {self.n_sites_} site(s)")
        return X, single

    def _map_standardised(self, X: Float[Tensor, "site n_tokens d_model"], fn, out: Tensor) -> Tensor:
        """`out[site, tokens] = fn(standardised X[site, tokens], site)`, site by site and `TOKEN_CHUNK`
        tokens at a time."""
        for site in range(X.shape[0]):
            for start in range(0, X.shape[1], TOKEN_CHUNK):
                chunk = slice(start, start + TOKEN_CHUNK)
                Z = (X[site, chunk].to(self.dtype) - self.mean_[site]).div_(self.scale_[site])
                out[site, chunk] = fn(Z, site)
        return out
