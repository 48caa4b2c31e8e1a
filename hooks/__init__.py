"""Activation plumbing on TransformerLens hook names: capture, cut, ablate, patch."""

from poslens.hooks.capture import (
           EMBED,
           Capture,
           capture_patterns,
           capture_residuals,
           hook_name,
           missing_resid_mid,
           residual_sites,
)
from poslens.hooks.interventions import cut_residual, mean_ablation, zero_ablation
from poslens.hooks.patching import PATCH_SITES, attribution_grids, patch_grids, patchable_sites

__all__ = ["EMBED", "PATCH_SITES", "Capture", "attribution_grids", "capture_patterns", "capture_residuals", "cut_residual",
           "hook_name", "mean_ablation", "missing_resid_mid", "patch_grids", "patchable_sites", "residual_sites",
           "zero_ablation"]
