"""Deprecated alias of `poslens.hooks.cuts` (residual cuts and ablations); the old name goes in
the next release."""

import sys

from poslens.hooks import cuts
from poslens.variants.deprecation import warn_renamed

warn_renamed(__name__, cuts.__name__)
sys.modules[__name__] = cuts
