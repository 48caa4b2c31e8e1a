"""`PositionProbe`: which class (position, role, digit…) is a token, read linearly off its activation?

One multinomial logistic regression per site, all sites fitted as one batched problem. The
objective at each site is exactly scikit-learn's `LogisticRegression(C=C)` on standardised
features — mean cross-entropy + |W|² / (2·C·n_tokens), bias unpenalised — so accuracies can be
compared with it. The solver is a batched L-BFGS (`probes.lbfgs`) preconditioned with a
Kronecker-factored Hessian (exact at the start, so the first step is a Newton step): on the
correlated features of a residual stream it needs several times fewer passes over the data
than plain L-BFGS. With few tokens per class (below `KRONECKER_MIN_TOKENS_PER_CLASS`: 1,024
positions over a few dozen sequences) every class is nearly separable, the loss is far from its
quadratic model, and Newton-like steps overshoot; there plain L-BFGS is 2-7x faster and stops
where scikit-learn's does (measured in `benchmarks/probe_scale.py`), so it is used instead.
Each pass evaluates the sites one after another, so that a site's activations stay in cache
between the forward and backward products, and a site's tokens in chunks of at most
`LOGITS_PER_CHUNK` logits (1,024 positions × 100k tokens × 25 sites would be ~10 GB of logits at
once; below ~700k tokens with 12 classes a site is one chunk); the solver's bookkeeping is
batched. Sites are fitted in groups that fit in `memory_limit` (`probes.base`).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from jaxtyping import Float, Int
from sklearn.base import ClassifierMixin
from torch import Tensor

from poslens.probes.base import DEFAULT_MEMORY_LIMIT, SiteProbe
from poslens.probes.inputs import ArrayLike, activations, class_labels, positive, positive_int
from poslens.probes.lbfgs import HISTORY, minimize

LOGITS_PER_CHUNK = 2**23  # logits (classes × tokens) of one chunk of one site: 32 MB in float32
KRONECKER_MIN_TOKENS_PER_CLASS = 32  # below it, plain L-BFGS: see the module docstring


class PositionProbe(ClassifierMixin, SiteProbe):
    """L2-penalised multinomial logistic regression from activation to integer class, batched over sites.

    Inputs are torch tensors or numpy arrays: `X` is `[site, n_tokens, d_model]`, or
    `[n_tokens, d_model]` for one site, in which case outputs have no site axis; `y` is
    `[n_tokens]` integer classes, the same for every site. Outputs are torch tensors.

    Parameters: `C` inverse regularisation strength (as scikit-learn's); `max_iter` and `tol`
    (stop when every gradient entry is at most `tol`, as scikit-learn's lbfgs); `n_classes`
    defaults to `y.max() + 1`; `dtype` of the computation (float32 is about twice as fast as
    float64 and accurate to well below a point of accuracy); `memory_limit`, the bytes of working
    memory a fit may use beside its inputs (sites are fitted in groups that fit). Fitting is
    deterministic.

    Fitted attributes: `classes_` (`arange(n_classes)`), `weight_` `[site, d_model, n_classes]`
    and `bias_` `[site, n_classes]` acting on standardised features (`(X - mean_) / scale_`,
    both `[site, 1, d_model]`), `n_iter_` `[site]`. A class absent from the training labels
    gets bias −inf: it is never predicted.
    """

    _fitted = (*SiteProbe._fitted, "classes_", "weight_", "bias_", "n_iter_")

    def __init__(self, C: float = 1.0, *, max_iter: int = 200, tol: float = 1e-4, n_classes: int | None = None,
                 dtype: torch.dtype = torch.float32, memory_limit: int = DEFAULT_MEMORY_LIMIT):
        self.C, self.max_iter, self.tol, self.n_classes, self.dtype = C, max_iter, tol, n_classes, dtype
        self.memory_limit = memory_limit

    def fit(self, X: Float[ArrayLike, "*site n_tokens d_model"], y: Int[ArrayLike, " n_tokens"]) -> PositionProbe:
        C, tol = positive(self.C, "C"), positive(self.tol, "tol")
        max_iter = positive_int(self.max_iter, "max_iter")
        X, _ = activations(X)
        y = class_labels(y, X.shape[1]).to(X.device)
        n_classes = self._n_classes(y)
        observed = torch.unique(y)
        if len(observed) < 2:
            raise ValueError(f"y must contain at least 2 distinct classes, got only {observed.tolist()}")
        n_sites, n_tokens, d_model = X.shape
        on: dict[str, Any] = {"device": X.device}
        self.classes_ = torch.arange(n_classes, **on)
        self.weight_ = torch.zeros(n_sites, d_model, n_classes, dtype=self.dtype, **on)
        self.bias_ = torch.full((n_sites, n_classes), float("-inf"), dtype=self.dtype, **on)
        self.n_iter_ = torch.zeros(n_sites, dtype=torch.long, **on)
        converged = torch.zeros(n_sites, dtype=torch.bool, **on)
        targets, means, scales = torch.searchsorted(observed, y), [], []
        for group in self._site_groups(X, self._bytes_per_site(n_tokens, d_model + 1, len(observed))):
            Zt, mean, scale = self._standardise_fit(X[group], ones_row=True)
            loss = SoftmaxLoss(Zt, targets, len(observed), l2=1 / (C * n_tokens))
            solution = minimize(loss, loss.start(), loss.precondition, tol=tol, max_iter=max_iter)
            self.weight_[group, :, observed] = solution.x[:, :-1]
            self.bias_[group, observed] = solution.x[:, -1]
            self.n_iter_[group], converged[group] = solution.n_iter, solution.converged
            means.append(mean)
            scales.append(scale)
            del Zt, loss, solution
        self._set_statistics(means, scales, d_model)
        if not converged.all():
            sites = (~converged).nonzero().squeeze(1).tolist()
            warnings.warn(f"PositionProbe reached max_iter={max_iter} before tol={tol} at sites {sites}; "
                          "increase max_iter", RuntimeWarning, stacklevel=2)
        return self

    def predict_proba(self, X: Float[ArrayLike, "*site n_tokens d_model"]) -> Float[Tensor, "*site n_tokens n_classes"]:
        """Probability of each class for each token."""
        X, single = self._checked(X)
        out = torch.empty(*X.shape[:2], len(self.classes_), dtype=self.dtype, device=self.weight_.device)
        probs = self._map_standardised(X, lambda Z, site: self._site_logits(Z, site).softmax(-1), out)
        return probs[0] if single else probs

    def predict(self, X: Float[ArrayLike, "*site n_tokens d_model"]) -> Int[Tensor, "*site n_tokens"]:
        """The most probable class of each token."""
        X, single = self._checked(X)
        out = torch.empty(X.shape[:2], dtype=torch.long, device=self.weight_.device)
        classes = self._map_standardised(X, lambda Z, site: self._site_logits(Z, site).argmax(-1), out)
        return classes[0] if single else classes

    def score(self, X: Float[ArrayLike, "*site n_tokens d_model"], y: Int[ArrayLike, " n_tokens"]) -> (
            Float[Tensor, " site"] | float):
        """Accuracy per site (a float for one site's 2-D `X`)."""
        predicted = self.predict(X)
        y = class_labels(y, predicted.shape[-1]).to(predicted.device)
        accuracy = (predicted == y).double().mean(-1)
        return accuracy.item() if accuracy.ndim == 0 else accuracy

    def _fitted_layout(self, n_sites: int, n_features: int, tensors: dict[str, Tensor]) -> dict[
            str, tuple[tuple[int, ...], torch.dtype]]:
        n_classes = len(tensors["classes_"]) if "classes_" in tensors else 0
        if self.n_classes is not None and n_classes != self.n_classes:
            raise ValueError(f"a saved PositionProbe has {n_classes} classes but its settings say n_classes="
                             f"{self.n_classes}")
        return {**super()._fitted_layout(n_sites, n_features, tensors), "classes_": ((n_classes,), torch.long),
                "weight_": ((n_sites, n_features, n_classes), self.dtype),
                "bias_": ((n_sites, n_classes), self.dtype), "n_iter_": ((n_sites,), torch.long)}

    def _site_logits(self, Z: Float[Tensor, "n_tokens d_model"], site: int) -> Float[Tensor, "n_tokens n_classes"]:
        return torch.addmm(self.bias_[site], Z, self.weight_[site])

    def _bytes_per_site(self, n_tokens: int, n_features: int, n_classes: int) -> int:
        """Working memory of one site's fit: its standardised activations, the solver's history and
        iterates, the two curvature factors, and one chunk of logits."""
        numbers = (n_features * n_tokens + (2 * HISTORY + 8) * n_features * n_classes + 2 * n_features**2
                   + 3 * n_classes**2 + 3 * min(n_classes * n_tokens, LOGITS_PER_CHUNK))
        return numbers * torch.finfo(self.dtype).bits // 8

    def _n_classes(self, y: Int[Tensor, " n_tokens"]) -> int:
        largest = int(y.max())
        if self.n_classes is None:
            return largest + 1
        n_classes = positive_int(self.n_classes, "n_classes")
        if largest >= n_classes:
            raise ValueError(f"y has label {largest}, which is not below n_classes={n_classes}")
        return n_classes


class SoftmaxLoss:
    """Mean cross-entropy of a linear softmax classifier plus (l2/2)·|W|², for any subset of sites.

    Features come feature-major with a last row of ones, so a site's parameters are one
    `[d_model + 1, n_classes]` matrix whose last row is the (unpenalised) bias. `targets` index
    the `n_classes` columns, and every class must occur. Each evaluation walks over the tokens
    in chunks of `LOGITS_PER_CHUNK // n_classes`. With fewer than `KRONECKER_MIN_TOKENS_PER_CLASS`
    tokens per class, `precondition` only projects out the all-ones class direction.
    """

    def __init__(self, Zt: Float[Tensor, "site d_model+1 n_tokens"], targets: Int[Tensor, " n_tokens"], n_classes: int,
                 l2: float):
        n_sites, n_features, n_tokens = Zt.shape
        self.Zt, self.l2, self.chunk = Zt, l2, max(1, LOGITS_PER_CHUNK // n_classes)
        # Logits more than `floor` below a token's largest one are raised to it: their probabilities (below
        # eps² of the largest) change the loss and gradient by less than rounding, and left alone they
        # underflow to subnormal numbers, which make every product with them 10-100x slower on x86 CPUs.
        self.floor = -2 * math.log(torch.finfo(Zt.dtype).eps)
        self.targets = targets.view(1, n_tokens)
        self.prior = torch.bincount(targets, minlength=n_classes).to(Zt.dtype) / n_tokens
        # Σ_i y_i x_iᵀ / n: the part of the gradient that does not depend on the parameters
        self.class_sums = torch.stack([Zt.new_zeros(n_classes, n_features).index_add_(0, targets, site.T)
                                       for site in Zt]).div_(n_tokens)
        self.penalized = Zt.new_ones(n_features, 1)
        self.penalized[-1] = 0
        self.kronecker = n_tokens >= KRONECKER_MIN_TOKENS_PER_CLASS * n_classes
        if not self.kronecker:
            return
        # The Hessian of a site is close to (class curvature) ⊗ (feature covariance) + l2, and equal to it
        # at the start, where every token is predicted with the class prior. The feature factor is fixed;
        # the class factor, mean_i(diag(p_i) − p_i p_iᵀ), is refreshed at every evaluated point, averaged
        # over the first chunk of tokens only (all of them unless classes × tokens exceeds LOGITS_PER_CHUNK:
        # at 1,024 classes the full average would cost more than the loss and gradient), and its
        # eigendecomposition is computed once per point, when a preconditioning step first needs it.
        self.feature_values, self.feature_vectors = torch.linalg.eigh(torch.bmm(Zt, Zt.mT).div_(n_tokens))
        self.class_curvature = Zt.new_zeros(n_sites, n_classes, n_classes)
        self.class_values, self.class_vectors = Zt.new_zeros(n_sites, n_classes), self.class_curvature.clone()
        self.stale = torch.ones(n_sites, dtype=torch.bool, device=Zt.device)

    def start(self) -> Float[Tensor, "site d_model+1 n_classes"]:
        """Zero weights and the bias that predicts the class prior: the optimum of the bias alone."""
        x = self.Zt.new_zeros(self.Zt.shape[0], self.Zt.shape[1], len(self.prior))
        log_prior = self.prior.log()
        x[:, -1] = log_prior - log_prior.mean()
        return x

    def __call__(self, x: Float[Tensor, "sites d_model+1 n_classes"], sites: Int[Tensor, " sites"]) -> tuple[
            Float[Tensor, " sites"], Float[Tensor, "sites d_model+1 n_classes"]]:
        """Loss and gradient at `x` for `sites`, one site at a time: a site's activations (a few MB)
        stays in cache between the forward and the backward product, where a batched product would
        stream every site's activations from memory twice."""
        losses, gradients = zip(*(self._evaluate(x_site, site) for x_site, site in zip(x, sites.tolist())))
        return torch.stack(losses), torch.stack(gradients)

    def precondition(self, q: Float[Tensor, "sites d_model+1 n_classes"], sites: Int[Tensor, " sites"]) -> Float[
            Tensor, "sites d_model+1 n_classes"]:
        """The Kronecker-factored inverse Hessian at the sites' last evaluated points, applied to `q`.

        Shifting every class by the same amount changes nothing, so the all-ones class direction
        gets a nominal curvature and is projected out."""
        if not self.kronecker:
            return q - q.mean(-1, keepdim=True)
        stale = sites[self.stale[sites]]
        if len(stale):
            self.class_values[stale], self.class_vectors[stale] = torch.linalg.eigh(
                self.class_curvature[stale] + 1 / q.shape[-1])
            self.stale[stale] = False
        class_values, U = self.class_values[sites], self.class_vectors[sites]
        V, feature_values = self.feature_vectors[sites], self.feature_values[sites]
        curvature = feature_values.unsqueeze(-1) * class_values.unsqueeze(1) + self.l2
        step = V @ ((V.mT @ q @ U) / curvature) @ U.mT
        return step - step.mean(-1, keepdim=True)

    def _evaluate(self, x: Float[Tensor, "d_model+1 n_classes"], site: int) -> tuple[
            Float[Tensor, ""], Float[Tensor, "d_model+1 n_classes"]]:
        Zt = self.Zt[site]
        n_tokens = Zt.shape[1]
        log_likelihood = x.new_zeros(())
        expected = x.new_zeros(x.shape[1], x.shape[0])  # Σ_i p_i x_iᵀ / n; its last column is mean_i p_i
        for start in range(0, n_tokens, self.chunk):
            Z = Zt[:, start:start + self.chunk]
            logits = torch.mm(x.T, Z)  # [n_classes, chunk]
            probs = torch.maximum(logits, logits.amax(0) - self.floor).softmax(0)
            target_probs = probs.gather(0, self.targets[:, start:start + self.chunk])
            log_likelihood += target_probs.clamp_min(torch.finfo(x.dtype).tiny).log().sum()
            expected.addmm_(probs, Z.T)
            if start == 0 and self.kronecker:  # mean_i(diag(p_i) − p_i p_iᵀ) over the first chunk: PSD
                curvature = torch.diag(probs.mean(1)) - torch.mm(probs, probs.T).div_(probs.shape[1])
        expected.div_(n_tokens)
        weights = x * self.penalized
        loss = -log_likelihood / n_tokens + 0.5 * self.l2 * (weights * weights).sum()
        if self.kronecker:
            self.class_curvature[site] = curvature
            self.stale[site] = True
        return loss, (expected - self.class_sums[site]).T + self.l2 * weights
