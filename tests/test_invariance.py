"""The symmetry theorem, to float tolerance, on random and on trained weights."""

import pytest
import torch

from poslens.analyses.measures.invariance import TOLERANCE, invariance_table, permutation_test
from poslens.tasks import Addition
from poslens.variants import build, load

PROMPTS = Addition().sample_test(32, seed=0)[:, :8]


def max_delta(model):
    return permutation_test(model, PROMPTS, n_perms=10)["max_abs_delta"].item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name, layers", [("nope-bidirectional", 1), ("nope-bidirectional", 3),
                                          ("nope-causal", 1), ("nope-bidirectional+cut0", 2)])
def test_invariant_variants_with_random_weights(tiny, name, layers, dtype):
    model = build(tiny(name, n_layers=layers, dtype=dtype, init_std=0.2))
    assert max_delta(model) <= TOLERANCE[dtype]


@pytest.mark.parametrize("name, layers", [("nope-causal", 2), ("nope-causal", 3), ("learned-causal", 1),
                                          ("learned-bidirectional", 2), ("sinusoidal-causal", 1),
                                          ("sinusoidal-bidirectional", 2), ("rotary-causal", 1),
                                          ("rotary-bidirectional", 2)])
def test_order_sensitive_variants_with_random_weights(tiny, name, layers):
    model = build(tiny(name, n_layers=layers, dtype=torch.float64))
    assert max_delta(model) >= 100 * TOLERANCE[torch.float64]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_invariance_holds_on_trained_weights(trained_runs, dtype):
    for key in (("nope-bidirectional", 2), ("nope-causal", 1)):
        assert max_delta(load(trained_runs[key], dtype=dtype)) <= TOLERANCE[dtype], key
    for key in (("nope-causal", 2), ("learned-causal", 2)):
        assert max_delta(load(trained_runs[key], dtype=torch.float64)) >= 100 * TOLERANCE[torch.float64], key


def test_invariance_table_labels_rows(trained_runs):
    table = invariance_table(["nope-bidirectional", "nope-causal"], [trained_runs[("nope-causal", 1)]],
                             n_layers=2, n_sequences=16, n_perms=4)
    assert list(table["variant"]) == ["nope-bidirectional", "nope-causal", "nope-causal"]
    assert list(table["invariant"]) == [True, False, True]
    assert table["weights"].iloc[0] == "random" and table["weights"].iloc[2] == str(trained_runs[("nope-causal", 1)])


def test_permutation_test_rejects_bad_input(tiny):
    model = build(tiny("nope-causal"))
    with pytest.raises(ValueError, match="need at least 3 positions"):
        permutation_test(model, PROMPTS[:, :2])
    with pytest.raises(ValueError, match="longer than the model's n_ctx"):
        permutation_test(model, torch.zeros(2, 20, dtype=torch.long))
    with pytest.raises(ValueError, match="give at least one variant or checkpoint"):
        invariance_table()
