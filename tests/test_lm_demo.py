"""The language-model demo (`poslens demo --model SPEC`): its panels' computations, its callbacks under
hostile requests (an inline message, never a 500) and its command line, on tiny random GPT-2 (learned
PE) and parallel-residual GPT-NeoX (rotary, no resid_mid) bridges built locally with a word-level
tokenizer, and on one of our own trained runs. The tests that load a model run `offline`; the app
tests talk to it on 127.0.0.1 only."""

from __future__ import annotations

import json

import plotly.graph_objects as go
import pytest
import torch
from browser import serving
from test_demo_server import POLL, callback, inline_message, post, settled

from poslens.demos import lm_app
from poslens.demos.lm_app import MAX_PROMPT_CHARS, make_app
from poslens.demos.lm_panels import (
    LMDemoModel,
    attention_figure,
    encode_prompt,
    load_lm_demo,
    patch_effects,
    probe_predictions,
    prompt_tokens,
    summary,
    top_next_tokens,
    top_tokens_figure,
)
from poslens.demos.panels import probe_figure
from poslens.hooks import residual_sites

PROMPT, CORRUPTED = "w1 w2 w3 w4 w5 w6", "w1 w2 w40 w4 w5 w6"
UPDATE = "..message.children...tokens.children...next-tokens.figure...probe.figure...state.data.."
HEATMAP = "..patch-message.children...heatmap.figure...heatmap-poll.disabled.."
FAST_S = 1.0


@pytest.fixture(scope="module")
def demos(tiny_hf, word_tokenizer) -> dict[str, LMDemoModel]:
    """Demo models whose probes fit on 32 random-token sequences of 16 tokens, prepared."""
    return {kind: load_lm_demo(tiny_hf(kind), tokenizer=word_tokenizer(), n_sequences=32, max_len=16).prepare()
            for kind in ("gpt2", "neox-parallel")}


# panels ---------------------------------------------------------------------------------------------------------------

def test_summary_names_sites_and_the_positional_encoding_of_every_block(demos):
    gpt2, neox = demos["gpt2"], demos["neox-parallel"]
    facts = summary(gpt2).set_index("property")["value"]
    assert facts["n_layers"] == "2" and facts["d_vocab"] == "96" and "note" not in facts
    assert facts["residual_sites"] == ", ".join(residual_sites(gpt2.model))
    assert gpt2.info["pe_kind"].tolist() == ["learned"] * 2 and neox.info["pe_kind"].tolist() == ["rotary"] * 2
    assert gpt2.sites == ["resid_pre", "resid_mid", "resid_post"] and neox.sites == ["resid_pre", "resid_post"]
    assert "have no hook_resid_mid" in summary(neox).set_index("property")["value"]["note"]
    assert gpt2.probe_data == "32 random-token sequences of 16 tokens, BOS first"


def test_prompts_are_tokenised_with_bos_first_and_checked(demos):
    demo = demos["gpt2"]
    assert encode_prompt(demo, "w1 w2 nonsense").tolist() == [[1, 5, 6, 0]]  # BOS, w1, w2, <unk>
    assert prompt_tokens(demo, encode_prompt(demo, "w1 w2")).to_dict("list") == {
        "position": [0, 1, 2], "token_id": [1, 5, 6], "token": ["<bos>", "w1", "w2"]}
    with pytest.raises(ValueError, match="the corrupted prompt is empty: type some text"):
        encode_prompt(demo, "  ", "corrupted prompt")
    long = " ".join(["w7"] * 400)
    with pytest.raises(ValueError, match=r"the prompt 'w7 w7 .*'… \(1199 characters\) has 401 tokens with BOS; "
                                         r"the demo takes at most 16") as refused:
        encode_prompt(demo, long)
    assert len(str(refused.value)) < 150  # the prompt is quoted by a short prefix only


def test_top_next_tokens_are_the_model_distribution(demos):
    demo = demos["neox-parallel"]
    tokens = encode_prompt(demo, PROMPT)
    table = top_next_tokens(demo, tokens, k=5)
    with torch.no_grad():
        logits = demo.model(tokens)[0, -1]
    assert table["rank"].tolist() == [1, 2, 3, 4, 5]
    assert table["token_id"].tolist() == logits.topk(5).indices.tolist()
    torch.testing.assert_close(torch.tensor(table["probability"].to_numpy()).float(), logits.softmax(-1).topk(5).values,
                               atol=1e-6, rtol=0)
    assert table["token"].tolist() == demo.model.to_str_tokens(logits.topk(5).indices)
    assert list(top_tokens_figure(table).data[0].x) == table["probability"].tolist()


def test_attention_figure_is_the_head_causal_pattern(demos):
    demo = demos["gpt2"]
    tokens = encode_prompt(demo, PROMPT)
    figure = attention_figure(demo, tokens, 1, 3)
    z = torch.tensor(figure.data[0].z)
    _, cache = demo.model.run_with_cache(tokens)
    torch.testing.assert_close(z, cache["blocks.1.attn.hook_pattern"][0, 3], atol=1e-6, rtol=0)
    assert z.shape == (7, 7) and torch.allclose(z.sum(-1), torch.ones(7)) and z.triu(1).abs().max() == 0
    assert list(figure.data[0].x) == ["0:<bos>", "1:w1", "2:w2", "3:w3", "4:w4", "5:w5", "6:w6"]
    with pytest.raises(ValueError, match=r"layer 2, head 0 is outside layers 0..1 and heads 0..3"):
        attention_figure(demo, tokens, 2, 0)


def test_the_probe_finds_position_where_the_model_adds_it_and_not_where_it_does_not(demos):
    """GPT-2 adds a learned position vector at the embedding: the probe reads every position there.
    GPT-NeoX's stream at the embedding is the token alone (rotary acts inside attention): only BOS,
    always first, gives its position away."""
    prompt = " ".join(f"w{(7 * i) % 92}" for i in range(15))  # 16 tokens with BOS, not a probe sequence
    for kind, at_most in (("gpt2", 16), ("neox-parallel", 3)):
        demo = demos[kind]
        table = probe_predictions(demo, encode_prompt(demo, prompt))
        assert len(table) == len(residual_sites(demo.model)) * 16
        embed = table[table["site"] == "embed"]
        correct = int((embed["predicted"] == embed["position"]).sum())
        assert correct == 16 if kind == "gpt2" else correct <= at_most, (kind, correct)
        assert embed["predicted"].iloc[0] == 0  # BOS
    figure = probe_figure(table)
    assert isinstance(figure, go.Figure) and len(figure.data[0].z) == len(residual_sites(demo.model))


def test_patch_effects_restore_the_clean_run_and_refuse_unequal_lengths(demos):
    demo = demos["gpt2"]
    clean, corrupted = encode_prompt(demo, PROMPT), encode_prompt(demo, CORRUPTED)
    table, metric = patch_effects(demo, clean, corrupted, "resid_post")
    value = table.set_index(["layer", "position"])["value"]
    assert value[(1, 6)] == pytest.approx(1.0, abs=1e-5)  # the whole last block's output at the last position
    assert all(value[(1, position)] == pytest.approx(0.0, abs=1e-6) for position in range(6))
    assert table["role"][:7].tolist() == ["<bos>", "w1", "w2", "w3→w40", "w4", "w5", "w6"]
    pre = patch_effects(demo, clean, corrupted, "resid_pre")[0].set_index(["layer", "position"])["value"]
    assert pre[(0, 3)] == pytest.approx(1.0, abs=1e-5) and pre[(0, 2)] == 0.0
    with pytest.raises(ValueError, match="equal token length: the clean prompt has 7 tokens, the corrupted one 8"):
        patch_effects(demo, clean, encode_prompt(demo, CORRUPTED + " w7"))
    with pytest.raises(ValueError, match=r"unknown patching site 'resid_mid' for in-memory; allowed: "
                                         r"\['resid_pre', 'resid_post'\]"):
        patch_effects(demos["neox-parallel"], clean, corrupted, "resid_mid")
    with pytest.raises(ValueError, match="patching has nothing to restore"):
        patch_effects(demo, clean, clean)


def test_loading_refuses_what_the_demo_cannot_show(tiny_hf, word_tokenizer, trained_runs, tmp_path, offline):
    with pytest.raises(ValueError, match="has no tokenizer, so it cannot read text"):
        load_lm_demo(tiny_hf("gpt2"))
    with pytest.raises(ValueError, match=r"max_len must be an integer in 2..64 \(the model's n_ctx\), got 65"):
        load_lm_demo(tiny_hf("gpt2"), tokenizer=word_tokenizer(), max_len=65)
    with pytest.raises(ValueError, match="the probe needs at least 2 sequences, got 1"):
        load_lm_demo(tiny_hf("gpt2"), tokenizer=word_tokenizer(), n_sequences=1)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(f"w{(i * 5) % 92}" for i in range(100)), encoding="utf-8")
    on_text = load_lm_demo(tiny_hf("gpt2"), tokenizer=word_tokenizer(), text=corpus, n_sequences=50, max_len=11)
    assert on_text.probe_tokens.shape == (10, 11) and on_text.probe_data.startswith("10 text sequences of 11 tokens")
    assert on_text.probe_tokens[0, 1:].tolist() == [4 + (i * 5) % 92 for i in range(10)]
    ours = load_lm_demo(trained_runs[("nope-causal", 2)], max_len=8)  # a poslens run: characters are tokens
    assert ours.name == trained_runs[("nope-causal", 2)].name and not ours.bos
    assert encode_prompt(ours, "123+456=").shape == (1, 8) and ours.sites == ["resid_pre", "resid_mid", "resid_post"]
    with pytest.raises(ValueError, match="character 'x' at index 3 of '123x' is not in the vocabulary"):
        encode_prompt(ours, "123x")


# the app under hostile requests ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(demos):
    with serving(make_app(demos["neox-parallel"], prompt=PROMPT, corrupted=CORRUPTED)) as running:
        yield running


GOOD = {"prompt.value": PROMPT, "corrupted.value": CORRUPTED}
STATE = {"prompt": PROMPT, "corrupted": CORRUPTED}


def figure_of(body: bytes, output: str) -> dict:
    return json.loads(body)["response"][output]["figure"]


def test_good_requests_work(server):
    status, body, _ = post(server, callback(UPDATE, GOOD, "prompt.value"))
    response = json.loads(body)["response"]
    assert status == 200 and response["message"]["children"] == "" and response["state"]["data"] == STATE
    assert "0:'<bos>'  1:'w1'" in response["tokens"]["children"]
    assert response["probe"]["figure"]["data"][0]["type"] == "heatmap"
    status, body, _ = settled(server, HEATMAP, {"state.data": STATE, "site.value": "resid_post", **POLL}, "site.value")
    figure = figure_of(body, "heatmap")
    assert (status == 200 and figure["data"][0]["type"] == "heatmap"
            and "resid_post: " in figure["layout"]["title"]["text"])
    assert json.loads(body)["response"]["patch-message"]["children"] == ""
    inputs = {"state.data": STATE, "attn-layer.value": 1, "attn-head.value": 2}
    status, body, _ = post(server, callback("attention.figure", inputs, "state.data"))
    assert status == 200 and "layer 1 head 2" in json.dumps(figure_of(body, "attention")["layout"]["title"])
    status, body, _ = post(server, callback(HEATMAP, {"state.data": {**STATE, "corrupted": ""}, "site.value":
                                                      "resid_pre", **POLL}, "state.data"))
    assert ("type a corrupted prompt of 7 tokens to patch"
            in figure_of(body, "heatmap")["layout"]["annotations"][0]["text"])
    status, body, _ = post(server, callback(UPDATE, {**GOOD, "prompt.value": "w1 <b>w2"}, "prompt.value"))
    title = figure_of(body, "next-tokens")["layout"]["title"]["text"]
    assert status == 200 and "'w1 &lt;b&gt;w2'" in title  # typed text is shown, not read as plotly markup


HUGE = "w1 " * 2**18


def hostile_requests() -> list[tuple[str, str, dict, str]]:
    """(what, output, inputs, expected inline message) for wrongly typed, oversized or refused values."""
    attention = {"state.data": STATE, "attn-layer.value": 0, "attn-head.value": 0}
    return [
        ("prompt as int", UPDATE, {**GOOD, "prompt.value": 5}, "prompt must be text, got int 5"),
        ("prompt as dict", UPDATE, {**GOOD, "prompt.value": {"a": 1}}, "prompt must be text, got dict {'a': 1}"),
        ("corrupted as list", UPDATE, {**GOOD, "corrupted.value": ["w1"]},
         "corrupted prompt must be text, got list ['w1']"),
        ("768 kB prompt", UPDATE, {**GOOD, "prompt.value": HUGE},
         f"(786432 characters) is too long: at most {MAX_PROMPT_CHARS} characters"),
        ("empty prompt", UPDATE, {**GOOD, "prompt.value": ""}, "the prompt is empty: type some text"),
        ("too many tokens", UPDATE, {**GOOD, "prompt.value": "w1 " * 30}, "has 31 tokens with BOS; the demo takes "
                                                                         "at most 16"),
        ("unequal lengths", HEATMAP, {"state.data": {**STATE, "corrupted": CORRUPTED + " w9"}, "site.value":
                                      "resid_pre", **POLL}, "the clean prompt has 7 tokens, the corrupted one 8"),
        ("identical prompts", HEATMAP, {"state.data": {**STATE, "corrupted": PROMPT}, "site.value": "resid_pre",
                                        **POLL},
         "patching has nothing to restore"),
        ("site the model lacks", HEATMAP, {"state.data": STATE, "site.value": "resid_mid", **POLL},
         "unknown patching site 'resid_mid'; allowed: ['resid_pre', 'resid_post']"),
        ("site as list", HEATMAP, {"state.data": STATE, "site.value": ["resid_pre"], **POLL}, "unknown patching site"),
        ("forged state of another shape", HEATMAP, {"state.data": [1, 2], "site.value": "resid_pre", **POLL},
         "state must be {'prompt', 'corrupted'}"),
        ("forged huge state", "attention.figure", {**attention, "state.data": {"prompt": [[1] * 12] * 20_000,
                                                                               "corrupted": ""}},
         "prompt must be text, got list [[1, 1, 1"),
        ("state with a long prompt", "attention.figure", {**attention, "state.data": {**STATE, "prompt": HUGE}},
         "is too long"),
        ("layer null", "attention.figure", {**attention, "attn-layer.value": None},
         "layer must be an integer, got None"),
        ("head as text", "attention.figure", {**attention, "attn-head.value": "0"}, "head must be an integer, got '0'"),
        ("layer out of range", "attention.figure", {**attention, "attn-layer.value": 7},
         "attention layer 7, head 0 is outside layers 0..1"),
    ]


def test_hostile_values_get_a_short_inline_message_fast(server):
    for what, output, inputs, expected in hostile_requests():
        status, body, seconds = post(server, callback(output, inputs, next(iter(inputs))))
        assert status == 200, (what, status, body[:300])
        message = inline_message(body) if output != HEATMAP else json.loads(body)["response"]["patch-message"][
            "children"]
        assert expected in message and len(message) <= 400, (what, message[:300])
        assert seconds < FAST_S, (what, seconds)
        if output in (UPDATE, HEATMAP):  # a bad value leaves the last good panels in place (and stops polling)
            assert set(json.loads(body)["response"]) - {"heatmap-poll"} in ({"message"}, {"patch-message"}), what
    status, body, _ = post(server, callback(UPDATE, GOOD, "prompt.value"), host="evil.example")
    assert status == 403  # the app is served by demos.server: foreign Host headers are refused


# the command line -----------------------------------------------------------------------------------------------------

def test_demo_command_with_a_model(run_cli, tiny_hf, word_tokenizer, tmp_path, monkeypatch, offline):
    folder = tmp_path / "gpt2"
    tiny_hf("gpt2").save_pretrained(folder)
    served = []
    monkeypatch.setattr(lm_app, "serve", lambda demo, **options: served.append((demo, options)))
    code, _, err = run_cli("demo", "--model", str(folder), "--port", "0", "--sequences", "8", "--max-len", "12")
    assert code == 2 and "has no tokenizer files" in err  # no tokenizer saved with it
    word_tokenizer().save_pretrained(folder)
    code, _, err = run_cli("demo", "--model", str(folder), "--port", "0", "--sequences", "8", "--max-len", "12",
                           "--quiet")
    assert code == 0, err
    [(demo, options)] = served
    assert (demo.name, demo.n_sequences, demo.max_len, demo.text) == ("gpt2", 8, 12, None)
    assert options == {"port": 0, "allow_hosts": [], "quiet": True}
    for argv, expected in ((["--text", "x.txt"], "--text go with --model SPEC"),
                           (["--dtype", "bfloat16", "--max-len", "5"], "--dtype, --max-len go with --model SPEC"),
                           (["--model", str(folder), "--static", str(tmp_path / "x.html")],
                            "--static writes the addition demo's page"),
                           (["--model", str(folder), "--max-len", "99"], "max_len must be an integer in 2..64"),
                           (["--model", str(folder), "--port", "70000"], "port must be an integer in 0..65535")):
        code, _, err = run_cli("demo", *argv)
        assert code == 2 and expected in err, (argv, err)
    with pytest.raises(SystemExit):  # argparse: not allowed with argument --models
        run_cli("demo", "--model", str(folder), "--models", str(folder))
