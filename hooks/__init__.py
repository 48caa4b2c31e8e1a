"""Activation plumbing on TransformerLens hook names: capture, cut, ablate."""

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

__all__ = ["EMBED", "Capture", "capture_patterns", "capture_residuals", "cut_residual", "hook_name", "mean_ablation",
           "missing_resid_mid", "residual_sites", "zero_ablation"]
