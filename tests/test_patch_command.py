"""`poslens patch`: checkpoints on their task's corruptions, any model on a file of prompt pairs, the alignment
rule for prompts of unequal token length, and one-line errors."""

import pytest

from poslens.analyses.experiments.patch import encode_pairs, read_pairs
from poslens.analyses.measures.patching import activation_patching, prompt_patch_table
from poslens.analyses.tables import read_table
from poslens.tasks import Addition
from poslens.variants import load, load_any


@pytest.fixture(scope="module")
def run(trained_runs):
    return trained_runs[("nope-causal", 2)]


def write_pairs(path, *pairs):
    path.write_text("# clean<TAB>corrupted\n\n" + "".join(f"{a}\t{b}\n" for a, b in pairs), encoding="utf-8")
    return path


def test_checkpoint_on_its_task_writes_every_format_and_a_heatmap(run, run_cli, tmp_path):
    code, out, err = run_cli("patch", str(run), "--sites", "resid_pre", "attn_out", "--sequences", "8",
                             "--positions", "4", "6", "--out", str(tmp_path / "out"), "--quiet")
    assert code == 0, err
    assert "exact patching, metric: normalised logit diff" in out
    names = sorted(path.name for path in (tmp_path / "out").iterdir())
    assert names == sorted(["patching.csv", "patching.md", "patching.tex", "patching.json",
                            "patching.nope-causal.resid_pre.html", "patching.nope-causal.attn_out.html",
                            "plotly.min.js"])  # the heatmaps share one copy of plotly.js
    table = read_table(tmp_path / "out" / "patching.csv")
    assert set(table["site"]) == {"resid_pre", "attn_out"} and table["fixed_by_construction"].any()
    expected = activation_patching(load(run), Addition(), positions=(4, 6), n_sequences=8)
    expected = expected[expected["site"].isin(["resid_pre", "attn_out"])].reset_index(drop=True)
    assert table["value"].to_numpy() == pytest.approx(expected["value"].to_numpy(), abs=1e-6)
    assert read_table(tmp_path / "out" / "patching.json").equals(table)
    code, _, err = run_cli("patch", str(run), "--sequences", "8", "--out", str(tmp_path / "out"), "--quiet")
    assert code == 2 and err.count("\n") == 1 and "already exists" in err  # nothing is overwritten silently


def test_model_with_pairs_exact_and_attribution(run, run_cli, tmp_path):
    pairs = write_pairs(tmp_path / "pairs.tsv", ("123+456=", "321+456="))
    tables = {}
    for method in ("exact", "attribution"):
        code, out, err = run_cli("patch", "--model", str(run), "--pairs", str(pairs), "--method", method,
                                 "--out", str(tmp_path / method), "--quiet")
        assert code == 0, err
        tables[method] = read_table(tmp_path / method / "patching.csv")
    model = load(run)
    clean, corrupted, dropped = encode_pairs(model, read_pairs(pairs))
    assert dropped == 0 and clean.shape == (1, 8)
    expected, _ = prompt_patch_table(model, clean, corrupted, ["resid_pre"])
    exact = tables["exact"]
    assert list(exact.columns) == ["model", "method", "site", "layer", "position", "from_end", "role", "value",
                                   "dropped"]
    assert exact["value"].to_numpy() == pytest.approx(expected["value"].to_numpy(), abs=1e-6)
    assert (exact["from_end"] == exact["position"] - 8).all() and exact["role"][0] == "1→3"
    preview = tables["attribution"]
    assert (preview["method"] == "attribution").all() and preview["value"].notna().all()
    # at the embedding, positions whose token the corruption keeps are identical in both runs: both exactly 0
    kept = (exact["layer"] == 0) & ~exact["role"].str.contains("→")
    assert kept.sum() == 6 and (exact["value"][kept] == 0).all() and (preview["value"][kept] == 0).all()
    assert (preview["value"][~kept & (exact["layer"] == 0)] != 0).all()


def test_unequal_lengths_are_refused_or_aligned_from_the_end(run, run_cli, tmp_path):
    pairs = write_pairs(tmp_path / "pairs.tsv", ("123+456=", "1+456="))
    code, _, err = run_cli("patch", "--model", str(run), "--pairs", str(pairs), "--out", str(tmp_path / "a"))
    assert code == 2 and err.count("\n") == 1
    assert "has 8 tokens, another 6; patching compares equal positions (rule 'equal'); pass --align end" in err
    code, _, err = run_cli("patch", "--model", str(run), "--pairs", str(pairs), "--align", "end",
                           "--out", str(tmp_path / "b"), "--quiet")
    assert code == 0, err
    table = read_table(tmp_path / "b" / "patching.csv")
    # the clean prompt keeps its last 6 tokens: "3+456=" against "1+456="
    assert table["position"].max() == 5 and (table["dropped"] == 2).all() and table["from_end"].min() == -6
    clean, corrupted, dropped = encode_pairs(load(run), read_pairs(pairs), "end")
    model = load(run)
    assert dropped == 2 and (model.to_string(clean[0]), model.to_string(corrupted[0])) == ("3+456=", "1+456=")
    assert table["role"][0] == "3→1"


def test_bridged_model_folder(run_cli, tiny_hf, word_tokenizer, tmp_path, offline):
    folder = tmp_path / "gpt2"
    tiny_hf("gpt2").save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    pairs = write_pairs(tmp_path / "pairs.tsv", ("w5 w9 w4 w30 w12 w7", "w5 w9 w40 w30 w12 w7"))
    code, out, err = run_cli("patch", "--model", str(folder), "--pairs", str(pairs), "--sites", "resid_pre",
                             "resid_mid", "--out", str(tmp_path / "out"), "--quiet")
    assert code == 0, err
    table = read_table(tmp_path / "out" / "patching.csv")
    model = load_any(folder)
    clean, corrupted, _ = encode_pairs(model, read_pairs(pairs))
    assert clean.shape == (1, 7)  # BOS first
    expected, _ = prompt_patch_table(model, clean, corrupted, ["resid_pre", "resid_mid"])
    assert table["value"].to_numpy() == pytest.approx(expected["value"].to_numpy(), abs=1e-5)
    assert "w4→w40" in set(table["role"])


@pytest.mark.parametrize("argv, expected", [
    (["--out", "o"], "give either checkpoint directories or --model SPEC (not both)"),
    (["--model", "{run}", "--out", "o"], "--model needs --pairs FILE"),
    (["--model", "{run}", "--pairs", "{tmp}/missing.tsv", "--out", "o"], "is not a file of prompt pairs"),
    (["--model", "{run}", "--pairs", "{tmp}/bad.tsv", "--out", "o"], "line 2: expected a clean and a corrupted prompt"),
    (["{run}", "--positions", "0", "3", "--out", "o"], "operand-digit positions [0, 1, 2, 4, 5, 6], got (0, 3)"),
])
def test_bad_input_is_one_line_and_exit_2(argv, expected, run, run_cli, tmp_path):
    (tmp_path / "bad.tsv").write_text("123+456=\t321+456=\n123+456= 321+456=\n", encoding="utf-8")
    argv = [arg.format(run=run, tmp=tmp_path).replace("o", str(tmp_path / "o")) if arg == "o"
            else arg.format(run=run, tmp=tmp_path) for arg in argv]
    code, out, err = run_cli("patch", *argv)
    assert code == 2 and err.count("\n") == 1 and expected in err, err
    assert "Traceback" not in err and not (tmp_path / "o").exists()
