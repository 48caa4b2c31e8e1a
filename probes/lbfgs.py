"""Batched L-BFGS: one smooth convex problem per site, all minimised in lockstep.

Every site keeps its own curvature history, step length and stopping decision, so a site's
answer does not depend on which other sites share the batch; sites share only the solver's
tensor operations and the passes over the data. Sites that have converged drop out of
later evaluations. A site stops as scikit-learn's `lbfgs` does, when its largest gradient entry
is at most `tol`; or when its loss no longer decreases by more than rounding error (a relative
4 machine epsilons, so float32 fits converge as far as float64 ones), or no step decreases it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

# (x of the chosen sites, their indices) -> (loss [sites], gradient shaped like x)
Objective = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
# (q of the chosen sites, their indices) -> an approximate inverse Hessian applied to q
Preconditioner = Callable[[Tensor, Tensor], Tensor]

ARMIJO = 1e-4  # sufficient-decrease constant
HISTORY = 10  # (step, gradient change) pairs kept per site
MAX_BACKTRACKS = 30


@dataclass
class Solution:
    x: Float[Tensor, "site rows cols"]
    n_iter: Int[Tensor, " site"]
    converged: Bool[Tensor, " site"]  # stopped by a tolerance (or at the precision limit) before max_iter


def minimize(objective: Objective, x0: Float[Tensor, "site rows cols"], precondition: Preconditioner, *, tol: float,
             max_iter: int, history: int = HISTORY) -> Solution:
    """Minimise `objective` independently for every site, starting from `x0`.

    `precondition` is the initial inverse-Hessian guess of each quasi-Newton step; the closer
    it is to the true curvature, the fewer passes over the data a fit needs.
    """
    n_sites = x0.shape[0]
    x = x0.clone()
    f, g = objective(x, torch.arange(n_sites, device=x.device))
    steps, changes = x.new_zeros(history, *x.shape), x.new_zeros(history, *x.shape)
    rho, gamma = x.new_zeros(history, n_sites), x.new_ones(n_sites)
    n_iter = torch.zeros(n_sites, dtype=torch.long, device=x.device)
    converged = _largest(g) <= tol
    ftol = 4 * torch.finfo(x.dtype).eps
    for iteration in range(max_iter):
        sites = (~converged).nonzero().squeeze(1)
        if len(sites) == 0:
            break
        newest_first = [(iteration - 1 - j) % history for j in range(min(iteration, history))]
        direction = _two_loop(g[sites], steps[:, sites], changes[:, sites], rho[:, sites], gamma[sites],
                              lambda q: precondition(q, sites), newest_first)  # noqa: B023 (called in this iteration)
        t, f_new, g_new, stuck = _line_search(objective, x[sites], f[sites], g[sites], direction, sites)
        step, change = _expand(t) * direction, g_new - g[sites]
        curvature = _dot(step, change)
        usable = curvature > torch.finfo(x.dtype).eps * _dot(change, change)
        slot = iteration % history
        steps[slot, sites], changes[slot, sites] = step, change
        rho[slot, sites] = torch.where(usable, 1 / curvature, torch.zeros_like(curvature))
        scaled = _dot(change, precondition(change, sites))
        gamma[sites] = torch.where(usable, curvature / scaled, gamma[sites])
        f_old = f[sites]
        x[sites] = torch.where(_expand(stuck), x[sites], x[sites] + step)
        f[sites] = torch.where(stuck, f[sites], f_new)
        g[sites] = torch.where(_expand(stuck), g[sites], g_new)
        n_iter[sites] += 1
        flat = f_old - f_new <= ftol * torch.maximum(f_new.abs(), f_old.abs()).clamp_min(1)
        converged[sites] = stuck | flat | (_largest(g[sites]) <= tol)
    return Solution(x, n_iter, converged)


def _two_loop(g: Tensor, steps: Tensor, changes: Tensor, rho: Tensor, gamma: Tensor,
              precondition: Callable[[Tensor], Tensor], newest_first: list[int]) -> Tensor:
    """The L-BFGS direction -H g from the stored (step, gradient change) pairs."""
    q, alphas = -g, {}
    for j in newest_first:
        alphas[j] = rho[j] * _dot(steps[j], q)
        q = q - _expand(alphas[j]) * changes[j]
    r = _expand(gamma) * precondition(q)
    for j in reversed(newest_first):
        beta = rho[j] * _dot(changes[j], r)
        r = r + _expand(alphas[j] - beta) * steps[j]
    return r


def _line_search(objective: Objective, x: Tensor, f: Tensor, g: Tensor, direction: Tensor,
                 sites: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Step lengths meeting the Armijo condition, trying the full quasi-Newton step first.

    Returns the steps, the loss and gradient there, and which sites found no acceptable step
    (a non-descent direction or no decrease left at this precision)."""
    slope = _dot(g, direction)
    t = torch.ones_like(f)
    f_new, g_new = objective(x + direction, sites)
    pending = ~(f_new <= f + ARMIJO * slope) & (slope < 0)
    stuck = slope >= 0
    for _ in range(MAX_BACKTRACKS):
        if not pending.any():
            break
        redo = pending.nonzero().squeeze(1)
        t_old, excess = t[redo], f_new[redo] - f[redo] - slope[redo] * t[redo]
        # minimiser of the quadratic through f(0), f'(0) and f(t_old), kept within [0.1, 0.5] * t_old
        t_quad = torch.nan_to_num(-slope[redo] * t_old**2 / (2 * excess), nan=0.0, posinf=0.0)
        t[redo] = torch.minimum(torch.maximum(t_quad, 0.1 * t_old), 0.5 * t_old)
        f_new[redo], g_new[redo] = objective(x[redo] + _expand(t[redo]) * direction[redo], sites[redo])
        pending[redo] = ~(f_new[redo] <= f[redo] + ARMIJO * t[redo] * slope[redo])
    return t, f_new, g_new, stuck | pending


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-site inner product over all parameter axes."""
    return (a * b).flatten(1).sum(1)


def _largest(g: Tensor) -> Tensor:
    return g.abs().flatten(1).amax(1)


def _expand(per_site: Tensor) -> Tensor:
    """A per-site scalar shaped to broadcast against `[site, rows, cols]` parameters."""
    return per_site[:, None, None]
