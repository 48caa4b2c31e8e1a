"""Patching in both directions (`analyses.measures.patching_directions`) on planted signals, and the
BCa interval it reports (`analyses.stats.bootstrap_mean_interval`)."""

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from poslens.analyses.measures.patching import patching_sample
from poslens.analyses.measures.patching_directions import (
    GAP_FLOOR,
    MIN_INTERVAL_PROMPTS,
    PATCHING_EFFECT_COLUMNS,
    guard_prompts,
    patching_effects,
)
from poslens.analyses.stats import bootstrap_mean_interval
from poslens.variants import build, load

DIGITS = ["s0", "s1", "s2", "s3"]
N = 16


def cells(table, **where):
    rows = table
    for column, wanted in where.items():
        rows = rows[rows[column] == wanted]
    return rows


@pytest.fixture(scope="module")
def planted(tiny, addition):
    """A 2-block NoPE-causal model whose answers provably depend on one cell per layer: block 0's
    attention reads only position 0 (its pattern set by a permanent hook), block 1's attention
    writes nothing. So the first answer digit, read at position 7 ('=', the same in both runs),
    sees the swapped digit at position 0 through block 0 only: (resid_pre, 0, 0) carries all of
    the difference, and at block 1 only the readout's own stream (resid_pre, 1, 7) does."""
    model = build(tiny("nope-causal", dtype=torch.float64, init_std=0.5)).eval()

    def attend_to_position_0(pattern, hook):
        only = torch.zeros_like(pattern)
        only[..., 0] = 1.0
        return only

    model.add_hook("blocks.0.attn.hook_pattern", attend_to_position_0, is_permanent=True)
    with torch.no_grad():
        model.blocks[1].attn.W_O.zero_()
    return model


@pytest.fixture(scope="module")
def planted_table(planted, addition):
    return patching_effects(planted, addition, corruptions=["swap"], n_sequences=N, n_resamples=200)


def test_planted_cell_restores_and_destroys_everything_and_nothing_else_moves(planted_table):
    first = cells(planted_table, digit="s0", site="resid_pre")
    assert first["n_prompts"].iloc[0] >= N // 2  # random weights: most prompts have a clear gap
    for direction in ("denoise", "noise"):
        rows = cells(first, direction=direction).set_index(["layer", "position"])
        for (layer, position), row in rows.iterrows():
            expected = 1.0 if (layer, position) in ((0, 0), (1, 7)) else 0.0
            assert row["value"] == pytest.approx(expected, abs=1e-4), (direction, layer, position)
            assert row["ci_low"] == pytest.approx(expected, abs=1e-4) and row["ci_high"] == pytest.approx(expected,
                                                                                                         abs=1e-4)
    # at block 1 every digit depends on its own readout's stream alone
    for k, digit in enumerate(DIGITS):
        rows = cells(planted_table, digit=digit, layer=1)
        rows = rows[rows["n_prompts"] > 0]
        assert len(rows), digit
        on = rows["position"] == 7 + k
        assert np.allclose(rows.loc[on, "value"], 1.0, atol=1e-4) and np.allclose(rows.loc[~on, "value"], 0, atol=1e-4)
    # the swapped digit at position 2 is never read: nothing moves there
    assert np.allclose(cells(first, position=2)["value"], 0.0)


def test_schema_is_stable_and_every_answer_digit_is_read(planted_table, planted, addition):
    assert list(planted_table.columns) == list(PATCHING_EFFECT_COLUMNS)
    n_pos = addition.seq_len - 1
    assert len(planted_table) == 2 * 1 * 4 * 1 * planted.cfg.n_layers * n_pos
    assert list(pd.unique(planted_table["direction"])) == ["denoise", "noise"]
    assert list(pd.unique(planted_table["digit"])) == DIGITS  # the carry s3 included
    assert list(planted_table["role"]) == [addition.roles[p] for p in planted_table["position"]]
    counts = planted_table.groupby("digit")[["n_prompts", "n_excluded", "n_unchanged"]].first().sum(axis=1)
    assert (counts == N).all()  # every prompt is kept, excluded or unchanged, per digit
    # causal: a position after the digit's readout is never read, fixed at 0
    later = planted_table["position"] > 7 + planted_table["digit"].str[1].astype(int)
    assert planted_table.loc[later, "fixed_by_construction"].all()
    assert (planted_table.loc[later & (planted_table["n_prompts"] > 0), "value"] == 0).all()


@pytest.fixture(scope="module")
def trained(trained_runs):
    return load(trained_runs[("nope-causal", 2)])


@pytest.fixture(scope="module")
def trained_table(trained, addition):
    return patching_effects(trained, addition, n_sequences=N, n_resamples=300, seed=3)


def test_same_seed_same_table_and_the_interval_covers_the_mean(trained_table, trained, addition):
    again = patching_effects(trained, addition, n_sequences=N, n_resamples=300, seed=3)
    pd.testing.assert_frame_equal(trained_table, again)
    assert set(trained_table["corruption"]) == {"swap", "permute"}
    defined = trained_table[trained_table["n_prompts"] >= MIN_INTERVAL_PROMPTS]
    assert len(defined) and (defined["ci_low"] <= defined["value"] + 1e-12).all()
    assert (defined["value"] <= defined["ci_high"] + 1e-12).all()
    few = patching_effects(trained, addition, corruptions=["swap"], directions=["denoise"], n_sequences=4,
                           n_resamples=50)  # fewer kept prompts than an interval needs: none given
    assert few["n_prompts"].max() < MIN_INTERVAL_PROMPTS and few["ci_low"].isna().all() and few["ci_high"].isna().all()
    assert few.loc[few["n_prompts"] > 0, "value"].notna().all()
    free = defined[~defined["fixed_by_construction"]]
    assert (free["ci_high"] - free["ci_low"] > 0).any()
    fixed = trained_table[trained_table["fixed_by_construction"] & trained_table["value"].notna()]
    assert ((fixed["value"].abs() < 1e-3) | ((fixed["value"] - 1).abs() < 1e-3)).all()


@torch.no_grad()
def test_values_are_per_prompt_normalised_patches_made_by_hand(trained_table, trained, addition):
    clean, corrupted = patching_sample(addition, kind="swap", n_sequences=N, seed=3)
    start, k, layer, position = addition.prompt_len, 1, 1, 2  # digit s1, read at position 8
    rows, good, bad = torch.arange(len(clean)), clean[:, start + k], corrupted[:, start + k]
    name = f"blocks.{layer}.hook_resid_pre"

    def ld(tokens, source=None):
        hooks = []
        if source is not None:
            _, cache = trained.run_with_cache(source[:, :-1], names_filter=name)

            def patch(activation, hook):
                activation[:, position] = cache[name][:, position]
                return activation

            hooks = [(name, patch)]
        with trained.hooks(fwd_hooks=hooks):
            read = trained(tokens[:, :-1])[:, start - 1 + k]
        return read[rows, good] - read[rows, bad]

    clean_ld, corrupted_ld = ld(clean), ld(corrupted)
    gap = clean_ld - corrupted_ld
    changed = good != bad
    keep = changed & (gap.abs() > max(0.1 * float(gap.abs()[changed].median()), GAP_FLOOR))
    restored = ((ld(corrupted, clean) - corrupted_ld) / gap)[keep].mean()
    destroyed = ((clean_ld - ld(clean, corrupted)) / gap)[keep].mean()
    for direction, expected in (("denoise", restored), ("noise", destroyed)):
        row = cells(trained_table, direction=direction, corruption="swap", digit="s1", site="resid_pre", layer=layer,
                    position=position)
        assert len(row) == 1
        assert float(row["value"].iloc[0]) == pytest.approx(float(expected), abs=1e-4), direction
        assert int(row["n_prompts"].iloc[0]) == int(keep.sum())
        assert int(row["n_unchanged"].iloc[0]) == int((~changed).sum())


def test_a_model_that_cannot_tell_the_prompts_apart_is_excluded_and_counted(tiny, addition):
    # NoPE-bidirectional at the first digit (input: the prompt alone, as greedy decoding sees it) is permutation
    # invariant: clean and corrupted logits agree to float rounding, so every prompt falls under the guard
    model = build(tiny("nope-bidirectional", init_std=0.5)).eval()
    table = patching_effects(model, addition, n_sequences=8, n_resamples=100)
    first = table[table["digit"] == "s0"]
    assert first["value"].isna().all() and first["ci_low"].isna().all()
    assert (first["n_prompts"] == 0).all() and (first["n_excluded"] == 8).all() and (first["n_unchanged"] == 0).all()
    # later digits see answer digits that differ: defined, and positions the digit's input lacks are fixed at 0
    later = table[(table["digit"] == "s1") & (table["n_prompts"] > 0)]
    assert len(later) and later["value"].notna().all()
    absent = later[later["position"] > 8]
    assert absent["fixed_by_construction"].all() and (absent["value"] == 0).all()


def test_guard_excludes_gaps_small_against_the_median():
    gap = torch.tensor([[1.0], [-1.2], [0.9], [0.05], [0.0], [1e-5], [3.0]])
    changed = torch.tensor([[True], [True], [True], [True], [False], [True], [True]])
    kept = guard_prompts(gap, changed, guard=0.1)  # median |gap| of the changed rows: 0.9
    assert kept[:, 0].tolist() == [True, True, True, False, False, False, True]
    assert guard_prompts(gap * 0, changed)[:, 0].tolist() == [False] * 7  # all rounding: nothing kept
    assert guard_prompts(gap, changed, guard=0.0)[:, 0].tolist() == [True, True, True, True, False, False, True]


def test_bad_arguments_are_one_line_errors(trained, addition):
    with pytest.raises(ValueError, match=r"unknown patching direction 'both'; allowed: \['denoise', 'noise'\]"):
        patching_effects(trained, addition, directions=["both"])
    with pytest.raises(ValueError, match=r"unknown patching corruption 'shuffle'; allowed: \['swap', 'permute'\]"):
        patching_effects(trained, addition, corruptions=["shuffle"])
    with pytest.raises(ValueError, match=r"guard must be a fraction of the median gap in \[0, 1\), got 1.5"):
        patching_effects(trained, addition, guard=1.5)
    with pytest.raises(ValueError, match=r"unknown patching site 'z'"):
        patching_effects(trained, addition, sites=["z"])


# the BCa interval -----------------------------------------------------------------------------------------------------

def test_bca_interval_agrees_with_scipy():
    sample = np.random.default_rng(1).exponential(size=32)
    low, high = bootstrap_mean_interval(sample[None, :], n_resamples=20000, seed=0)
    reference = stats.bootstrap((sample,), np.mean, method="BCa", n_resamples=20000, random_state=0).confidence_interval
    width = reference.high - reference.low
    assert abs(low[0] - reference.low) < 0.03 * width and abs(high[0] - reference.high) < 0.03 * width


@pytest.mark.parametrize("draw, truth", [("normal", 0.0), ("exponential", 1.0)])
def test_bca_interval_covers_the_true_mean_about_95_percent(draw, truth):
    rng = np.random.default_rng(7)
    samples = getattr(rng, draw)(size=(400, 24))
    low, high = bootstrap_mean_interval(samples, n_resamples=1000, seed=2)
    coverage = float(((low <= truth) & (truth <= high)).mean())
    assert 0.89 <= coverage <= 0.98, coverage  # BCa at n = 24: about 0.92-0.94 (skewed data a little below)


def test_bca_interval_degenerate_rows():
    low, high = bootstrap_mean_interval(np.array([[2.0, 2.0, 2.0], [0.0, 1.0, 2.0]]), n_resamples=100)
    assert low[0] == high[0] == 2.0 and low[1] < 1.0 < high[1]
    assert np.isnan(bootstrap_mean_interval(np.ones((2, 1)))[0]).all()
    with pytest.raises(ValueError, match=r"values must be \[rows, n\], got shape \(3,\)"):
        bootstrap_mean_interval(np.ones(3))
