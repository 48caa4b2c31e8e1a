"""Position interventions (`hooks.positions`, `HookedTransformer(position_ids=...)`) and their measures."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from poslens.analyses.measures.positions import (
    LM_COLUMNS,
    READOUT_COLUMNS,
    TASK_COLUMNS,
    default_edits,
    edit_fixed,
    lm_under_positions,
    position_interventions,
    readout_under_positions,
)
from poslens.hooks import capture_residuals
from poslens.hooks.positions import (
    permuted,
    position_support,
    repeated,
    shifted,
    swapped,
    unchanged,
    with_positions,
)
from poslens.variants import build, load_any
from poslens.variants.model import rotary_tables, sinusoidal_table

VARIANTS = ("nope-causal", "nope-bidirectional", "learned-causal", "sinusoidal-causal", "rotary-causal",
            "rotary-bidirectional")


@pytest.fixture
def tokens(addition):
    return addition.sample_test(6, seed=0)[:, :-1]  # the 11 input tokens of a full sum


@pytest.mark.parametrize("variant", VARIANTS)
def test_default_positions_are_unchanged_to_the_bit(tiny, tokens, variant):
    model = build(tiny(variant)).eval()
    default = model(tokens)
    assert torch.equal(model(tokens, position_ids=torch.arange(tokens.shape[1])), default)
    assert torch.equal(model(tokens, position_ids=torch.arange(tokens.shape[1]).expand(len(tokens), -1)), default)


def test_tables_at_explicit_positions_equal_the_cached_tables(tiny):
    cfg = tiny("rotary-causal")
    cos, sin = rotary_tables(cfg)
    at_cos, at_sin = rotary_tables(cfg, torch.arange(cfg.n_ctx))
    assert torch.equal(cos, at_cos) and torch.equal(sin, at_sin)
    cfg = tiny("sinusoidal-causal")
    assert torch.equal(sinusoidal_table(cfg), sinusoidal_table(cfg, torch.arange(cfg.n_ctx)))
    assert torch.equal(sinusoidal_table(cfg, torch.tensor([[3, 1]])), sinusoidal_table(cfg)[[3, 1]][None])


@pytest.mark.parametrize("variant", ["nope-causal", "nope-bidirectional"])
def test_nope_ignores_every_position_edit_by_construction(tiny, tokens, variant):
    """NoPE has no positional signal: whatever ids it is told, every logit is bitwise the same."""
    model = build(tiny(variant)).eval()
    n = tokens.shape[1]
    for edit in (shifted(n, 1), swapped(n, 0, 2), repeated(n, 0, 2), permuted(torch.arange(n).flip(0))):
        assert torch.equal(model(tokens, position_ids=edit.position_ids), model(tokens))
        assert edit_fixed({"none"}, edit.kind)


@pytest.mark.parametrize("variant", ["rotary-causal", "rotary-bidirectional"])
def test_rotary_is_shift_invariant_but_not_swap_invariant(tiny, tokens, variant):
    model = build(dataclasses.replace(tiny(variant), dtype=torch.float64)).eval()
    n = tokens.shape[1]
    default = model(tokens)
    for k in (1, 5, 100):  # a rotary encoding is a formula: ids past n_ctx are defined
        assert (model(tokens, position_ids=shifted(n, k).position_ids) - default).abs().max() < 1e-10
    assert (model(tokens, position_ids=swapped(n, 0, 2).position_ids) - default).abs().max() > 1e-3
    assert edit_fixed({"rotary"}, "shift") and not edit_fixed({"rotary"}, "swap")


def test_learned_ids_read_the_rows_of_the_table(tiny, tokens):
    """Planted: telling token t position p[t] is the same as a model whose table has row p[t] at t."""
    model = build(tiny("learned-causal")).eval()
    order = torch.randperm(tokens.shape[1], generator=torch.Generator().manual_seed(0))
    moved = build(tiny("learned-causal")).eval()
    with torch.no_grad():
        moved.pos_embed.W_pos[: len(order)] = model.pos_embed.W_pos[order]
    assert torch.allclose(model(tokens, position_ids=order), moved(tokens), atol=1e-6)
    assert (model(tokens, position_ids=shifted(tokens.shape[1], 1).position_ids) - model(tokens)).abs().max() > 1e-2


@pytest.mark.parametrize("ids, message", [
    (torch.arange(11) + 2, "must be in 0..11 for a learned position table of n_ctx=12 rows, got 12"),
    (torch.arange(11) - 1, "must be >= 0"),
    (torch.arange(10), "must be shaped [pos] = [11]"),
    (torch.arange(11).float(), "must be an integer tensor"),
])
def test_bad_position_ids_are_refused_by_name(tiny, tokens, ids, message):
    model = build(tiny("learned-causal")).eval()
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        model(tokens, position_ids=ids)


def test_edits_are_checked():
    assert unchanged(3).position_ids.tolist() == [0, 1, 2]
    assert swapped(4, 0, 2).position_ids.tolist() == [2, 1, 0, 3]
    assert repeated(4, 0, 2).position_ids.tolist() == [0, 1, 0, 3] and repeated(4, 0, 2).moved().tolist() == [2]
    for make in (lambda: shifted(4, -1), lambda: swapped(4, 1, 1), lambda: repeated(4, 0, 9),
                 lambda: permuted([0, 0, 1]), lambda: unchanged(0)):
        with pytest.raises(ValueError):
            make()


def test_with_positions_applies_to_every_forward_pass(tiny, tokens, addition):
    model = build(tiny("learned-causal")).eval()
    edit = shifted(tokens.shape[1], 1)
    with with_positions(model, edit):
        capture = capture_residuals(model, tokens, batch_size=2)  # several passes, each its own batch
        answer = model.generate(tokens[:, : addition.prompt_len], 3)  # ids cut to each pass's length
        with pytest.raises(ValueError, match="given both"):
            model(tokens, position_ids=edit.position_ids)
    _, cache = model.run_with_cache(tokens, position_ids=edit.position_ids)
    assert torch.allclose(capture["blocks.1.hook_resid_post"], cache["blocks.1.hook_resid_post"], atol=1e-6)
    manual = tokens[:, : addition.prompt_len]
    for _step in range(3):
        manual = torch.cat([manual, model(manual, position_ids=edit.position_ids[: manual.shape[1]])[:, -1:].argmax(
            -1)], dim=1)
    assert torch.equal(answer, manual[:, addition.prompt_len:])
    assert torch.equal(model(tokens), model(tokens, position_ids=torch.arange(tokens.shape[1])))  # hook removed
    with pytest.raises(ValueError, match="only 3 position ids"), with_positions(model, torch.arange(3)):
        model(tokens)


def test_task_and_readout_tables(tiny, addition):
    """Schemas; NoPE rows fixed and unchanged; a learned table read at the embedding (planted: the
    stream there is the token plus the told row, so a probe reads the told position)."""
    learned = position_interventions(build(tiny("learned-causal")).eval(), addition, n_sequences=64)
    nope = position_interventions(build(tiny("nope-causal")).eval(), addition, n_sequences=64)
    for tables in (learned, nope):
        assert list(tables["position_task"].columns) == list(TASK_COLUMNS)
        assert list(tables["position_readout"].columns) == list(READOUT_COLUMNS)
    task = nope["position_task"]
    assert (task["keeps_answer"] == 1).all() and task.loc[task["kind"] != "none", "fixed_by_construction"].all()
    readout = nope["position_readout"]
    assert (readout["reads_index"] == readout["accuracy_unedited"]).all() and readout["fixed_by_construction"].all()
    readout = learned["position_readout"]
    embed = readout[(readout["site"] == "embed") & (readout["kind"] == "shift")].iloc[0]
    assert embed["reads_told"] > 0.9 and not embed["fixed_by_construction"]
    assert not learned["position_task"]["fixed_by_construction"].any()
    assert learned["position_task"].loc[learned["position_task"]["kind"] == "shift", "keeps_answer"].iloc[0] < 1


def test_shift_past_a_learned_table_is_refused(tiny):
    model = build(tiny("learned-causal"))
    with pytest.raises(ValueError, match=r"shifts \[2\] take positions past the learned table"):
        default_edits(model, 11, shifts=(1, 2))


# Bridged Hugging Face models ---------------------------------------------------------------------------------------

def test_bridged_gpt2_reads_the_ids_it_is_given(tiny_hf):
    hf = tiny_hf("gpt2")
    bridge = load_any(hf)
    tokens = torch.randint(4, 96, (3, 10), generator=torch.Generator().manual_seed(0))
    edit = shifted(10, 3)
    with with_positions(bridge, edit):
        edited = bridge(tokens)
    expected = hf(tokens, position_ids=edit.position_ids.expand(3, -1)).logits
    assert torch.allclose(edited, expected, atol=1e-5) and (edited - bridge(tokens)).abs().max() > 1e-3
    table = lm_under_positions(bridge, tokens, [unchanged(10), edit])
    assert list(table.columns) == list(LM_COLUMNS) and not table["fixed_by_construction"].any()
    assert table["delta_loss"].iloc[0] == 0 and table["delta_loss"].iloc[1] != 0


@pytest.mark.parametrize("kind", ["llama", "neox-sequential"])
def test_bridged_rotary_models_ignore_a_shift_but_not_a_swap(tiny_hf, kind):
    bridge = load_any(tiny_hf(kind))
    tokens = torch.randint(4, 96, (8, 10), generator=torch.Generator().manual_seed(0))
    table = lm_under_positions(bridge, tokens, [unchanged(10), shifted(10, 7), swapped(10, 1, 5)]).set_index("kind")
    assert table.loc["shift", "agreement"] == 1 and abs(table.loc["shift", "delta_loss"]) < 1e-5
    assert table.loc["shift", "fixed_by_construction"] and not table.loc["swap", "fixed_by_construction"]
    assert abs(table.loc["swap", "delta_loss"]) > 1e-6
    readout = readout_under_positions(bridge, tokens, [shifted(10, 2)], sites=["embed", "blocks.1.hook_resid_post"])
    assert readout["fixed_by_construction"].all()


def test_models_without_position_ids_are_named():
    import transformers

    bloom = transformers.BloomForCausalLM(transformers.BloomConfig(hidden_size=32, n_layer=1, n_head=4,
                                                                    vocab_size=96))
    assert "ALiBi" in position_support(load_any(bloom))
    assert "no position_ids argument" in position_support(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="ALiBi"), with_positions(load_any(bloom), shifted(4, 1)):
        pass


def test_figures_leave_fixed_rows_out(tiny, addition):
    from poslens.analyses.figures.positions import position_edit_figure, position_readout_figure

    tables = position_interventions(build(tiny("rotary-causal")).eval(), addition, n_sequences=32)
    bars = position_edit_figure(tables["position_task"])
    assert list(bars.data[0].x) == ["none", "swap 0,2", "repeat 2=0"]  # the shift is fixed for rotary
    lines = position_readout_figure(tables["position_readout"])
    assert {trace.name for trace in lines.data} == {f"{edit} · {reading}" for edit in ("swap 0,2", "repeat 2=0")
                                                   for reading in ("reads_told", "reads_index")}
    assert all("embed" not in list(trace.x) for trace in lines.data)  # rotary adds nothing at the embedding


def test_positions_command_on_a_run_and_on_a_bridged_model(run_cli, trained_runs, tiny_hf, word_tokenizer, tmp_path):
    run = trained_runs[("learned-causal", 2)]
    code, text, err = run_cli("positions", "--model", str(run), "--sequences", "48", "--out", str(tmp_path / "run"))
    assert code == 0, err
    assert "| shift+1 | shift | 1 2 3 4 5 6 7 8 9 10 11 |" in text
    assert (tmp_path / "run" / "tables" / "position_readout.csv").is_file()
    assert (tmp_path / "run" / "figures" / "position_edits.html").is_file()
    code, _, err = run_cli("positions", "--model", str(run), "--out", str(tmp_path / "run"))
    assert code == 2 and "already exists" in err  # refused before any work
    code, _, err = run_cli("positions", "--model", str(run), "--shift", "3", "--out", str(tmp_path / "far"))
    assert code == 2 and "shifts [3] take positions past the learned table of n_ctx=12 rows" in err
    folder = tmp_path / "llama"
    tiny_hf("llama").save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    code, text, err = run_cli("positions", "--model", str(folder), "--random-tokens", "--max-len", "12",
                              "--sequences", "16", "--shift", "1", "--shift", "20", "--out", str(tmp_path / "lm"))
    assert code == 0, err
    assert "| shift+20 | shift |" in text and "| True |" in text  # rotary: a shift is fixed by construction


def test_demo_shift_control(trained_runs):
    """The addition demo's "shift positions by k": the panel function and the app's callback."""
    import json
    import threading
    import urllib.request

    from poslens.demos.app import make_app
    from poslens.demos.panels import ModelStore, max_position_shift, parse_prompt, shifted_answer
    from poslens.demos.server import make_server

    store = ModelStore({"learned": trained_runs[("learned-causal", 2)], "nope": trained_runs[("nope-causal", 2)]},
                       n_sequences=48)
    learned, nope = store["learned"], store["nope"]
    assert max_position_shift(learned) == 1 and max_position_shift(nope) == 16
    clean = parse_prompt(learned, "123+456=")
    unshifted = shifted_answer(learned, clean, 0).iloc[0]
    assert not unshifted.fixed_by_construction and unshifted.correct_answer == "9750"
    assert shifted_answer(nope, clean, 16).iloc[0].answer == shifted_answer(nope, clean, 0).iloc[0].answer
    assert shifted_answer(nope, clean, 16).iloc[0].fixed_by_construction
    with pytest.raises(ValueError, match=r"shift must be an integer in 0..1 for learned, got 2"):
        shifted_answer(learned, clean, 2)
    server = make_server(make_app(store), port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        def shifted_view(k) -> str:
            state = {"model": "learned", "clean": "123+456=", "corrupted": "321+456="}
            body = json.dumps({"output": "shifted.children", "outputs": {"id": "shifted", "property": "children"},
                               "inputs": [{"id": "state", "property": "data", "value": state},
                                          {"id": "shift", "property": "value", "value": k}],
                               "changedPropIds": ["shift.value"], "state": []}).encode()
            request = urllib.request.Request(f"http://127.0.0.1:{server.server_port}/_dash-update-component",
                                             data=body, headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())["response"]["shifted"]["children"]

        assert shifted_view(1).startswith("positions 1..11: 123+456= → model ")
        assert "correct 9750" in shifted_view(1)
        assert shifted_view(5) == "shift must be an integer in 0..1 for learned, got 5"
    finally:
        server.shutdown()
        thread.join(timeout=10)
        server.server_close()
