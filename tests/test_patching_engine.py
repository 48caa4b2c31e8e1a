"""The batched patching engine (`hooks.patching`) against TransformerLens's per-cell loop, the reference:
equal to 1e-5 in float32 on every site, on our variants and on bridged GPT-2, GPT-NeoX and Llama."""

from functools import partial

import pytest
import torch
from transformer_lens import patching
from transformer_lens.tools.analysis.attribution_patching import attribution_patch

from poslens.hooks.patching import (
    PATCH_SITES,
    attribution_grids,
    check_sites,
    chunk_cells,
    patch_grids,
    patchable_sites,
)
from poslens.tasks import Addition
from poslens.variants import build, load_any, variant_config

# TransformerLens's per-cell grids, one forward pass per cell.
REFERENCE = {
    "resid_pre": patching.get_act_patch_resid_pre,
    "resid_mid": patching.get_act_patch_resid_mid,
    "resid_post": partial(patching.generic_activation_patch, patch_setter=patching.layer_pos_patch_setter,
                          activation_name="resid_post", index_axis_names=("layer", "pos")),
    "attn_out": patching.get_act_patch_attn_out,
    "mlp_out": patching.get_act_patch_mlp_out,
    "z": patching.get_act_patch_attn_head_out_all_pos,
}
VARIANTS = ["nope-causal", "learned-causal", "sinusoidal-bidirectional", "rotary-causal", "nope-bidirectional+cut0",
            "rotary-bidirectional+cut1:mlp", "learned-causal+cut0,1"]
BRIDGES = ["gpt2", "neox-parallel", "llama"]


def metric_of(vocab: int):
    """A metric reading the last position, as TransformerLens users write them: a mean logit difference."""
    def metric(logits):
        return (logits[:, -1, 3] - logits[:, -1, vocab - 1]).mean() + logits[:, -1, 5].mean()

    return metric


@torch.no_grad()
def reference_grids(model, clean, corrupted, metric, sites):
    """TransformerLens's grids, without autograd (as poslens always ran them: TL clones an activation that
    requires grad, and a bridge's resid_mid is the second LayerNorm's input, so with autograd its patch would
    reach only that LayerNorm, not the stream)."""
    _, cache = model.run_with_cache(clean)
    original, patching.tqdm = patching.tqdm, partial(patching.tqdm, disable=True)
    try:
        return {site: REFERENCE[site](model, corrupted, cache, metric) for site in sites}
    finally:
        patching.tqdm = original


def pair(model, n_prompts=2, n_pos=8, seed=0):
    """Random clean prompts and copies with two positions changed."""
    generator = torch.Generator().manual_seed(seed)
    clean = torch.randint(4, model.cfg.d_vocab - 1, (n_prompts, n_pos), generator=generator)
    corrupted = clean.clone()
    corrupted[:, [2, 5]] = torch.randint(4, model.cfg.d_vocab - 1, (n_prompts, 2), generator=generator)
    return clean, corrupted


@pytest.fixture(scope="module")
def bridges(tiny_hf, word_tokenizer):
    return {kind: load_any(tiny_hf(kind), tokenizer=word_tokenizer()) for kind in BRIDGES}


def ours(name, tiny):
    return build(tiny(name, n_heads=4, d_head=8)).eval()


def assert_equal_grids(model, n_prompts=2):
    clean, corrupted = pair(model, n_prompts)
    metric, sites = metric_of(model.cfg.d_vocab), patchable_sites(model)
    expected = reference_grids(model, clean, corrupted, metric, sites)
    for options in ({}, {"last_position_only": True, "memory_mb": 0.05}):
        grids = patch_grids(model, clean, corrupted, metric, sites, **options)
        for site in sites:
            assert grids[site].shape == expected[site].shape
            torch.testing.assert_close(grids[site], expected[site].float(), atol=1e-5, rtol=0, msg=f"{site} {options}")
            assert expected[site].abs().max() > 1e-3, site  # a grid of zeros would prove nothing


@pytest.mark.parametrize("name", VARIANTS)
def test_equals_transformer_lens_on_our_variants(name, tiny):
    assert_equal_grids(ours(name, tiny))


@pytest.mark.parametrize("kind", BRIDGES)
def test_equals_transformer_lens_on_bridged_models(kind, bridges, offline):
    model = bridges[kind]
    assert ("resid_mid" in patchable_sites(model)) == (kind != "neox-parallel")  # parallel residual: no resid_mid
    assert_equal_grids(model, n_prompts=1 if kind == "llama" else 2)


@pytest.mark.parametrize("model_of", [lambda tiny, bridges: ours("nope-causal", tiny),
                                      lambda tiny, bridges: bridges["gpt2"]], ids=["ours", "bridged-gpt2"])
def test_a_per_prompt_metric_gives_each_prompt_its_own_grid(model_of, tiny, bridges, offline):
    """A metric that returns one value per prompt: each cell holds the vector, and its mean is the grid of the
    same metric averaged (the no-op cells included: they hold the unpatched run's vector)."""
    model = model_of(tiny, bridges)
    clean, corrupted = pair(model, n_prompts=3)
    vocab = model.cfg.d_vocab

    def per_prompt(logits):
        return logits[:, -1, 3] - logits[:, -1, vocab - 1]

    sites = ["resid_pre", "attn_out"]
    vectors = patch_grids(model, clean, corrupted, per_prompt, sites)
    means = patch_grids(model, clean, corrupted, lambda logits: per_prompt(logits).mean(), sites)
    for site in sites:
        assert vectors[site].shape == (*means[site].shape, 3)
        torch.testing.assert_close(vectors[site].mean(-1), means[site], atol=1e-5, rtol=0)
        assert (vectors[site].std(-1) > 1e-4).any(), site  # the prompts differ: a broadcast mean would fail here


def test_chunking_bfloat16_and_progress(tiny, capsys):
    model = ours("learned-causal", tiny)
    clean, corrupted = pair(model, n_pos=10)
    metric = metric_of(model.cfg.d_vocab)
    one_pass = chunk_cells(model, 2, 10)
    assert one_pass >= 2 * 10 and chunk_cells(model, 2, 10, memory_mb=0.01) == 1
    assert chunk_cells(model, 2, 10, last_position_only=True) > one_pass
    exact = patch_grids(model, clean, corrupted, metric, ["resid_pre"])["resid_pre"]
    assert capsys.readouterr().err == ""  # quiet by default
    tiny_budget = patch_grids(model, clean, corrupted, metric, ["resid_pre"], memory_mb=0.01, quiet=False)
    assert "patching resid_pre" in capsys.readouterr().err
    torch.testing.assert_close(tiny_budget["resid_pre"], exact, atol=1e-5, rtol=0)
    half = patch_grids(model, clean, corrupted, metric, ["resid_pre"], dtype=torch.bfloat16)["resid_pre"]
    assert half.dtype == torch.float32 and not torch.equal(half, exact)
    assert (half - exact).abs().max() < 0.05 * exact.abs().max()


@pytest.mark.parametrize(("name", "unchanged"), [("learned-causal", 5), ("learned-bidirectional", 0)])
def test_cells_whose_patch_is_a_no_op_are_not_run(name, unchanged, tiny):
    """Cells whose clean and corrupted activations are equal take the corrupted run's metric without a
    pass: in block 0's `resid_pre` every position but the corrupted one; above it, in a causal model, the
    positions before it (a bidirectional model's all differ). The grid is still TransformerLens's."""
    model = ours(name, tiny)
    clean, _ = pair(model)
    corrupted = clean.clone()
    corrupted[:, 5] = (clean[:, 5] + 1 - 4) % (model.cfg.d_vocab - 5) + 4
    metric, last = metric_of(model.cfg.d_vocab), model.cfg.n_layers - 1
    rows = []
    handle = model.hook_dict[f"blocks.{last}.hook_resid_post"].register_forward_hook(
        lambda module, inputs, output: rows.append(output.shape[0]))
    try:
        grids = patch_grids(model, clean, corrupted, metric, ["resid_pre", "z"])
    finally:
        handle.remove()
    n_pos, n_prompts = clean.shape[1], clean.shape[0]
    run = 1 + (model.cfg.n_layers - 1) * (n_pos - unchanged)  # resid_pre cells that change something
    # the clean run, the corrupted run, then one pass per site: the corrupted rows and each run cell's rows
    assert rows == [n_prompts, n_prompts, n_prompts * (1 + run),
                    n_prompts * (1 + model.cfg.n_layers * model.cfg.n_heads)]
    expected = reference_grids(model, clean, corrupted, metric, ["resid_pre", "z"])
    for site, grid in grids.items():
        torch.testing.assert_close(grid, expected[site].float(), atol=1e-5, rtol=0)
    with torch.no_grad():
        baseline = float(metric(model(corrupted)))
    assert (grids["resid_pre"][:, :unchanged] == baseline).all() and (grids["resid_pre"][0, 6:] == baseline).all()


def test_bad_sites_and_shapes_are_refused(tiny, bridges, offline):
    model = ours("nope-causal", tiny)
    clean, corrupted = pair(model)
    with pytest.raises(ValueError, match=r"unknown patching site 'resid'; allowed: \['resid_pre', 'resid_mid', "):
        patch_grids(model, clean, corrupted, metric_of(10), ["resid"])
    with pytest.raises(ValueError, match=r"resid_mid cannot be patched in this model .*allowed: \['resid_pre', "
                                         r"'resid_post', 'attn_out', 'mlp_out', 'z'\]"):
        check_sites(bridges["neox-parallel"], ["resid_mid"])
    with pytest.raises(ValueError, match=r"must be \[batch, pos\] of the same shape, got \(2, 8\) and \(2, 7\)"):
        patch_grids(model, clean, corrupted[:, :7], metric_of(10))
    assert set(patchable_sites(model)) == set(PATCH_SITES)


def test_attribution_node_scores_are_transformer_lens_attribution_patch(tiny, bridges, offline):
    """On one prompt pair, the `z` and `mlp_out` grids less the corrupted run's metric are TransformerLens 4.3's
    `attribution_patch` node scores (heads summed over positions)."""
    for model in (ours("rotary-causal", tiny), bridges["gpt2"]):
        clean, corrupted = pair(model, n_prompts=1)
        metric = metric_of(model.cfg.d_vocab)
        grids = attribution_grids(model, clean, corrupted, metric, ["z", "mlp_out"])
        scores = attribution_patch(model, clean, corrupted, metric).node_scores
        heads = torch.zeros_like(grids["z"])
        mlp = torch.zeros_like(grids["mlp_out"])
        for node, score in scores.items():
            if node.kind == "attn_head_out":
                heads[node.layer, node.head] += score
            elif node.kind == "mlp_out":
                mlp[node.layer, node.position] = score
        with torch.no_grad():
            baseline = float(metric(model(corrupted)))  # the grids are metric values, the node scores changes
        torch.testing.assert_close(grids["z"] - baseline, heads, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(grids["mlp_out"] - baseline, mlp, atol=1e-5, rtol=1e-4)


def test_attribution_previews_the_exact_grid(tiny, bridges, offline):
    """The preview estimates the same metric values as exact patching: where the clean and corrupted
    activations are equal (positions before the first changed token, in a causal model) it is the corrupted
    run's metric exactly, and over whole grids it correlates with exact patching, on our model and a bridge."""
    for model in (ours("learned-causal", tiny), bridges["gpt2"]):
        clean, corrupted = pair(model, n_prompts=2)
        metric = metric_of(model.cfg.d_vocab)
        sites = ["resid_pre", "attn_out", "mlp_out", "z"]
        exact = patch_grids(model, clean, corrupted, metric, sites)
        estimate = attribution_grids(model, clean, corrupted, metric, sites)
        for site in sites:
            assert estimate[site].shape == exact[site].shape
        flat = torch.stack([torch.cat([exact[s].flatten() for s in sites]),
                            torch.cat([estimate[s].flatten() for s in sites])])
        assert torch.corrcoef(flat)[0, 1] > 0.8
        with torch.no_grad():
            baseline = float(metric(model(corrupted)))
        for grid in (estimate["resid_pre"], exact["resid_pre"]):
            torch.testing.assert_close(grid[:, :2], torch.full((model.cfg.n_layers, 2), baseline), atol=1e-5, rtol=0)


def test_analyses_tables_use_the_engine(addition, tiny):
    """`analyses.measures.patching.patch_table` (what reproduce and the demos call) gives the engine's grid."""
    from poslens.analyses.measures.patching import corrupt, patch_table, restoration_metric

    model = build(variant_config("learned-causal", task=Addition(), d_model=32, d_head=8, d_mlp=64, n_layers=2)).eval()
    clean = addition.sample_test(16, 0)
    corrupted = corrupt(addition, clean, "swap", positions=(4, 6))
    keep = clean[:, addition.prompt_len] != corrupted[:, addition.prompt_len]
    clean, corrupted = clean[keep], corrupted[keep]
    table, _ = patch_table(model, addition, clean, corrupted, ["resid_pre"])
    metric = restoration_metric(model, clean, corrupted, addition.prompt_len)[0]
    prompts = slice(0, addition.prompt_len)
    expected = reference_grids(model, clean[:, prompts], corrupted[:, prompts], metric, ["resid_pre"])["resid_pre"]
    got = torch.tensor(table["value"].to_numpy(), dtype=torch.float32).reshape(expected.shape)
    torch.testing.assert_close(got, expected.float(), atol=1e-5, rtol=0)
    preview, _ = patch_table(model, addition, clean, corrupted, ["resid_pre"], method="attribution")
    assert list(preview.columns) == list(table.columns) and len(preview) == len(table)
    with pytest.raises(ValueError, match=r"unknown patching method 'fast'; allowed: \['exact', 'attribution'\]"):
        patch_table(model, addition, clean, corrupted, ["resid_pre"], method="fast")
