"""One offline HTML page that reads like a paper's results section, and its Markdown twin.

An experiment hands over `Section`s: a title, a verdict line, a sentence on how to read the
measure, figures, one compact table (rounded, no empty columns) and any number of long tidy
tables, which the page folds away in `<details>` and links to their files in `tables/`. The page
loads plotly.js from the output folder's one shared offline copy, `figures/plotly.min.js` (the
figure pages' own, `analyses.figures.write_plotly_js`), by a relative path: it opens with no
network, from `file://` too, as long as it stays beside its `figures/` folder.
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from poslens.analyses.figures import write_plotly_js
from poslens.analyses.tables import render_table
from poslens.variants.storage import atomic_write

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1.5em; color: #1f2328; line-height: 1.5; }
h1 { font-size: 1.8em; border-bottom: 1px solid #d0d7de; padding-bottom: .3em; }
h2 { font-size: 1.35em; margin-top: 2.2em; border-bottom: 1px solid #d0d7de; padding-bottom: .2em; }
p.meta { color: #57606a; }
p.verdict { font-weight: 600; }
p.howto { color: #57606a; font-size: .95em; }
table { border-collapse: collapse; margin: .8em 0; font-size: .9em; }
th, td { border: 1px solid #d0d7de; padding: .3em .6em; text-align: right; vertical-align: top; }
th { background: #f6f8fa; }
td.text, th.text { text-align: left; }
tr:nth-child(even) td { background: #fbfcfd; }
td.supported { background: #dafbe1 !important; } td.contradicted { background: #ffebe9 !important; }
td.inconclusive { background: #fff8c5 !important; } td.text { max-width: 28em; }
details { margin: .6em 0; } summary { cursor: pointer; color: #0969da; }
.figure { margin: 1em 0; }
div.alerts { background: #fff8c5; border: 1px solid #d4a72c; padding: .5em 1em; margin: 1em 0; }
"""


@dataclass
class Section:
    """One claim or measure of a report."""

    title: str
    verdict: str = ""
    howto: str = ""
    figures: Sequence[go.Figure] = ()
    table: pd.DataFrame | None = None
    details: dict[str, pd.DataFrame] = field(default_factory=dict)  # title -> a long table, folded
    anchor: str = ""


def compact(table: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """`table` for reading: floats to `digits` significant digits, all-empty columns dropped."""
    kept = table.dropna(axis=1, how="all")
    return kept.apply(lambda column: column.map(lambda v: _significant(v, digits))
                      if pd.api.types.is_float_dtype(column) else column)


def _significant(value: float, digits: int) -> str:
    if pd.isna(value):
        return ""
    return f"{value:.0f}" if abs(value) >= 10**digits else f"{value:.{digits}g}"


def _html_table(table: pd.DataFrame, verdict_column: str | None = "verdict") -> str:
    """Numbers right-aligned, text left-aligned, a verdict cell coloured by its verdict."""
    shown = compact(table)
    kinds = {column: "" if pd.api.types.is_numeric_dtype(table[column]) else "text" for column in shown.columns}
    head = "".join(f'<th class="{kinds[column]}">{html.escape(str(column))}</th>' for column in shown.columns)
    rows = []
    for values in shown.itertuples(index=False):
        cells = []
        for column, value in zip(shown.columns, values):
            text = "" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)
            css = f"{kinds[column]} {html.escape(text) if column == verdict_column else ''}".strip()
            cells.append(f'<td class="{css}">{html.escape(text)}</td>')
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _section_html(section: Section, tables_link: str) -> str:
    parts = [f'<h2 id="{html.escape(section.anchor)}">{html.escape(section.title)}</h2>']
    if section.verdict:
        parts.append(f'<p class="verdict">{html.escape(section.verdict)}</p>')
    if section.howto:
        parts.append(f'<p class="howto">How to read this: {html.escape(section.howto)}</p>')
    parts += [f'<div class="figure">{figure.to_html(full_html=False, include_plotlyjs=False)}</div>'
              for figure in section.figures]
    if section.table is not None:
        parts.append(_html_table(section.table))
    for title, table in section.details.items():
        parts.append(f"<details><summary>{html.escape(title)} ({len(table)} rows; "
                     f'<a href="{tables_link}">tables/</a>)</summary>{_html_table(table, None)}</details>')
    return "\n".join(parts)


def _alerts_html(alerts: Sequence[str]) -> str:
    if not alerts:
        return ""
    items = "".join(f"<li>{html.escape(alert)}</li>" for alert in alerts)
    return f"<div class='alerts'><strong>Read first:</strong><ul>{items}</ul></div>"


def write_report(out_dir: str | os.PathLike, title: str, meta: str, sections: Sequence[Section],
                 alerts: Sequence[str] = (), *, figures_dir: str = "figures") -> Path:
    """`out_dir/report.html` (one offline page) and `out_dir/summary.md` (the same sections'
    verdicts and compact tables), both written atomically; returns the page's path.

    Args:
        out_dir: the output folder.
        title: the page's title.
        meta: one line under the title (preset, seeds, versions).
        sections: the sections, in order.
        figures_dir: the subfolder whose shared `plotly.min.js` the page loads (written if missing).
        alerts: lines a reader must see before any result (e.g. runs that missed the
            criterion), listed at the top of both files.

    Returns:
        The path of `report.html`.
    """
    out_dir = Path(out_dir)
    script = write_plotly_js(out_dir / figures_dir).relative_to(out_dir).as_posix()
    for index, section in enumerate(sections):
        section.anchor = section.anchor or f"s{index}"
    toc = "".join(f'<li><a href="#{html.escape(s.anchor)}">{html.escape(s.title)}</a></li>' for s in sections)
    body = "\n".join(_section_html(section, "tables/") for section in sections)
    page = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style><script charset='utf-8' src='{html.escape(script)}'></script></head>"
            f"<body><h1>{html.escape(title)}</h1><p class='meta'>{html.escape(meta)}</p>{_alerts_html(alerts)}"
            f"<ol>{toc}</ol>{body}"
            f"</body></html>")
    atomic_write(out_dir / "report.html", page)
    lines = [f"# {title}\n", f"{meta}\n"] + (["**Read first:**\n\n" + "".join(f"- {alert}\n" for alert in alerts)]
                                              if alerts else [])
    for section in sections:
        lines.append(f"## {section.title}\n")
        lines += [f"{text}\n" for text in (section.verdict, section.howto and f"How to read this: {section.howto}")
                  if text]
        if section.table is not None:
            lines.append(render_table(compact(section.table), "md"))
    atomic_write(out_dir / "summary.md", "\n".join(lines))
    return out_dir / "report.html"
