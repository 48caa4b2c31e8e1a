"""Order-sensitive synthetic tasks: deterministic token batches, one character per token.

Every task exposes the same small surface, which is all training and analysis rely on:
`name`, `alphabet` (token characters; token id = index), `seq_len`, `prompt_len` (the answer
is the rest), `roles` (a name per position), `train_batch(batch_size, seed)` and `test_set()`.
Tasks are frozen dataclasses, so a run can record one as `{"name": ..., **fields}` and
`make_task(**record)` rebuilds it.
"""

from __future__ import annotations

from typing import Any

from poslens.tasks.addition import Addition
from poslens.tasks.markov import MarkovICL

TASKS = {"addition": Addition, "markov": MarkovICL}


def make_task(name: str, **fields: Any) -> Addition | MarkovICL:
    """The task called `name` (`addition` or `markov`), built with `fields`."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; allowed: {sorted(TASKS)}")
    return TASKS[name](**fields)


__all__ = ["Addition", "MarkovICL", "TASKS", "make_task"]
