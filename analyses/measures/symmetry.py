"""The symmetry theorem on every encoding, mask and depth: random-weight twins of a run.

`invariance.permutation_test` checks one model. The theorem's claims span the whole grid:
no positional encoding and no causal mask is invariant at the last position at any depth;
a causal mask breaks it from the second layer on (one causal NoPE layer still is); any
positional encoding (learned, sinusoidal, rotary) breaks it with either mask and any depth.
`symmetry_twins` builds, for a run's sizes and seed, an untrained model of every encoding ×
mask × depth (1 and 2 layers) in float64 and tests each; no training is needed, because the
theorem is about the architecture (weights do not enter it).
"""

from __future__ import annotations

import pandas as pd
import torch

from poslens.analyses.measures.invariance import INVARIANCE_COLUMNS, permutation_test
from poslens.tasks import Addition
from poslens.variants import build, variant_config

ENCODINGS = ("nope", "learned", "sinusoidal", "rotary")
ATTENTION = ("causal", "bidirectional")
SYMMETRY_COLUMNS = ("encoding", "attention", "weights", *INVARIANCE_COLUMNS)


def symmetry_twins(task: Addition, *, sizes: dict[str, int], seed: int = 0, depths: tuple[int, ...] = (1, 2),
                   n_sequences: int = 32, n_perms: int = 10) -> pd.DataFrame:
    """`permutation_test` of an untrained float64 model of every encoding, mask and depth.

    Args:
        task: the task whose held-out prompts are permuted (a seeded sample).
        sizes: `variant_config` size overrides (d_model, d_head, ...); `n_layers` is set per depth.
        seed: seeds the weights, the prompt sample and the permutations.
        depths: the numbers of layers to build.
        n_sequences: prompts tested.
        n_perms: random permutations of the positions before the last.

    Returns:
        One row per (encoding, attention, depth): `SYMMETRY_COLUMNS`, weights "random".
    """
    prompts = task.sample_test(n_sequences, seed=seed)[:, : task.prompt_len]
    sizes = {key: value for key, value in sizes.items() if key != "n_layers"}
    rows = [permutation_test(build(variant_config(f"{encoding}-{attention}", task=task, seed=seed, dtype=torch.float64,
                                          n_layers=depth, **sizes)), prompts, n_perms=n_perms, seed=seed)
            .assign(encoding=encoding, attention=attention, weights="random")
            for encoding in ENCODINGS for attention in ATTENTION for depth in depths]
    return pd.concat(rows, ignore_index=True)[list(SYMMETRY_COLUMNS)]
