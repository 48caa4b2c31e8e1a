import pytest
import torch

from poslens.tasks import Addition, MarkovICL, make_task
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


def test_addition_train_and_test_are_disjoint_by_operand_pair():
    task = Addition(n_digits=1, n_test=20)
    test_pairs = {tuple(row) for row in task.test_set()[:, :3].tolist()}
    assert len(test_pairs) == 20
    train = task.train_batch(5000, seed=0)
    train_pairs = {tuple(row) for row in train[:, :3].tolist()}
    assert not train_pairs & test_pairs
    assert len(train_pairs) == 100 - 20  # every other pair is reachable


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
    (lambda: Addition(n_digits=1, n_test=60), "n_test must be in 1..50"),
    (lambda: MarkovICL(vocab=1), "vocab must be in 2..10"),
    (lambda: MarkovICL(alpha=0), "alpha must be > 0"),
    (lambda: make_task("sorting"), r"unknown task 'sorting'; allowed: \['addition', 'markov'\]"),
    (lambda: Addition().train_batch(0, 0), "batch_size must be >= 1, got 0"),
])
def test_bad_task_arguments_are_named(bad, message):
    with pytest.raises(ValueError, match=message):
        bad()
