"""Variance by position and cosine adjacency: they find planted signals, nothing in pure noise, and
the published random-init effects (shrinkage and adjacency in causal NoPE, neither bidirectionally)."""

import numpy as np
import pandas as pd
import pytest
import torch

from poslens.analyses.figures.geometry import cosine_figure, variance_figure
from poslens.analyses.measures.geometry import (
    adjacency,
    cosine_by_offset,
    cosine_matrix,
    geometry_scores,
    position_geometry,
    variance_by_position,
    variance_slope,
)
from poslens.hooks import residual_sites
from poslens.variants import build


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def scores(acts, **kwargs):
    return pd.DataFrame(geometry_scores(acts, **kwargs)).set_index("score")


def test_pure_noise_has_neither_signal():
    table = scores(randn(600, 10, 16, seed=1))
    for score in ("variance_slope", "adjacency"):
        assert abs(table.loc[score, "z"]) < 3, score
        assert abs(table.loc[score, "value"]) < 0.03, score


def test_a_planted_variance_shrinkage_is_found():
    t = torch.arange(1, 11, dtype=torch.float64)
    acts = randn(600, 10, 16, seed=2) / t[None, :, None].sqrt()  # variance 1/t
    variance = variance_by_position(acts)
    assert variance.shape == (10,)
    assert variance_slope(variance) == pytest.approx(-1.0, abs=0.05)
    table = scores(acts)
    assert table.loc["variance_slope", "z"] < -10 and abs(table.loc["variance_slope", "null_mean"]) < 0.05
    assert abs(table.loc["adjacency", "z"]) < 3  # scale alone is not similarity
    assert np.isnan(variance_slope(torch.tensor([1.0, 0.0, 2.0])))


def test_a_planted_adjacency_is_found():
    acts = randn(600, 10, 16, seed=3).cumsum(dim=1)  # a random walk: h_t+1 = h_t + noise
    curve = cosine_by_offset(cosine_matrix(acts))
    assert curve.shape == (9,) and (curve.diff() < 0).all()  # similarity falls with the offset
    table = scores(acts)
    assert table.loc["adjacency", "value"] > 0.1 and table.loc["adjacency", "z"] > 10
    assert abs(table.loc["adjacency", "null_mean"]) < 0.02


def test_cosine_matrix_and_adjacency_by_hand():
    acts = randn(5, 4, 3, seed=4)
    unit = acts / acts.norm(dim=-1, keepdim=True)
    expected = torch.einsum("epd,eqd->pq", unit, unit) / 5
    cosines = cosine_matrix(acts)
    assert torch.allclose(cosines, expected) and torch.allclose(cosines.diagonal(), torch.ones(4, dtype=torch.float64))
    adjacent = (cosines[0, 1] + cosines[1, 2] + cosines[2, 3]) / 3
    distant = (cosines[0, 2] + cosines[1, 3] + cosines[0, 3]) / 3
    assert adjacency(cosines) == pytest.approx(float(adjacent - distant))
    assert cosine_by_offset(cosines)[2] == pytest.approx(float(cosines[0, 3]))


def test_random_init_causal_nope_shrinks_and_neighbours_bidirectional_does_neither(tiny, addition):
    prompts = addition.sample_test(300, seed=0)
    found = {}
    for name in ("nope-causal", "nope-bidirectional"):
        tables = position_geometry(build(tiny(name)), prompts, n_shuffles=10)
        found[name] = tables.scores.set_index(["site", "score"])
    causal, bidirectional = found["nope-causal"], found["nope-bidirectional"]
    site = "blocks.0.hook_resid_mid"  # embedding + the first attention output
    assert causal.loc[(site, "variance_slope"), "z"] < -5 and causal.loc[(site, "adjacency"), "z"] > 5
    assert abs(bidirectional.loc[(site, "variance_slope"), "value"]) < 0.05
    assert bidirectional.loc[(site, "adjacency"), "z"] < 3


def test_position_geometry_tables_and_figures(tiny, addition):
    model = build(tiny("nope-causal"))
    prompts = addition.sample_test(40, seed=1)[:, : addition.prompt_len]
    tables = position_geometry(model, prompts, n_shuffles=3)
    sites = residual_sites(model)
    assert list(tables.variance.columns) == ["site", "position", "variance"]
    assert len(tables.variance) == len(sites) * 8 and len(tables.cosine) == len(sites) * 7
    assert list(tables.scores.columns) == ["site", "score", "value", "null_mean", "null_sd", "excess", "z",
                                           "n_examples", "n_shuffles"]
    assert len(tables.scores) == 2 * len(sites)
    figure = variance_figure(tables.variance.assign(variant="v", seed=0))
    assert len(figure.data) == len(sites) and figure.layout.xaxis.type == "log"
    assert list(figure.data[0].x) == list(range(1, 9))
    figure = cosine_figure(tables.cosine)
    assert len(figure.data) == len(sites) and list(figure.data[0].x) == list(range(1, 8))
    with pytest.raises(ValueError,
                       match=r"need activations \[example >= 1, pos >= 3, d_model\], got shape \(4, 2, 3\)"):
        variance_by_position(torch.zeros(4, 2, 3))
    with pytest.raises(ValueError, match="n_shuffles must be an integer >= 2"):
        geometry_scores(randn(4, 5, 3), n_shuffles=1)
