import pytest
import torch

from poslens.hooks import (
    capture_patterns,
    capture_residuals,
    cut_residual,
    mean_ablation,
    missing_resid_mid,
    residual_sites,
    zero_ablation,
)
from poslens.variants import build

TEXT = ["123+456=9750", "999+001=0001", "555+555=0111", "000+000=0000", "321+123=4440"]


@pytest.fixture(scope="module")
def model(tiny):
    return build(tiny("nope-causal", n_layers=3))


def test_capture_matches_run_with_cache_in_any_batching(model):
    tokens = model.to_tokens(TEXT)
    _, cache = model.run_with_cache(tokens)
    for batch_size in (1, 2, 5, 64):
        capture = capture_residuals(model, tokens, batch_size=batch_size)
        assert capture.sites == residual_sites(model) and capture.activations.shape == (7, 5, 12, 32)
        assert torch.equal(capture["embed"], cache["blocks.0.hook_resid_pre"])
        for site in capture.sites[1:]:
            assert torch.equal(capture[site], cache[site]), site


def test_capture_a_subset_keeps_the_requested_order(model):
    tokens = model.to_tokens(TEXT)
    sites = ["blocks.1.hook_resid_post", "embed"]
    capture = capture_residuals(model, tokens, sites=sites, batch_size=2)
    full = capture_residuals(model, tokens)
    assert capture.sites == sites
    assert torch.equal(capture.activations[0], full["blocks.1.hook_resid_post"])
    assert torch.equal(capture.activations[1], full["embed"])


def test_capture_rejects_bad_input(model):
    tokens = model.to_tokens(TEXT)
    with pytest.raises(ValueError, match=r"sites must be distinct and among \['embed'"):
        capture_residuals(model, tokens, sites=["blocks.7.hook_resid_post"])
    with pytest.raises(ValueError, match="distinct"):
        capture_residuals(model, tokens, sites=["embed", "embed"])
    with pytest.raises(ValueError, match="empty dataset"):
        capture_residuals(model, tokens[:0])
    with pytest.raises(ValueError, match="longer than the model's n_ctx"):
        capture_residuals(model, torch.zeros(2, 13, dtype=torch.long))
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        capture_residuals(model, tokens, batch_size=0)


@pytest.mark.parametrize("sublayer", ["attn", "mlp", "both"])
def test_cut_hook_equals_a_model_built_with_the_cut(tiny, model, sublayer):
    suffix = "" if sublayer == "both" else f":{sublayer}"
    built = build(tiny(f"nope-causal+cut1{suffix}", n_layers=3))
    built.load_state_dict(model.state_dict())
    tokens = model.to_tokens(TEXT)
    with model.hooks(fwd_hooks=cut_residual(1, sublayer)):
        cut_logits = model(tokens)
    assert torch.equal(cut_logits, built(tokens))
    assert not torch.allclose(cut_logits, model(tokens))  # and the hooks are gone afterwards
    with pytest.raises(ValueError, match=r"unknown residual cut sublayer 'ffn'"):
        cut_residual(0, "ffn")


def test_ablations(model):
    tokens = model.to_tokens(TEXT)
    _, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_resid_post"))
    mean = cache["blocks.0.hook_resid_post"].mean(0)
    with model.hooks(fwd_hooks=zero_ablation("blocks.0.hook_attn_out")):
        _, zeroed = model.run_with_cache(tokens)
    assert torch.equal(zeroed["blocks.0.hook_resid_mid"], zeroed["blocks.0.hook_resid_pre"])
    with model.hooks(fwd_hooks=mean_ablation("blocks.0.hook_resid_post", mean)):
        _, averaged = model.run_with_cache(tokens)
    assert torch.equal(averaged["blocks.1.hook_resid_pre"], mean.expand(5, 12, 32))
    with model.hooks(fwd_hooks=mean_ablation("blocks.0.hook_resid_post", mean.mean(0))):
        _, averaged = model.run_with_cache(tokens)
    assert torch.equal(averaged["blocks.1.hook_resid_pre"][3, 4], mean.mean(0))
    with pytest.raises(ValueError, match=r"mean must be shaped \[d_model\] or \[pos, d_model\]"):
        mean_ablation("embed", torch.zeros(2, 3, 4))


def test_capture_patterns_matches_the_cache(tiny, addition):
    model = build(tiny("nope-causal"))
    tokens = addition.test_set()[:3, :-1]
    logits, patterns = capture_patterns(model, tokens)
    full_logits, cache = model.run_with_cache(tokens)
    assert patterns.shape == (2, 3, model.cfg.n_heads, tokens.shape[1], tokens.shape[1])
    torch.testing.assert_close(logits, full_logits)
    torch.testing.assert_close(patterns[1], cache["blocks.1.attn.hook_pattern"])
    torch.testing.assert_close(patterns.sum(-1), torch.ones(patterns.shape[:-1]))


def test_capture_in_float16_and_default_batches(model):
    tokens = model.to_tokens(TEXT * 3)
    full = capture_residuals(model, tokens)
    half = capture_residuals(model, tokens, dtype=torch.float16, batch_size=4)
    assert half.activations.dtype == torch.float16 and full.activations.dtype == torch.float32
    torch.testing.assert_close(half.activations.float(), full.activations, atol=5e-3, rtol=1e-3)
    assert missing_resid_mid(model) == [] and len(residual_sites(model)) == 1 + 2 * model.cfg.n_layers
