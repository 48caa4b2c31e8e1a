"""The hooked model: TransformerLens interop, residual cuts, config validation, bad input."""

import pytest
import torch
from transformer_lens import ActivationCache, head_detector, patching

from poslens.tasks import Addition, MarkovICL
from poslens.variants import VARIANT_NAMES, VariantConfig, build, variant_config

BLOCK_HOOKS = ["hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post",
               "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z"]


@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_every_variant_has_transformer_lens_hook_names(tiny, name):
    model = build(tiny(name))
    logits, cache = model.run_with_cache("123+456=")
    assert isinstance(cache, ActivationCache) and logits.shape == (1, 8, 12)
    expected = ({"hook_embed", "ln_final.hook_normalized"}
                | {f"blocks.{layer}.{h}" for layer in range(2) for h in BLOCK_HOOKS})
    assert expected <= set(cache.keys())
    assert ("hook_pos_embed" in cache.keys()) == name.startswith(("learned", "sinusoidal"))  # noqa: SIM118 (an ActivationCache, not a dict)
    if "hook_pos_embed" in cache.keys():  # noqa: SIM118
        assert cache["hook_pos_embed"].shape == (1, 8, 32)
    assert cache.accumulated_resid().shape == (3, 1, 8, 32)
    assert cache.stack_activation("resid_post").shape == (2, 1, 8, 32)


@pytest.mark.parametrize("name", ["nope-causal", "learned-causal", "rotary-bidirectional"])
def test_decompose_resid_sums_to_the_final_stream(tiny, name):
    model = build(tiny(name, init_std=0.3))
    _, cache = model.run_with_cache(model.to_tokens(["123+456=", "999+001="]))
    components = cache.decompose_resid()
    torch.testing.assert_close(components.sum(0), cache["blocks.1.hook_resid_post"], atol=1e-5, rtol=0)


def test_causal_mask_and_bidirectional_pattern(tiny):
    causal = build(tiny("nope-causal"))
    _, cache = causal.run_with_cache("123+456=")
    pattern = cache["pattern", 0]
    assert torch.all(pattern[0].triu(1) == 0)
    torch.testing.assert_close(pattern.sum(-1), torch.ones_like(pattern.sum(-1)))
    _, cache = build(tiny("nope-bidirectional")).run_with_cache("123+456=")
    upper = torch.ones(8, 8, dtype=torch.bool).triu(1)
    assert torch.all(cache["pattern", 0][0][:, upper] > 0)


@pytest.mark.parametrize("sublayer", ["attn", "mlp", "both"])
@pytest.mark.parametrize("training", [False, True])
def test_a_cut_removes_exactly_the_named_residual_connection(tiny, sublayer, training):
    model = build(tiny(f"nope-causal+cut1:{sublayer}" if sublayer != "both" else "nope-causal+cut1", n_layers=3,
                       init_std=0.3)).train(training)
    _, cache = model.run_with_cache("123+456=")
    for block in range(3):
        pre, attn_out, mid, mlp_out, post = (cache[f"blocks.{block}.hook_{h}"] for h in
                                             ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post"))
        cut_attn = block == 1 and sublayer in ("attn", "both")
        cut_mlp = block == 1 and sublayer in ("mlp", "both")
        assert torch.equal(mid, attn_out if cut_attn else pre + attn_out)
        assert torch.equal(post, mlp_out if cut_mlp else mid + mlp_out)
        assert not torch.equal(mid, attn_out) or cut_attn  # an intact connection really adds the stream


def test_a_cut_changes_only_blocks_from_the_cut_on(tiny):
    intact, cut = build(tiny("nope-causal", init_std=0.3)), build(tiny("nope-causal+cut1", init_std=0.3))
    tokens = intact.to_tokens("123+456=")
    _, a = intact.run_with_cache(tokens)
    _, b = cut.run_with_cache(tokens)
    assert torch.equal(a["blocks.0.hook_resid_post"], b["blocks.0.hook_resid_post"])
    assert not torch.allclose(a["blocks.1.hook_resid_post"], b["blocks.1.hook_resid_post"])


def test_transformer_lens_patching_runs_and_restores_the_clean_run(tiny):
    model = build(tiny("nope-causal", init_std=0.3)).eval()
    clean, corrupted = model.to_tokens("123+456="), model.to_tokens("193+456=")
    clean_logits, clean_cache = model.run_with_cache(clean)
    metric = lambda logits: logits[0, -1, 7] - logits[0, -1, 3]  # noqa: E731
    result = patching.get_act_patch_resid_pre(model, corrupted, clean_cache, metric)
    assert result.shape == (2, 8)
    # Layer 0, position 1 is the only differing token: patching it makes the run exactly the clean one.
    torch.testing.assert_close(result[0, 1], metric(clean_logits), atol=1e-5, rtol=0)
    corrupted_metric = metric(model(corrupted))
    torch.testing.assert_close(result[0, 0], corrupted_metric, atol=1e-6, rtol=0)
    assert patching.get_act_patch_block_every(model, corrupted, clean_cache, metric).shape == (3, 2, 8)


def test_transformer_lens_head_detector_matches_its_definition(tiny):
    model = build(tiny("nope-causal", init_std=0.5)).eval()
    scores = head_detector.detect_head(model, "1234512345", "previous_token_head")
    assert scores.shape == (2, 4)
    _, cache = model.run_with_cache("1234512345")
    pattern = cache["pattern", 1][0, 2]
    expected = pattern.diagonal(-1).sum() / pattern.sum()
    torch.testing.assert_close(scores[1, 2], expected.to(scores.dtype), atol=1e-6, rtol=0)


def test_same_seed_same_weights_and_float64(tiny):
    a, b, c = (build(tiny("learned-causal", seed=3)), build(tiny("learned-causal", seed=3)),
               build(tiny("learned-causal", seed=4)))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.embed.W_E, c.embed.W_E)
    double = build(tiny("rotary-causal", dtype=torch.float64))
    assert double("123+456=").dtype == torch.float64


DATA = {"alphabet": Addition().alphabet, "n_ctx": Addition().seq_len}


def test_config_takes_its_data_from_the_caller_or_a_task():
    with pytest.raises(ValueError, match=r"needs its data's alphabet and n_ctx: pass alphabet=\.\.\. and n_ctx=\.\.\., "
                                         r"or variant_config\(name, task=task\)"):
        variant_config("nope-causal")
    markov = MarkovICL()
    cfg = variant_config("nope-causal", task=markov)
    assert (cfg.alphabet, cfg.n_ctx, cfg.d_vocab) == (markov.alphabet, markov.seq_len, markov.vocab)
    assert variant_config("nope-causal", task=markov, n_ctx=200).n_ctx == 200  # explicit fields win over the task's


@pytest.mark.parametrize("make, message", [
    (lambda: variant_config("alibi-causal", **DATA), r"unknown variant 'alibi-causal'; allowed: \['nope-causal'"),
    (lambda: variant_config("nope-causal+cut4", **DATA), r"residual cut block 4 is out of range; allowed: 0..3"),
    (lambda: variant_config("nope-causal+cut0:ffn", **DATA),
     r"unknown residual cut sublayer 'ffn'; allowed: \['attn', 'mlp', 'both'\]"),
    (lambda: variant_config("nope-causal+cutx", **DATA), r"bad residual cut 'x'"),
    (lambda: variant_config("nope-causal", **DATA, attention_dir="causal"), "set by the variant name"),
    (lambda: VariantConfig(**DATA, d_model=60, d_head=16), r"d_model \(60\) must be divisible by d_head \(16\)"),
    (lambda: VariantConfig(**DATA, n_heads=3), r"must equal n_heads \(3\) × d_head"),
    (lambda: VariantConfig(**DATA, attention_dir="left"),
     r"unknown attention_dir 'left'; allowed: \['causal', 'bidirectional'\]"),
    (lambda: VariantConfig(**DATA, positional_embedding_type="alibi"), "unknown positional_embedding_type 'alibi'"),
    (lambda: VariantConfig(**DATA, act_fn="tanh"), r"unknown act_fn 'tanh'; allowed: \['relu', 'gelu', 'silu'\]"),
    (lambda: VariantConfig(**DATA, dtype=torch.float16), r"unknown dtype 'float16'; allowed: \['float32', 'float64'\]"),
    (lambda: VariantConfig(**DATA, n_layers=0), "n_layers must be a positive integer, got 0"),
    (lambda: VariantConfig(**DATA, attn_only=True), "attn_only=True is not supported"),
    (lambda: VariantConfig(**DATA, residual_cuts={"a": "attn"}), "residual cut block 'a' is out of range"),
    (lambda: VariantConfig.from_json({"colour": 1}), r"unknown config fields \['colour'\]"),
])
def test_bad_configs_are_named(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_bad_model_input_is_named(tiny):
    model = build(tiny("nope-causal"))
    with pytest.raises(ValueError, match="sequence length 13 is longer than the model's n_ctx = 12"):
        model(torch.zeros(1, 13, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token id 12 is outside the vocabulary; allowed: 0..11"):
        model(torch.tensor([[1, 12]]))
    with pytest.raises(ValueError, match="'a' at index 0"):
        model("a+b=")
    with pytest.raises(ValueError, match=r"integer tensor \[batch, pos\]"):
        model(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown return_type 'loss'"):
        model("1+1=", return_type="loss")


def test_preset_names_round_trip():
    for name in ["nope-causal", "learned-bidirectional+cut0", "rotary-causal+cut0,1", "nope-causal+cut0:attn,2:mlp"]:
        assert variant_config(name, **DATA).name == name
    cfg = variant_config("sinusoidal-causal+cut1:mlp", **DATA, n_layers=3, dtype=torch.float64)
    assert VariantConfig.from_json(cfg.to_json()) == cfg


def test_layer_norm_scale_hook_reads_and_edits_like_transformer_lens(tiny):
    model = build(tiny("nope-causal"))
    tokens = model.to_tokens("123+456=")
    logits, cache = model.run_with_cache(tokens)
    assert torch.equal(logits, model(tokens))  # observing the scale does not change the output
    resid = cache["blocks.1.hook_resid_post"]
    centered = resid - resid.mean(-1, keepdim=True)
    torch.testing.assert_close(cache["ln_final.hook_scale"], (centered.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt())
    ln = model.ln_final
    with model.hooks(fwd_hooks=[("ln_final.hook_scale", lambda scale, hook: scale * 2)]):
        _, edited = model.run_with_cache(tokens)
    expected = centered / (2 * cache["ln_final.hook_scale"]) * ln.w + ln.b
    torch.testing.assert_close(edited["ln_final.hook_normalized"], expected)


# TransformerLens's weight surface (TransformerLensModelWithWeights) ------------------------------------------------

def _weighted_models(tiny, trained_runs):
    """Random models with non-zero biases and LayerNorm parameters, and trained ones."""
    from poslens.variants import load

    models = []
    for name in ("nope-causal", "learned-causal", "rotary-bidirectional", "sinusoidal-causal"):
        model = build(tiny(name, init_std=0.3))
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(1)))
        models.append(model)
    return models + [load(trained_runs[key]) for key in (("nope-causal", 2), ("learned-causal", 2))]


def test_models_satisfy_transformer_lens_model_with_weights(tiny):
    from transformer_lens.model_protocol import TransformerLensModelWithWeights

    for name in VARIANT_NAMES:
        model = build(tiny(name))
        assert isinstance(model, TransformerLensModelWithWeights)
        assert hasattr(model, "W_pos") == name.startswith(("learned", "sinusoidal"))


def test_full_residual_decomposition_sums_to_the_stream_and_explains_the_logit_difference(tiny, trained_runs):
    for model in _weighted_models(tiny, trained_runs):
        tokens = model.to_tokens(["123+456=", "999+001=", "505+050="])
        logits, cache = model.run_with_cache(tokens)
        components, labels = cache.get_full_resid_decomposition(return_labels=True)
        n_heads, d_mlp = model.cfg.n_heads, model.cfg.d_mlp
        assert components.shape == (2 * n_heads + 2 * d_mlp + 2 + hasattr(model, "W_pos"), 3, 8, 32)
        assert labels[0] == "L0H0" and labels[-1] == "bias"
        torch.testing.assert_close(components.sum(0), cache["blocks.1.hook_resid_post"], atol=2e-5, rtol=0)
        right, wrong = torch.tensor([3, 7, 0]), torch.tensor([5, 1, 9])
        attributions = cache.logit_attrs(components, right, wrong)
        difference = logits[torch.arange(3), :, right] - logits[torch.arange(3), :, wrong]
        offset = (model.b_U_folded[right] - model.b_U_folded[wrong])[:, None]
        torch.testing.assert_close(attributions.sum(0) + offset, difference, atol=1e-4, rtol=0)
        assert model.b_U_folded.abs().max() > 0  # the constant part is real for these weights


def test_stacked_weights_and_circuits(tiny):
    model = build(tiny("nope-causal", init_std=0.3))
    L, H, D, d = 2, model.cfg.n_heads, 32, model.cfg.d_head
    shapes = {"W_Q": (L, H, D, d), "W_K": (L, H, D, d), "W_V": (L, H, D, d), "W_O": (L, H, d, D),
              "b_Q": (L, H, d), "b_K": (L, H, d), "b_V": (L, H, d), "b_O": (L, D), "W_in": (L, D, 64),
              "b_in": (L, 64), "W_out": (L, 64, D), "b_out": (L, D), "W_E": (12, D), "W_U": (D, 12), "b_U": (12,)}
    assert {name: tuple(getattr(model, name).shape) for name in shapes} == shapes
    assert torch.equal(model.W_Q[1, 2], model.blocks[1].attn.W_Q[2])
    assert model.OV.shape == model.QK.shape == (L, H, D, D)
    with torch.no_grad():  # (b_Q, b_K are [head, d_head] matrices, so they start random: zero them for QK alone)
        for block in model.blocks:
            block.attn.b_Q.zero_()
            block.attn.b_K.zero_()
    _, cache = model.run_with_cache("123+456=")
    for layer in range(L):
        x = cache[f"blocks.{layer}.ln1.hook_normalized"][0]
        pattern, z = cache["pattern", layer][0], cache["z", layer][0]
        for head in range(H):  # QK is the attention score bilinear form; OV maps what a head reads to what it writes
            scores = (x @ model.QK[layer, head].AB @ x.T) / d**0.5
            torch.testing.assert_close(scores.tril(), cache["attn_scores", layer][0, head].tril(), atol=1e-5, rtol=0)
            written = pattern[head] @ x @ model.OV[layer, head].AB + model.b_V[layer, head] @ model.W_O[layer, head]
            torch.testing.assert_close(written, z[:, head] @ model.W_O[layer, head], atol=1e-5, rtol=0)


def test_token_string_helpers_and_residual_directions(tiny):
    model = build(tiny("learned-causal"))
    assert model.to_str_tokens("12+3") == ["1", "2", "+", "3"]
    assert model.to_str_tokens(model.to_tokens("9=")) == ["9", "="]
    assert model.to_str_tokens(model.to_tokens(["12", "34"])) == [["1", "2"], ["3", "4"]]
    assert model.to_str_tokens(["1", "2"]) == [["1"], ["2"]]
    assert model.to_single_token("=") == 11 and torch.equal(model.W_pos, model.pos_embed.W_pos)
    with pytest.raises(ValueError, match="'12' is not a single token"):
        model.to_single_token("12")
    with pytest.raises(ValueError, match="'x' at index 0"):
        model.to_single_token("x")
    directions = model.tokens_to_residual_directions(torch.tensor([[1, 2, 3], [4, 5, 6]]))
    assert directions.shape == (2, 3, 32)
    torch.testing.assert_close(model.tokens_to_residual_directions("+"), model.ln_final.w * model.W_U[:, 10])
    torch.testing.assert_close(model.accumulated_bias(2), model.b_O.sum(0) + model.b_out.sum(0))
    torch.testing.assert_close(model.accumulated_bias(1, mlp_input=True), model.b_O.sum(0) + model.b_out[0])
    with pytest.raises(ValueError, match=r"layer must be in 0..1, got 2"):
        model.accumulated_bias(2, mlp_input=True)
