import dataclasses

import pytest
import torch

from poslens.analyses.runs import load_task
from poslens.tasks import Addition, MarkovICL, from_record, make_task
from poslens.variants import evaluate, train, variant_config
from poslens.variants.storage import read_json, write_json
from poslens.variants.tokens import detokenize, tokenize


def digits_to_int(tokens, reverse):
    digits = tokens.tolist()[::-1] if reverse else tokens.tolist()
    return int("".join(map(str, digits)))


@pytest.mark.parametrize("reverse", [True, False])
@pytest.mark.parametrize("bos", [False, True])
def test_addition_sequences_hold_the_right_sum(reverse, bos):
    task = Addition(reverse_answer=reverse, bos=bos)
    tokens = task.train_batch(500, seed=3)
    assert tokens.shape == (500, task.seq_len)
    text = detokenize(tokens, task.alphabet)
    for row, string in zip(tokens, text):
        body = string[1:] if bos else string
        assert string.startswith("^") == bos
        a, rest = body[:3], body[4:]
        b = rest[:3]
        assert body[3] == "+" and body[7] == "="
        assert digits_to_int(row[task.prompt_len:], reverse) == int(a) + int(b)
    assert len(task.roles) == task.seq_len and task.roles[task.prompt_len - 1] == "="
    assert task.operand_positions == [p + int(bos) for p in (0, 1, 2, 4, 5, 6)]


def test_addition_example_format():
    task = Addition()
    tokens = task.encode(torch.tensor([123]), torch.tensor([456]))
    assert detokenize(tokens[0], task.alphabet) == "123+456=9750"
    assert detokenize(Addition(reverse_answer=False).encode(torch.tensor([999]), torch.tensor([999]))[0],
                      task.alphabet) == "999+999=1998"


@pytest.mark.parametrize("exclude_twins", [False, True])
def test_addition_train_and_test_are_disjoint_by_operand_pair(exclude_twins):
    task = Addition(n_digits=1, n_test=20, exclude_twins=exclude_twins)
    test_pairs = {tuple(row) for row in task.test_set()[:, [0, 2]].tolist()}
    assert len(test_pairs) == 20
    twins = {(b, a) for a, b in test_pairs}
    train = task.train_batch(5000, seed=0)
    train_pairs = {tuple(row) for row in train[:, [0, 2]].tolist()}
    assert not train_pairs & test_pairs
    assert bool(train_pairs & twins) != exclude_twins  # b+a of a held-out a+b is trained on only without the option
    assert len(train_pairs) == 100 - len(test_pairs | (twins if exclude_twins else set()))  # every other pair is drawn


def test_commutative_twins_leak_without_the_option():
    # without the option, the twin b+a of nearly every held-out a+b can be drawn in training (a quick-preset run draws
    # about half of them); with it, none can
    pairs = Addition().test_pair_ids
    a, b = pairs // 1000, pairs % 1000
    twins = b * 1000 + a
    trainable = ~torch.isin(twins, Addition(exclude_twins=False).excluded_pair_ids)
    assert trainable.double().mean() > 0.99  # (spared: a = b, or a twin that is itself held out)
    assert torch.isin(twins, Addition().excluded_pair_ids).all()
    batch = Addition().train_batch(20000, seed=5)
    drawn = Addition().decode_operands(batch)
    assert not torch.isin(drawn[0] * 1000 + drawn[1], Addition().excluded_pair_ids).any()


def test_a_run_recorded_before_a_task_field_existed_loads_with_its_old_behaviour(tmp_path, tiny):
    train(tiny("nope-causal", n_layers=1), Addition(), out_dir=tmp_path, steps=1, batch_size=4, quiet=True)
    old = {"name": "addition", "n_digits": 3, "reverse_answer": True, "bos": False, "n_test": 1000, "seed": 0}
    write_json(tmp_path / "run.json", {**read_json(tmp_path / "run.json"), "task": old})
    task = load_task(tmp_path)
    assert task == Addition(exclude_twins=False) and not task.exclude_twins and task.max_shift == 0
    assert torch.equal(task.train_batch(64, 3), Addition(exclude_twins=False).train_batch(64, 3))
    new = {"name": "addition", **dataclasses.asdict(Addition(max_shift=2))}
    assert from_record(new) == Addition(max_shift=2) and from_record(new).exclude_twins
    markov = {"name": "markov", **dataclasses.asdict(MarkovICL(length=20))}
    assert from_record(markov) == MarkovICL(length=20)
    with pytest.raises(ValueError, match="a task record needs a 'name'"):
        from_record({"n_digits": 3})


# position apart from role ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bos", [False, True])
def test_shifted_format_moves_the_operands_and_keeps_the_answer_in_place(bos):
    task = Addition(max_shift=3, bos=bos)
    assert task.alphabet == "0123456789+=" + ("^" if bos else "") + "_"
    assert (task.prompt_len, task.seq_len) == (8 + bos + 3, 12 + bos + 3)
    tokens = task.train_batch(400, seed=1)
    assert tokens.shape == (400, task.seq_len)
    shifts = task.shifts(tokens)
    assert set(shifts.tolist()) == {0, 1, 2, 3}  # every shift occurs
    a, b = task.decode_operands(tokens)
    for row, text, k, x, y in zip(tokens, detokenize(tokens, task.alphabet), shifts.tolist(), a, b):
        body = text[1:] if bos else text
        assert text.startswith("^") == bos
        assert body == "_" * k + f"{int(x):03d}+{int(y):03d}=" + "_" * (3 - k) + text[task.prompt_len:]
        assert digits_to_int(row[task.prompt_len:], reverse=True) == x + y  # the answer: always the last 4 tokens
    plus = (tokens == task.alphabet.index("+")).nonzero()[:, 1]
    assert set(plus.tolist()) == {3 + bos + k for k in range(4)}  # `+` moves with the shift


@pytest.mark.parametrize("bos", [False, True])
def test_role_labels(bos):
    fixed = Addition(bos=bos)
    tokens = fixed.test_set()[:5]
    assert torch.equal(fixed.role_labels(tokens), torch.arange(fixed.seq_len).expand(5, -1))  # role id = position
    assert fixed.role_names == fixed.roles
    task = Addition(max_shift=2, bos=bos)
    tokens = task.sample_test(300, seed=0)
    labels = task.role_labels(tokens)
    names = task.role_names
    assert names[-2:] == ["pad_lead", "pad_gap"] and names[:-2] == fixed.roles
    for row, text in zip(labels, detokenize(tokens, task.alphabet)):
        roles = [names[label] for label in row]
        assert [role for role in roles if not role.startswith("pad")] == fixed.roles  # every role once, in order
        for index, char in enumerate(text):
            if char == "_":
                assert roles[index] == ("pad_lead" if index < text.index("+") else "pad_gap"), (text, roles)
            elif char in "+=^":
                assert roles[index] == {"+": "+", "=": "=", "^": "BOS"}[char]
    by_position = [set(labels[:, position].tolist()) for position in range(task.prompt_len)]
    assert all(len(roles) > 1 for roles in by_position[bos:])  # no prompt position has a fixed role ...
    assert all(len({names[label] for label in labels[:, position]}) == 1
               for position in range(task.prompt_len, task.seq_len))  # ... but the answer positions do
    assert torch.equal(task.role_labels(tokens[:, : task.prompt_len]), labels[:, : task.prompt_len])
    with pytest.raises(ValueError, match="have no fixed role; use role_labels"):
        _ = task.roles
    with pytest.raises(ValueError, match=rf"tokens must be \[batch, pos\] with pos <= {task.seq_len}"):
        task.role_labels(torch.zeros(2, task.seq_len + 1, dtype=torch.long))


def test_markov_role_labels():
    task = MarkovICL(length=12, targets="all")
    tokens = task.test_set()[:3]
    labels = task.role_labels(tokens)
    assert task.role_names == ["context", "answer"]
    assert [[task.role_names[i] for i in row] for row in labels.tolist()] == [task.roles] * 3
    assert MarkovICL(length=12).role_labels(tokens)[0].tolist() == [0] * 11 + [1]


def test_a_shifted_task_trains_with_its_fixed_shape(tmp_path):
    task = Addition(max_shift=2, n_test=100)
    cfg = variant_config("nope-causal", task=task, n_layers=1, d_model=16, d_head=8)
    result = train(cfg, task, out_dir=tmp_path / "run", steps=3, batch_size=16, eval_every=3, quiet=True)
    assert result.model.cfg.n_ctx == task.seq_len and set(evaluate(result.model, task)) >= {"exact_match"}
    assert load_task(tmp_path / "run") == task


def test_tasks_are_deterministic_by_seed():
    task = Addition()
    assert torch.equal(task.train_batch(64, 7), task.train_batch(64, 7))
    assert not torch.equal(task.train_batch(64, 7), task.train_batch(64, 8))
    assert torch.equal(Addition(seed=1).test_set(), Addition(seed=1).test_set())
    assert not torch.equal(Addition(seed=1).test_set(), Addition(seed=2).test_set())
    markov = MarkovICL(length=20)
    assert torch.equal(markov.train_batch(8, 1), markov.train_batch(8, 1))


def test_markov_sequences_follow_their_own_table():
    task = MarkovICL(vocab=3, length=4000, n_parents=2, alpha=0.5)
    tokens, tables = task.sample(2, seed=0)
    assert tokens.shape == (2, 4000) and tables.shape == (2, 9, 3)
    assert torch.allclose(tables.sum(-1), torch.ones(2, 9, dtype=tables.dtype))
    row, table = tokens[0], tables[0]
    context = row[:-2] * 3 + row[1:-1]
    counts = torch.zeros(9, 3)
    counts.index_put_((context, row[2:]), torch.ones(len(context)), accumulate=True)
    seen = counts.sum(-1) > 200
    empirical = counts[seen] / counts[seen].sum(-1, keepdim=True)
    assert (empirical - table[seen].float()).abs().max() < 0.1


def test_tokenize_round_trip_and_errors():
    alphabet = Addition().alphabet
    assert detokenize(tokenize("12+3=", alphabet), alphabet) == "12+3="
    assert tokenize(["12", "34"], alphabet).shape == (2, 2)
    with pytest.raises(ValueError, match=r"'x' at index 2 .* allowed characters: '0123456789\+='"):
        tokenize("12x", alphabet)
    with pytest.raises(ValueError, match="equal length"):
        tokenize(["1", "22"], alphabet)
    with pytest.raises(ValueError, match="token id 12 is outside"):
        detokenize(torch.tensor([1, 12]), alphabet)


@pytest.mark.parametrize("bad, message", [
    (lambda: Addition(n_digits=0), "n_digits must be in 1..9, got 0"),
    (lambda: Addition(n_digits=1, n_test=60), r"n_test must be in 1..25 \(a quarter of the 100 operand pairs, since "
                                               "each test pair's twin b\\+a leaves training too\\), got 60"),
    (lambda: Addition(n_digits=1, n_test=60, exclude_twins=False), r"n_test must be in 1..50 \(half of the 100"),
    (lambda: Addition(max_shift=-1), "max_shift must be an integer >= 0, got -1"),
    (lambda: Addition(max_shift=2).encode(torch.tensor([1]), torch.tensor([2]), torch.tensor([3])),
     r"shift must be \[batch\] = \(1,\) with values in 0..2, got shape \(1,\) with values \[3\]"),
    (lambda: MarkovICL(vocab=1), "vocab must be in 2..10"),
    (lambda: MarkovICL(alpha=0), "alpha must be > 0"),
    (lambda: make_task("sorting"), r"unknown task 'sorting'; allowed: \['addition', 'markov'\]"),
    (lambda: Addition().train_batch(0, 0), "batch_size must be >= 1, got 0"),
])
def test_bad_task_arguments_are_named(bad, message):
    with pytest.raises(ValueError, match=message):
        bad()
