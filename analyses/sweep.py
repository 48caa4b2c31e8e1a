"""Deprecated alias of `poslens.analyses.executors`, the executors that run a study's units (a
"sweep" in poslens is a probe sweep); the old name goes in the next release."""

import sys

from poslens.analyses import executors
from poslens.variants.deprecation import warn_renamed

warn_renamed(__name__, executors.__name__)
sys.modules[__name__] = executors
