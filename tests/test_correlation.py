import numpy as np
import plotly.graph_objects as go
import pytest
import torch

from poslens.analyses.figures.correlation import correlation_heatmap
from poslens.analyses.measures.correlation import (
    block_contrast,
    block_diagonality,
    block_means,
    block_scores,
    full_correlation,
    position_correlation,
)


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def block_structured(n_examples=2000, n_pos=4, d_model=5, noise=0.3, seed=0):
    """Each position's dims share one latent; different positions' latents are independent."""
    latent = randn(n_examples, n_pos, 1, seed=seed)
    return latent + noise * randn(n_examples, n_pos, d_model, seed=seed + 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_full_correlation_is_numpy_corrcoef_with_constant_features_zeroed(dtype):
    acts = randn(200, 3, 4, seed=1, dtype=dtype)
    acts[:, 1, 2] = 0.1  # a constant feature: its correlation is undefined, reported as 0
    full = full_correlation(acts)
    assert full.shape == (12, 12) and full.dtype == torch.float64 and not full.isnan().any()
    constant = 1 * 4 + 2
    assert torch.equal(full[constant], torch.zeros(12, dtype=torch.float64))
    assert torch.equal(full[:, constant], torch.zeros(12, dtype=torch.float64))
    keep = [index for index in range(12) if index != constant]
    with np.errstate(invalid="ignore"):  # numpy gives NaN for the constant feature
        expected = np.abs(np.corrcoef(acts.reshape(200, 12).double().numpy(), rowvar=False))[np.ix_(keep, keep)]
    np.testing.assert_allclose(full[keep][:, keep].numpy(), expected, rtol=0, atol=1e-12)
    assert full.max() <= 1 + 1e-12 and full.min() >= 0


def test_full_correlation_is_position_major():
    acts = randn(500, 3, 2, seed=2)
    acts[:, 2, 1] = -3 * acts[:, 0, 0] + 1  # feature (pos 2, dim 1) = row 2 * 2 + 1 = 5 tracks feature 0
    full = full_correlation(acts)
    assert full[0, 5] == pytest.approx(1, abs=1e-12) and full[5, 0] == pytest.approx(1, abs=1e-12)
    assert full[1, 5] < 0.2 and full[0, 4] < 0.2


def test_position_correlation_on_a_shared_latent():
    n, d = 3000, 6
    shared = randn(n, d, seed=3)
    acts = randn(n, 4, d, seed=4) * 0.5
    acts[:, 0] += shared  # positions 0 and 2 share a latent per dimension, 1 and 3 are independent noise
    acts[:, 2] += shared
    corr = position_correlation(acts)
    assert corr.shape == (4, 4) and not corr.isnan().any()
    assert torch.allclose(corr, corr.T, atol=1e-12)
    assert torch.allclose(corr.diagonal(), torch.ones(4, dtype=corr.dtype), atol=1e-12)
    assert corr[0, 2] == pytest.approx(1 / 1.25, abs=0.03)  # var 1 shared, var 0.25 private
    off = corr[[0, 0, 1, 1, 2], [1, 3, 2, 3, 3]]
    assert off.max() < 4 / n**0.5  # independent: |corr| of order 1/sqrt(n)


def test_position_correlation_is_the_mean_same_dim_entry_of_full():
    acts = randn(100, 3, 4, seed=5)
    acts[:, 1] += acts[:, 0]
    full, corr = full_correlation(acts), position_correlation(acts)
    for p in range(3):
        for q in range(3):
            block = full[p * 4 : (p + 1) * 4, q * 4 : (q + 1) * 4]
            assert corr[p, q] == pytest.approx(float(block.diagonal().mean()), abs=1e-12)


def test_block_diagonality_is_one_for_independent_positions():
    d = 5
    score = block_diagonality(full_correlation(block_structured(d_model=d)), d)
    assert 0.9 < score <= 1
    # and mixing the positions destroys it
    acts = block_structured(d_model=d)
    acts[:, 1:] += acts[:, :1]
    assert block_diagonality(full_correlation(acts), d) < 0.7


def test_block_diagonality_of_noise_is_the_uniform_share():
    n_pos, d = 4, 6
    score = block_diagonality(full_correlation(randn(4000, n_pos, d, seed=6)), d)
    assert score == pytest.approx((d - 1) / (n_pos * d - 1), abs=0.03)  # 5/23 = 0.217, not 1/n_pos or 1


def test_block_diagonality_ignores_the_diagonal():
    # identity "correlation": no off-diagonal mass at all
    assert np.isnan(block_diagonality(torch.eye(6, dtype=torch.float64), 3))
    full = torch.eye(6, dtype=torch.float64)
    full[0, 1] = full[1, 0] = 0.5  # in block 0
    full[0, 3] = full[3, 0] = 0.5  # across blocks
    assert block_diagonality(full, 3) == pytest.approx(0.5)


def test_shape_errors_name_the_shape():
    for bad in (torch.zeros(5, 4), torch.zeros(1, 3, 4), torch.zeros(2, 3, 4, 1)):
        for function in (full_correlation, position_correlation):
            with pytest.raises(ValueError,
                               match=rf"got shape {tuple(bad.shape)}".replace("(", r"\(").replace(")", r"\)")):
                function(bad)
    with pytest.raises(ValueError, match=r"d_model=4, got shape \(12, 10\)"):
        block_diagonality(torch.zeros(12, 10), 4)
    with pytest.raises(ValueError, match=r"d_model=5, got shape \(12, 12\)"):
        block_diagonality(torch.zeros(12, 12), 5)
    with pytest.raises(ValueError, match=r"got shape \(2, 6, 6\)"):
        block_diagonality(torch.zeros(2, 6, 6), 3)


def test_block_diagonality_rejects_a_bad_d_model():
    full = full_correlation(randn(50, 3, 4, seed=7))
    for d_model in (0, -4):
        with pytest.raises(ValueError, match="d_model"):
            block_diagonality(full, d_model)
    with pytest.raises(ValueError, match=r"got shape \(\)"):
        block_diagonality(torch.tensor(1.0), 1)


def test_correlation_heatmap():
    full = full_correlation(randn(100, 3, 4, seed=8))
    figure = correlation_heatmap(full, "embed", tick_every=4)
    assert isinstance(figure, go.Figure)
    heatmap = figure.data[0]
    z = np.asarray(heatmap.z)
    assert z.shape == (12, 12) and np.nanmin(z) >= 0 and np.nanmax(z) <= 1 + 1e-6 and not np.isnan(z).any()
    assert (heatmap.zmin, heatmap.zmax) == (0, 1)
    assert figure.layout.title.text == "embed"
    assert list(figure.layout.xaxis.tickvals) == [0, 4, 8] and list(figure.layout.xaxis.ticktext) == ["0", "1", "2"]
    assert figure.layout.yaxis.autorange == "reversed"


# block scores against their null --------------------------------------------------------------------------------------

def planted(n_examples, rho=0.2, n_pos=6, d_model=8, seed=0):
    """A block-diagonal truth: each position's dims share a latent with correlation `rho`, positions independent."""
    latent = randn(n_examples, n_pos, 1, seed=seed, dtype=torch.float64)
    return rho**0.5 * latent + (1 - rho) ** 0.5 * randn(n_examples, n_pos, d_model, seed=seed + 1, dtype=torch.float64)


def test_block_means_are_the_block_averages_of_full():
    acts = randn(300, 3, 4, seed=9)
    full = full_correlation(acts)
    means = block_means(full, 4)
    assert means.shape == (3, 3)
    for p in range(3):
        for q in range(3):
            block = full[p * 4 : (p + 1) * 4, q * 4 : (q + 1) * 4]
            expected = (block.sum() - block.diagonal().sum()) / 12 if p == q else block.mean()
            assert means[p, q] == pytest.approx(float(expected), abs=1e-12)
    assert block_contrast(full, 4) == pytest.approx(float(means.diagonal().mean() - means[~torch.eye(3).bool()].mean()))


def test_block_scores_of_pure_noise_are_zero_after_the_null():
    for n in (500, 4000):
        scores = block_scores(randn(n, 6, 8, seed=n, dtype=torch.float64), seed=1).set_index("score")
        for score in ("contrast", "share"):
            assert abs(scores.loc[score, "z"]) < 3, (n, score)
            assert abs(scores.loc[score, "excess"]) < 4 * scores.loc[score, "null_sd"], (n, score)
        assert abs(scores.loc["contrast", "value"]) < 0.01  # the contrast itself is ~0: noise lifts both kinds alike
        assert scores.loc["share", "null_mean"] == pytest.approx(7 / 47, abs=0.01)  # (d-1)/(P d - 1)


def test_a_planted_block_structure_scores_clearly_and_its_contrast_hardly_depends_on_n():
    small, large = (block_scores(planted(n)).set_index("score") for n in (1000, 8000))
    for scores in (small, large):
        assert scores.loc["contrast", "z"] > 20 and scores.loc["share", "z"] > 20
        assert scores.loc["contrast", "excess"] > 0.15
    # the contrast is rho - sqrt(2 / (pi n)): 0.175 at n = 1,000 and 0.191 at n = 8,000; the share moves far more
    for scores, n in ((small, 1000), (large, 8000)):
        assert scores.loc["contrast", "value"] == pytest.approx(0.2 - (2 / (np.pi * n)) ** 0.5, abs=0.01)
    assert abs(large.loc["contrast", "excess"] - small.loc["contrast", "excess"]) < 0.03
    assert large.loc["share", "excess"] - small.loc["share", "excess"] > 0.1


def test_block_scores_are_blind_to_per_position_offsets_and_scales():
    # the documented limit: correlation across examples cannot see anything constant across examples
    acts = planted(500)
    shifted = acts * torch.linspace(0.5, 3, 6)[None, :, None] + torch.arange(6.0)[None, :, None] * 10
    before, after = block_scores(acts, n_shuffles=3), block_scores(shifted, n_shuffles=3)
    assert np.allclose(before["value"], after["value"], atol=1e-12)


def test_block_scores_need_a_null_with_a_spread():
    with pytest.raises(ValueError, match="n_shuffles must be an integer >= 2"):
        block_scores(randn(10, 2, 3), n_shuffles=1)


def test_heatmap_of_the_scored_matrix_can_scale_to_its_maximum():
    means = block_means(full_correlation(planted(200)), 8)
    figure = correlation_heatmap(means, "blocks", zmax=None)
    assert figure.data[0].zmax == pytest.approx(float(means.max())) and figure.data[0].zmin == 0
    assert figure.layout.xaxis.title.text == "position"
