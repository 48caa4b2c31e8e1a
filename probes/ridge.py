"""`RidgePositionProbe`: how well is position encoded as a *number*, i.e. along one linear direction?

A classifier can succeed with one direction per position; a good ridge fit says the positions
are also ordered along a line. Closed form, all sites in one batched solve. The objective at
each site is scikit-learn's `Ridge(alpha)` on standardised features: |y − Zw − b|² + alpha·|w|².
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from sklearn.base import RegressorMixin
from torch import Tensor

from poslens.probes.base import DEFAULT_MEMORY_LIMIT, SiteProbe
from poslens.probes.inputs import ArrayLike, activations, positive, real_targets


class RidgePositionProbe(RegressorMixin, SiteProbe):
    """Ridge regression from activation to a real target (usually the position), batched over sites.

    `X` is `[site, n_tokens, d_model]`, or `[n_tokens, d_model]` for one site (outputs then have
    no site axis); `y` is `[n_tokens]` numbers. Accepts tensors or numpy arrays, returns tensors.
    Computes in float64 by default: the whole fit is one `[site, d_model, d_model]` Cholesky solve
    (in groups of sites that fit in `memory_limit` bytes beside the inputs).

    Fitted attributes: `weight_` `[site, d_model]` and `bias_` `[site]` acting on standardised
    features (`(X - mean_) / scale_`).
    """

    _fitted = (*SiteProbe._fitted, "weight_", "bias_")

    def __init__(self, alpha: float = 1.0, *, dtype: torch.dtype = torch.float64,
                 memory_limit: int = DEFAULT_MEMORY_LIMIT):
        self.alpha, self.dtype, self.memory_limit = alpha, dtype, memory_limit

    def fit(self, X: Float[ArrayLike, "*site n_tokens d_model"], y: Float[ArrayLike, " n_tokens"]
            ) -> RidgePositionProbe:
        alpha = positive(self.alpha, "alpha")
        X, _ = activations(X)
        y = real_targets(y, X.shape[1]).to(X.device, self.dtype)
        centred, (n_sites, n_tokens, d_model) = y - y.mean(), X.shape
        weights, means, scales = [], [], []
        bytes_per_site = (d_model * n_tokens + 2 * d_model**2) * torch.finfo(self.dtype).bits // 8
        for group in self._site_groups(X, bytes_per_site):
            Zt, mean, scale = self._standardise_fit(X[group])
            gram = torch.bmm(Zt, Zt.mT) + alpha * torch.eye(d_model, dtype=self.dtype, device=X.device)
            # gram is symmetric positive definite: a Cholesky solve (the batched LU solve of this torch/MKL build
            # fails with "DLASWP" errors and hangs on [site, 768, 768] float64 batches)
            weights.append(torch.cholesky_solve((Zt @ centred).unsqueeze(-1), torch.linalg.cholesky(gram)).squeeze(-1))
            means.append(mean)
            scales.append(scale)
            del Zt, gram
        self._set_statistics(means, scales, d_model)
        self.weight_ = torch.cat(weights)
        self.bias_ = y.mean().expand(n_sites).clone()
        return self

    def _fitted_layout(self, n_sites: int, n_features: int, tensors: dict[str, Tensor]) -> dict[
            str, tuple[tuple[int, ...], torch.dtype]]:
        return {**super()._fitted_layout(n_sites, n_features, tensors),
                "weight_": ((n_sites, n_features), self.dtype), "bias_": ((n_sites,), self.dtype)}

    def predict(self, X: Float[ArrayLike, "*site n_tokens d_model"]) -> Float[Tensor, "*site n_tokens"]:
        """The predicted target (position) of each token."""
        X, single = self._checked(X)
        out = torch.empty(X.shape[:2], dtype=self.dtype, device=self.weight_.device)
        predicted = self._map_standardised(X, lambda Z, site: Z @ self.weight_[site] + self.bias_[site], out)
        return predicted[0] if single else predicted

    def score(self, X: Float[ArrayLike, "*site n_tokens d_model"], y: Float[ArrayLike, " n_tokens"]) -> (
            Float[Tensor, " site"] | float):
        """R² per site (a float for one site's 2-D `X`): 1 is perfect, 0 is no better than the mean
        of `y`; NaN when `y` is constant."""
        predicted, y = self._predict_with_targets(X, y)
        residual = (predicted - y).square().sum(-1)
        total = (y - y.mean()).square().sum()
        r2 = 1 - residual / total if total > 0 else torch.full_like(residual, float("nan"))
        return r2.item() if r2.ndim == 0 else r2

    def mae(self, X: Float[ArrayLike, "*site n_tokens d_model"], y: Float[ArrayLike, " n_tokens"]) -> (
            Float[Tensor, " site"] | float):
        """Mean absolute error per site, in the units of `y` (positions); compare with `random_guess_mad`."""
        predicted, y = self._predict_with_targets(X, y)
        error = (predicted - y).abs().mean(-1)
        return error.item() if error.ndim == 0 else error

    def _predict_with_targets(self, X: Float[ArrayLike, "*site n_tokens d_model"], y: Float[ArrayLike, " n_tokens"]
                              ) -> tuple[Float[Tensor, "*site n_tokens"], Float[Tensor, " n_tokens"]]:
        predicted = self.predict(X)
        return predicted, real_targets(y, predicted.shape[-1]).to(predicted)
