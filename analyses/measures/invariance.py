"""The symmetry theorem of Zuo & Guerzhoy as a measurement.

Without positional encodings *and* without a causal mask, the logits at the last position
are invariant to any permutation of the tokens before it: every operation is
permutation-equivariant and the last position attends over a set. A causal mask breaks
this from the second layer on; with one layer, the last position attends over token
embeddings alone (a function of each token, not its place), so a one-layer causal NoPE
model is still invariant there. Any positional encoding breaks it at once.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from jaxtyping import Int
from torch import Tensor

from poslens.tasks import make_task
from poslens.variants import HookedTransformer, build, load, variant_config
from poslens.variants.threads import uses_threads
from poslens.variants.training import Task

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}
INVARIANCE_COLUMNS = ["variant", "n_layers", "dtype", "n_sequences", "n_perms",
                      "max_abs_delta", "mean_abs_delta", "tolerance", "invariant"]


@torch.no_grad()
def permutation_test(model: HookedTransformer, tokens: Int[Tensor, "batch pos"], *, n_perms: int = 20,
                     seed: int = 0) -> pd.DataFrame:
    """One row: max and mean |Δ logit| at the last position over random permutations of the
    other positions, and whether that stays within float rounding (`TOLERANCE`).

    Args:
        model: the model.
        tokens: the prompts `[batch, pos]`.
        n_perms: permutations per prompt.
        seed: draws the permutations.

    Returns:
        A one-row table.
    """
    tokens = model.check_tokens(tokens).to(model.cfg.device)
    if tokens.shape[1] < 3 or n_perms < 1:
        raise ValueError(f"need at least 3 positions and n_perms >= 1, got {tokens.shape[1]} and {n_perms!r}")
    reference = model(tokens)[:, -1]
    generator = torch.Generator().manual_seed(seed)
    deltas = []
    for _ in range(n_perms):
        order = torch.randperm(tokens.shape[1] - 1, generator=generator)
        while torch.equal(order, torch.arange(len(order))):
            order = torch.randperm(tokens.shape[1] - 1, generator=generator)
        permuted = torch.cat([tokens[:, order.to(tokens.device)], tokens[:, -1:]], dim=1)
        deltas.append((model(permuted)[:, -1] - reference).abs())
    delta = torch.stack(deltas)
    tolerance = TOLERANCE[model.cfg.dtype]
    return pd.DataFrame([{
        "variant": model.cfg.name, "n_layers": model.cfg.n_layers, "dtype": str(model.cfg.dtype).removeprefix("torch."),
        "n_sequences": tokens.shape[0], "n_perms": n_perms, "max_abs_delta": float(delta.max()),
        "mean_abs_delta": float(delta.mean()), "tolerance": tolerance, "invariant": bool(delta.max() <= tolerance),
    }], columns=INVARIANCE_COLUMNS)


@uses_threads
def invariance_table(variants: list[str] = (), checkpoints: list[str | Path] = (), *, n_layers: int | None = None,
                     dtype: torch.dtype = torch.float64, task: Task | None = None, n_sequences: int = 64,
                     n_perms: int = 20, seed: int = 0) -> pd.DataFrame:
    """`permutation_test` for fresh random-weight `variants` and trained `checkpoints`, on a
    seeded sample (`seed`, which also draws the permutations) of `n_sequences` held-out prompts of
    `task` (addition by default: `a+b=`, so the last position predicts the first answer digit).
    `threads=N` pins torch to N threads (default: the policy of `variants.threads`).

    Args:
        variants: variant names, tested with fresh random weights.
        checkpoints: trained run folders.
        n_layers: the blocks of the random-weight models.
        dtype: the precision of the test (float64 separates rounding from real changes).
        task: the task whose prompts are permuted; default `Addition()`.
        n_sequences: prompts tested.
        n_perms: permutations per prompt.
        seed: draws the prompts and the permutations.

    Returns:
        One `permutation_test` row per model.
    """
    task = task or make_task("addition")
    prompts = task.sample_test(min(n_sequences, task.n_test), seed)[:, : task.prompt_len]
    sizes = {} if n_layers is None else {"n_layers": n_layers}
    models = [build(variant_config(name, task=task, dtype=dtype, **sizes)) for name in variants]
    models += [load(path, dtype=dtype) for path in checkpoints]
    if not models:
        raise ValueError("give at least one variant or checkpoint")
    rows = [permutation_test(model, prompts, n_perms=n_perms, seed=seed) for model in models]
    table = pd.concat(rows, ignore_index=True)
    table.insert(1, "weights", ["random"] * len(variants) + [str(path) for path in checkpoints])
    return table
