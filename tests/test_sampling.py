"""Analysis samples are unbiased: every operand digit is close to uniform in what analyses draw.

The rule: a chi-square goodness-of-fit test of the ten digit counts at each operand position
against uniform must give p > 0.001 (scipy.stats.chisquare). The first rows of the sorted
test set, which analyses used to take, fail it at once (their first operand is always small).
"""

import pytest
import torch
from scipy.stats import chisquare

from poslens.analyses.measures.patching import patching_sample
from poslens.tasks import Addition

P_MIN = 1e-3


def digit_p_values(task: Addition, tokens: torch.Tensor) -> dict[str, float]:
    """Chi-square p-value of uniform digits at each operand position, by role."""
    return {task.roles[position]: float(chisquare(torch.bincount(tokens[:, position], minlength=10).numpy()).pvalue)
            for position in task.operand_positions}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_patching_sample_has_uniform_operand_digits(addition, seed):
    clean, corrupted = patching_sample(addition, n_sequences=64, seed=seed)  # activation_patching's prompts
    assert len(clean) == 64
    for sample in (clean, corrupted):
        p_values = digit_p_values(addition, sample)
        assert min(p_values.values()) > P_MIN, p_values


@pytest.mark.parametrize("n", [64, 256, 500])
def test_held_out_samples_have_uniform_operand_digits(addition, n):
    # the draws of position_swap (4 x 64), residual_cut_effects (500), invariance and the demo's probe
    for seed in (0, 7):
        p_values = digit_p_values(addition, addition.sample_test(n, seed))
        assert min(p_values.values()) > P_MIN, (n, seed, p_values)


def test_the_first_rows_of_the_sorted_test_set_fail_the_check(addition):
    p_values = digit_p_values(addition, addition.test_set()[:64])
    assert p_values["x2"] < 1e-10  # all 64 have a < 100: x2 = 0


def test_sample_test_draws_without_replacement_and_depends_on_the_seed():
    task = Addition(n_digits=2, n_test=50)
    full = task.test_set()
    sample = task.sample_test(20, seed=3)
    rows = {tuple(row) for row in full.tolist()}
    assert sample.shape == (20, task.seq_len) and len({tuple(r) for r in sample.tolist()}) == 20
    assert {tuple(r) for r in sample.tolist()} <= rows
    assert torch.equal(task.sample_test(20, seed=3), sample)
    assert not torch.equal(task.sample_test(20, seed=4), sample)
    assert {tuple(r) for r in task.sample_test(50, seed=0).tolist()} == rows
    for bad in (0, 51, 2.5, True):
        with pytest.raises(ValueError, match=rf"sample size n must be an integer in 1..50 \(the held-out set\), "
                                             rf"got {bad!r}"):
            task.sample_test(bad, seed=0)
