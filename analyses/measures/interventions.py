"""Deprecated alias: its measures are now in `analyses.measures.swaps` (position swaps, swap readout)
and `analyses.measures.cut_effects` (residual cuts); the old name goes in the next release."""

from poslens.analyses.measures.cut_effects import residual_cut_effects
from poslens.analyses.measures.swaps import SWAP_COLUMNS, SWAP_READOUT_COLUMNS, exchange, position_swap, swap_readout
from poslens.variants.deprecation import warn_renamed

__all__ = ["SWAP_COLUMNS", "SWAP_READOUT_COLUMNS", "exchange", "position_swap", "residual_cut_effects", "swap_readout"]

warn_renamed(__name__, "poslens.analyses.measures.swaps and poslens.analyses.measures.cut_effects")
