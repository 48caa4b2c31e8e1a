import dataclasses

import plotly.graph_objects as go
import pytest
import torch

from poslens.analyses.figures.patching import patching_heatmap
from poslens.analyses.measures.cut_effects import residual_cut_effects
from poslens.analyses.measures.patching import (
    KL_RESTORED,
    LOGIT_DIFF,
    PATCHING_COLUMNS,
    NothingToRestore,
    activation_patching,
    corrupt,
    model_sites,
    next_token_restoration,
    patching_sample,
    prompt_patch_table,
)
from poslens.analyses.measures.swaps import position_swap, swap_readout
from poslens.hooks import capture_residuals, residual_sites
from poslens.probes import PositionProbe, flatten_tokens, split_by_sequence
from poslens.tasks import Addition
from poslens.variants import build, evaluate, load, load_any
from poslens.variants.config import SUBLAYERS
from poslens.variants.tokens import detokenize

SITES = ["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"]


@pytest.fixture(scope="module")
def model(trained_runs):
    return load(trained_runs[("nope-causal", 2)])


def parse(text: str) -> tuple[str, str, int]:
    """`'123+456=9750'` → (`'123'`, `'456'`, 579): the operands and the (reversed) answer as a number."""
    prompt, answer = text.split("=")
    a, b = prompt.split("+")
    return a, b, int(answer[::-1])


# corrupt --------------------------------------------------------------------------------------------------------------

def test_swap_exchanges_two_digits_and_recomputes_the_answer(addition):
    tokens = addition.test_set()[:50]
    for positions in ((0, 2), (4, 6), (2, 4), (1, 5)):
        corrupted = corrupt(addition, tokens, "swap", positions=positions)
        assert corrupted.shape == tokens.shape
        for before, after in zip(detokenize(tokens, addition.alphabet), detokenize(corrupted, addition.alphabet)):
            expected = list(before[: addition.prompt_len])
            expected[positions[0]], expected[positions[1]] = expected[positions[1]], expected[positions[0]]
            assert after[: addition.prompt_len] == "".join(expected)
            a, b, total = parse(after)
            assert total == int(a) + int(b)
    # the default is the first operand's hundreds and units
    assert torch.equal(corrupt(addition, tokens), corrupt(addition, tokens, "swap", positions=(0, 2)))
    assert not torch.equal(corrupt(addition, tokens), tokens)


def test_swap_with_a_bos_token():
    task = Addition(bos=True)
    tokens = task.test_set()[:20]
    corrupted = corrupt(task, tokens, "swap", positions=(1, 3))  # x2 <-> x0 after BOS
    for before, after in zip(detokenize(tokens, task.alphabet), detokenize(corrupted, task.alphabet)):
        assert after[0] == "^" and after[1:4] == before[1:4][::-1] and after[4:9] == before[4:9]
        a, b, total = parse(after[1:])
        assert total == int(a) + int(b)
    with pytest.raises(ValueError, match=r"operand-digit positions \[1, 2, 3, 5, 6, 7\], got \(0, 2\)"):
        corrupt(task, tokens, "swap", positions=(0, 2))


def test_permute_keeps_the_operand_digits_and_recomputes_the_sum(addition):
    tokens = addition.test_set()[:50]
    operand = [0, 1, 2, 4, 5, 6]
    corrupted = corrupt(addition, tokens, "permute", seed=3)
    assert torch.equal(corrupt(addition, tokens, "permute", seed=3), corrupted)  # a pure function of the seed
    assert not torch.equal(corrupted, tokens)
    assert not torch.equal(corrupt(addition, tokens, "permute", seed=4), corrupted)
    # one permutation for the whole batch: the same slot mapping in every row
    moved = corrupted[:, operand]
    sources = [[k for k in range(6) if torch.equal(moved[:, j], tokens[:, operand][:, k])] for j in range(6)]
    assert all(len(source) >= 1 for source in sources)
    for before, after in zip(detokenize(tokens, addition.alphabet), detokenize(corrupted, addition.alphabet)):
        assert sorted(before[:3] + before[4:7]) == sorted(after[:3] + after[4:7])
        assert after[3] == "+" and after[7] == "="
        a, b, total = parse(after)
        assert total == int(a) + int(b)


def test_corrupt_rejects_bad_arguments(addition):
    tokens = addition.test_set()[:4]
    with pytest.raises(ValueError, match=r"unknown corruption 'shuffle'; allowed: \['swap', 'permute'\]"):
        corrupt(addition, tokens, "shuffle")
    for positions in ((0, 3), (0, 0), (2, 7), (0, 1, 2), (0, 11)):
        with pytest.raises(ValueError, match=rf"operand-digit positions \[0, 1, 2, 4, 5, 6\], got {positions}"
                           .replace("(", r"\(").replace(")", r"\)")):
            corrupt(addition, tokens, "swap", positions=positions)


# activation patching --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def patched(model, addition):
    return activation_patching(model, addition, positions=(4, 6), n_sequences=16)


def test_activation_patching_table(patched, model, addition):
    assert list(patched.columns) == ["site", "layer", "position", "role", "value", "fixed_by_construction"]
    assert sorted(patched["site"].unique()) == sorted(SITES)
    n_layers, n_pos = model.cfg.n_layers, addition.prompt_len
    for site in SITES:
        rows = patched[patched["site"] == site]
        assert len(rows) == n_layers * n_pos
        assert (sorted(zip(rows["layer"], rows["position"]))
                == [(layer, p) for layer in range(n_layers) for p in range(n_pos)])
    assert all(patched["role"] == [addition.roles[p] for p in patched["position"]])
    assert patched["value"].notna().all()


def value(table, site, layer, position):
    row = table[(table["site"] == site) & (table["layer"] == layer) & (table["position"] == position)]
    assert len(row) == 1
    return float(row["value"].iloc[0])


def test_activation_patching_exact_values(patched, model, addition):
    last_layer, last = model.cfg.n_layers - 1, addition.prompt_len - 1
    # the embedding of an unchanged token is the same in both runs: patching it changes nothing
    for position in range(addition.prompt_len):
        if position not in (4, 6):
            assert value(patched, "resid_pre", 0, position) == 0.0, position
    # causal: positions before the first swapped digit never see it, at any layer or site
    for site in SITES:
        for layer in range(model.cfg.n_layers):
            for position in range(4):
                assert value(patched, site, layer, position) == 0.0, (site, layer, position)
    # the last layer's MLP and the unembedding are per position: patching resid_mid there *is* the clean run
    assert value(patched, "resid_mid", last_layer, last) == pytest.approx(1.0, abs=1e-6)
    # patching resid_mid at a position makes that position's resid_post (the next resid_pre) clean too
    for layer in range(model.cfg.n_layers - 1):
        for position in range(addition.prompt_len):
            assert value(patched, "resid_pre", layer + 1, position) == pytest.approx(
                value(patched, "resid_mid", layer, position), abs=1e-6)
            # resid_post of block l is the stream entering block l + 1
            assert value(patched, "resid_post", layer, position) == value(patched, "resid_pre", layer + 1, position)
    # the final resid_post at the last position is the whole input to the unembedding
    assert value(patched, "resid_post", last_layer, last) == pytest.approx(1.0, abs=1e-6)
    # something does move: the swapped positions matter at layer 0
    assert max(abs(value(patched, "resid_pre", 0, p)) for p in (4, 6)) > 0.01


def test_activation_patching_marks_the_cells_the_architecture_fixes(patched, model, addition):
    fixed, free = patched[patched["fixed_by_construction"]], patched[~patched["fixed_by_construction"]]
    # a fixed cell is 0 or 1 whatever the weights, up to float32 rounding (summing attention's keys in another
    # order), which the normalised metric divides by a small clean - corrupted difference (float64: test_construction)
    assert ((fixed["value"].abs() < 1e-3) | ((fixed["value"] - 1).abs() < 1e-3)).all()
    assert len(free) and (free["value"].abs() > 1e-2).any()
    marked = set(zip(fixed["site"], fixed["layer"], fixed["position"]))
    last_layer, last = model.cfg.n_layers - 1, addition.prompt_len - 1
    assert ("resid_pre", 0, 0) in marked and ("resid_post", last_layer, last) in marked  # causal prefix; the output
    assert ("mlp_out", last_layer, 2) in marked  # after the last attention layer, nothing reads position 2
    assert ("resid_pre", 1, last) in marked  # NoPE causal: after one attention layer, position 7 saw a permuted set
    assert ("resid_pre", 0, 4) not in marked and ("resid_pre", 1, 5) not in marked


@torch.no_grad()
def test_activation_patching_matches_a_hand_made_patch(patched, model, addition):
    # the examples activation_patching uses: the first 16 of a seeded sample of 4 * 16 whose first answer digit changes
    clean = addition.sample_test(64, 0)
    corrupted = corrupt(addition, clean, "swap", positions=(4, 6))
    changed = clean[:, addition.prompt_len] != corrupted[:, addition.prompt_len]
    clean, corrupted = clean[changed][:16], corrupted[changed][:16]
    assert all(torch.equal(x, y) for x, y in zip((clean, corrupted), patching_sample(addition, positions=(4, 6),
                                                                                     n_sequences=16)))
    prompt_len, rows = addition.prompt_len, torch.arange(16)
    good, bad = clean[:, prompt_len], corrupted[:, prompt_len]

    def metric(prompts, hooks=()):
        with model.hooks(fwd_hooks=list(hooks)):
            last = model(prompts)[:, -1]
        return float((last[rows, good] - last[rows, bad]).mean())

    _, cache = model.run_with_cache(clean[:, :prompt_len])
    clean_value, corrupted_value = metric(clean[:, :prompt_len]), metric(corrupted[:, :prompt_len])
    hook_names = {"resid_pre": "hook_resid_pre", "resid_mid": "hook_resid_mid", "attn_out": "hook_attn_out",
                  "mlp_out": "hook_mlp_out"}
    for site, hook in hook_names.items():
        for layer, position in ((0, 6), (1, 5), (1, 7)):
            name = f"blocks.{layer}.{hook}"

            def patch(activation, hook, name=name, position=position):
                activation[:, position] = cache[name][:, position]
                return activation

            patched_value = metric(corrupted[:, :prompt_len], [(name, patch)])
            expected = (patched_value - corrupted_value) / (clean_value - corrupted_value)
            assert value(patched, site, layer, position) == pytest.approx(expected, abs=1e-5), (site, layer, position)


def test_activation_patching_defaults_and_heatmap(model, addition):
    table = activation_patching(model, addition, n_sequences=16)  # swap x2 <-> x0
    assert value(table, "resid_pre", 0, 1) == 0.0 and value(table, "resid_pre", 0, 7) == 0.0
    assert max(abs(value(table, "resid_pre", 0, p)) for p in (0, 2)) > 0.01
    figure = patching_heatmap(table, "attn_out")
    assert isinstance(figure, go.Figure)
    heatmap = figure.data[0]
    assert heatmap.z.shape == (model.cfg.n_layers, addition.prompt_len)
    assert list(heatmap.x) == [f"{p}:{role}" for p, role in enumerate(addition.roles[: addition.prompt_len])]
    expected = table[table["site"] == "attn_out"].sort_values(["layer", "position"])["value"].to_numpy()
    assert heatmap.z.flatten().tolist() == pytest.approx(expected.tolist())
    assert figure.layout.title.text == "activation patching, attn_out"


def test_activation_patching_rejects_a_corruption_that_keeps_the_answer(model, addition):
    # swapping the two tens digits (x1 <-> y1) never changes the sum
    with pytest.raises(ValueError, match=r"changes no first answer digit"):
        activation_patching(model, addition, positions=(1, 5), n_sequences=4)


# position swap --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def swapped(model, addition):
    return position_swap(model, addition, n_sequences=32)


def test_position_swap_table(swapped, model):
    assert list(swapped["site"]) == residual_sites(model)
    assert list(swapped.columns) == ["site", "follows_swap", "keeps_original", "n_sequences", "fixed_by_construction"]
    assert swapped["n_sequences"].nunique() == 1 and 0 < swapped["n_sequences"].iloc[0] <= 32
    assert swapped[["follows_swap", "keeps_original"]].apply(lambda c: c.between(0, 1)).all().all()


def test_position_swap_at_embed_is_swapping_the_tokens_in_nope(swapped):
    # NoPE has no positional embedding: exchanging two positions' embeddings is exchanging the tokens,
    # so the answer follows the swap by construction and the row is flagged, not evidence
    embed = swapped[swapped["site"] == "embed"].iloc[0]
    assert embed["follows_swap"] == 1.0 and embed["fixed_by_construction"]


def test_position_swap_cells_fixed_by_construction_keep_every_answer(swapped, model):
    # 2-block NoPE causal: after block 0's attention one attention layer is left, which sees the swap as a set
    fixed = swapped.set_index("site")["fixed_by_construction"]
    assert list(fixed[fixed].index) == residual_sites(model)  # the embedding: a token swap (above)
    kept = swapped[swapped["fixed_by_construction"] & (swapped["site"] != "embed")]
    assert len(kept) == len(residual_sites(model)) - 1 and (kept["keeps_original"] == 1.0).all()


def test_swap_readout(model, addition):
    table = swap_readout(model, addition, positions=(0, 2), n_sequences=48, seed=1)
    sites = residual_sites(model)
    assert list(table.columns) == ["swap_site", "site", "column", "origin", "reads_origin", "reads_index",
                                   "reads_other", "accuracy_unswapped", "fixed_by_construction", "n_sequences"]
    assert len(table) == 2 * sum(len(sites) - index for index in range(len(sites)))
    shares = table[["reads_origin", "reads_index", "reads_other"]].sum(axis=1)
    assert shares.to_numpy() == pytest.approx(1.0)
    assert set(zip(table["column"], table["origin"])) == {(0, 2), (2, 0)}
    # at the swap site itself the column *is* the origin's unswapped vector: the probe reads what it read there
    at_swap = table[table["swap_site"] == table["site"]]
    assert at_swap["fixed_by_construction"].all()
    for row in at_swap.itertuples():
        origin_row = at_swap[(at_swap["site"] == row.site) & (at_swap["column"] == row.origin)].iloc[0]
        assert row.reads_origin >= origin_row.accuracy_unswapped - 1e-12  # predicts the origin wherever it did
    assert not table["fixed_by_construction"].all()
    with pytest.raises(ValueError, match=r"two distinct prompt positions in 0..7, got \(0, 8\)"):
        swap_readout(model, addition, positions=(0, 8))


# residual cuts --------------------------------------------------------------------------------------------------------

N_CUT = 40


@pytest.fixture(scope="module")
def cut_table(model, addition):
    return residual_cut_effects(model, addition, n_sequences=N_CUT)


def test_residual_cut_table(cut_table, model):
    cuts = [(-1, "none")] + [(block, sublayer) for block in range(model.cfg.n_layers) for sublayer in SUBLAYERS]
    assert list(zip(cut_table["block"], cut_table["sublayer"])) == cuts
    for column in ("exact_match", "answer_logprob", "probe_accuracy"):
        assert f"delta_{column}" in cut_table
        assert cut_table[f"delta_{column}"].iloc[0] == 0.0
        assert (cut_table[f"delta_{column}"] == cut_table[column] - cut_table[column].iloc[0]).all()
    assert cut_table["answer_logprob"].lt(0).all() and cut_table["probe_accuracy"].between(0, 1).all()
    assert cut_table["delta_answer_logprob"].iloc[1:].ne(0).all()  # every cut changes the model


def test_residual_cut_none_row_is_the_intact_model(cut_table, model, addition):
    tokens = addition.sample_test(N_CUT, 0)
    scores = evaluate(model, addition, tokens)
    intact = cut_table.iloc[0]
    assert intact["exact_match"] == scores["exact_match"]
    n_answer = addition.seq_len - addition.prompt_len
    assert intact["answer_logprob"] == pytest.approx(-scores["test_loss"] * n_answer, rel=1e-5)


def expected_row(model, task, tokens):
    """What `residual_cut_effects` should report for `model`, computed without hooks."""
    scores = evaluate(model, task, tokens)
    train_seq, test_seq = split_by_sequence(len(tokens), test_fraction=0.25, seed=0)
    acts = capture_residuals(model, tokens, sites=[residual_sites(model)[-1]]).activations.float()
    probe = PositionProbe(C=1.0).fit(*flatten_tokens(acts, train_seq))
    n_answer = task.seq_len - task.prompt_len
    return (scores["exact_match"], -scores["test_loss"] * n_answer,
            float(probe.score(*flatten_tokens(acts, test_seq))[0]))


def test_residual_cut_rows_equal_models_built_with_the_cut(cut_table, model, addition):
    tokens = addition.sample_test(N_CUT, 0)
    for row in cut_table.iloc[1:].itertuples():
        built = build(dataclasses.replace(model.cfg, residual_cuts={row.block: row.sublayer}))
        built.load_state_dict(model.state_dict())
        exact_match, answer_logprob, probe_accuracy = expected_row(built.eval(), addition, tokens)
        assert row.exact_match == exact_match, row
        assert row.answer_logprob == pytest.approx(answer_logprob, rel=1e-5), row
        assert row.probe_accuracy == probe_accuracy, row


# free text: any prompts of equal token length -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def text_models(model, tiny_hf, word_tokenizer):
    """Our trained NoPE model (prompts of its characters) and tiny random GPT-2 and parallel-residual
    GPT-NeoX bridges (word tokens), each with a clean prompt."""
    prompt = torch.tensor([[1, 5, 9, 4, 30, 12, 7]])
    return {"ours": (model, model.to_tokens("123+456=")),
            "gpt2": (load_any(tiny_hf("gpt2"), tokenizer=word_tokenizer()), prompt),
            "neox-parallel": (load_any(tiny_hf("neox-parallel"), tokenizer=word_tokenizer()), prompt)}


@torch.no_grad()
def single_token_change(model, clean, changes_top: bool):
    """The first copy of `clean` with one token changed that changes the most likely next token
    (`changes_top`; the last position tried first, where that is likeliest) or keeps it (the first
    position first), and the changed position."""
    top = model(clean)[0, -1].argmax()
    positions = range(clean.shape[1])
    for position in reversed(positions) if changes_top else positions:
        for token in range(model.cfg.d_vocab):
            corrupted = clean.clone()
            corrupted[0, position] = token
            if token != clean[0, position] and (model(corrupted)[0, -1].argmax() != top) == changes_top:
                return corrupted, position
    raise AssertionError(f"no single-token change {'changes' if changes_top else 'keeps'} the top next token")


@pytest.mark.parametrize("name", ["ours", "gpt2"])
def test_next_token_restoration_scores_the_corrupted_run_0_and_the_clean_run_1(name, text_models, offline):
    model, clean = text_models[name]
    changed, kept = single_token_change(model, clean, True)[0], single_token_change(model, clean, False)[0]
    other = torch.randint(model.cfg.d_vocab, clean.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        clean_logits, other_logits = model(clean), model(other)
        for corrupted, expected in ((changed, LOGIT_DIFF), (kept, KL_RESTORED)):
            metric, metric_name = next_token_restoration(model, clean, corrupted)
            assert metric_name == expected
            assert float(metric(clean_logits)) == pytest.approx(1.0, abs=1e-6)
            assert float(metric(model(corrupted))) == pytest.approx(0.0, abs=1e-6)
            assert abs(float(metric(other_logits))) > 1e-3  # a third run is neither
        metric = next_token_restoration(model, clean, changed)[0]
        good, bad = clean_logits[0, -1].argmax(), model(changed)[0, -1].argmax()  # the logit difference by hand
        diff = [logits[0, -1, good] - logits[0, -1, bad] for logits in (other_logits, model(changed), clean_logits)]
        assert float(metric(other_logits)) == pytest.approx(float((diff[0] - diff[1]) / (diff[2] - diff[1])), abs=1e-5)
    with pytest.raises(ValueError, match="either all differ or all agree in their next-token answer, got 1 of 2"):
        next_token_restoration(model, torch.cat([clean, clean]), torch.cat([changed, kept]))
    with pytest.raises(ValueError, match="equal token length: the clean prompt has 7 tokens, the corrupted one 6"):
        next_token_restoration(model, clean[:, :7], changed[:, :6])
    with pytest.raises(NothingToRestore, match="the same next-token logits"):
        next_token_restoration(model, clean, clean)


@pytest.mark.parametrize("name", ["ours", "gpt2", "neox-parallel"])
def test_prompt_patch_table_exact_cells(name, text_models, offline):
    """Cells whose value the architecture fixes: the one changed token's embedding restores the
    clean run, the other embeddings nothing, and the last block's output at the last position is
    the clean run (the unembedding reads only that position)."""
    model, clean = text_models[name]
    sites = [site for site in ("resid_pre", "resid_mid", "resid_post") if site in model_sites(model)]
    assert ("resid_mid" in sites) == (name != "neox-parallel")
    n_layers, n_pos = model.cfg.n_layers, clean.shape[1]
    for changes_top, metric in ((True, LOGIT_DIFF), (False, KL_RESTORED)):
        corrupted, changed = single_token_change(model, clean, changes_top)
        table, metric_name = prompt_patch_table(model, clean, corrupted, sites)
        assert list(table.columns) == list(PATCHING_COLUMNS) and metric_name == metric
        assert len(table) == len(sites) * n_layers * n_pos
        assert table["role"][:n_pos].tolist() == [str(t) if p != changed else f"{t}→{int(corrupted[0, p])}"
                                                  for p, t in enumerate(clean[0].tolist())]
        value = table.set_index(["site", "layer", "position"])["value"]
        assert value[("resid_pre", 0, changed)] == pytest.approx(1.0, abs=1e-5)
        assert value[("resid_post", n_layers - 1, n_pos - 1)] == pytest.approx(1.0, abs=1e-5)
        for position in range(n_pos):
            if position != changed:
                assert value[("resid_pre", 0, position)] == pytest.approx(0.0, abs=1e-6)
            if position != n_pos - 1:
                assert value[("resid_post", n_layers - 1, position)] == pytest.approx(0.0, abs=1e-6)
            for layer in range(n_layers - 1):
                assert value[("resid_post", layer, position)] == pytest.approx(
                    value[("resid_pre", layer + 1, position)], abs=1e-5)
    if name == "neox-parallel":
        with pytest.raises(ValueError, match=r"resid_mid cannot be patched in this model \(some block has no "
                                             r"hook_resid_mid hook\); allowed: \['resid_pre', 'resid_post', "):
            prompt_patch_table(model, clean, corrupted, ["resid_mid"])
    with pytest.raises(ValueError, match="labels must name each of the 7 positions, got 2"):
        prompt_patch_table(model, clean[:, :7], corrupted[:, :7], ["resid_pre"], labels=["a", "b"])
