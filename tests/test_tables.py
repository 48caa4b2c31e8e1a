"""Tests for analyses.tables (schema, summaries, exports) and analyses.figures."""

from __future__ import annotations

import itertools
import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import plotly.offline
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from poslens.analyses.figures.probes import probe_accuracy_figure
from poslens.analyses.tables import (
    PROBE_COLUMNS,
    PROBE_DTYPES,
    empty_probe_table,
    export_table,
    read_table,
    render_table,
    site_layer,
    summarise_seeds,
    validate_probe_table,
    wide_table,
)

SITES = ["embed", "blocks.0.hook_resid_mid", "blocks.0.hook_resid_post", "blocks.1.hook_resid_pre",
         "blocks.1.hook_resid_mid", "blocks.1.hook_resid_post"]
ODD_TEXT = st.text(
    alphabet=st.one_of(st.sampled_from(list(',"\'_ |%&#$\\{}~^±\n\t;')), st.characters(exclude_categories=("Cs",))),
    min_size=1, max_size=10,
)
VALUES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-1e-300, max_value=1e-300),
    st.floats(min_value=-1.0, max_value=1.0),
)


def probe_table(rows: list[tuple]) -> pd.DataFrame:
    """A tidy probe table from (variant, seed, site, probe, metric, value, baseline) tuples."""
    records = [
        {"variant": v, "seed": seed, "site": site, "layer": site_layer(site), "probe": probe,
         "metric": metric, "value": value, "baseline": baseline}
        for v, seed, site, probe, metric, value, baseline in rows
    ]
    return pd.DataFrame(records, columns=list(PROBE_COLUMNS)).astype(PROBE_DTYPES)


def odd_names(most: int) -> st.SearchStrategy[list[str]]:
    return st.lists(ODD_TEXT, min_size=1, max_size=most, unique=True)


@st.composite
def probe_tables(draw) -> pd.DataFrame:
    """Random valid probe tables: odd names, several seeds, every key combination once."""
    seeds = st.lists(st.integers(-(2**63), 2**63 - 1), min_size=1, max_size=3, unique=True)
    sites = st.lists(st.sampled_from(SITES), min_size=1, max_size=3, unique=True)
    keys = list(itertools.product(
        draw(odd_names(3)), draw(seeds), draw(sites), draw(odd_names(2)), draw(odd_names(2)), draw(odd_names(2)),
    ))
    values = draw(st.lists(VALUES, min_size=len(keys), max_size=len(keys)))
    return probe_table([(v, seed, site, probe, metric, value, baseline)
                        for (v, seed, site, probe, metric, baseline), value in zip(keys, values)])


@pytest.fixture
def two_variants() -> pd.DataFrame:
    """2 variants x 3 seeds x 3 sites (listed out of layer order), plus rows wide_table must ignore.

    Trained position accuracy of (variant, site) over seeds 0..2 is base + (0.0, 0.1, 0.2),
    so its mean is base + 0.1 and its std exactly 0.1.
    """
    bases = {
        ("zeta", "blocks.0.hook_resid_post"): 0.7, ("zeta", "embed"): 0.1, ("zeta", "blocks.0.hook_resid_mid"): 0.4,
        ("alpha", "blocks.0.hook_resid_post"): 0.6, ("alpha", "embed"): 0.0, ("alpha", "blocks.0.hook_resid_mid"): 0.3,
    }
    rows = []
    for (variant, site), base in bases.items():
        for seed in range(3):
            rows.append((variant, seed, site, "position", "accuracy", base + 0.1 * seed, "trained"))
            rows.append((variant, seed, site, "position", "accuracy", 0.05, "random_init"))
            rows.append((variant, seed, site, "position", "accuracy", 1 / 12, "chance"))
            rows.append((variant, seed, site, "position_control", "accuracy", 0.2, "trained"))
            rows.append((variant, seed, site, "position", "mad", 3.0, "trained"))
    return probe_table(rows)


# --- schema -------------------------------------------------------------------------------------


def test_site_layer_maps_sites_to_documented_layer_numbers():
    assert [site_layer(s) for s in SITES] == [0.0, 0.5, 1.0, 1.0, 1.5, 2.0]
    assert site_layer("blocks.11.hook_resid_mid") == 11.5
    with pytest.raises(ValueError, match="blocks.0.attn.hook_z"):
        site_layer("blocks.0.attn.hook_z")


def test_empty_probe_table_passes_validation_with_schema_columns():
    empty = empty_probe_table()
    assert list(empty.columns) == list(PROBE_COLUMNS)
    assert validate_probe_table(empty) is empty


def test_validate_names_missing_and_extra_columns(two_variants):
    with pytest.raises(ValueError, match=r"missing columns \['seed'\] and extra columns \['run'\]"):
        validate_probe_table(two_variants.rename(columns={"seed": "run"}))


def test_validate_names_wrong_dtypes(two_variants):
    with pytest.raises(ValueError, match=r"'layer': 'int64'"):
        validate_probe_table(two_variants.assign(layer=two_variants["layer"].round().astype("int64")))


def test_validate_rejects_layer_that_contradicts_site(two_variants):
    with pytest.raises(ValueError, match="layer does not match"):
        validate_probe_table(two_variants.assign(layer=two_variants["layer"] + 1))


def test_validate_rejects_repeated_keys(two_variants):
    with pytest.raises(ValueError, match="repeated keys"):
        validate_probe_table(pd.concat([two_variants, two_variants.head(1)], ignore_index=True))


# --- summaries ----------------------------------------------------------------------------------


def test_summarise_seeds_mean_std_and_count(two_variants):
    summary = summarise_seeds(two_variants)
    row = summary[(summary["variant"] == "zeta") & (summary["site"] == "blocks.0.hook_resid_mid")
                  & (summary["baseline"] == "trained") & (summary["probe"] == "position")
                  & (summary["metric"] == "accuracy")]
    assert len(row) == 1
    assert row["mean"].item() == pytest.approx(0.5)
    assert row["std"].item() == pytest.approx(0.1)
    assert row["n_seeds"].item() == 3
    assert len(summary) == len(two_variants) // 3


def test_summarise_single_seed_has_nan_std():
    summary = summarise_seeds(probe_table([("a", 0, "embed", "position", "accuracy", 0.5, "trained")]))
    assert summary["n_seeds"].tolist() == [1]
    assert math.isnan(summary["std"].item())


def test_wide_table_text_orders_sites_by_layer_and_variants_by_appearance(two_variants):
    wide = wide_table(two_variants)
    assert list(wide.index) == ["embed", "blocks.0.hook_resid_mid", "blocks.0.hook_resid_post"]
    assert list(wide.columns) == ["zeta", "alpha"]
    assert wide.loc["embed", "zeta"] == "0.200 ± 0.100"
    assert wide.loc["blocks.0.hook_resid_post", "alpha"] == "0.700 ± 0.100"


def test_wide_table_single_seed_shows_mean_and_missing_cell_is_blank():
    table = probe_table([("b", 0, "embed", "position", "accuracy", 0.5, "trained"),
                         ("a", 0, "blocks.0.hook_resid_post", "position", "accuracy", 0.25, "trained")])
    wide = wide_table(table)
    assert list(wide.index) == ["embed", "blocks.0.hook_resid_post"]
    assert list(wide.columns) == ["b", "a"]
    assert wide.to_dict("index") == {"embed": {"b": "0.500", "a": ""},
                                     "blocks.0.hook_resid_post": {"b": "", "a": "0.250"}}


def test_wide_table_numeric_has_mean_std_multiindex(two_variants):
    wide = wide_table(two_variants, as_text=False)
    assert wide.shape == (3, 4)
    assert list(wide.columns) == [("zeta", "mean"), ("zeta", "std"), ("alpha", "mean"), ("alpha", "std")]
    np.testing.assert_allclose(wide[("alpha", "mean")], [0.1, 0.4, 0.7])
    np.testing.assert_allclose(wide[("zeta", "std")], [0.1, 0.1, 0.1])


def test_wide_table_selects_requested_metric_and_baseline(two_variants):
    assert wide_table(two_variants, metric="mad").loc["embed", "alpha"] == "3.000 ± 0.000"
    assert wide_table(two_variants, baseline="random_init").loc["embed", "alpha"] == "0.050 ± 0.000"
    with pytest.raises(ValueError, match="metric='r2'"):
        wide_table(two_variants, metric="r2")


# --- exports ------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(table=probe_tables(), suffix=st.sampled_from([".csv", ".json"]))
def test_csv_and_json_round_trip_exactly(table, suffix):
    with tempfile.TemporaryDirectory() as folder:
        back = read_table(export_table(table, Path(folder) / f"probes{suffix}"))
    pd.testing.assert_frame_equal(back, table, check_exact=True)


def test_named_index_is_written_and_row_numbers_are_not(tmp_path, two_variants):
    subset = two_variants.iloc[5:]
    pd.testing.assert_frame_equal(read_table(export_table(subset, tmp_path / "t.csv")),
                                  subset.reset_index(drop=True))
    header = export_table(wide_table(two_variants), tmp_path / "w.csv").read_text(encoding="utf-8").splitlines()[0]
    assert header == '"site","zeta","alpha"'


def test_markdown_has_every_variant_and_one_line_per_row(tmp_path, two_variants):
    wide = wide_table(two_variants)
    lines = export_table(wide, tmp_path / "t.md").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "| site | zeta | alpha |"
    assert len(lines) == 2 + len(wide)
    assert lines[2] == "| embed | 0.200 ± 0.100 | 0.100 ± 0.100 |"


def test_markdown_escapes_pipes(tmp_path):
    table = probe_table([("a|b", 0, "embed", "position", "accuracy", 0.5, "trained")])
    text = export_table(table, tmp_path / "t.md").read_text(encoding="utf-8")
    assert r"| a\|b |" in text


def test_latex_is_booktabs_with_every_variant_and_escapes(tmp_path, two_variants):
    odd = two_variants.replace({"variant": {"zeta": "nope_causal 50% & #1"}})
    wide = wide_table(odd)
    text = export_table(wide, tmp_path / "t.tex").read_text(encoding="utf-8")
    body = text.split("\\midrule\n")[1].split("\\bottomrule")[0].splitlines()
    assert len(body) == len(wide)
    assert r"site & nope\_causal 50\% \& \#1 & alpha \\" in text
    assert r"embed & 0.200 $\pm$ 0.100 & 0.100 $\pm$ 0.100 \\" in text
    assert "±" not in text and "\\toprule" in text and "\\begin{tabular}{lll}" in text


LATEX_SPECIALS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
                  "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "<": r"\textless{}",
                  ">": r"\textgreater{}", "±": r"$\pm$", "\n": " "}


@settings(max_examples=60, deadline=None)
@given(names=st.lists(ODD_TEXT, min_size=1, max_size=3, unique=True), cells=st.lists(ODD_TEXT, min_size=1, max_size=4),
       numbers=st.lists(VALUES, min_size=1, max_size=4))
def test_latex_through_styler_is_the_hand_rendered_booktabs_table(names, cells, numbers):
    """`Styler.to_latex` lays out exactly the tabular poslens wrote by hand before: a text column per
    name (left), a float column (right, 4 significant digits, empty for NaN), every special character
    escaped once; the expected text is built here line by line."""
    rows = min(len(cells), len(numbers))
    frame = pd.DataFrame({**dict.fromkeys(names, cells[:rows]), "value ±": numbers[:rows]})

    def escaped(text: str) -> str:
        return "".join(LATEX_SPECIALS.get(character, character) for character in text)

    def number(value: float) -> str:
        return "" if math.isnan(value) else f"{value:.4g}"

    expected = [rf"\begin{{tabular}}{{{'l' * len(names)}r}}", r"\toprule",
                " & ".join(escaped(name) for name in [*names, "value ±"]) + r" \\", r"\midrule",
                *[" & ".join([escaped(cell)] * len(names) + [number(value)]) + r" \\"
                  for cell, value in zip(cells[:rows], numbers[:rows])], r"\bottomrule", r"\end{tabular}"]
    assert render_table(frame, "tex") == "\n".join(expected) + "\n"


def test_refuses_to_overwrite_unless_asked(tmp_path, two_variants):
    target = tmp_path / "t.csv"
    target.write_text("original", encoding="utf-8")
    with pytest.raises(FileExistsError, match=str(target)):
        export_table(two_variants, target)
    assert target.read_text(encoding="utf-8") == "original"
    export_table(two_variants, target, overwrite=True)
    pd.testing.assert_frame_equal(read_table(target), two_variants)


def test_unknown_suffix_and_empty_frame_raise_naming_the_value(tmp_path, two_variants):
    with pytest.raises(ValueError, match=r"'\.xlsx'.*\.csv, \.md, \.tex, \.json"):
        export_table(two_variants, tmp_path / "t.xlsx")
    with pytest.raises(ValueError, match="empty table"):
        export_table(empty_probe_table(), tmp_path / "t.csv")
    with pytest.raises(ValueError, match=r"'\.md'"):
        read_table(tmp_path / "t.md")
    assert list(tmp_path.iterdir()) == []


def test_crash_while_writing_leaves_old_file_and_no_temp(tmp_path, two_variants, monkeypatch):
    target = tmp_path / "t.json"
    export_table(two_variants, target)
    before = target.read_bytes()

    def crash(*_args, **_kwargs):
        raise OSError("simulated crash")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        export_table(two_variants.assign(value=0.0), target, overwrite=True)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["t.json"]


def test_json_is_standard_and_carries_dtypes(tmp_path, two_variants):
    table = two_variants.assign(value=np.where(two_variants.index == 0, np.nan, two_variants["value"]))
    payload = json.loads(export_table(table, tmp_path / "t.json").read_text(encoding="utf-8"))
    fields = {f["name"]: f["type"] for f in payload["schema"]["fields"]}
    assert fields == {"variant": "string", "seed": "integer", "site": "string", "layer": "number",
                      "probe": "string", "metric": "string", "value": "number", "baseline": "string"}
    assert payload["data"][0]["value"] is None


def test_corrupted_json_error_names_file(tmp_path):
    target = tmp_path / "t.json"
    target.write_text('{"schema": ', encoding="utf-8")
    with pytest.raises(ValueError, match="t.json"):
        read_table(target)


# --- figures ------------------------------------------------------------------------------------


def test_probe_accuracy_figure_lines_and_baselines(two_variants):
    figure = probe_accuracy_figure(two_variants)
    assert isinstance(figure, go.Figure)
    solid = {t.name: t for t in figure.data if t.line.dash == "solid"}
    assert list(solid) == ["zeta", "alpha"]
    np.testing.assert_allclose(solid["alpha"].y, [0.1, 0.4, 0.7])
    np.testing.assert_allclose(solid["alpha"].error_y.array, [0.1, 0.1, 0.1])
    dashed = [t for t in figure.data if t.line.dash not in ("solid", "dot")]
    assert sorted(t.name for t in dashed) == ["alpha (control task)", "alpha (random_init)",
                                              "zeta (control task)", "zeta (random_init)"]
    for trace in dashed:
        assert trace.line.color == solid[trace.legendgroup].line.color
    assert solid["zeta"].line.color != solid["alpha"].line.color
    chance = [t for t in figure.data if t.line.dash == "dot"]
    assert [(t.name, t.line.color) for t in chance] == [("chance", "grey")]
    assert list(figure.layout.xaxis.ticktext) == ["embed", "blocks.0.hook_resid_mid", "blocks.0.hook_resid_post"]
    assert list(figure.layout.xaxis.tickvals) == [0.0, 0.5, 1.0]
    assert tuple(figure.layout.yaxis.range) == (0, 1)
    assert figure.layout.title.text and figure.layout.yaxis.title.text == "accuracy"


def test_probe_accuracy_figure_other_metric_has_free_y_range(two_variants):
    figure = probe_accuracy_figure(two_variants, metric="mad")
    assert figure.layout.yaxis.range is None
    assert [t.name for t in figure.data] == ["zeta", "alpha"]


def test_json_tables_are_strict_json_and_keep_infinities(tmp_path):
    table = pd.DataFrame({"name": ["a", "b", "c", "d"], "value": [1.5, float("inf"), float("-inf"), float("nan")]})
    path = export_table(table, tmp_path / "t.json")
    rows = json.loads(path.read_text(), parse_constant=lambda constant: pytest.fail(f"non-strict {constant}"))["data"]
    assert [row["value"] for row in rows] == [1.5, "Infinity", "-Infinity", None]
    pd.testing.assert_frame_equal(read_table(path), table)


def test_figure_pages_of_a_folder_share_one_plotly_js_kept_current(tmp_path):
    from poslens.analyses.figures import write_figure

    stale = tmp_path / "plotly.min.js"
    stale.write_text("/* plotly.js v0.0.1, left by an older plotly */")
    figure = go.Figure(go.Bar(x=[1, 2], y=[3, 4]))
    pages = [write_figure(figure, tmp_path / f"{name}.html") for name in ("a", "b")]
    assert all('src="plotly.min.js"' in page.read_text() and page.stat().st_size < 100_000 for page in pages)
    assert stale.read_text() == plotly.offline.get_plotlyjs()  # replaced by this plotly's own
    written = stale.stat().st_mtime_ns
    write_figure(figure, tmp_path / "c.html")
    assert stale.stat().st_mtime_ns == written  # a current copy is not written again
    alone = write_figure(figure, tmp_path / "alone" / "d.html", standalone=True)
    assert "<script src=" not in alone.read_text() and alone.stat().st_size > 1_000_000
    assert not (tmp_path / "alone" / "plotly.min.js").exists()
