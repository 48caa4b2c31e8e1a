"""Amnesic probing and the probe-subspace swap (`analyses.measures.use`): schema, and planted signals:
a subspace the model uses hurts more than its placebo; a subspace that carries nothing does nothing."""

import pytest
import torch

from poslens.analyses.measures.use import (
    AMNESIC_COLUMNS,
    SUBSPACE_SWAP_COLUMNS,
    amnesic_probing,
    subspace_effects,
    subspace_swap,
)
from poslens.hooks import EMBED


def test_amnesic_table_schema_and_intact_rows(tiny, addition):
    from poslens.variants import build
    table = amnesic_probing(build(tiny("nope-causal")), addition, n_sequences=32, twin=False)
    assert tuple(table.columns) == AMNESIC_COLUMNS
    assert list(table["site"].unique()) == [EMBED, "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    intact = table[table["condition"] == "intact"]
    assert (intact["delta_answer_logprob"] == 0).all() and (intact["answer_kl"] == 0).all()
    assert (table["answer_kl"] >= -1e-6).all() and (table["rank"] > 0).all()
    with pytest.raises(ValueError, match="iterations"):
        amnesic_probing(build(tiny("nope-causal")), addition, n_sequences=32, iterations=0)


@torch.no_grad()
def test_removing_a_used_position_subspace_beats_its_placebo(tiny, addition):
    """Planted use: a learned positional embedding confined to 12 dimensions that
    the unembedding reads strongly (the block writes nothing); removing the probe's span at the embedding
    changes the answer distribution more (by 20%) than a random subspace of the same rank (also with INLP's
    second round)."""
    from poslens.variants import build
    model = build(tiny("learned-causal", n_layers=1)).eval()
    model.pos_embed.W_pos.mul_(5)[:, 12:] = 0  # position in 12 dimensions, tokens beside it
    for weight in (model.blocks[0].attn.W_O, model.blocks[0].attn.b_O, model.blocks[0].mlp.W_out,
                   model.blocks[0].mlp.b_out):
        weight.zero_()  # the block writes nothing: the output reads the embedding directly
    model.W_U[:12].mul_(20)  # ... and mostly its position dimensions
    for iterations in (1, 2):
        table = amnesic_probing(model, addition, n_sequences=64, iterations=iterations, twin=False)
        embed = table[table["site"] == EMBED].set_index("condition")
        assert embed.loc["position", "answer_kl"] > 1.2 * embed.loc["placebo", "answer_kl"]


@torch.no_grad()
def test_a_subspace_that_carries_nothing_has_no_effect(tiny, addition):
    """Planted null: dimensions no weight ever writes are zero at every site; removing them changes
    nothing (KL 0, no change of log-probability), while a random subspace of the same rank does."""
    from poslens.variants import build
    model = build(tiny("learned-causal")).eval()
    dead = torch.arange(24, 32)
    model.embed.W_E[:, dead] = 0
    model.pos_embed.W_pos[:, dead] = 0
    for block in model.blocks:
        block.attn.W_O[..., dead] = 0
        block.attn.b_O[dead] = 0
        block.mlp.W_out[:, dead] = 0
        block.mlp.b_out[dead] = 0
    basis = torch.eye(32)[:, dead]
    sites = {EMBED: basis, "blocks.1.hook_resid_post": basis}
    table = subspace_effects(model, addition, addition.sample_test(32, 0), sites,
                             {site: torch.zeros(32) for site in sites}).set_index(["site", "condition"])
    for site in sites:
        assert table.loc[(site, "position"), "answer_kl"] < 1e-9
        assert table.loc[(site, "position"), "delta_answer_logprob"] == pytest.approx(0, abs=1e-5)
        assert table.loc[(site, "placebo"), "answer_kl"] > 1e-4


def test_subspace_swap_schema_and_fixed_rows(tiny, addition):
    from poslens.variants import build
    table = subspace_swap(build(tiny("learned-causal")), addition, n_sequences=16)
    assert tuple(table.columns) == SUBSPACE_SWAP_COLUMNS
    assert set(table["weights"]) == {"trained", "random_init"} and set(table["condition"]) == {"position", "placebo"}
    last = table[table["site"] == "blocks.1.hook_resid_post"]
    assert last["fixed_by_construction"].all() and (last["changed"] == 0).all()
    assert not table[table["site"] != "blocks.1.hook_resid_post"]["fixed_by_construction"].any()
    rates = table[["changed", "follows_swap", "keeps_original"]].dropna()
    assert ((rates >= 0) & (rates <= 1)).all().all()
    assert (table["changed"] + table["keeps_original"]).dropna().sub(1).abs().max() < 1e-9
