"""Activation plumbing on TransformerLens hook names: capture, cut, ablate, patch; and the positions a model is told."""

from poslens.hooks.capture import (
           EMBED,
           Capture,
           capture_patterns,
           capture_residuals,
           hook_name,
           missing_resid_mid,
           residual_sites,
)
from poslens.hooks.cuts import cut_residual, mean_ablation, zero_ablation
from poslens.hooks.patching import PATCH_SITES, attribution_grids, patch_grids, patchable_sites
from poslens.hooks.positions import (
    PositionEdit,
    permuted,
    position_support,
    repeated,
    shifted,
    swapped,
    unchanged,
    with_positions,
)

__all__ = ["EMBED", "PATCH_SITES", "Capture", "PositionEdit", "attribution_grids", "capture_patterns",
           "capture_residuals", "cut_residual", "hook_name", "mean_ablation", "missing_resid_mid", "patch_grids",
           "patchable_sites", "permuted", "position_support", "repeated", "residual_sites", "shifted", "swapped",
           "unchanged", "with_positions", "zero_ablation"]
