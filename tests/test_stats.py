"""The statistics and the verdict rule on synthetic tables, including "inconclusive" at small n."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from poslens.analyses.stats import (
    CLAIM_COLUMNS,
    against_null,
    claim_row,
    compare,
    exact_check,
    fisher_learned,
    fisher_seeds_needed,
    min_fisher_p,
    min_permutation_p,
    min_sign_flip_p,
    one_sample,
    verdict,
)


def test_three_seeds_per_arm_cannot_reach_five_percent():
    assert min_fisher_p(3, 3) == pytest.approx(0.1)  # 2 / C(6, 3)
    assert min_fisher_p(4, 4) == pytest.approx(2 / 70)
    assert fisher_seeds_needed() == 4 and fisher_seeds_needed(0.01) == 5  # 2 / C(10, 5) = 0.0079
    assert min_permutation_p(3, 3) == pytest.approx(0.1) and min_sign_flip_p(3) == 0.25 and min_sign_flip_p(6) < 0.05


@pytest.mark.parametrize("learned_a, n_a, learned_b, n_b, direction, expected", [
    (3, 3, 0, 3, +1, "inconclusive"),   # the most extreme table at 3 seeds: p = 0.1
    (4, 4, 0, 4, +1, "supported"),      # p = 0.029
    (5, 5, 0, 5, +1, "supported"),
    (0, 5, 5, 5, +1, "contradicted"),   # the claimed arm is the one that fails
    (5, 5, 0, 5, -1, "contradicted"),
    (3, 5, 2, 5, +1, "inconclusive"),
    (5, 5, 0, 5, 0, "supported"),
])
def test_fisher_verdicts(learned_a, n_a, learned_b, n_b, direction, expected):
    result = fisher_learned(learned_a, n_a, learned_b, n_b)
    table = [[learned_a, n_a - learned_a], [learned_b, n_b - learned_b]]
    assert result.p == pytest.approx(stats.fisher_exact(table).pvalue)
    assert result.value == pytest.approx(learned_a / n_a - learned_b / n_b)
    assert result.n == f"{n_a} vs {n_b}" and result.n_needed == 4
    assert verdict(result, direction) == expected


def test_permutation_comparison_is_inconclusive_at_three_seeds_and_conclusive_at_five():
    high, low = [0.90, 0.92, 0.95], [0.10, 0.20, 0.15]
    result = compare(high, low)
    assert result.p == pytest.approx(0.1) and result.min_p == pytest.approx(0.1) and result.n_needed == 4
    assert result.value == pytest.approx(np.mean(high) - np.mean(low))
    assert result.ci_low <= result.value <= result.ci_high
    assert verdict(result, +1) == "inconclusive"
    five_high, five_low = high + [0.91, 0.93], low + [0.12, 0.18]
    assert verdict(compare(five_high, five_low), +1) == "supported"
    assert verdict(compare(five_low, five_high), +1) == "contradicted"
    assert compare(high, low, seed=3) == compare(high, low, seed=3)  # seeded


def test_welch_and_t_verdicts():
    rng = np.random.default_rng(0)
    a, b = 0.8 + 0.02 * rng.standard_normal(5), 0.5 + 0.02 * rng.standard_normal(5)
    result = compare(a, b, method="welch")
    expected = stats.ttest_ind(a, b, equal_var=False)
    assert result.p == pytest.approx(expected.pvalue) and result.ci_low < result.value < result.ci_high
    assert verdict(result, +1) == "supported" and verdict(compare(b, a, method="welch"), +1) == "contradicted"
    overlapping = compare(a, a + 0.01 * rng.standard_normal(5), method="welch")
    assert verdict(overlapping, +1) == "inconclusive" and verdict(overlapping, 0) == "inconclusive"
    # one sample against a bar: probe accuracy minus the token-identity bar over 3 seeds
    excess = one_sample([0.31, 0.29, 0.33], bar=0.0)
    assert excess.n == "3" and excess.value == pytest.approx(0.31) and verdict(excess, +1) == "supported"
    assert verdict(one_sample([0.31, 0.29, 0.33], bar=0.5), +1) == "contradicted"
    assert verdict(one_sample([0.01, -0.02, 0.02]), +1) == "inconclusive"
    flips = one_sample([0.31, 0.29, 0.33], method="sign_flip")
    assert flips.p == pytest.approx(0.25) and flips.n_needed == 6 and verdict(flips, +1) == "inconclusive"


def test_a_confidence_interval_spanning_no_effect_is_inconclusive():
    result = compare([1, 2, 3], [4, 5, 7], method="welch")  # p = 0.042, CI excludes 0
    assert verdict(result, -1) == "supported"
    straddling = result.__class__(**{**result.__dict__, "ci_high": 0.5})
    assert verdict(straddling, -1) == "inconclusive"
    nan_p = result.__class__(**{**result.__dict__, "p": math.nan})
    assert verdict(nan_p, -1) == "inconclusive"


def test_exact_checks_and_claim_rows():
    holds = exact_check("max |Δ logit| ≤ 1e-5", 3e-7, True, n=4)
    assert verdict(holds, +1) == "supported" and verdict(exact_check("x", 0.2, False, 4), +1) == "contradicted"
    rows = pd.DataFrame([claim_row("invariance", holds, +1),
                         claim_row("NoPE-causal learns, NoPE-bidirectional does not", fisher_learned(3, 3, 0, 3), +1)])
    assert list(rows.columns) == list(CLAIM_COLUMNS)
    assert list(rows["verdict"]) == ["supported", "inconclusive"]
    assert "at least 4 seeds per arm" in rows["rule"].iloc[1] and "p <= 0.05" in rows["rule"].iloc[1]
    assert rows["rule"].iloc[0].startswith("exact check")


def test_against_null():
    row = against_null(1.0, [0.0, 0.2, -0.2, 0.0])
    assert row["null_mean"] == 0 and row["null_sd"] == pytest.approx(np.std([0, 0.2, -0.2, 0], ddof=1))
    assert row["z"] == pytest.approx(1.0 / row["null_sd"]) and row["excess"] == 1.0
    assert math.isnan(against_null(1.0, [0.5, 0.5])["z"])


@pytest.mark.parametrize("bad, message", [
    (lambda: fisher_learned(4, 3, 0, 3), r"arm a: need 0 <= seeds reaching the criterion <= seeds >= 1, got 4 of 3"),
    (lambda: compare([1.0], [2.0, 3.0]), r"a must be at least 2 finite numbers"),
    (lambda: compare([1.0, 2.0], [2.0, 3.0], method="mann"), r"unknown method 'mann'; allowed: \['permutation', 'welch'\]"),
    (lambda: one_sample([1.0, float("nan")]), "values must be at least 2 finite numbers"),
    (lambda: verdict(exact_check("x", 0, True, 1), 2), r"direction must be \+1, -1 or 0, got 2"),
    (lambda: against_null(0.0, [1.0]), "a null needs at least 2 draws"),
])
def test_bad_input_is_named(bad, message):
    with pytest.raises(ValueError, match=message):
        bad()
