"""Hooked transformer variants: NoPE / learned / sinusoidal / rotary × causal / bidirectional × residual cuts."""

from variants.checkpoint import load, save
from variants.config import PRESET_NAMES, VariantConfig, preset
from variants.model import HookedTransformer, build
from variants.training import TrainResult, TrainSettings, evaluate, load_task, train

__all__ = [
    "HookedTransformer", "PRESET_NAMES", "TrainResult", "TrainSettings", "VariantConfig",
    "build", "evaluate", "load", "load_task", "preset", "save", "train",
]
