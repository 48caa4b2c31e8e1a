"""Probe accuracy tables with one stable, documented schema.

Every probe sweep is stored as a *tidy* table, one measurement per row, so
results from different variants, seeds and baselines can be concatenated,
averaged and pivoted without bespoke glue. The columns, in order:

=========  ========  ==========================================================
column     dtype     meaning
=========  ========  ==========================================================
variant    str       model variant, e.g. ``nope_causal``
seed       int64     training seed of that variant
site       str       residual-stream site probed, a TransformerLens hook name
                     (``blocks.0.hook_resid_mid``) or ``embed``, the stream
                     entering block 0
layer      float64   the site's depth, ``site_layer(site)``: 0 for ``embed``,
                     l for ``blocks.l.hook_resid_pre``, l + 0.5 for
                     ``blocks.l.hook_resid_mid``, l + 1 for
                     ``blocks.l.hook_resid_post`` (so the resid_post of block l
                     and the resid_pre of block l + 1 share a layer number, as
                     they are the same stream)
probe      str       what the probe predicts: ``position``,
                     ``position_control`` (Hewitt & Liang control task),
                     ``role``, ...
metric     str       ``accuracy``, ``mad``, ``r2``, ``selectivity``, ...
value      float64   the measurement (NaN allowed where it is undefined)
baseline   str       which model produced the activations: ``trained``,
                     ``random_init``, ``token_identity``, ``chance``, ...
=========  ========  ==========================================================

The key ``(variant, seed, site, probe, metric, baseline)`` is unique.

Tables are exported with `export_table` (CSV and JSON keep every bit and
every dtype; Markdown and LaTeX are for reading) and read back with
`read_table`. Markdown is rendered here rather than with
``DataFrame.to_markdown``, so poslens does not need tabulate. LaTeX is laid out
by pandas' ``Styler.to_latex`` (its jinja2 comes with torch) with our own cell
escaping: pandas' ``escape="latex"`` leaves ``±``, ``<``, ``>`` and line breaks
as they are, which LaTeX would misread or reject.
"""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
from pandas.io.json import build_table_schema

from poslens.variants.storage import atomic_write, check_output_file

PROBE_COLUMNS: tuple[str, ...] = ("variant", "seed", "site", "layer", "probe", "metric", "value", "baseline")
PROBE_DTYPES: dict[str, str] = {
    "variant": "str", "seed": "int64", "site": "str", "layer": "float64",
    "probe": "str", "metric": "str", "value": "float64", "baseline": "str",
}
KEY_COLUMNS: tuple[str, ...] = ("variant", "seed", "site", "probe", "metric", "baseline")
EXPORT_SUFFIXES: tuple[str, ...] = (".csv", ".md", ".tex", ".json")
READ_SUFFIXES: tuple[str, ...] = (".csv", ".json")

_JSON_DTYPES = {"integer": "int64", "number": "float64", "boolean": "bool", "string": "str"}
_BLOCK_SITE = re.compile(r"blocks\.(\d+)\.hook_resid_(pre|mid|post)")
_SITE_OFFSET = {"pre": 0.0, "mid": 0.5, "post": 1.0}
_LATEX_ESCAPES = str.maketrans({
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
    "<": r"\textless{}", ">": r"\textgreater{}", "±": r"$\pm$", "\n": " ",
})


def site_layer(site: str) -> float:
    """Depth of a residual-stream site on the layer axis (see the module docstring)."""
    if site == "embed":
        return 0.0
    match = _BLOCK_SITE.fullmatch(site)
    if match is None:
        raise ValueError(f"unknown site {site!r}: expected 'embed' or 'blocks.<l>.hook_resid_pre|mid|post'")
    return int(match.group(1)) + _SITE_OFFSET[match.group(2)]


def empty_probe_table() -> pd.DataFrame:
    """A probe table with no rows and the schema's columns and dtypes."""
    return pd.DataFrame({column: pd.Series(dtype=PROBE_DTYPES[column]) for column in PROBE_COLUMNS})


def validate_probe_table(df: pd.DataFrame) -> pd.DataFrame:
    """Check `df` against the probe schema and return it; raise `ValueError` saying what is wrong.

    Checked: the column set (any order; `PROBE_COLUMNS` is the canonical
    one), each column's dtype, no missing keys, a layer that matches its
    site, and no repeated ``(variant, seed, site, probe, metric, baseline)``
    key (a repeat would silently count as an extra seed).
    """
    _check_probe_columns(df)
    _check_dtypes(df)
    _check_values(df)
    return df


def _check_probe_columns(df: pd.DataFrame) -> None:
    missing = [c for c in PROBE_COLUMNS if c not in df.columns]
    extra = [c for c in df.columns if c not in PROBE_COLUMNS]
    if missing or extra:
        raise ValueError(f"probe table has missing columns {missing} and extra columns {extra}; "
                         f"expected {list(PROBE_COLUMNS)}")


def _check_dtypes(df: pd.DataFrame) -> None:
    wrong = {c: str(df[c].dtype) for c in PROBE_COLUMNS if df[c].dtype != PROBE_DTYPES[c]}
    if wrong:
        expected = {c: PROBE_DTYPES[c] for c in wrong}
        raise ValueError(f"probe table columns have dtypes {wrong}, expected {expected} "
                         f"(convert with df.astype(PROBE_DTYPES))")


def _check_values(df: pd.DataFrame) -> None:
    keyed = [c for c in PROBE_COLUMNS if c != "value"]
    holes = [c for c in keyed if df[c].isna().any()]
    if holes:
        raise ValueError(f"probe table has missing values in columns {holes}")
    expected_layer = df["site"].map(site_layer)
    mismatched = df.loc[expected_layer != df["layer"], ["site", "layer"]].drop_duplicates()
    if not mismatched.empty:
        raise ValueError(f"layer does not match site_layer(site) for {mismatched.to_dict('records')}")
    repeated = df[df.duplicated(list(KEY_COLUMNS), keep=False)]
    if not repeated.empty:
        raise ValueError(f"repeated keys {list(KEY_COLUMNS)}: {repeated[list(KEY_COLUMNS)].head().to_dict('records')}")


def summarise_seeds(df: pd.DataFrame) -> pd.DataFrame:
    """Average a probe table over seeds: one row per (variant, site, probe, metric, baseline).

    Columns: variant, site, layer, probe, metric, baseline, mean, std, n_seeds.
    ``std`` is the sample standard deviation (ddof=1) and is NaN when only one
    seed was run: a spread cannot be estimated from one run, and NaN says so
    where 0 would claim a perfectly reproducible result. ``n_seeds`` counts
    the seeds with a non-NaN value, the ones the mean is over. Rows are
    sorted by variant, probe, metric, baseline and then layer.
    """
    validate_probe_table(df)
    keys = ["variant", "probe", "metric", "baseline", "layer", "site"]
    summary = seed_summary(df, keys, ["value"], sort=True)
    summary = summary.rename(columns={"value_mean": "mean", "value_std": "std", "value_n_seeds": "n_seeds"})
    return summary[["variant", "site", "layer", "probe", "metric", "baseline", "mean", "std", "n_seeds"]]


def seed_summary(df: pd.DataFrame, keys: list[str], values: list[str], *, sort: bool = False) -> pd.DataFrame:
    """Mean, sample std (NaN for one seed) and count of non-NaN values of each `values` column
    over the rows (seeds) sharing `keys`: columns `{value}_mean`, `{value}_std`, `{value}_n_seeds`.
    Groups keep their first appearance's order unless `sort`."""
    summary = df.groupby(keys, sort=sort)[values].agg(["mean", "std", "count"])
    summary.columns = [f"{value}_{'n_seeds' if statistic == 'count' else statistic}"
                       for value, statistic in summary.columns]
    for value in values:
        summary[f"{value}_n_seeds"] = summary[f"{value}_n_seeds"].astype("int64")
    return summary.reset_index()


def mean_sd_text(df: pd.DataFrame, keys: list[str], values: list[str], *, digits: int = 3) -> pd.DataFrame:
    """For reading: one row per `keys`, each of `values` as "mean ± sd" over the rows (seeds) to
    `digits` significant digits (the mean alone for one seed; empty where all are NaN), and `n`
    (the rows per group)."""
    summary = seed_summary(df, keys, values)
    text = summary[keys].copy()
    for value in values:
        text[value] = [_significant_pm(mean, std, digits)
                       for mean, std in zip(summary[f"{value}_mean"], summary[f"{value}_std"])]
    text["n"] = df.groupby(keys, sort=False).size().to_numpy()
    return text


def _significant_pm(mean: float, std: float, digits: int) -> str:
    if pd.isna(mean):
        return ""
    return f"{mean:.{digits}g}" + ("" if pd.isna(std) else f" ± {std:.{max(1, digits - 1)}g}")


def select_summary(summary: pd.DataFrame, *, metric: str, probe: str, baseline: str) -> pd.DataFrame:
    """Rows of a `summarise_seeds` result for one metric, probe and baseline; `ValueError` if none."""
    chosen = summary[(summary["metric"] == metric) & (summary["probe"] == probe) & (summary["baseline"] == baseline)]
    if chosen.empty:
        available = summary[["metric", "probe", "baseline"]].drop_duplicates().to_dict("records")
        raise ValueError(f"no rows with metric={metric!r}, probe={probe!r}, baseline={baseline!r}; "
                         f"available: {available}")
    return chosen


def wide_table(
    df: pd.DataFrame,
    metric: str = "accuracy",
    probe: str = "position",
    baseline: str = "trained",
    *,
    as_text: bool = True,
    digits: int = 3,
) -> pd.DataFrame:
    """Paper-style pivot: one row per site (ordered by layer), one column per variant.

    With ``as_text=True`` each cell is ``"mean ± std"`` (just ``"mean"`` for a
    single seed, ``""`` where a variant lacks that site), rounded to `digits`
    decimals. With ``as_text=False`` the columns are a MultiIndex
    ``(variant, "mean" | "std")`` of floats. Variants keep the order in which
    they first appear in `df`, so callers control the column order.
    """
    chosen = select_summary(summarise_seeds(df), metric=metric, probe=probe, baseline=baseline)
    variants = list(pd.unique(df["variant"][df["variant"].isin(chosen["variant"])]))
    sites = chosen.sort_values(["layer", "site"])["site"].drop_duplicates().tolist()
    numeric = chosen.pivot(index="site", columns="variant", values=["mean", "std"]).swaplevel(axis=1)
    numeric = numeric.reindex(index=sites, columns=pd.MultiIndex.from_product([variants, ["mean", "std"]]))
    numeric.columns.names = ["variant", None]
    if not as_text:
        return numeric
    cells = [_mean_std_text(m, s, n, digits) for m, s, n in zip(chosen["mean"], chosen["std"], chosen["n_seeds"])]
    text = chosen.assign(cell=cells).pivot(index="site", columns="variant", values="cell")
    return text.reindex(index=sites, columns=variants).fillna("")


def side_by_side(df: pd.DataFrame, metric: str = "accuracy", probe: str = "position", *,
                 digits: int = 3) -> pd.DataFrame:
    """The headline table: per site, each variant's trained probe beside its untrained (`random_init`) twin,
    then the task-level bars every variant must clear (`token_identity`, `chance`; they depend only on the
    tokens, so one column each)."""
    present = set(df.loc[(df["metric"] == metric) & (df["probe"] == probe), "baseline"])
    parts = [wide_table(df, metric, probe, "trained", digits=digits)]
    if "random_init" in present:
        parts.append(wide_table(df, metric, probe, "random_init", digits=digits).add_suffix(" (random init)"))
    for baseline in ("token_identity", "chance"):
        if baseline in present:
            column = wide_table(df, metric, probe, baseline, digits=digits).iloc[:, :1]
            parts.append(column.set_axis([baseline.replace("_", " ")], axis=1))
    table = pd.concat(parts, axis=1)
    variants = list(parts[0].columns)
    ordered = [c for v in variants for c in (v, f"{v} (random init)") if c in table.columns]
    return table[ordered + [c for c in table.columns if c not in ordered]]


def _mean_std_text(mean: float, std: float, n_seeds: int, digits: int) -> str:
    if n_seeds > 1:
        return f"{mean:.{digits}f} ± {std:.{digits}f}"
    return f"{mean:.{digits}f}"


def export_table(df: pd.DataFrame, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write `df` atomically in the format named by `path`'s suffix. A named index (such as
    `wide_table`'s sites) becomes the first column(s), an unnamed one is dropped, and MultiIndex
    column labels are joined with spaces.

    Args:
        df: the table; an empty one is refused (`ValueError`).
        path: `.csv` and `.json` keep full precision (JSON carries pandas' table schema, so dtypes
            survive `read_table`); `.md` and `.tex` (booktabs) show floats to 4 significant digits.
        overwrite: replace an existing file (otherwise `FileExistsError` naming it).

    Returns:
        `path` as a `Path`.
    """
    path = Path(path)
    suffix = _checked_suffix(path, EXPORT_SUFFIXES)
    if df.empty:
        raise ValueError(f"refusing to write an empty table to {path}")
    return atomic_write(path, render_table(df, suffix), overwrite=overwrite)


def render_table(df: pd.DataFrame, fmt: str) -> str:
    """`df` as the text `export_table` would write for format `fmt` (`csv`, `md`, `tex`, `json`)."""
    suffix = fmt if fmt.startswith(".") else f".{fmt}"
    renderers = {".csv": _render_csv, ".md": _render_markdown, ".tex": _render_latex, ".json": _render_json}
    if suffix not in renderers:
        raise ValueError(f"unknown table format {fmt!r}; allowed: {[s.lstrip('.') for s in renderers]}")
    return renderers[suffix](_flatten(df))


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read a ``.csv`` or ``.json`` file written by `export_table`.

    A CSV whose header is the probe schema is read with the schema's dtypes
    (pandas 3 parses floats exactly), so tidy probe tables round-trip
    unchanged; other CSVs get pandas' inferred dtypes. JSON carries its own
    schema.
    """
    path = Path(path)
    suffix = _checked_suffix(path, READ_SUFFIXES)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    return _read_csv(path) if suffix == ".csv" else _read_json(path)


def export_tables(df: pd.DataFrame, directory: str | os.PathLike, name: str, *,
                  formats: tuple[str, ...] = EXPORT_SUFFIXES, overwrite: bool = False) -> list[Path]:
    """`export_table` to `directory/name{suffix}` for every suffix in `formats`; refuses, before
    writing any of them, if one exists and not `overwrite`."""
    paths = [Path(directory) / f"{name}{suffix}" for suffix in formats]
    for path in paths:
        check_writable(path, overwrite=overwrite)
    return [export_table(df, path, overwrite=overwrite) for path in paths]


def tables_complete(directory: str | os.PathLike, name: str, formats: tuple[str, ...] = EXPORT_SUFFIXES) -> bool:
    """Whether `export_tables(..., directory, name, formats=formats)` has written every format."""
    return all((Path(directory) / f"{name}{suffix}").is_file() for suffix in formats)


def check_columns(df: pd.DataFrame, columns: tuple[str, ...] | list[str], name: str) -> None:
    """Raise a `ValueError` naming the missing columns of the `name` table, or if it has no rows."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{name} table lacks columns {missing}; expected {list(columns)}")
    if df.empty:
        raise ValueError(f"{name} table is empty")


def check_writable(path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Fail early, before any work, if `export_table(..., path, overwrite=overwrite)` would refuse or
    could not write there (a directory at `path`, a folder that is read-only or is a file)."""
    path = Path(path)
    _checked_suffix(path, EXPORT_SUFFIXES)
    return check_output_file(path, overwrite=overwrite)


def _checked_suffix(path: Path, allowed: tuple[str, ...]) -> str:
    suffix = path.suffix.lower()
    if suffix not in allowed:
        raise ValueError(f"unsupported file suffix {path.suffix!r} for {path}; allowed: {', '.join(allowed)}")
    return suffix


def _flatten(df: pd.DataFrame) -> pd.DataFrame:
    """Move named index levels into columns (unnamed ones are row numbers) and join MultiIndex labels."""
    flat = df.reset_index() if any(name is not None for name in df.index.names) else df
    if isinstance(flat.columns, pd.MultiIndex):
        flat = flat.set_axis([" ".join(str(p) for p in label if p != "") for label in flat.columns], axis=1)
    return flat.rename_axis(columns=None)


def _render_csv(df: pd.DataFrame) -> str:
    """CSV with every text field quoted, so a bare carriage return inside one cannot split a row."""
    return df.to_csv(index=False, lineterminator="\n", quoting=csv.QUOTE_NONNUMERIC)


def _render_json(df: pd.DataFrame) -> str:
    """pandas' ``orient="table"`` layout, written as strict JSON with Python's exact float repr.

    ``DataFrame.to_json`` rounds floats to at most 15 significant digits,
    which breaks exact round-trips; Python's `json` does not. NaN becomes
    ``null``; infinities, which strict JSON has no number for, become the
    strings ``"Infinity"`` / ``"-Infinity"``, which `read_table` turns back
    into floats through the schema's dtype.
    """
    records = [{k: _json_cell(v) for k, v in row.items()} for row in df.to_dict(orient="records")]
    return json.dumps({"schema": build_table_schema(df, index=False), "data": records}, allow_nan=False) + "\n"


def _json_cell(value: object) -> object:
    if _is_missing(value):
        return None
    if isinstance(value, float | np.floating) and np.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def _is_missing(value: object) -> bool:
    return value is None or (np.isscalar(value) and bool(pd.isna(value)))


def _read_csv(path: Path) -> pd.DataFrame:
    header = pd.read_csv(path, nrows=0).columns
    if sorted(header) != sorted(PROBE_COLUMNS):
        return pd.read_csv(path)
    return pd.read_csv(path, dtype=PROBE_DTYPES, keep_default_na=False, na_values={"value": [""]}, encoding="utf-8")


def _read_json(path: Path) -> pd.DataFrame:
    """Parse with Python's `json` (pandas' reader rejects subnormal floats) and apply the schema's dtypes."""
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        dtypes = {field["name"]: _json_dtype(field) for field in payload["schema"]["fields"]}
        frame = pd.DataFrame.from_records(payload["data"], columns=list(dtypes))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is not a table written by export_table (corrupted?): {error}") from error
    return frame.astype({name: dtype for name, dtype in dtypes.items() if dtype is not None})


def _json_dtype(field: dict) -> str | None:
    """The pandas dtype a table-schema field stands for; None leaves pandas' inference."""
    return field.get("extDtype") or _JSON_DTYPES.get(field["type"])


def _cell_text(value: object) -> str:
    if _is_missing(value):
        return ""
    if isinstance(value, float | np.floating):
        return f"{value:.4g}"
    return str(value)


def _render_markdown(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table; numeric columns right-aligned, ``|`` escaped."""
    def row(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", r"\|").replace("\n", " ") for c in cells) + " |"

    rules = ["---:" if pd.api.types.is_numeric_dtype(df[c]) else "---" for c in df.columns]
    lines = [row([str(c) for c in df.columns]), "| " + " | ".join(rules) + " |"]
    lines += [row([_cell_text(v) for v in values]) for values in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def _render_latex(df: pd.DataFrame) -> str:
    """A booktabs tabular (``\\toprule``/``\\midrule``/``\\bottomrule``) with LaTeX-escaped text, numeric
    columns right-aligned, through pandas' `Styler.to_latex`."""
    def escaped(value: object) -> str:
        return _cell_text(value).translate(_LATEX_ESCAPES)

    spec = "".join("r" if pd.api.types.is_numeric_dtype(df[c]) else "l" for c in df.columns)
    styler = df.style.hide(axis="index").format(escaped).format_index(lambda c: str(c).translate(_LATEX_ESCAPES),
                                                                       axis=1)
    return styler.to_latex(column_format=spec, hrules=True)
