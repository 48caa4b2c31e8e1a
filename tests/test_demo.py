"""The demo's computations, its static page and `poslens demo` errors, without a browser."""

import base64
import dataclasses
import io
import json
import shutil
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

from poslens.analyses.measures.patching import KL_RESTORED, LOGIT_DIFF, SITES, corrupt
from poslens.cli import main
from poslens.demos import discovery, panels
from poslens.demos.discovery import demo_models, discover_models
from poslens.demos.panels import (
    DemoModel,
    ModelStore,
    answer_distribution,
    answers,
    attention_figure,
    corrupt_prompt,
    distribution_figure,
    greedy_answer,
    load_demo_model,
    parse_prompt,
    patch_effects,
    probe_figure,
    probe_predictions,
    residual_cut_answers,
    residual_cut_figure,
)
from poslens.demos.static import static_figures, write_static_page
from poslens.hooks import capture_residuals, residual_sites
from poslens.tasks import Addition, MarkovICL
from poslens.variants import build, variant_config
from poslens.variants.storage import read_json, write_json


@pytest.fixture(scope="module")
def store(trained_runs):
    return ModelStore({"nope": trained_runs[("nope-causal", 2)], "learned": trained_runs[("learned-causal", 2)],
                       "bidirectional": trained_runs[("nope-bidirectional", 2)]}, n_sequences=48)


@pytest.fixture(scope="module")
def nope(store):
    return store["nope"]


def run(*argv):
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def first_digit_logit_diff(probabilities, good, bad):
    return float(np.log(probabilities[good]) - np.log(probabilities[bad]))


# models -----------------------------------------------------------------------------------------------------------

def test_discover_models(trained_runs, tmp_path):
    checkpoint = trained_runs[("nope-causal", 2)]
    assert discover_models(checkpoint) == {checkpoint.name: checkpoint}
    for layout in ("reproduce/runs", "parent"):  # a reproduce output, and a folder of checkpoints
        for name in ("nope-causal-seed0", "learned-causal-seed0"):
            shutil.copytree(trained_runs[(name.removesuffix("-seed0"), 2)], tmp_path / layout / name)
        (tmp_path / layout / "not-a-run").mkdir()
    expected = ["learned-causal-seed0", "nope-causal-seed0"]
    assert sorted(discover_models(tmp_path / "reproduce")) == expected
    assert discover_models(tmp_path / "parent") == {name: tmp_path / "parent" / name for name in expected}
    with pytest.raises(FileNotFoundError, match=r"holds no poslens checkpoint"):
        discover_models(tmp_path / "parent" / "not-a-run")
    with pytest.raises(FileNotFoundError, match=r"model folder .*missing does not exist"):
        discover_models(tmp_path / "missing")


def test_load_demo_model_needs_an_addition_model(trained_runs, tmp_path):
    demo = load_demo_model(trained_runs[("nope-causal", 2)], name="x")
    assert demo.name == "x" and demo.task == Addition() and not demo.model.training
    copy = shutil.copytree(trained_runs[("nope-causal", 2)], tmp_path / "markov")
    record = read_json(copy / "run.json")
    record["task"] = {"name": "markov", **dataclasses.asdict(MarkovICL())}
    write_json(copy / "run.json", record)
    with pytest.raises(ValueError, match=r"was trained on 'markov'; the demo needs an 'addition' model"):
        load_demo_model(copy)


def with_task(run_dir: Path, out: Path, **task_fields) -> Path:
    """A copy of `run_dir` at `out` whose run.json records another task (what a reproduce output's other runs hold)."""
    copy = shutil.copytree(run_dir, out)
    record = read_json(copy / "run.json")
    record["task"] = {**record["task"], **task_fields}
    write_json(copy / "run.json", record)
    return copy


def test_demo_skips_shifted_format_runs_of_a_reproduce_output(trained_runs, tmp_path, run_cli):
    # a reproduce output: fixed-format runs beside shifted-format ones (Addition(max_shift=4)), whose positions have
    # no fixed role; the demo shows the former and names the latter instead of stopping on the first shifted run
    runs = tmp_path / "reproduce" / "runs"
    shutil.copytree(trained_runs[("nope-causal", 2)], runs / "nope-causal-seed0")
    shifted = with_task(trained_runs[("nope-causal", 2)], runs / "nope-causal-shift4-seed0", max_shift=4)
    shown, skipped = demo_models(discover_models(tmp_path / "reproduce"))
    assert shown == {"nope-causal-seed0": runs / "nope-causal-seed0"}
    assert list(skipped) == ["nope-causal-shift4-seed0"] and "shifted format (max_shift=4)" in skipped[
        "nope-causal-shift4-seed0"]
    with pytest.raises(ValueError, match=r"shift4-seed0 was trained on the shifted format \(max_shift=4\)"):
        load_demo_model(shifted)
    with pytest.raises(ValueError, match=r"no model the demo can show: .*max_shift=4"):
        demo_models({"shifted": shifted})
    out = tmp_path / "demo.html"
    code, text, err = run_cli("demo", "--models", str(tmp_path / "reproduce"), "--static", str(out))
    assert code == 0 and text.endswith(f"wrote {out}\n"), err
    assert "skipping nope-causal-shift4-seed0: it was trained on the shifted format (max_shift=4)" in err
    page = out.read_text(encoding="utf-8")
    assert set(page_figures(page)) == {"nope-causal-seed0"}
    assert "<li>nope-causal-shift4-seed0: it was trained on the shifted format (max_shift=4)" in page
    code, _, err = run_cli("demo", "--models", str(shifted), "--static", str(tmp_path / "none.html"))
    assert code == 2 and "no model the demo can show" in err and "Traceback" not in err


def test_model_store_loads_once_and_names_unknown_models(store):
    assert store.names == ["nope", "learned", "bidirectional"]
    assert store["nope"] is store["nope"]
    with pytest.raises(ValueError, match=r"unknown model 'gpt'; allowed: \['nope', 'learned', 'bidirectional'\]"):
        store["gpt"]
    with pytest.raises(ValueError, match=r"at least one model"):
        ModelStore({})


def test_default_model_trains_once_then_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(discovery, "DEFAULT_STEPS", 2)
    out = discovery.default_model(tmp_path / "default", quiet=True)
    assert read_json(out / "run.json")["step"] == 2 and read_json(out / "run.json")["finished"]
    assert (read_json(out / "config.json")["config"]
            == variant_config(discovery.DEFAULT_VARIANT, task=Addition()).to_json())
    weights = out / "model.safetensors"
    stamp, payload = weights.stat().st_mtime_ns, weights.read_bytes()
    assert discovery.default_model(tmp_path / "default", quiet=True) == out  # finished: loaded, not retrained
    assert weights.stat().st_mtime_ns == stamp and weights.read_bytes() == payload


# prompts ----------------------------------------------------------------------------------------------------------

def test_parse_prompt(nope):
    sequence = parse_prompt(nope, "  123+456= ")
    assert torch.equal(sequence, Addition().encode(torch.tensor([123]), torch.tensor([456])))
    assert nope.model.to_string(sequence[0]) == "123+456=9750"
    assert nope.model.to_string(parse_prompt(nope, "007+040=")[0]) == "007+040=7400"
    for bad, message in (("12a+456=", r"character 'a' at index 2 of '12a\+456=' is not in the vocabulary; "
                                       r"allowed characters: '0123456789\+='"),
                         ("123+456=123+456=", r"sequence length 16 is longer than the model's n_ctx = 12"),
                         ("1234+56=", r"prompt '1234\+56=' is not two 3-digit operands"),
                         ("12+456=", r"is not two 3-digit operands: .*zero-padded"),
                         ("123+456", r"and end with '='"),
                         ("123=456+", r"is not two 3-digit operands"),
                         ("", r"prompt '' is not two 3-digit operands")):
        with pytest.raises(ValueError, match=message):
            parse_prompt(nope, bad)


def test_prompts_with_a_bos_token(tiny):
    task = Addition(bos=True)
    demo = DemoModel("bos", build(tiny("nope-causal", alphabet=task.alphabet, n_ctx=task.seq_len)), task)
    clean = parse_prompt(demo, "123+456=")
    assert demo.model.to_string(clean[0]) == "^123+456=9750"
    assert panels.prompt_text(demo, clean) == "123+456="
    corrupted = corrupt_prompt(demo, clean, "swap", positions=(1, 3))
    assert demo.model.to_string(corrupted[0]) == "^321+456=7770"
    with pytest.raises(ValueError, match=r"prompt '\^123\+456=' is not two 3-digit operands"):
        parse_prompt(demo, "^123+456=")  # BOS is added, never typed


def test_corruptions(nope):
    clean = parse_prompt(nope, "123+456=")
    swapped = corrupt_prompt(nope, clean, "swap", positions=(4, 6))
    assert torch.equal(swapped, corrupt(nope.task, clean, "swap", positions=(4, 6)))
    assert nope.model.to_string(swapped[0]) == "123+654=7770"
    assert nope.model.to_string(corrupt_prompt(nope, clean, "operands")[0]) == "456+123=9750"
    assert nope.model.to_string(corrupt_prompt(nope, clean, "prompt", second_prompt="124+456=")[0]) == "124+456=0850"
    with pytest.raises(ValueError, match=r"'swap two positions' leaves '121\+456=' unchanged"):
        corrupt_prompt(nope, parse_prompt(nope, "121+456="), "swap", positions=(0, 2))
    with pytest.raises(ValueError, match=r"'swap the operands' leaves '333\+333=' unchanged"):
        corrupt_prompt(nope, parse_prompt(nope, "333+333="), "operands")
    with pytest.raises(ValueError, match=r"'a second prompt' leaves"):
        corrupt_prompt(nope, clean, "prompt", second_prompt="123+456=")
    with pytest.raises(ValueError, match=r"prompt '99\+1=' is not two 3-digit operands"):
        corrupt_prompt(nope, clean, "prompt", second_prompt="99+1=")
    with pytest.raises(ValueError, match=r"operand-digit positions \[0, 1, 2, 4, 5, 6\], got \(0, 3\)"):
        corrupt_prompt(nope, clean, "swap", positions=(0, 3))
    with pytest.raises(ValueError, match=r"unknown corruption 'reverse'; allowed: \['swap', 'operands', 'prompt'\]"):
        corrupt_prompt(nope, clean, "reverse")


def test_answers(nope):
    clean, corrupted = parse_prompt(nope, "123+456="), parse_prompt(nope, "124+456=")
    table = answers(nope, clean, corrupted)
    assert list(table.columns) == ["run", "prompt", "answer", "answer_value", "correct_answer", "correct_value",
                                   "is_correct"]
    assert table["run"].tolist() == ["clean", "corrupted"] and table["prompt"].tolist() == ["123+456=", "124+456="]
    assert table["correct_answer"].tolist() == ["9750", "0850"] and table["correct_value"].tolist() == [579, 580]
    for row, sequence in zip(table.itertuples(), (clean, corrupted)):
        generated = nope.model.generate(sequence[:, :8], 4)
        assert row.answer == nope.model.to_string(generated[0])
        assert row.answer_value == int(row.answer[::-1]) and row.is_correct == (row.answer == row.correct_answer)
    assert panels.answer_value(nope.task, "12+4") is None
    assert str(table["answer_value"].dtype) == "Int64" and str(table["correct_value"].dtype) == "Int64"


# activation patching ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def swap_pair(nope):
    clean = parse_prompt(nope, "123+456=")
    return clean, corrupt_prompt(nope, clean, "swap", positions=(4, 6))  # 123+654=: first answer digit 9 -> 7


def test_patch_effects_table_and_exact_cells(nope, swap_pair):
    tables = {}
    for site in SITES:
        tables[site], metric = patch_effects(nope, *swap_pair, site=site)
        assert metric == LOGIT_DIFF
        assert list(tables[site].columns) == ["site", "layer", "position", "role", "value"]
        cells = list(zip(tables[site]["layer"], tables[site]["position"]))
        assert cells == [(layer, position) for layer in range(2) for position in range(8)]
    value = {site: table.set_index(["layer", "position"])["value"] for site, table in tables.items()}
    for position in range(4):  # causal: nothing before the first swapped digit sees the swap
        assert all(value[site][(layer, position)] == 0.0 for site in SITES for layer in range(2))
    assert value["resid_pre"][(0, 5)] == 0.0 and value["resid_pre"][(0, 7)] == 0.0  # same token, same embedding
    assert value["resid_post"][(1, 7)] == pytest.approx(1.0, abs=1e-5)  # the last stream *is* the clean run
    assert value["resid_mid"][(1, 7)] == pytest.approx(1.0, abs=1e-5)
    for position in range(8):  # resid_post of block 0 is resid_pre of block 1
        assert value["resid_post"][(0, position)] == pytest.approx(value["resid_pre"][(1, position)], abs=1e-5)


@pytest.mark.parametrize("site, layer, position", [("resid_pre", 0, 4), ("resid_mid", 0, 6), ("resid_post", 1, 5)])
def test_patch_effect_cell_matches_its_answer_distribution(nope, swap_pair, site, layer, position):
    table, _ = patch_effects(nope, *swap_pair, site=site)
    cell = table.set_index(["layer", "position"])["value"][(layer, position)]
    distribution = answer_distribution(nope, *swap_pair, site, layer, position)
    assert list(distribution.columns) == ["run", "answer", "token", "probability"]
    probability = {run: rows["probability"].to_numpy() for run, rows in distribution.groupby("run")}
    good, bad = 9, 7
    diff = {run: first_digit_logit_diff(p, good, bad) for run, p in probability.items()}
    expected = (diff["patched"] - diff["corrupted"]) / (diff["clean"] - diff["corrupted"])
    assert cell == pytest.approx(expected, rel=1e-3, abs=1e-4)  # float32 probabilities, a small denominator
    for run, p in probability.items():
        assert p.sum() == pytest.approx(1.0, abs=1e-5), run
    answers_by_run = distribution.drop_duplicates("run").set_index("run")["answer"]
    assert answers_by_run["clean"] == greedy_answer(nope, swap_pair[0])
    assert answers_by_run["corrupted"] == greedy_answer(nope, swap_pair[1])


def test_patching_the_last_stream_restores_the_clean_run(nope, swap_pair):
    distribution = answer_distribution(nope, *swap_pair, "resid_post", 1, 7)
    clean = distribution[distribution["run"] == "clean"]
    patched = distribution[distribution["run"] == "patched"]
    assert patched["probability"].to_numpy() == pytest.approx(clean["probability"].to_numpy(), abs=1e-6)
    assert patched["answer"].iloc[0][0] == clean["answer"].iloc[0][0]


def test_operand_swap_uses_the_kl_metric(nope):
    clean = parse_prompt(nope, "123+456=")
    corrupted = corrupt_prompt(nope, clean, "operands")
    table, metric = patch_effects(nope, clean, corrupted, "resid_pre")
    assert metric == KL_RESTORED
    distribution = answer_distribution(nope, clean, corrupted, "resid_pre", 1, 5)
    p = {run: rows["probability"].to_numpy().astype(np.float64) for run, rows in distribution.groupby("run")}

    def kl(q):
        return float((p["clean"] * (np.log(p["clean"]) - np.log(q))).sum())

    expected = 1 - kl(p["patched"]) / kl(p["corrupted"])
    assert table.set_index(["layer", "position"])["value"][(1, 5)] == pytest.approx(expected, abs=1e-3)
    assert table["value"].ne(0).any()


def test_patching_refuses_what_it_cannot_measure(store, nope, swap_pair):
    bidirectional = store["bidirectional"]
    clean = parse_prompt(bidirectional, "123+456=")
    with pytest.raises(ValueError, match=r"'123\+456=' → '456\+123=': the model gives the same first-digit logits "
                                         r"on the clean and the corrupted prompts "
                                         r"\(fraction of KL restored undefined\)"):
        patch_effects(bidirectional, clean, corrupt_prompt(bidirectional, clean, "operands"))
    with pytest.raises(ValueError, match=r"unknown patching site 'attn'; allowed: \['resid_pre', 'resid_mid', "
                                         r"'resid_post', 'attn_out', 'mlp_out'\]"):
        patch_effects(nope, *swap_pair, site="attn")
    for layer, position in ((2, 0), (0, 8), (-1, 0)):
        with pytest.raises(ValueError, match=r"outside layers 0..1 and prompt positions 0..7"):
            answer_distribution(nope, *swap_pair, "resid_pre", layer, position)


def test_figures(nope, swap_pair):
    table, _ = patch_effects(nope, *swap_pair)
    figure = distribution_figure(answer_distribution(nope, *swap_pair, "resid_pre", 0, 4), title="t")
    assert isinstance(figure, go.Figure) and [trace.type for trace in figure.data] == ["bar"] * 3
    assert [trace.name.split(":")[0] for trace in figure.data] == ["clean", "corrupted", "patched"]
    assert list(figure.data[0].x) == list("0123456789+=") and figure.layout.title.text == "t"
    assert panels.message_figure("nothing here").layout.annotations[0].text == "nothing here"


# residual cuts, attention, probes ---------------------------------------------------------------------------------

def test_residual_cut_answers(nope, swap_pair):
    clean = swap_pair[0]
    table = residual_cut_answers(nope, clean)
    assert list(table.columns) == ["block", "sublayer", "exact_match", "answer", "is_correct"]
    assert list(zip(table["block"], table["sublayer"])) == list(zip(nope.cut_effects["block"],
                                                                    nope.cut_effects["sublayer"]))
    assert table["exact_match"].tolist() == nope.cut_effects["exact_match"].tolist()
    assert table["answer"].iloc[0] == greedy_answer(nope, clean)
    for row in table.iloc[1:].itertuples():  # each answer is that of a model built with the cut
        built = build(dataclasses.replace(nope.model.cfg, residual_cuts={row.block: row.sublayer}))
        built.load_state_dict(nope.model.state_dict())
        assert row.answer == built.to_string(built.eval().generate(clean[:, :8], 4)[0]), row
        assert row.is_correct == (row.answer == "9750")
    figure = residual_cut_figure(table)
    assert list(figure.data[0].x)[:2] == ["none", "block 0: attn"]
    assert list(figure.data[0].text) == list(table["answer"])


def test_attention_figure(nope, swap_pair):
    figure = attention_figure(nope, *swap_pair, layer=1, head=2)
    assert [trace.type for trace in figure.data] == ["heatmap", "heatmap"]
    _, cache = nope.model.run_with_cache(swap_pair[1][:, :8])
    expected = cache["blocks.1.attn.hook_pattern"][0, 2].numpy()
    assert np.allclose(np.asarray(figure.data[1].z), expected)
    assert np.allclose(np.asarray(figure.data[0].z).sum(-1), 1.0, atol=1e-5)
    assert np.all(np.triu(np.asarray(figure.data[0].z), 1) == 0)  # causal
    assert list(figure.data[0].x) == ["0:1", "1:2", "2:3", "3:+", "4:4", "5:5", "6:6", "7:="]
    for layer, head in ((2, 0), (0, 4)):
        with pytest.raises(ValueError, match=r"outside layers 0..1 and heads 0..3"):
            attention_figure(nope, *swap_pair, layer=layer, head=head)


def test_probe_predictions(store, swap_pair):
    for name in ("nope", "learned"):
        demo = store[name]
        table = probe_predictions(demo, swap_pair[0])
        assert list(table.columns) == ["site", "position", "token", "predicted", "probability", "true_probability"]
        assert list(dict.fromkeys(table["site"])) == residual_sites(demo.model)
        assert table["token"].tolist()[:8] == list("123+456=")
        capture = capture_residuals(demo.model, swap_pair[0][:, :8])
        expected = demo.probe.predict(capture.activations[:, 0].float())
        assert table["predicted"].tolist() == expected.flatten().tolist()
        assert (table["probability"] >= table["true_probability"]).all()
        if name == "learned":  # a learned positional embedding puts position in the stream at once
            embed = table[table["site"] == "embed"]
            assert embed["predicted"].tolist() == list(range(8)) and (embed["true_probability"] > 0.5).all()
    figure = probe_figure(table)
    assert np.asarray(figure.data[0].z).shape == (5, 8) and figure.data[0].y[0] == "embed"


# the static page and the CLI --------------------------------------------------------------------------------------

def decode(array):
    """A plotly JSON array (a list, or a base64 typed array) as numpy."""
    if isinstance(array, dict):
        values = np.frombuffer(base64.b64decode(array["bdata"]), dtype=np.dtype(array["dtype"]))
        return values.reshape([int(size) for size in array["shape"].split(",")]) if "shape" in array else values
    return np.asarray(array)


def page_figures(text: str) -> dict:
    start = text.index("const FIGURES = ") + len("const FIGURES = ")
    return json.loads(text[start : text.index(";\nconst chosen")])


def test_static_page(store, tmp_path):
    prompts = ["123+456=", "905+381="]
    out = write_static_page(ModelStore({"nope": store.paths["nope"], "bidirectional": store.paths["bidirectional"]}),
                            tmp_path / "demo.html", prompts=prompts, quiet=True)
    text = out.read_text(encoding="utf-8")
    assert "<script src=" not in text and "https://" not in text.split("const FIGURES")[1]  # offline
    assert text.count('<select id="') == 3 and '<option value="905+381=">' in text
    figures = page_figures(text)
    assert list(figures) == ["nope", "bidirectional"]
    assert all(list(figures[name]) == prompts and list(figures[name][p]) == list(SITES) for name in figures
               for p in prompts)
    entry = figures["nope"]["905+381="]["resid_mid"]
    table, metric = patch_effects(store["nope"], parse_prompt(store["nope"], "905+381="),
                                  parse_prompt(store["nope"], "509+381="), "resid_mid")
    heatmap = entry["figure"]["data"][0]
    assert heatmap["type"] == "heatmap" and metric in entry["figure"]["layout"]["title"]["text"]
    assert decode(heatmap["z"]).flatten() == pytest.approx(table["value"].to_numpy(), abs=1e-6)
    assert "clean 905+381= → model" in entry["answers"] and "corrupted 509+381=" in entry["answers"]
    # NoPE-bidirectional: x2 <-> x0 is a permutation of earlier tokens, the last logits cannot move
    assert "patching has nothing to restore" in json.dumps(figures["bidirectional"]["123+456="]["resid_pre"])
    with pytest.raises(FileExistsError, match=r"demo.html already exists; pass overwrite=True"):
        write_static_page(store, out, prompts=prompts, quiet=True)
    with pytest.raises(ValueError,
                       match=r"must end in one of \['.html', '.htm'\]: poslens writes interactive HTML pages"):
        write_static_page(store, tmp_path / "demo.png", quiet=True)
    assert static_figures(ModelStore({"nope": store.paths["nope"]}), ["123+456="], quiet=True)["nope"].keys() == {
        "123+456="}


def test_cli_demo_static_and_errors(trained_runs, tmp_path, monkeypatch):
    checkpoint = trained_runs[("learned-causal", 2)]
    out = tmp_path / "page.html"
    code, text, _ = run("demo", "--models", str(checkpoint), "--static", str(out), "--quiet")
    assert code == 0 and text == f"wrote {out}\n" and set(page_figures(out.read_text())) == {checkpoint.name}
    code, _, err = run("demo", "--models", str(checkpoint), "--static", str(out), "--quiet")
    assert code == 2 and "page.html already exists; pass overwrite=True (--overwrite)" in err
    code, _, _ = run("demo", "--models", str(checkpoint), "--static", str(out), "--quiet", "--overwrite")
    assert code == 0
    code, _, err = run("demo", "--models", str(tmp_path / "nothing"), "--static", str(tmp_path / "x.html"))
    assert code == 2 and "model folder" in err and "does not exist" in err
    code, _, err = run("demo", "--models", str(checkpoint), "--port", "70000")
    assert code == 2 and "port must be an integer in 0..65535 (0 = any free port), got 70000" in err
    # no --models: the built-in model is trained (here 2 steps) into runs/demo-default, then used
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(discovery, "DEFAULT_STEPS", 2)
    code, text, _ = run("demo", "--static", "default.html", "--quiet")
    assert code == 0 and (tmp_path / "runs" / "demo-default" / "model.safetensors").is_file()
    assert set(page_figures((tmp_path / "default.html").read_text())) == {"demo-default"}
