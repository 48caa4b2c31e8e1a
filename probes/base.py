"""What every probe shares: per-site standardisation learnt at `fit`, the site-axis convention,
bounded working memory, the device it runs on, saving and loading, and scikit-learn's estimator
protocol.

Device: a probe fits on the device its activations are on (a GPU when they are there), with the
same solver, and keeps its fitted tensors there; `predict` / `score` move each chunk of their
input to that device and answer there. `to(device)` moves a fitted probe.

Saving: `probe.save(path)` writes one safetensors file with the settings as JSON in its metadata
(`probes.saving`); `Probe.load(path, device=..., **expected)` reads it back and refuses a file of
another class, a corrupted one, tensors that do not match the settings, or settings that differ
from `expected`. A loaded probe predicts exactly as the saved one did.

scikit-learn: every probe is a `sklearn.base.BaseEstimator` (scikit-learn is a dependency of
poslens, so this holds in every install), with `get_params` / `set_params`, so `clone`,
`GridSearchCV`, `Pipeline` and `cross_val_score` work. Their view is the single-site one: `X`
is one site's `[n_tokens, d_model]` array (numpy or torch), `y` its `[n_tokens]` labels, and
`score(X, y)` a float. The batched `[site, n_tokens, d_model]` form is the same estimator fitting
every site at once; scikit-learn's tools do not know about the site axis.

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
import os
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from sklearn.base import BaseEstimator
from torch import Tensor

from poslens.probes.inputs import ArrayLike, NotFittedError, activations, positive_int
from poslens.probes.saving import check_expected, check_tensors, read_probe, save_probe

TOKEN_CHUNK = 8192  # tokens per block when a fit or a prediction walks over tokens
DEFAULT_MEMORY_LIMIT = 2 * 1024**3


class SiteProbe(BaseEstimator):
    """Base class: stores `mean_` and `scale_` (`[site, 1, d_model]`) and checks later inputs against them."""

    dtype: torch.dtype
    _fitted: tuple[str, ...] = ("mean_", "scale_")  # the fitted tensors, extended by each probe

    def save(self, path: str | os.PathLike) -> Path:
        """Write the fitted probe to `path` (one safetensors file, settings as JSON in its metadata).

        Args:
            path: the file (conventionally `.safetensors`), replaced atomically if it exists.

        Returns:
            The path written.
        """
        if not hasattr(self, "mean_"):
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet; fit it before saving")
        return save_probe(self, path, {name: getattr(self, name) for name in self._fitted})

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str | torch.device = "cpu", **expected: Any) -> SiteProbe:
        """A probe saved by `save`, on `device`.

        Args:
            path: the file `save` wrote.
            device: where the fitted tensors go (predictions are computed there).
            **expected: settings the file must have, e.g. `C=1.0`, `n_sites=9`, `n_features_in=64`;
                any difference is refused with a message naming both values.

        Returns:
            The fitted probe, predicting exactly as the saved one.
        """
        settings, tensors = read_probe(path, cls.__name__)
        check_expected(path, settings, expected)
        probe = cls(**settings["params"])
        check_tensors(path, tensors, probe._fitted_layout(settings["n_sites"], settings["n_features_in"], tensors))
        for name, tensor in tensors.items():
            setattr(probe, name, tensor)
        probe.n_sites_, probe.n_features_in_ = settings["n_sites"], settings["n_features_in"]
        return probe.to(device)

    def to(self, device: str | torch.device) -> SiteProbe:
        """Move the fitted tensors to `device` (in place); later predictions run there. Returns the probe."""
        for name in self._fitted:
            if hasattr(self, name):
                setattr(self, name, getattr(self, name).to(device))
        return self

    def _fitted_layout(self, n_sites: int, n_features: int, tensors: dict[str, Tensor]) -> dict[
            str, tuple[tuple[int, ...], torch.dtype]]:
        """The shape and dtype of every fitted tensor of a probe with these sizes."""
        return {"mean_": ((n_sites, 1, n_features), self.dtype), "scale_": ((n_sites, 1, n_features), self.dtype)}

    @classmethod
    def _param_names(cls) -> list[str]:
        """The constructor's parameters, which are also the estimator's attributes (scikit-learn's convention)."""
        return [name for name in inspect.signature(cls.__init__).parameters if name != "self"]

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor parameters and their current values."""
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params: Any) -> SiteProbe:
        """Set constructor parameters (validated at the next `fit`); an unknown name is an error naming the
        allowed ones."""
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
        Zt = torch.empty(n_sites, d_model + ones_row, n_tokens, dtype=self.dtype, device=X.device)
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
                Z = (X[site, chunk].to(self.mean_.device, self.dtype) - self.mean_[site]).div_(self.scale_[site])
                out[site, chunk] = fn(Z, site)
        return out
