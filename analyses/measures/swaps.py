"""Position swaps on the residual stream of an addition model, and what a position probe reads after one.

The position-swap counterfactual tests the "vertical slice" reading directly: exchange the
residual vectors of two positions at one site and ask whether the model now answers as if the
two digits had swapped places (position is carried by the column) or as before (the vectors
carry their own position with them). Cells whose outcome the architecture fixes whatever the
weights are marked `fixed_by_construction` (`analyses.measures.construction`): they are not
evidence. `swap_readout` asks the question of position itself: after the swap, does a
position probe at later sites read each swapped column's original position or its new index?

Every measure draws its prompts with `task.sample_test(..., seed)`, an unbiased sample of the
held-out set, so each training seed can get its own draw.
"""

from __future__ import annotations

import einops
import pandas as pd
import torch
from torch import Tensor

from poslens.analyses.measures.construction import swap_fixed, swap_is_token_swap, swap_readout_fixed
from poslens.analyses.measures.patching import corrupt
from poslens.hooks import capture_residuals, hook_name, residual_sites
from poslens.probes import PositionProbe, split_by_sequence, split_tokens
from poslens.tasks import Addition
from poslens.variants import HookedTransformer

SWAP_COLUMNS = ("site", "follows_swap", "keeps_original", "n_sequences", "fixed_by_construction")
SWAP_READOUT_COLUMNS = ("swap_site", "site", "column", "origin", "reads_origin", "reads_index", "reads_other",
                        "accuracy_unswapped", "fixed_by_construction", "n_sequences")


def exchange(positions: tuple[int, int]):
    """A forward hook that exchanges the vectors of two positions (for `model.hooks`)."""
    i, j = positions

    def hook(activation: Tensor, hook) -> Tensor:
        activation = activation.clone()
        activation[:, [i, j]] = activation[:, [j, i]]
        return activation

    return hook


@torch.no_grad()
def position_swap(model: HookedTransformer, task: Addition, *, positions: tuple[int, int] = (0, 2),
                  n_sequences: int = 256, seed: int = 0) -> pd.DataFrame:
    """At every residual site, exchange the vectors of two positions and record how often the
    model's greedy answer becomes its own answer to the digit-swapped prompt (`follows_swap`)
    or stays its answer to the original prompt (`keeps_original`), on prompts where the
    model's two answers differ (up to `n_sequences` of them, from a seeded sample of
    4 × `n_sequences` held-out prompts). `fixed_by_construction`: the architecture alone keeps
    every answer position unchanged under this swap, or makes it a token swap the answer
    follows (`swap_is_token_swap`: NoPE's embedding), so the row is not evidence (columns
    `SWAP_COLUMNS`).

    Args:
        model: an addition model.
        task: its task (fixed format).
        positions: the two operand-digit positions whose vectors are exchanged.
        n_sequences: the most prompts scored.
        seed: draws the sample.

    Returns:
        One row per site, columns `SWAP_COLUMNS`.
    """
    n_answer = task.seq_len - task.prompt_len
    sequences = task.sample_test(min(4 * n_sequences, task.n_test), seed)
    prompts = sequences[:, : task.prompt_len]
    swapped_prompts = corrupt(task, sequences, "swap", positions=positions)[:, : task.prompt_len]
    original = model.generate(prompts.to(model.cfg.device), n_answer).cpu()
    swapped = model.generate(swapped_prompts.to(model.cfg.device), n_answer).cpu()
    differs = (original != swapped).any(-1)
    prompts, original, swapped = (prompts[differs][:n_sequences], original[differs][:n_sequences],
                                  swapped[differs][:n_sequences])
    readouts = range(task.prompt_len - 1, task.seq_len - 1)
    rows = []
    for site in residual_sites(model):
        with model.hooks(fwd_hooks=[(hook_name(site), exchange(positions))]):
            answer = model.generate(prompts.to(model.cfg.device), n_answer).cpu()
        rows.append({"site": site, "follows_swap": float((answer == swapped).all(-1).double().mean()),
                     "keeps_original": float((answer == original).all(-1).double().mean()),
                     "n_sequences": len(prompts),
                     "fixed_by_construction": swap_is_token_swap(model.cfg, site)
                     or all(swap_fixed(model.cfg, site, positions, q) for q in readouts)})
    return pd.DataFrame(rows, columns=list(SWAP_COLUMNS))


@torch.no_grad()
def swap_readout(model: HookedTransformer, task: Addition, *, positions: tuple[int, int] = (0, 2),
                 n_sequences: int = 256, seed: int = 0, C: float = 1.0) -> pd.DataFrame:
    """After exchanging the vectors of two positions at a site, which position does a position
    probe read from each swapped column at that site and every later one?

    One `PositionProbe` per site is fitted on unswapped activations of three quarters of a
    seeded sample of `n_sequences` held-out prompts (split by sequence). On the other quarter,
    for every swap site and every site at or after it, and for each swapped `column`:
    `reads_origin` = share of prompts where the probe predicts the position the column's
    vector came from (`origin`, the other swapped position), `reads_index` = share predicting
    the column's own index, `reads_other` = the rest; `accuracy_unswapped` = the probe's
    accuracy on that column without the swap (how well position is readable there at all).
    `fixed_by_construction`: the column is exactly the unswapped vector of `origin`
    (`construction.swap_readout_fixed`), so reading the origin there says nothing about the
    model. Columns `SWAP_READOUT_COLUMNS`.

    Args:
        model: an addition model.
        task: its task (fixed format).
        positions: the two positions whose vectors are exchanged.
        n_sequences: held-out prompts sampled.
        seed: draws the sample and splits the probes' data.
        C: the inverse L2 strength of the probes.

    Returns:
        The readout table, columns `SWAP_READOUT_COLUMNS`.
    """
    i, j = positions
    if i == j or not (0 <= i < task.prompt_len and 0 <= j < task.prompt_len):
        raise ValueError(f"swap positions must be two distinct prompt positions in 0..{task.prompt_len - 1}, "
                         f"got {positions}")
    prompts = task.sample_test(min(n_sequences, task.n_test), seed)[:, : task.prompt_len]
    train_seq, test_seq = split = split_by_sequence(len(prompts), test_fraction=0.25, seed=seed)
    sites = residual_sites(model)
    unswapped = capture_residuals(model, prompts).activations.float()
    probe = PositionProbe(C=C).fit(*split_tokens(unswapped, split)[0])
    columns = torch.tensor([i, j])

    def predicted(acts: Tensor) -> Tensor:  # [site, example, column]: the probe's position at the two columns
        flat = einops.rearrange(acts[:, :, columns], "site example column d -> site (example column) d")
        return einops.rearrange(probe.predict(flat), "site (example column) -> site example column", column=2)

    baseline = predicted(unswapped[:, test_seq])
    rows = []
    for swap_index, swap_site in enumerate(sites):
        with model.hooks(fwd_hooks=[(hook_name(swap_site), exchange(positions))]):
            read = predicted(capture_residuals(model, prompts[test_seq]).activations.float())
        for index in range(swap_index, len(sites)):
            for slot, (column, origin) in enumerate(((i, j), (j, i))):
                answers = read[index, :, slot]
                rows.append({"swap_site": swap_site, "site": sites[index], "column": column, "origin": origin,
                             "reads_origin": float((answers == origin).double().mean()),
                             "reads_index": float((answers == column).double().mean()),
                             "reads_other": float(((answers != origin) & (answers != column)).double().mean()),
                             "accuracy_unswapped": float((baseline[index, :, slot] == column).double().mean()),
                             "fixed_by_construction": swap_readout_fixed(model.cfg, swap_site, sites[index]),
                             "n_sequences": len(test_seq)})
    return pd.DataFrame(rows, columns=list(SWAP_READOUT_COLUMNS))
