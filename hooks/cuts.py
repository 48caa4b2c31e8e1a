"""Hooks that cut a forward pass: a block's residual connection removed, an activation zeroed or
replaced by its mean; for `model.hooks(...)` / `run_with_hooks(fwd_hooks=...)`. Each function
returns a list of `(hook_name, hook_fn)` pairs."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from poslens.variants.config import SUBLAYERS

FwdHooks = list[tuple[str, object]]


def cut_residual(block: int, sublayer: str = "both") -> FwdHooks:
    """Remove block `block`'s residual connection(s) in an intact model at inference:
    `resid_mid` becomes `attn_out` (`attn`), `resid_post` becomes `mlp_out` (`mlp`), or both.

    Equivalent, to the bit, to a model built with `residual_cuts={block: sublayer}` and the same weights.

    Args:
        block: the block whose residual connection(s) to remove.
        sublayer: `attn`, `mlp` or `both`.

    Returns:
        Forward hooks for `model.hooks(fwd_hooks=...)`.
    """
    if sublayer not in SUBLAYERS:
        raise ValueError(f"unknown residual cut sublayer {sublayer!r}; allowed: {list(SUBLAYERS)}")
    if not isinstance(block, int) or block < 0:
        raise ValueError(f"residual cut block must be a block index >= 0, got {block!r}")
    hooks: FwdHooks = []
    for name, out_hook, stream_hook in (("attn", "hook_attn_out", "hook_resid_mid"),
                                        ("mlp", "hook_mlp_out", "hook_resid_post")):
        if sublayer in (name, "both"):
            saved: dict[str, Tensor] = {}
            hooks.append((f"blocks.{block}.{out_hook}", _saver(saved)))
            hooks.append((f"blocks.{block}.{stream_hook}", _replacer(saved)))
    return hooks


def _saver(saved: dict[str, Tensor]):
    def hook(activation: Tensor, hook) -> None:
        saved["output"] = activation

    return hook


def _replacer(saved: dict[str, Tensor]):
    def hook(activation: Tensor, hook) -> Tensor:
        return saved.pop("output")

    return hook


def zero_ablation(hook_name: str) -> FwdHooks:
    """Replace the activation at `hook_name` by zeros.

    Args:
        hook_name: the TransformerLens hook to ablate.

    Returns:
        Forward hooks for `model.hooks(fwd_hooks=...)`.
    """
    return [(hook_name, lambda activation, hook: torch.zeros_like(activation))]


def mean_ablation(hook_name: str, mean: Float[Tensor, "... d"]) -> FwdHooks:
    """Replace the activation at `hook_name` by `mean` (e.g. its mean over a dataset, per position
    `[pos, d_model]` or overall `[d_model]`), broadcast over the batch.

    Args:
        hook_name: the TransformerLens hook to ablate.
        mean: the replacement, `[pos, d_model]` or `[d_model]`.

    Returns:
        Forward hooks for `model.hooks(fwd_hooks=...)`.
    """

    if mean.ndim not in (1, 2):
        raise ValueError(f"mean must be shaped [d_model] or [pos, d_model], got {tuple(mean.shape)}")

    def hook(activation: Tensor, hook) -> Tensor:
        values = mean if mean.ndim == 1 else mean[: activation.shape[1]]
        return values.to(activation).expand_as(activation).clone()

    return [(hook_name, hook)]
