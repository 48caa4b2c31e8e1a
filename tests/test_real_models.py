"""Hugging Face models through TransformerBridge (`variants.load_any`), and the measures written against the
TransformerLens protocol: on tiny random GPT-2, GPT-NeoX (parallel and sequential residual), Llama and
SmolLM3 (a NoPE layer), each built locally with a WordLevel tokenizer, vocabulary 96 ≠ d_model 32.
No test touches the network (`offline` makes any attempt fail at once)."""

from __future__ import annotations

import pytest
import torch
from transformer_lens import patching
from transformer_lens.model_protocol import TransformerLensModel

from poslens.analyses.measures.discovery import MODEL_COLUMNS, layer_sites, model_info, positional_encodings
from poslens.analyses.measures.probe_sweep import PROBE_POSITION_COLUMNS, run_probe_sweep
from poslens.analyses.measures.sequences import random_sequences, text_sequences
from poslens.analyses.tables import PROBE_COLUMNS, read_table, validate_probe_table
from poslens.hooks import capture_residuals, residual_sites
from poslens.variants import HookedTransformer, build, fresh_twin, load, load_any
from poslens.variants.hub import encode_text

TOKENS = torch.tensor([[1, 5, 9, 4, 30, 12, 7, 60], [1, 8, 8, 8, 8, 2, 40, 3]])
PE_KINDS = {"gpt2": ["learned"] * 2, "neox-parallel": ["rotary"] * 2, "neox-sequential": ["rotary"] * 2,
            "llama": ["rotary"] * 2, "smollm3": ["rotary", "none"]}


@pytest.fixture(autouse=True)
def no_network(offline):
    """Every test here runs offline."""


@pytest.fixture(scope="module")
def bridges():
    """Bridges built once per module (booting is cheap, but building the HF models is not free)."""
    return {}


@pytest.fixture
def bridge(bridges, tiny_hf, word_tokenizer):
    def get(kind: str):
        if kind not in bridges:
            bridges[kind] = load_any(tiny_hf(kind), tokenizer=word_tokenizer())
        return bridges[kind]

    return get


@pytest.mark.parametrize("kind", list(PE_KINDS))
def test_bridge_logits_equal_hf_logits_and_sites_and_pe_kinds_are_found(kind, tiny_hf, word_tokenizer):
    hf = tiny_hf(kind)
    assert not hf.config.architectures  # a config built in code: the bridge could not pick an adapter from it
    with torch.no_grad():
        expected = hf(TOKENS).logits
    model = load_any(hf, tokenizer=word_tokenizer())
    assert isinstance(model, TransformerLensModel) and not model.training
    torch.testing.assert_close(model(TOKENS), expected, atol=1e-5, rtol=0)
    blocks = range(2)
    mids = [] if kind == "neox-parallel" else [f"blocks.{b}.hook_resid_mid" for b in blocks]
    assert residual_sites(model) == ["embed"] + sorted(mids + [f"blocks.{b}.hook_resid_post" for b in blocks])
    info = model_info(model, variant=kind)
    assert list(info.columns) == list(MODEL_COLUMNS)
    assert info["pe_kind"].tolist() == PE_KINDS[kind]
    assert info["resid_mid"].tolist() == [kind != "neox-parallel"] * 2
    if kind == "smollm3":  # its config says rotary for every layer; layer 1 has none
        assert info["config_pe"].tolist() == ["rotary", "rotary"]
        assert info["attention_spread"][1] < 1e-5 < 1e-2 < info["attention_spread"][0]


@pytest.mark.parametrize("name, kinds", [
    ("nope-causal", ["none"] * 2), ("nope-bidirectional", ["none"] * 2), ("learned-causal", ["learned"] * 2),
    ("sinusoidal-causal", ["sinusoidal"] * 2), ("rotary-bidirectional", ["rotary"] * 2)])
def test_pe_kinds_of_our_variants(tiny, name, kinds):
    assert positional_encodings(build(tiny(name)))["pe_kind"].tolist() == kinds


def test_a_trained_nope_model_still_tests_as_nope(trained_runs):
    model = load(trained_runs[("nope-causal", 2)])
    assert positional_encodings(model)["pe_kind"].tolist() == ["none", "none"]


@pytest.mark.parametrize("kind", list(PE_KINDS))
def test_capture_probe_sweep_and_patching_run_on_a_bridge(kind, bridge):
    model = bridge(kind)
    tokens = random_sequences(model, 24, 10, seed=0)
    _, cache = model.run_with_cache(tokens)
    capture = capture_residuals(model, tokens, batch_size=7)
    for site in capture.sites:
        hook = "blocks.0.hook_resid_pre" if site == "embed" else site
        torch.testing.assert_close(capture[site], cache[hook], atol=1e-6, rtol=0)
    half = capture_residuals(model, tokens, dtype=torch.float16)
    assert half.activations.dtype == torch.float16
    torch.testing.assert_close(half.activations.float(), capture.activations, atol=2e-3, rtol=2e-3)

    result = run_probe_sweep({kind: [model]}, tokens, quiet=True)
    assert list(validate_probe_table(result.table).columns) == list(PROBE_COLUMNS)
    n_sites = len(residual_sites(model))
    assert set(result.table["site"]) == set(residual_sites(model))
    # trained + random init: accuracy, mad, ridge r2/mae, control, selectivity; random init: accuracy, mad;
    # token identity: accuracy, mad; bag of prefix: accuracy, mad; chance: accuracy, mad
    assert len(result.table) == n_sites * (6 + 2 + 2 + 2 + 2)
    assert list(result.by_position.columns) == list(PROBE_POSITION_COLUMNS)
    assert len(result.by_position) == n_sites * 10 * 2 * 5  # positions × (accuracy, mad) × 5 baselines
    assert result.models["pe_kind"].tolist() == PE_KINDS[kind]

    clean = tokens[:1]
    corrupted = clean.clone()
    corrupted[0, 3] = 50 if clean[0, 3] != 50 else 51
    _, clean_cache = model.run_with_cache(clean)

    def metric(logits):
        return logits[0, -1, 5] - logits[0, -1, 6]

    patched = patching.get_act_patch_resid_pre(model, corrupted, clean_cache, metric)
    assert patched.shape == (2, 10)
    with torch.no_grad():  # the one differing token, patched in before block 0, makes the run the clean one
        torch.testing.assert_close(patched[0, 3], metric(model(clean)), atol=1e-5, rtol=0)
        torch.testing.assert_close(patched[0, 0], metric(model(corrupted)), atol=1e-5, rtol=0)


def test_random_init_twin_of_a_bridge(bridge):
    model = bridge("llama")
    twin = fresh_twin(model)
    assert type(twin) is type(model) and not twin.training and twin.tokenizer is not None
    assert not torch.allclose(twin(TOKENS), model(TOKENS))
    torch.testing.assert_close(fresh_twin(model)(TOKENS), twin(TOKENS), atol=0, rtol=0)  # seeded
    assert [p.shape for p in twin.parameters()] == [p.shape for p in model.parameters()]


def test_text_is_chunked_with_the_model_tokenizer_and_bos_first(bridge):
    model = bridge("gpt2")
    text = " ".join(f"w{i % 92}" for i in range(40))
    sequences = text_sequences(model, text, 8)
    assert sequences.shape == (5, 8)  # 40 tokens in chunks of 7 after BOS; the last 5 are dropped
    assert (sequences[:, 0] == 1).all()
    assert torch.equal(sequences[:, 1:].flatten(), encode_text(model, text)[:35])
    assert text_sequences(model, text, 8, bos=False, max_sequences=2).tolist() == [
        list(range(4, 12)), list(range(12, 20))]
    random = random_sequences(model, 50, 12, seed=3)
    assert torch.equal(random, random_sequences(model, 50, 12, seed=3)) and (random[:, 0] == 1).all()
    assert random[:, 1:].min() >= 4  # no special token after BOS
    with pytest.raises(ValueError, match=r"max_len must be an integer in 2..64 \(the model's n_ctx\), got 65"):
        text_sequences(model, text, 65)
    with pytest.raises(ValueError, match="the text has 3 tokens, fewer than the 7"):
        text_sequences(model, "w1 w2 w3", 8)


def test_a_model_without_a_tokenizer_takes_token_tensors_only(tiny_hf):
    model = load_any(tiny_hf("neox-sequential"))
    assert model.tokenizer is None
    torch.testing.assert_close(model(TOKENS), tiny_hf("neox-sequential")(TOKENS).logits, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="has no tokenizer, so it cannot read text"):
        text_sequences(model, "w1 w2", 4)
    assert random_sequences(model, 4, 6, bos=False).shape == (4, 6)
    with pytest.raises(ValueError, match="has no BOS token; pass bos=False"):
        random_sequences(model, 4, 6)


def test_traps_give_clear_errors_or_are_fixed(tiny_hf, word_tokenizer, trained_runs, tmp_path):
    from transformer_lens.model_bridge import TransformerBridge

    unnamed = word_tokenizer()
    with pytest.raises(KeyError, match="name_or_path"):  # the trap, on the raw bridge
        TransformerBridge.boot_transformers("x", hf_model=_with_architecture(tiny_hf("gpt2")), tokenizer=unnamed)
    with pytest.raises(OSError):  # ... and with a name, the bridge goes to the hub for a tokenizer
        TransformerBridge.boot_transformers("x", hf_model=_with_architecture(tiny_hf("gpt2")),
                                            tokenizer=word_tokenizer(name_or_path="local"))
    model = load_any(tiny_hf("gpt2"), tokenizer=unnamed)
    assert model.to_tokens("w1 w2", prepend_bos=False).tolist() == [[5, 6]]
    assert "name_or_path" not in unnamed.init_kwargs  # the caller's tokenizer is left as it was
    named = word_tokenizer(name_or_path="local")
    assert load_any(tiny_hf("llama"), tokenizer=named).tokenizer is not None

    folder = tmp_path / "gpt2"
    tiny_hf("gpt2").save_pretrained(folder)
    with pytest.raises(ValueError, match="has no tokenizer files"):
        load_any(folder)
    word_tokenizer().save_pretrained(folder)
    assert load_any(folder).to_tokens("w3", prepend_bos=False).tolist() == [[7]]

    with pytest.raises(ValueError, match="could not load 'nobody/no-such-model'.*offline"):
        load_any("nobody/no-such-model")
    with pytest.raises(FileNotFoundError, match="is not a model folder"):
        load_any(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a poslens run directory nor a save_pretrained folder"):
        load_any(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"cannot load a model from a int; allowed"):
        load_any(3)

    run = load_any(trained_runs[("nope-causal", 2)])
    assert isinstance(run, HookedTransformer) and load_any(run) is run
    with pytest.raises(ValueError, match="used as it is"):
        load_any(run, device="cpu")
    with pytest.raises(ValueError, match="blocks \\[5\\] do not exist; allowed: 0..1"):
        layer_sites(run, [0, 5])
    assert layer_sites(run, [1]) == ["embed", "blocks.1.hook_resid_mid", "blocks.1.hook_resid_post"]


def test_inspect_and_probe_commands_on_a_saved_model(run_cli, tiny_hf, word_tokenizer, tmp_path):
    folder = tmp_path / "smol"
    tiny_hf("smollm3").save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    half = load_any(folder, dtype=torch.bfloat16)  # a large model's weights can load in bfloat16
    assert half.cfg.dtype == torch.bfloat16 and positional_encodings(half)["pe_kind"].tolist() == PE_KINDS["smollm3"]
    assert capture_residuals(half, TOKENS).activations.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype= applies to a model loaded from a folder or the hub"):
        load_any(half, dtype=torch.float32)
    code, text, _ = run_cli("inspect", "--model", str(folder))
    assert code == 0 and "residual sites (5): embed, blocks.0.hook_resid_mid" in text
    assert "| smol | 0 | 1 | none | rotary |" in text
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(f"w{(i * 7) % 92}" for i in range(400)), encoding="utf-8")
    out = tmp_path / "probe.csv"
    code, text, err = run_cli("probe", "--model", str(folder), "--text", str(corpus), "--max-len", "12",
                              "--layers", "1", "--control", "chance", "token_identity", "--out", str(out), "--quiet")
    assert code == 0, err
    assert "| smol | 0 | 1 | none | rotary |" in text and "probe.by_position.csv" in text
    table = validate_probe_table(read_table(out))
    assert set(table["site"]) == {"embed", "blocks.1.hook_resid_mid", "blocks.1.hook_resid_post"}
    code, _, err = run_cli("probe", "--model", str(folder), "--out", str(tmp_path / "other.csv"))
    assert code == 2 and "--text FILE or --random-tokens" in err
    code, _, err = run_cli("probe", "--model", str(folder), "--random-tokens", "--out", str(out))
    assert code == 2 and "already exists" in err
    code, _, err = run_cli("probe", str(folder), "--model", str(folder), "--out", str(tmp_path / "x.csv"))
    assert code == 2 and "not both" in err


def _with_architecture(model):
    model.config.architectures = [type(model).__name__]
    return model
