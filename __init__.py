"""poslens: where does a transformer keep token position, and what puts it there?

The subpackages, in the one direction data flows (none imports one to its right):
`poslens.tasks` (token batches) → `poslens.variants` (models, training, checkpoints) →
`poslens.hooks` (capture, cut, patch) → `poslens.probes` (fit/score) → `poslens.analyses`
(measures, experiments, tables, figures) → `poslens.demos` (app, static page, notebooks).
`poslens.cli` is the `poslens` command.

The names a user reaches for first are importable from here, loaded on first use (so that
`import poslens.tasks` does not pay for pandas or plotly):

    from poslens import Addition, variant_config, build, train, load, capture_residuals, PositionProbe, probe_table

Old names kept for a release after a rename (`preset`, `probe_sweep`) still resolve, with a
`DeprecationWarning` naming the new one; they are not in `__all__`.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Addition": "poslens.tasks", "MarkovICL": "poslens.tasks", "make_task": "poslens.tasks",
    "VariantConfig": "poslens.variants", "HookedTransformer": "poslens.variants", "variant_config": "poslens.variants",
    "build": "poslens.variants", "train": "poslens.variants", "load": "poslens.variants",
    "capture_residuals": "poslens.hooks", "cut_residual": "poslens.hooks",
    "PositionProbe": "poslens.probes", "RidgePositionProbe": "poslens.probes", "split_by_sequence": "poslens.probes",
    "flatten_tokens": "poslens.probes",
    "probe_table": "poslens.analyses.measures.probe_sweep", "run_probe_sweep": "poslens.analyses.measures.probe_sweep",
    "export_table": "poslens.analyses.tables",
    "reproduce": "poslens.analyses.experiments.reproduce",
}
__all__ = sorted(_EXPORTS)
_RENAMED = {"preset": "variant_config", "probe_sweep": "probe_table"}  # old name → new, for one release


def __getattr__(name: str) -> Any:
    if name in _RENAMED:
        from poslens.variants.deprecation import warn_renamed

        warn_renamed(f"poslens.{name}", f"poslens.{_RENAMED[name]}")
        name = _RENAMED[name]
    if name not in _EXPORTS:
        raise AttributeError(f"module 'poslens' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
