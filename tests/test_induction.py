import math

import einops
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch
from transformer_lens.head_detector import detect_head

from poslens.analyses.experiments.presets import MARKOV_MODEL, MARKOV_TASK, MARKOV_TRAINING, MARKOV_VARIANT
from poslens.analyses.figures.induction import induction_figures
from poslens.analyses.measures.induction import (
    HEAD_SCORES,
    TABLE_COLUMNS,
    bayes_optimal_loss,
    context_count_loss,
    induction_analysis,
    induction_score_second_half,
    offset_profile,
    parent_match_score,
    previous_token_score,
    repeated_random_tokens,
    uniform_pattern,
)
from poslens.tasks import MarkovICL
from poslens.variants import TrainSettings, build, variant_config


def one_hot_pattern(targets: list[int], n_heads: int = 1, batch: int = 1) -> torch.Tensor:
    """A `[batch, head, query, key]` pattern where query q puts all its attention on `targets[q]`."""
    pattern = torch.zeros(len(targets), len(targets))
    pattern[torch.arange(len(targets)), torch.tensor(targets)] = 1
    return einops.repeat(pattern, "q k -> batch head q k", batch=batch, head=n_heads)


def previous_token_targets(n_pos: int) -> list[int]:
    return [max(q - 1, 0) for q in range(n_pos)]


def induction_targets(half_len: int) -> list[int]:
    """First-half queries on themselves, second-half query q on q − half_len + 1."""
    return list(range(half_len)) + [q - half_len + 1 for q in range(half_len, 2 * half_len)]


# pure scores on hand-built patterns -----------------------------------------------------------------------------------

def test_a_previous_token_head_scores_one_and_an_induction_head_scores_one_on_the_second_half():
    assert torch.equal(previous_token_score(one_hot_pattern(previous_token_targets(10), n_heads=2, batch=3)),
                       torch.ones(3, 2))
    induction = one_hot_pattern(induction_targets(6))
    assert induction_score_second_half(induction, 6).item() == 1
    assert previous_token_score(induction).item() < 0.2
    # a previous-token head is no induction head, and a shifted half length finds nothing
    assert induction_score_second_half(one_hot_pattern(previous_token_targets(12)), 6).item() == 0
    assert induction_score_second_half(induction, 5).item() == 0


def test_chance_scores_are_uniform_attention():
    uniform = uniform_pattern(8)
    assert torch.allclose(uniform.sum(-1), torch.ones(8, dtype=torch.float64))
    assert previous_token_score(uniform).item() == pytest.approx(sum(1 / (q + 1) for q in range(1, 8)) / 7)
    assert induction_score_second_half(uniform, 4).item() == pytest.approx(sum(1 / (q + 1) for q in range(4, 8)) / 4)
    assert torch.equal(uniform_pattern(3, causal=False)[0, 0], torch.full((3, 3), 1 / 3, dtype=torch.float64))


def test_offset_profile_puts_a_copier_at_its_offset():
    n_pos, max_offset = 12, 4
    copier = one_hot_pattern([max(q - 2, 0) for q in range(n_pos)])
    profile = offset_profile(torch.cat([copier, one_hot_pattern(previous_token_targets(n_pos))], dim=1), max_offset)
    assert profile.shape == (1, 2, max_offset + 1)
    assert torch.equal(profile[0, 0], torch.tensor([0.0, 0, 1, 0, 0]))
    assert torch.equal(profile[0, 1], torch.tensor([0.0, 1, 0, 0, 0]))
    chance = offset_profile(uniform_pattern(n_pos), max_offset)[0, 0]
    assert torch.allclose(chance, torch.full((5,), sum(1 / (q + 1) for q in range(4, 12)) / 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="max_offset must be an integer in 0..11, got 12"):
        offset_profile(copier, 12)


def test_parent_match_finds_the_positions_after_an_earlier_context():
    # the last position (index 7) continues the context "01", seen at 0..1 and 3..4: keys 2 and 5 match
    tokens = torch.tensor([[0, 1, 2, 0, 1, 2, 0, 1]])
    n_pos = tokens.shape[1]
    on_matches = torch.zeros(1, 3, n_pos, n_pos)
    on_matches[..., :, 0] = 1  # other rows are irrelevant: only the last query counts
    on_matches[0, 0, -1] = torch.tensor([0, 0, 0.5, 0, 0, 0.5, 0, 0])  # the classifier
    # itself: key 7 follows "20", not "01" (matching the last position's own context instead would
    # always count the last position itself)
    on_matches[0, 1, -1] = torch.tensor([0, 0, 0, 0, 0, 0, 0, 1.0])
    on_matches[0, 2, -1] = torch.tensor([0, 0, 0.25, 0.25, 0, 0.5, 0, 0])
    score = parent_match_score(on_matches, tokens, n_parents=2)
    assert torch.allclose(score, torch.tensor([[1.0, 0.0, 0.75]]))
    # one parent: every key after a "1" (keys 2, 5) matches; uniform attention gets #matches / n_pos
    chance = parent_match_score(uniform_pattern(n_pos).expand(1, 1, -1, -1), tokens, n_parents=1)
    assert chance.item() == pytest.approx(2 / 8)
    no_match = parent_match_score(uniform_pattern(4).expand(1, 1, -1, -1), torch.tensor([[0, 1, 2, 2]]), 2)
    assert no_match.isnan().all()
    with pytest.raises(ValueError, match="n_parents must be an integer in 1..7, got 8"):
        parent_match_score(on_matches, tokens, n_parents=8)


def test_bad_patterns_are_named():
    with pytest.raises(ValueError, match=r"pattern must be \[batch, head, query, key\].*got shape \(3, 3\)"):
        previous_token_score(torch.ones(3, 3))
    with pytest.raises(ValueError, match="half_len must be an integer in 1..5 for 10 positions, got 6"):
        induction_score_second_half(uniform_pattern(10), 6)


# Bayes references -----------------------------------------------------------------------------------------------------

def test_bayes_loss_on_a_deterministic_table_is_zero():
    task = MarkovICL(vocab=3, length=60, n_parents=2, alpha=0.1)
    tokens, tables = task.sample(64, seed=3)
    deterministic = torch.nn.functional.one_hot(tables.argmax(-1), 3).double()
    # resample the sequences under the deterministic table by running the chain
    for row, table in zip(tokens, deterministic):
        for i in range(2, len(row)):
            row[i] = int(table[row[i - 2] * 3 + row[i - 1]].argmax())
    losses = bayes_optimal_loss(tokens, deterministic, alpha=1e-9)
    assert torch.equal(losses["true_table"], torch.zeros(64, dtype=torch.float64))
    assert losses["bayes_posterior"].max() < 1e-6  # a deterministic chain revisits its last context
    # the generic posterior is the Dirichlet-multinomial predictive: check one sequence by hand
    tokens, tables = task.sample(1, seed=5)
    seq = tokens[0].tolist()
    context, last = seq[-3:-1], seq[-1]
    follows = [seq[i] for i in range(2, len(seq) - 1) if seq[i - 2 : i] == context]
    expected = -math.log((follows.count(last) + 0.1) / (len(follows) + 0.3))
    assert bayes_optimal_loss(tokens, tables, 0.1)["bayes_posterior"].item() == pytest.approx(expected)
    assert bayes_optimal_loss(tokens, tables, 0.1)["true_table"].item() == pytest.approx(
        -math.log(tables[0, context[0] * 3 + context[1], last]))


def test_bayes_posterior_beats_the_weaker_references_on_average():
    task = MarkovICL()
    tokens, tables = task.sample(2000, seed=0)
    bayes = bayes_optimal_loss(tokens, tables, task.alpha)
    unigram, bigram = (context_count_loss(tokens, k, task.alpha, task.vocab).mean() for k in (0, 1))
    assert bayes["true_table"].mean() < bayes["bayes_posterior"].mean() < bigram < unigram < math.log(3)
    with pytest.raises(ValueError,
                       match=r"tables must be \[batch=2000, vocab\*\*n_parents, vocab\], got \(2000, 8, 3\)"):
        bayes_optimal_loss(tokens, tables[:, :8], task.alpha)


# TransformerLens's detect_head on hand-set heads ----------------------------------------------------------------------

def test_detect_head_scores_hand_set_heads_as_notes_say(tiny_sizes):
    """With every head's pattern replaced by a perfect one, ours score 1; TransformerLens's "mul"
    score gives (T−1)/T for the previous-token head and 1/2 for the induction head."""
    half_len = 10
    model = build(variant_config("nope-causal", alphabet="0123456789", n_ctx=24, n_layers=1, **tiny_sizes))
    text = "0123456789" * 2  # distinct tokens: TL's duplicate-token pattern marks only induction targets
    for targets, ours, tl_name, tl_expected in (
        (previous_token_targets(2 * half_len), previous_token_score, "previous_token_head", 19 / 20),
        (induction_targets(half_len), lambda p: induction_score_second_half(p, half_len), "induction_head", 0.5),
    ):
        perfect = one_hot_pattern(targets, n_heads=model.cfg.n_heads)
        with model.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern", lambda pattern, hook: perfect)]):  # noqa: B023
            _, cache = model.run_with_cache(text)
            tl_scores = detect_head(model, text, tl_name)
        assert torch.equal(ours(cache["pattern", 0]), torch.ones(1, model.cfg.n_heads))
        assert torch.allclose(tl_scores, torch.full_like(tl_scores, tl_expected))


# the analysis on a tiny untrained model -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_task() -> MarkovICL:
    return MarkovICL(vocab=3, length=30, n_parents=2)


def test_induction_analysis_returns_documented_tables(tiny_sizes, small_task):
    model = build(variant_config("rotary-causal", alphabet=small_task.alphabet, n_ctx=30, n_layers=2,
                                 **tiny_sizes)).train()
    report = induction_analysis(model, small_task, n_sequences=40, n_tl_sequences=5, chunk_size=16, max_offset=4)
    assert model.training  # left as it was found
    figures = induction_figures(report.tables)
    assert set(report.tables) == set(figures) == set(TABLE_COLUMNS)
    for name, table in report.tables.items():
        assert list(table.columns) == TABLE_COLUMNS[name]
        assert isinstance(figures[name], go.Figure)
    n_heads = model.cfg.n_layers * model.cfg.n_heads
    offsets = report.tables["offset_profile"]
    assert len(offsets) == n_heads * 5 and offsets["mass"].between(0, 1).all()
    assert (offsets.groupby(["layer", "head"])["mass"].sum() <= 1 + 1e-6).all()
    match = report.tables["parent_match"]
    assert sorted(match["n_parents"].unique()) == [1, 2] and match["score"].between(0, 1).all()
    assert (match.groupby("n_parents")["chance"].first().diff().dropna() < 0).all()  # longer contexts match less
    scores = report.tables["head_scores"]
    assert sorted(scores["score_name"].unique()) == sorted(HEAD_SCORES) and len(scores) == 4 * n_heads
    assert scores["value"].between(0, 1).all() and scores["value"].notna().all()
    loss = report.tables["icl_loss"].set_index("predictor")
    assert list(loss.index) == ["model", "uniform", "unigram", "bigram", "bayes_posterior", "true_table"]
    assert loss.loc["uniform", "loss"] == pytest.approx(math.log(3))
    assert loss.loc["bayes_posterior", "gap_to_bayes"] == 0
    # an untrained model is near uniform, far above the Bayes posterior
    assert loss.loc["model", "gap_to_bayes"] > 3 * loss.loc["model", "gap_sem"]
    summary = report.summary
    assert summary["gap_to_bayes"] == loss.loc["model", "gap_to_bayes"]
    assert (summary["parent_match_winner"]["layer"] == 1
            and 0 <= summary["parent_match_winner"]["head"] < model.cfg.n_heads)
    # same seed, same numbers (up to float32 rounding when the chunks differ); a different seed, different sequences
    again = induction_analysis(model, small_task, n_sequences=40, n_tl_sequences=5, chunk_size=16, max_offset=4)
    rechunked = induction_analysis(model, small_task, n_sequences=40, n_tl_sequences=5, chunk_size=40, max_offset=4)
    for name, table in report.tables.items():
        pd.testing.assert_frame_equal(again.tables[name], table, check_exact=True)
        pd.testing.assert_frame_equal(rechunked.tables[name], table, rtol=1e-5)
    other = induction_analysis(model, small_task, n_sequences=40, n_tl_sequences=5, max_offset=4, seed=1)
    assert not other.tables["icl_loss"].equals(report.tables["icl_loss"])


def test_induction_analysis_rejects_bad_input(tiny_sizes, small_task):
    model = build(variant_config("rotary-causal", alphabet=small_task.alphabet, n_ctx=30, n_layers=2, **tiny_sizes))
    with pytest.raises(ValueError, match="n_sequences must be a positive integer, got 0"):
        induction_analysis(model, small_task, n_sequences=0)
    with pytest.raises(ValueError, match="does not fit the task"):
        induction_analysis(model, MarkovICL(vocab=4, length=30))


def test_the_recommended_model_and_settings_are_valid():
    task = MarkovICL(**MARKOV_TASK)
    assert task.prompt_len == task.n_parents and (task.vocab, task.length, task.alpha) == (3, 100, 0.1)
    cfg = variant_config(MARKOV_VARIANT, task=task, **MARKOV_MODEL)
    assert cfg.n_layers == 2 and cfg.n_ctx >= task.length - 1
    assert TrainSettings(**MARKOV_TRAINING).steps >= 1
    assert repeated_random_tokens(3, 5, 2, seed=0).shape == (2, 10)


def test_markov_targets_all_trains_on_every_drawn_token():
    last, every = MarkovICL(length=20), MarkovICL(length=20, targets="all")
    assert torch.equal(last.train_batch(4, 7), every.train_batch(4, 7))  # same data, more targets
    assert (last.prompt_len, every.prompt_len) == (19, 2)
    assert every.roles == ["context"] * 2 + ["answer"] * 18 and last.roles[-2:] == ["context", "answer"]
    with pytest.raises(ValueError, match=r"unknown targets 'first'; allowed: \['last', 'all'\]"):
        MarkovICL(targets="first")
