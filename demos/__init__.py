"""Interactive views of poslens results: a local Dash app, a static HTML page and notebooks.

The common names are importable from here, loaded on first use (the app needs the `demo` extra,
dash; the static page does not): `from poslens.demos import write_static_page, serve`.
"""

from __future__ import annotations

from poslens.analyses import lazy_exports

EXPORTS = {
    **dict.fromkeys(["ModelStore", "load_demo_model"], "poslens.demos.panels"),
    **dict.fromkeys(["demo_models", "discover_models"], "poslens.demos.discovery"),
    **dict.fromkeys(["make_app", "serve"], "poslens.demos.app"),
    "write_static_page": "poslens.demos.static",
    "load_lm_demo": "poslens.demos.lm_panels",
}
__all__ = sorted(EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, EXPORTS)
