"""Hooked transformer variants: NoPE / learned / sinusoidal / rotary × causal / bidirectional × residual cuts."""

from poslens.variants.checkpoint import load, save
from poslens.variants.config import PRESET_NAMES, VariantConfig, preset
from poslens.variants.hub import fresh_twin, load_any
from poslens.variants.model import HookedTransformer, build
from poslens.variants.training import TrainResult, TrainSettings, evaluate, task_record, train

__all__ = [
    "HookedTransformer", "PRESET_NAMES", "TrainResult", "TrainSettings", "VariantConfig",
    "build", "evaluate", "fresh_twin", "load", "load_any", "task_record", "preset", "save", "train",
]
