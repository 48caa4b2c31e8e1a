"""Order-sensitive synthetic tasks: deterministic token batches, one character per token.

Every task exposes the same small surface, which is all training and analysis rely on:
`name`, `alphabet` (token characters; token id = index), `seq_len`, `prompt_len` (the answer
is the rest), `roles` (a name per position, where positions have fixed roles), `role_names` and
`role_labels(tokens)` (the role id of every token), `train_batch(batch_size, seed)`,
`test_set()` and `sample_test(n, seed)` (an unbiased draw of held-out sequences for analyses).
Tasks are frozen dataclasses, so a run can record one as `{"name": ..., **fields}` and
`from_record(record)` rebuilds it, giving fields added since the record was written the value
that reproduces the old behaviour.
"""

from __future__ import annotations

from typing import Any

from poslens.tasks.addition import Addition
from poslens.tasks.markov import MarkovICL

TASKS = {"addition": Addition, "markov": MarkovICL}


def make_task(name: str, **fields: Any) -> Addition | MarkovICL:
    """The task called `name` (`addition` or `markov`), built with `fields`.

    Args:
        name: `addition` or `markov` (the keys of `TASKS`).
        **fields: the task's own fields, e.g. `n_digits=2` or `max_shift=4`.

    Returns:
        The task, an `Addition` or a `MarkovICL`.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; allowed: {sorted(TASKS)}")
    return TASKS[name](**fields)


def from_record(record: dict[str, Any]) -> Addition | MarkovICL:
    """The task a run recorded as `{"name": ..., **fields}`. A field the record lacks (it was
    written before the field existed) takes the value in the task's `LEGACY_FIELDS`, which
    reproduces what the run was trained on (e.g. `exclude_twins=False`), not today's default.

    Args:
        record: `{"name": ..., **fields}` as a run's `run.json` holds it.

    Returns:
        The task the run was trained on.
    """
    if "name" not in record:
        raise ValueError(f"a task record needs a 'name' (one of {sorted(TASKS)}), got keys {sorted(record)}")
    legacy = getattr(TASKS.get(record["name"]), "LEGACY_FIELDS", {})
    return make_task(**{**legacy, **record})


__all__ = ["Addition", "MarkovICL", "TASKS", "from_record", "make_task"]
