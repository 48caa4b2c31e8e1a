"""`PositionProbe`: which class (position, role, digit…) is a token, read linearly off its activation?

One multinomial logistic regression per site, all sites fitted as one batched problem. The
objective at each site is exactly scikit-learn's `LogisticRegression(C=C)` on standardised
features — mean cross-entropy + |W|² / (2·C·n_tokens), bias unpenalised — so accuracies can be
compared with it. The solver is a batched L-BFGS (`probes.lbfgs`) preconditioned with a
Kronecker-factored Hessian (exact at the start, so the first step is a Newton step): on the
correlated features of a residual stream it needs several times fewer passes over the data
than plain L-BFGS. Each pass evaluates the sites one after another so that a site's activations
stay in cache between the forward and backward products; the solver's bookkeeping is batched.
"""

from __future__ import annotations

import warnings

import torch
from jaxtyping import Float, Int
from torch import Tensor

from poslens.probes.base import SiteProbe
from poslens.probes.inputs import ArrayLike, activations, class_labels, positive, positive_int
from poslens.probes.lbfgs import minimize


class PositionProbe(SiteProbe):
    """L2-penalised multinomial logistic regression from activation to integer class, batched over sites.

    Inputs are torch tensors or numpy arrays: `X` is `[site, n_tokens, d_model]`, or
    `[n_tokens, d_model]` for one site, in which case outputs have no site axis; `y` is
    `[n_tokens]` integer classes, the same for every site. Outputs are torch tensors.

    Parameters: `C` inverse regularisation strength (as scikit-learn's); `max_iter` and `tol`
    (stop when every gradient entry is at most `tol`, as scikit-learn's lbfgs); `n_classes`
    defaults to `y.max() + 1`; `dtype` of the computation (float32 is about twice as fast as
    float64 and accurate to well below a point of accuracy). Fitting is deterministic.

    Fitted attributes: `classes_` (`arange(n_classes)`), `weight_` `[site, d_model, n_classes]`
    and `bias_` `[site, n_classes]` acting on standardised features (`(X - mean_) / scale_`,
    both `[site, 1, d_model]`), `n_iter_` `[site]`. A class absent from the training labels
    gets bias −inf: it is never predicted.
    """

    def __init__(self, C: float = 1.0, *, max_iter: int = 200, tol: float = 1e-4, n_classes: int | None = None,
                 dtype: torch.dtype = torch.float32):
        self.C, self.max_iter, self.tol, self.n_classes, self.dtype = C, max_iter, tol, n_classes, dtype

    def fit(self, X: Float[ArrayLike, "*site n_tokens d_model"], y: Int[ArrayLike, " n_tokens"]) -> PositionProbe:
        C, tol = positive(self.C, "C"), positive(self.tol, "tol")
        max_iter = positive_int(self.max_iter, "max_iter")
        X, _ = activations(X)
        y = class_labels(y, X.shape[1])
        n_classes = self._n_classes(y)
        observed = torch.unique(y)
        if len(observed) < 2:
            raise ValueError(f"y must contain at least 2 distinct classes, got only {observed.tolist()}")
        Zt = self._standardise_fit(X, ones_row=True)
        loss = SoftmaxLoss(Zt, torch.searchsorted(observed, y), len(observed), l2=1 / (C * Zt.shape[2]))
        solution = minimize(loss, loss.start(), loss.precondition, tol=tol, max_iter=max_iter)
        self.classes_ = torch.arange(n_classes)
        self.weight_ = Zt.new_zeros(Zt.shape[0], Zt.shape[1] - 1, n_classes)
        self.weight_[:, :, observed] = solution.x[:, :-1]
        self.bias_ = Zt.new_full((Zt.shape[0], n_classes), float("-inf"))
        self.bias_[:, observed] = solution.x[:, -1]
        self.n_iter_ = solution.n_iter
        if not solution.converged.all():
            sites = (~solution.converged).nonzero().squeeze(1).tolist()
            warnings.warn(f"PositionProbe reached max_iter={max_iter} before tol={tol} at sites {sites}; "
                          "increase max_iter", RuntimeWarning, stacklevel=2)
        return self

    def predict_proba(self, X: Float[ArrayLike, "*site n_tokens d_model"]) -> Float[Tensor, "*site n_tokens n_classes"]:
        """Probability of each class for each token."""
        logits, single = self._logits(X)
        probs = logits.softmax(-1)
        return probs[0] if single else probs

    def predict(self, X: Float[ArrayLike, "*site n_tokens d_model"]) -> Int[Tensor, "*site n_tokens"]:
        """The most probable class of each token."""
        logits, single = self._logits(X)
        classes = self.classes_[logits.argmax(-1)]
        return classes[0] if single else classes

    def score(self, X: Float[ArrayLike, "*site n_tokens d_model"], y: Int[ArrayLike, " n_tokens"]) -> (
            Float[Tensor, " site"] | float):
        """Accuracy per site (a float for one site's 2-D `X`)."""
        predicted = self.predict(X)
        y = class_labels(y, predicted.shape[-1])
        accuracy = (predicted == y).double().mean(-1)
        return accuracy.item() if accuracy.ndim == 0 else accuracy

    def _logits(self, X: Float[ArrayLike, "*site n_tokens d_model"]) -> tuple[
            Float[Tensor, "site n_tokens n_classes"], bool]:
        Z, single = self._standardise(X)
        return torch.baddbmm(self.bias_.unsqueeze(1), Z, self.weight_), single

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
    the `n_classes` columns, and every class must occur.
    """

    def __init__(self, Zt: Float[Tensor, "site d_model+1 n_tokens"], targets: Int[Tensor, " n_tokens"], n_classes: int,
                 l2: float):
        n_sites, n_features, n_tokens = Zt.shape
        self.Zt, self.l2 = Zt, l2
        self.targets = targets.view(1, n_tokens)
        one_hot = torch.nn.functional.one_hot(targets, n_classes).to(Zt.dtype).T
        self.prior = one_hot.mean(1)
        # Σ_i y_i x_iᵀ / n: the part of the gradient that does not depend on the parameters
        self.class_sums = torch.bmm(one_hot.expand(n_sites, -1, -1), Zt.mT).div_(n_tokens)
        self.penalized = Zt.new_ones(n_features, 1)
        self.penalized[-1] = 0
        # The Hessian of a site is close to (class curvature) ⊗ (feature covariance) + l2, and equal to it
        # at the start, where every token is predicted with the class prior. The feature factor is fixed;
        # the class factor, mean_i(diag(p_i) − p_i p_iᵀ), is refreshed at every evaluated point.
        self.feature_values, self.feature_vectors = torch.linalg.eigh(torch.bmm(Zt, Zt.mT).div_(n_tokens))
        self.class_curvature = Zt.new_zeros(n_sites, n_classes, n_classes)

    def start(self) -> Float[Tensor, "site d_model+1 n_classes"]:
        """Zero weights and the bias that predicts the class prior: the optimum of the bias alone."""
        x = self.Zt.new_zeros(self.Zt.shape[0], self.Zt.shape[1], len(self.prior))
        log_prior = self.prior.log()
        x[:, -1] = log_prior - log_prior.mean()
        return x

    def __call__(self, x: Float[Tensor, "sites d_model+1 n_classes"], sites: Int[Tensor, " sites"]) -> tuple[
            Float[Tensor, " sites"], Float[Tensor, "sites d_model+1 n_classes"]]:
        """Loss and gradient at `x` for `sites`, one site at a time: a site's activations (a few MB)
        stay in cache between the forward and the backward product, where a batched product would
        stream every site's activations from memory twice."""
        losses, gradients = zip(*(self._evaluate(x_site, site) for x_site, site in zip(x, sites.tolist())))
        return torch.stack(losses), torch.stack(gradients)

    def precondition(self, q: Float[Tensor, "sites d_model+1 n_classes"], sites: Int[Tensor, " sites"]) -> Float[
            Tensor, "sites d_model+1 n_classes"]:
        """The Kronecker-factored inverse Hessian at the sites' last evaluated points, applied to `q`.

        Shifting every class by the same amount changes nothing, so the all-ones class direction
        gets a nominal curvature and is projected out."""
        class_values, U = torch.linalg.eigh(self.class_curvature[sites] + 1 / q.shape[-1])
        V, feature_values = self.feature_vectors[sites], self.feature_values[sites]
        curvature = feature_values.unsqueeze(-1) * class_values.unsqueeze(1) + self.l2
        step = V @ ((V.mT @ q @ U) / curvature) @ U.mT
        return step - step.mean(-1, keepdim=True)

    def _evaluate(self, x: Float[Tensor, "d_model+1 n_classes"], site: int) -> tuple[
            Float[Tensor, ""], Float[Tensor, "d_model+1 n_classes"]]:
        Zt = self.Zt[site]
        n_tokens = Zt.shape[1]
        probs = torch.mm(x.T, Zt).softmax(0)  # [n_classes, n_tokens]
        target_probs = probs.gather(0, self.targets)
        weights = x * self.penalized
        loss = -target_probs.clamp_min(torch.finfo(x.dtype).tiny).log().mean() + 0.5 * self.l2 * (weights * weights).sum()
        expected = torch.mm(probs, Zt.T).div_(n_tokens)  # Σ_i p_i x_iᵀ / n; its last column is mean_i p_i
        self.class_curvature[site] = torch.diag(expected[:, -1]) - torch.mm(probs, probs.T).div_(n_tokens)
        return loss, (expected - self.class_sums[site]).T + self.l2 * weights
