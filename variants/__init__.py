"""Hooked transformer variants: NoPE / learned / sinusoidal / rotary × causal / bidirectional × residual cuts."""

from poslens.variants.checkpoint import load, save
from poslens.variants.config import VARIANT_NAMES, VariantConfig, variant_config
from poslens.variants.deprecation import renamed_attributes
from poslens.variants.hub import fresh_twin, load_any
from poslens.variants.model import HookedTransformer, build
from poslens.variants.training import TrainResult, TrainSettings, evaluate, task_record, train

__all__ = [
    "HookedTransformer", "TrainResult", "TrainSettings", "VARIANT_NAMES", "VariantConfig",
    "build", "evaluate", "fresh_twin", "load", "load_any", "save", "task_record", "train", "variant_config",
]
__getattr__ = renamed_attributes(__name__, {"preset": "variant_config", "PRESET_NAMES": "VARIANT_NAMES"})
