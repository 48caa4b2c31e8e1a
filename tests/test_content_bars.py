"""The bars for "position beyond content" on planted inputs: bag-of-prefix, the shift probe and the symmetry grid."""

import pytest
import torch

from poslens.analyses.measures.construction import swap_is_token_swap
from poslens.analyses.measures.shift import SHIFT_COLUMNS, shift_probe
from poslens.analyses.measures.symmetry import SYMMETRY_COLUMNS, symmetry_twins
from poslens.hooks import hook_name
from poslens.probes import bag_of_prefix_features, bag_of_prefix_predictions, split_by_sequence
from poslens.tasks import Addition
from poslens.variants import build, variant_config


def test_bag_of_prefix_features_are_the_token_and_its_prefix_shares():
    tokens = torch.tensor([[3, 5, 3, 3], [5, 5, 5, 5]])
    features = bag_of_prefix_features(tokens)
    assert features.shape == (2, 4, 4)  # two types: one-hot (2) and shares (2)
    assert torch.equal(features[0, :, :2], torch.tensor([[1.0, 0], [0, 1], [1, 0], [1, 0]]))
    assert features[0, 3, 2:].tolist() == pytest.approx([0.75, 0.25])
    assert torch.allclose(features[..., 2:].sum(-1), torch.ones(2, 4))  # shares, not counts: no position in their sum
    with pytest.raises(ValueError,
                       match=r"token_ids must be a non-empty \[sequence, position\] array, got shape \(4,\)"):
        bag_of_prefix_features(torch.tensor([1, 2, 3, 4]))


def test_bag_of_prefix_reads_position_where_a_token_of_known_count_is_in_the_prefix_and_not_otherwise():
    """Known effect: in `ddd+ddd=` the share of `+` is 1/(t + 1) after it, so every later position
    is read exactly. Null: sequences of one repeated token have the same shares everywhere."""
    task = Addition()
    tokens = task.sample_test(400, seed=0)[:, : task.prompt_len]
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    train, test = split_by_sequence(len(tokens), seed=0)
    predicted = bag_of_prefix_predictions(tokens, positions, train, test).view(len(test), -1)
    assert (predicted[:, 3:] == positions[test][:, 3:]).double().mean() > 0.97
    repeated = torch.full((400, 8), 7)
    flat = bag_of_prefix_predictions(repeated, positions, train, test)
    assert (flat == positions[test].flatten()).double().mean() == pytest.approx(1 / 8)


def test_shift_probe_finds_no_shift_in_a_nope_embedding_and_finds_it_after_causal_attention(tiny_sizes):
    """Null: a NoPE embedding holds token identity only, which says nothing about the shift on an
    operand token (chance). Known effect: one causal attention layer averages over the prefix,
    fillers included."""
    task = Addition(max_shift=4)
    model = build(variant_config("nope-causal", task=task, n_layers=2, seed=0, **tiny_sizes)).eval()
    table = shift_probe(model, task, n_sequences=200, seed=0)
    assert list(table.columns) == list(SHIFT_COLUMNS)
    wide = table.pivot(index="site", columns="baseline", values="value")
    assert abs(wide.loc["embed", "trained"] - wide.loc["embed", "chance"]) < 0.1
    assert abs(wide.loc["embed", "token_identity"] - wide.loc["embed", "chance"]) < 0.1
    assert wide.loc["blocks.0.hook_resid_post", "trained"] > wide.loc["embed", "chance"] + 0.15
    assert wide["random_init"].equals(wide["trained"])  # an untrained model is its own twin
    with pytest.raises(ValueError, match="shift_probe needs a shifted-format task"):
        shift_probe(model, Addition(), n_sequences=20)


def test_symmetry_grid_follows_the_theorem(tiny_sizes):
    table = symmetry_twins(Addition(), sizes=tiny_sizes, seed=1, n_sequences=8, n_perms=3)
    assert list(table.columns) == list(SYMMETRY_COLUMNS) and len(table) == 4 * 2 * 2
    invariant = table.set_index(["encoding", "attention", "n_layers"])["invariant"]
    expected = {key for key in invariant.index if key[0] == "nope" and (key[1] == "bidirectional" or key[2] == 1)}
    assert {key for key, value in invariant.items() if value} == expected


@pytest.mark.parametrize("name, follows", [("nope-causal", True), ("rotary-causal", True),
                                           ("learned-causal", False), ("sinusoidal-bidirectional", False)])
def test_a_swap_at_an_embedding_without_positions_is_a_token_swap(tiny, name, follows):
    model = build(tiny(name, dtype=torch.float64)).eval()
    assert swap_is_token_swap(model.cfg, "embed") is follows
    assert not swap_is_token_swap(model.cfg, "blocks.0.hook_resid_mid")
    tokens = Addition().sample_test(6, seed=0)[:, :8]
    swapped = tokens[:, [2, 1, 0, *range(3, 8)]]

    def exchange(value, hook):
        return value[:, [2, 1, 0, *range(3, value.shape[1])]]

    with model.hooks(fwd_hooks=[(hook_name("embed"), exchange)]):
        patched = model(tokens)
    assert torch.allclose(patched, model(swapped), atol=1e-10) is follows
