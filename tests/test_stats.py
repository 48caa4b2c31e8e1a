"""The statistics on planted signals: one-sided and paired t-tests, TOST, Holm, the interval's
coverage by simulation, the power figure, Fisher's floor and the verdict rule."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from poslens.analyses.stats import (
    SECONDARY,
    against_null,
    exact_check,
    fisher_learned,
    holm,
    min_fisher_p,
    min_permutation_p,
    paired,
    seeds_for_power,
    t_interval,
    t_test,
    tost,
    verdicts,
)


def test_one_sided_t_and_the_test_against_the_claim():
    rng = np.random.default_rng(0)
    up = 0.3 + 0.02 * rng.standard_normal(5)
    result = t_test(up, +1)
    assert result.p == pytest.approx(stats.ttest_1samp(up, 0, alternative="greater").pvalue)
    assert result.p < 1e-4 and result.p_against > 0.99 and result.n == 5
    assert result.ci_low < result.value < result.ci_high and result.sd == pytest.approx(up.std(ddof=1))
    down = t_test(up, -1)  # the same data against a claim of a fall: the test against it fires
    assert down.p > 0.99 and down.p_against < 1e-4
    # a margin: "no rise larger than 0.5" is supported by data at 0.3 ± 0.02
    assert t_test(up, +1, margin=0.5).p_against == pytest.approx(
        stats.ttest_1samp(up - 0.5, 0, alternative="less").pvalue)
    assert t_test(up, +1, margin=0.5).p_against < 1e-4
    flat = t_test([0.2, 0.2, 0.2], +1)  # no spread: nothing to judge
    assert math.isnan(flat.p) and math.isnan(flat.p_against) and flat.value == pytest.approx(0.2)


def test_paired_differences_beat_the_unpaired_floor():
    """Seeds pair the arms: a small, consistent difference on top of a large seed effect."""
    rng = np.random.default_rng(1)
    seed_effect = rng.normal(0, 0.2, 5)
    a = pd.Series(0.5 + seed_effect - 0.03 + 0.003 * rng.standard_normal(5), index=range(5))
    b = pd.Series(0.5 + seed_effect, index=range(5))
    result = paired(a, b, -1)
    assert result.value == pytest.approx((a - b).mean()) and result.p < 0.001
    assert "0.004" in result.test  # the unpaired permutation test's one-sided floor at 5 vs 5: 1/252
    assert stats.ttest_ind(a, b, alternative="less").pvalue > 0.3  # unpaired, the seed effect hides it
    assert min_permutation_p(5, 5) / 2 == pytest.approx(1 / 252)
    shuffled = paired(a.sample(frac=1, random_state=0), b, -1)  # aligned by seed, not by order
    assert shuffled.p == pytest.approx(result.p)


def test_tost_supports_no_effect_larger_than_the_margin_and_nothing_wider():
    rng = np.random.default_rng(2)
    near_zero = 0.002 + 0.01 * rng.standard_normal(8)
    assert tost(near_zero, -0.05, 0.05) < 0.001
    assert tost(near_zero, -0.002, 0.002) > 0.3  # a margin inside the noise cannot be supported
    shifted = near_zero + 0.1
    assert tost(shifted, -0.05, 0.05) > 0.99
    claim = t_test(near_zero, 0, margin=0.05)  # a claim of no effect: supported by TOST
    assert claim.p == pytest.approx(tost(near_zero, -0.05, 0.05))
    with pytest.raises(ValueError, match=r"margin must be >= 0 \(> 0 for a claim of no effect\), got 0"):
        t_test(near_zero, 0)


def test_holm_matches_the_step_down_by_hand():
    p = [0.01, 0.04, 0.03, 0.005, math.nan]
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1, made monotone: 0.02, 0.03, 0.06, 0.06
    assert holm(p)[:4] == pytest.approx([0.03, 0.06, 0.06, 0.02]) and math.isnan(holm(p)[4])
    assert list(holm([0.5, 0.9])) == [1.0, 1.0] and list(holm([0.01, 0.9])) == [0.02, 0.9] and holm([0.3])[0] == 0.3


def test_holm_keeps_the_family_wise_error_under_alpha_on_null_data():
    """20 true nulls, 2000 simulated studies of 5 seeds: at least one false 'supported' in at
    most 5% of studies with Holm, in most of them without."""
    rng = np.random.default_rng(3)
    data = rng.standard_normal((2000, 20, 5))
    p = stats.ttest_1samp(data, 0, axis=-1, alternative="greater").pvalue
    raw = (p <= 0.05).any(axis=1).mean()
    adjusted = np.array([(holm(row) <= 0.05).any() for row in p]).mean()
    assert raw > 0.5 and adjusted <= 0.06


@pytest.mark.parametrize("draw, low", [("normal", 0.94), ("uniform", 0.925)])
def test_the_t_interval_covers_95_percent_at_five_seeds(draw, low):
    """The interval's coverage by simulation (the percentile bootstrap once labelled 95% covered
    about 89% at 5 seeds): 4000 samples of 5 values from a known mean (standard error of the
    coverage 0.0034; light-tailed uniform values cost the t interval about a point)."""
    rng = np.random.default_rng(4)
    samples = rng.standard_normal((4000, 5)) if draw == "normal" else rng.uniform(0.6, 1.0, (4000, 5))
    truth = 0.0 if draw == "normal" else 0.8
    covered = np.mean([low <= truth <= high for low, high in map(t_interval, samples)])
    assert low <= covered <= 0.965, covered


def test_power_figure_against_the_noncentral_t_and_by_simulation():
    assert seeds_for_power(1.0, 1.0, 0.05) == 8  # one-sided, d = 1, 80%: the textbook 8
    assert seeds_for_power(0.5, 1.0, 0.05) == 27
    assert seeds_for_power(1.0, 1.0, 0.05 / 13) > seeds_for_power(1.0, 1.0, 0.05)  # Holm's worst case costs seeds
    assert math.isnan(seeds_for_power(-0.1, 1.0, 0.05)) and math.isnan(seeds_for_power(0.1, 0.0, 0.05))
    rng = np.random.default_rng(5)
    n = int(seeds_for_power(0.8, 1.0, 0.05))
    hits = stats.ttest_1samp(0.8 + rng.standard_normal((4000, n)), 0, axis=-1, alternative="greater").pvalue <= 0.05
    assert 0.78 <= hits.mean() <= 0.86
    hits_fewer = stats.ttest_1samp(0.8 + rng.standard_normal((4000, n - 1)), 0, axis=-1,
                                   alternative="greater").pvalue <= 0.05
    assert hits_fewer.mean() < 0.8


def test_fisher_one_sided_and_its_floor():
    assert min_fisher_p(5, 5) == pytest.approx(1 / 252) and min_fisher_p(3, 3) == pytest.approx(1 / 20)
    result = fisher_learned(5, 5, 0, 5)
    assert result.p == pytest.approx(1 / 252) and result.p_against == 1.0 and result.value == 1.0
    assert "smallest p at 5 vs 5: 0.004" in result.test
    with pytest.raises(ValueError, match=r"arm a: need 0 <= seeds reaching the criterion <= seeds >= 1, got 4 of 3"):
        fisher_learned(4, 3, 0, 3)


def test_verdicts_on_the_adjusted_p():
    rng = np.random.default_rng(6)
    strong = t_test(0.3 + 0.02 * rng.standard_normal(5), +1)
    weak = t_test(np.array([0.01, 0.03, -0.005, 0.02, 0.012]), +1)  # raw p about 0.03: Holm over 3 makes it fail
    opposite = t_test(-0.3 + 0.02 * rng.standard_normal(5), +1)
    found, adjusted, against = verdicts([strong, weak, opposite, exact_check("x", 0, True, 3), None, weak],
                                        [True, True, True, True, True, False])
    assert weak.p < 0.05 and adjusted[1] > 0.05
    assert found == ["supported", "inconclusive", "contradicted", "supported", "inconclusive", SECONDARY]
    assert adjusted[0] == pytest.approx(3 * strong.p) and math.isnan(adjusted[3]) and math.isnan(adjusted[5])
    assert against[2] <= 0.05


def test_against_null():
    row = against_null(1.0, [0.0, 0.2, -0.2, 0.0])
    assert row["null_mean"] == 0 and row["null_sd"] == pytest.approx(np.std([0, 0.2, -0.2, 0], ddof=1))
    assert row["z"] == pytest.approx(1.0 / row["null_sd"]) and row["excess"] == 1.0
    assert math.isnan(against_null(1.0, [0.5, 0.5])["z"])


@pytest.mark.parametrize("bad, message", [
    (lambda: t_test([1.0], +1), r"^mean: 1 value\(s\), the test needs at least 2 \(one per seed\)$"),
    (lambda: t_test([1.0, float("nan")], +1), r"^mean: 1 of 2 values are missing or infinite$"),
    (lambda: t_test([1.0, 2.0], 2), r"^direction must be \+1, -1 or 0, got 2$"),
    (lambda: tost([1.0, 2.0], 1, 0), r"^an equivalence interval needs low < high, got \[1, 0\]$"),
    (lambda: against_null(0.0, [1.0]), "a null needs at least 2 draws"),
])
def test_bad_input_is_named_in_one_line_without_a_repr(bad, message):
    with pytest.raises(ValueError, match=message) as error:
        bad()
    assert "dtype" not in str(error.value) and "array(" not in str(error.value)
