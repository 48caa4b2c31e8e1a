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
                 standalone: bool = False) -> Path:
    """Write `figure` as an HTML page at `path`, atomically; an existing file only with `overwrite`.

    The page loads plotly.js from `plotly.min.js` in its own folder (`write_plotly_js`), so the
    figures of one folder share one 4.8 MB copy and still open offline (`file://`, a relative
    script). A `standalone` page embeds its own copy instead, to be sent on its own.

    Args:
        figure: the figure.
        path: where the page goes; it must end in `.html`.
        overwrite: replace an existing page.
        standalone: embed plotly.js in the page rather than sharing the folder's copy.

    Returns:
        The page's path.
    """
    path = check_html_path(path, overwrite=overwrite)
    if standalone:
        return atomic_write(path, figure.to_html(include_plotlyjs=True, full_html=True), overwrite=overwrite)
    write_plotly_js(path.parent)
    return atomic_write(path, figure.to_html(include_plotlyjs=SHARED_PLOTLY_JS, full_html=True), overwrite=overwrite)


def write_plotly_js(folder: str | os.PathLike) -> Path:
    """`folder/plotly.min.js`, the offline plotly.js the pages of `folder` share: written atomically
    when missing or when it is not this plotly's own (an older plotly left it there).

    Args:
        folder: the folder of the pages.

    Returns:
        The script's path.
    """
    path, script = Path(folder) / SHARED_PLOTLY_JS, plotly.offline.get_plotlyjs().encode("utf-8")
    if not path.is_file() or path.stat().st_size != len(script) or path.read_bytes() != script:
        atomic_write(path, script)
    return path


def file_name(name: str) -> str:
    """`name` made safe for a file name: a variant's `+` and `,` become `_`."""
    return name.replace("+", "_").replace(",", "_")
