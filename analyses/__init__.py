"""Analyses in two layers, plus what they share.

- `measures`: pure functions from a model and tokens (or captured activations) to tidy tables:
  invariance, the probe sweep, correlation structure, position geometry, activation patching,
  position swaps and residual cuts (and which of their cells the architecture fixes), attention
  entropy, induction scores; what a model is (its residual sites and per-layer positional
  encoding) and the token sequences a language model is probed on.
- `experiments`: the studies that train, call measures and write `tables/`, `figures/`,
  `summary.md` and `report.html` (`reproduce`, `dynamics`, `induction`), with their sizes in
  `presets`. Each declares its units, figures and report to `study`, the one skeleton that
  locks, runs, merges, commits and draws them. No experiment imports another.
- Shared: `stats` (tests over seeds and the verdict rule, on scipy), `tables` (the tidy schemas and the one
  multi-format export), `figures` (plotly figures drawn from tables, and the one way to write one), `runs`
  (reading trained runs back).

The common names are importable from here, loaded on first use (so that importing one module does
not import every experiment): `from poslens.analyses import probe_table, activation_patching,
reproduce, export_table`. `__all__` lists them; each lives in the module `EXPORTS` names. Old names
kept for a release after a rename (`RENAMED`) still resolve, with a `DeprecationWarning`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

EXPORTS = {
    **dict.fromkeys(["ProbeSweep", "probe_table", "run_probe_sweep"], "poslens.analyses.measures.probe_sweep"),
    **dict.fromkeys(["activation_patching", "corrupt", "patch_table", "prompt_patch_table", "restoration_metric"],
                    "poslens.analyses.measures.patching"),
    **dict.fromkeys(["invariance_table", "permutation_test"], "poslens.analyses.measures.invariance"),
    **dict.fromkeys(["block_diagonality", "block_scores", "full_correlation"], "poslens.analyses.measures.correlation"),
    "position_geometry": "poslens.analyses.measures.geometry",
    **dict.fromkeys(["position_swap", "swap_readout"], "poslens.analyses.measures.swaps"),
    "residual_cut_effects": "poslens.analyses.measures.cut_effects",
    **dict.fromkeys(["attention_entropy", "decodable_steps", "entropy_rebound"], "poslens.analyses.measures.entropy"),
    **dict.fromkeys(["InductionReport", "induction_analysis"], "poslens.analyses.measures.induction"),
    **dict.fromkeys(["describe", "positional_encodings"], "poslens.analyses.measures.discovery"),
    **dict.fromkeys(["random_sequences", "text_sequences"], "poslens.analyses.measures.sequences"),
    "reproduce": "poslens.analyses.experiments.reproduce",
    **dict.fromkeys(["training_dynamics", "write_dynamics"], "poslens.analyses.experiments.dynamics"),
    "write_induction": "poslens.analyses.experiments.induction",
    **dict.fromkeys(["PROBE_COLUMNS", "export_table", "export_tables", "read_table", "render_table", "side_by_side",
                     "summarise_seeds", "wide_table"], "poslens.analyses.tables"),
    "write_figure": "poslens.analyses.figures",
    "probe_accuracy_figure": "poslens.analyses.figures.probes",
    "patching_heatmap": "poslens.analyses.figures.patching",
    **dict.fromkeys(["Unit", "run_units"], "poslens.analyses.executors"),
    **dict.fromkeys(["cached_results", "load_models_by_variant", "load_task"], "poslens.analyses.runs"),
}
__all__ = sorted(EXPORTS)
RENAMED = {"probe_sweep": "probe_table", "sweep_probes": "run_probe_sweep"}  # old name → new, for one release


def lazy_exports(package: str, exports: Mapping[str, str], renamed: Mapping[str, str] | None = None,
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A package's `__getattr__` and `__dir__` (PEP 562) that import each exported name from its
    module on first use: the package imports nothing until a name is asked for.

    Args:
        package: the package's `__name__`, for the error on an unknown name.
        exports: exported name → the module that defines it.
        renamed: old name → exported name, kept for a release: resolved with a `DeprecationWarning`.

    Returns:
        `(__getattr__, __dir__)` to assign in the package's `__init__.py`.
    """
    def getattr_(name: str) -> Any:
        if renamed and name in renamed:
            from poslens.variants.deprecation import warn_renamed  # only now: the package stays light

            warn_renamed(f"{package}.{name}", f"{package}.{renamed[name]}")
            name = renamed[name]
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(exports[name]), name)

    def dir_() -> list[str]:
        return sorted({*importlib.import_module(package).__dict__, *exports})

    return getattr_, dir_


__getattr__, __dir__ = lazy_exports(__name__, EXPORTS, RENAMED)
