"""Order-sensitive synthetic tasks: deterministic token batches, one character per token.

Every task exposes the same small surface, which is all training and analysis rely on:
`alphabet` (token characters), `seq_len`, `prompt_len` (the answer is the rest),
`roles` (a name per position), `train_batch(batch_size, seed)` and `test_set()`.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

from tasks.addition import Addition
from tasks.markov import MarkovICL
from tasks.tokens import detokenize, tokenize


class Task(Protocol):
    name: str
    alphabet: str
    seq_len: int
    prompt_len: int
    roles: list[str]

    def train_batch(self, batch_size: int, seed: int) -> Tensor: ...

    def test_set(self) -> Tensor: ...


TASKS = {"addition": Addition, "markov": MarkovICL}


def make_task(name: str, **kwargs) -> Task:
    """The task called `name` (`addition` or `markov`), built with `kwargs`."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; allowed: {sorted(TASKS)}")
    return TASKS[name](**kwargs)


__all__ = ["Addition", "MarkovICL", "Task", "TASKS", "make_task", "tokenize", "detokenize"]
