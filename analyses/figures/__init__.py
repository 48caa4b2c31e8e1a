"""Plotly figures drawn from tidy tables, and the one way poslens writes a figure to disk.

Functions in the topic modules (`probes`, `correlation`, `patching`, `dynamics`, `induction`)
return a `plotly.graph_objects.Figure` and never show or write it, so callers decide between a
notebook, an HTML report or a static image; `write_figure` writes one page.
"""

from __future__ import annotations

import os
from pathlib import Path

import plotly.graph_objects as go
import plotly.offline

from poslens.variants.storage import atomic_write, check_output_file

HTML_SUFFIXES = (".html", ".htm")
SHARED_PLOTLY_JS = "plotly.min.js"


def check_html_path(path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Fail early, before any work, if an HTML page (a figure, the demo's static page) could not be
    written to `path`: it must end in `.html` (poslens writes interactive pages, not images), an
    existing file is replaced only with `overwrite`, and its folder must accept files."""
    path = Path(path)
    if path.suffix.lower() not in HTML_SUFFIXES:
        raise ValueError(f"{path} must end in one of {list(HTML_SUFFIXES)}: poslens writes interactive HTML pages")
    return check_output_file(path, overwrite=overwrite, option="--overwrite")


def write_figure(figure: go.Figure, path: str | os.PathLike, *, overwrite: bool = False,
                 standalone: bool = True) -> Path:
    """Write `figure` as an HTML page at `path`, atomically; an existing file only with `overwrite`.

    A `standalone` page embeds plotly.js and opens offline anywhere; otherwise the page loads
    `plotly.min.js` from its own folder (written there once), so a folder of many figures holds
    one copy of the library.

    Args:
        figure: the plotly figure.
        path: an `.html` path.
        overwrite: replace an existing file.
        standalone: embed plotly.js in the page.

    Returns:
        `path` as a `Path`.
    """
    path = check_html_path(path, overwrite=overwrite)
    if standalone:
        return atomic_write(path, figure.to_html(include_plotlyjs=True, full_html=True), overwrite=overwrite)
    if not (path.parent / SHARED_PLOTLY_JS).exists():
        atomic_write(path.parent / SHARED_PLOTLY_JS, plotly.offline.get_plotlyjs())
    return atomic_write(path, figure.to_html(include_plotlyjs="directory", full_html=True), overwrite=overwrite)


def file_name(name: str) -> str:
    """`name` made safe for a file name: a variant's `+` and `,` become `_`."""
    return name.replace("+", "_").replace(",", "_")
