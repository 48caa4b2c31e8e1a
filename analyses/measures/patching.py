"""Activation patching on addition prompts, and on any pair of prompts of equal token length,
through poslens's batched engine (`hooks.patching`: the same grids as `transformer_lens.patching`,
every cell in a few passes).

A corruption swaps two operand digits (or permutes all of them), so the clean and corrupted
prompts differ only in *where* digits are. Each (layer, position) activation of the clean run
is copied into the corrupted run in turn, and a restoration metric says how much of the clean
first answer digit comes back: 0 = the corrupted run, 1 = the clean run. `poslens reproduce`
and the demos compute every patching number with the functions here. For free text (a language
model, `prompt_patch_table`) there is no correct answer to read: the metric compares the two
runs' own most likely next tokens instead (`next_token_restoration`). `activation_patching`
draws its prompts with `task.sample_test` (an unbiased sample; the first rows of the sorted
test set all have a small first operand) and marks the cells whose value the architecture
fixes (`analyses.measures.construction.patch_fixed`): they are not evidence. `method="attribution"`
gives the gradient preview of the same table (`hooks.patching.attribution_grids`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.model_protocol import TransformerLensModel
from transformer_lens.utilities import get_act_name

from poslens.analyses.measures.construction import patch_fixed
from poslens.hooks.patching import POSITION_SITES, attribution_grids, check_sites, patch_grids, patchable_sites
from poslens.tasks import Addition
from poslens.variants import HookedTransformer
from poslens.variants.config import VariantConfig

Metric = Callable[[Float[Tensor, "batch pos vocab"]], Tensor]

SITES = POSITION_SITES  # the layer × position sites of every table here
RESIDUAL_SITES = ("resid_pre", "resid_mid", "resid_post")
METHODS = ("exact", "attribution")
LOGIT_DIFF, KL_RESTORED = "normalised logit diff", "fraction of KL restored"
PATCHING_COLUMNS = ("site", "layer", "position", "role", "value")
ACTIVATION_PATCHING_COLUMNS = (*PATCHING_COLUMNS, "fixed_by_construction")


class NothingToRestore(ValueError):
    """The model answers the clean and the corrupted prompts alike: a restoration metric is undefined."""


def corrupt(task: Addition, tokens: Int[Tensor, "batch seq"], kind: str = "swap", *,
            positions: tuple[int, int] = (0, 2), seed: int = 0) -> Int[Tensor, "batch seq"]:
    """Corrupted copies of addition `tokens`: `swap` exchanges the operand digits at prompt
    `positions` (default: the first operand's hundreds and units); `permute` shuffles all
    operand digit positions (one random permutation for the batch); the answer is recomputed.

    Args:
        task: the addition task (fixed format).
        tokens: full sequences `[batch, seq]`.
        kind: `swap` or `permute`.
        positions: the two operand-digit positions a `swap` exchanges.
        seed: draws a `permute` corruption.

    Returns:
        The corrupted sequences, with their answers recomputed.
    """
    operand_slots = task.operand_positions
    order = list(range(task.seq_len))
    if kind == "swap":
        if not set(positions) <= set(operand_slots) or len(set(positions)) != 2:
            raise ValueError(f"swap positions must be two distinct operand-digit positions {operand_slots}, "
                             f"got {positions}")
        order[positions[0]], order[positions[1]] = positions[1], positions[0]
    elif kind == "permute":
        generator = torch.Generator().manual_seed(seed)
        shuffled = [operand_slots[i] for i in torch.randperm(len(operand_slots), generator=generator).tolist()]
        for slot, source in zip(operand_slots, shuffled):
            order[slot] = source
    else:
        raise ValueError(f"unknown corruption {kind!r}; allowed: ['swap', 'permute']")
    return task.encode(*task.decode_operands(tokens[:, order]))


def logit_diff(good: Int[Tensor, " batch"], bad: Int[Tensor, " batch"]) -> Metric:
    """Metric on prompt logits: mean over the batch of logit(`good`) − logit(`bad`) at the last position."""
    rows = torch.arange(len(good))

    def metric(logits: Float[Tensor, "batch pos vocab"]) -> Tensor:
        last = logits[:, -1]
        return (last[rows, good] - last[rows, bad]).mean()

    return metric


def first_answer_logit_diff(clean: Int[Tensor, "batch seq"], corrupted: Int[Tensor, "batch seq"],
                            prompt_len: int) -> Metric:
    """Metric on prompt logits: mean over the batch of logit(clean first answer digit) −
    logit(corrupted first answer digit) at the last prompt position."""
    return logit_diff(clean[:, prompt_len], corrupted[:, prompt_len])


def first_answer_kl(clean_logits: Float[Tensor, "batch pos vocab"]) -> Metric:
    """Metric on prompt logits: minus the mean KL(clean ‖ run) of the first answer token's distribution."""
    clean_log_probs = clean_logits[:, -1].log_softmax(-1)

    def metric(logits: Float[Tensor, "batch pos vocab"]) -> Tensor:
        log_probs = logits[:, -1].log_softmax(-1)
        return -(clean_log_probs.exp() * (clean_log_probs - log_probs)).sum(-1).mean()

    return metric


@torch.no_grad()
def restoration_metric(model: HookedTransformer, clean: Int[Tensor, "batch seq"], corrupted: Int[Tensor, "batch seq"],
                       prompt_len: int) -> tuple[Metric, str]:
    """A metric on the corrupted prompts' logits that is 0 for the corrupted run and 1 for the
    clean run, and its name.

    When every clean/corrupted pair has different correct first answer digits it is the
    normalised `first_answer_logit_diff`; when every pair shares it (swapping the operands never
    changes the sum) it is the fraction of KL(clean ‖ corrupted) of the first-digit
    distribution that a patch removes. A batch that mixes the two cases is refused.

    Args:
        model: the model.
        clean: the clean sequences (prompt and answer).
        corrupted: the corrupted sequences.
        prompt_len: where the answer starts.

    Returns:
        `(metric, name)`: the metric on the corrupted prompts' logits and its name.
    """
    device = model.cfg.device
    clean, corrupted = clean.to(device), corrupted.to(device)
    clean_logits, corrupted_logits = model(clean[:, :prompt_len]), model(corrupted[:, :prompt_len])
    return _normalised(clean[:, prompt_len], corrupted[:, prompt_len], clean_logits, corrupted_logits, "first-digit")


@torch.no_grad()
def next_token_restoration(model: TransformerLensModel, clean: Int[Tensor, "batch pos"],
                           corrupted: Int[Tensor, "batch pos"]) -> tuple[Metric, str]:
    """`restoration_metric` for prompts without a known answer (free text): 0 for the corrupted
    run, 1 for the clean run, and its name.

    The answers are the runs' own most likely next tokens at the last position. When the clean
    run's differs from the corrupted run's in every pair, the metric is the normalised logit
    difference between those two tokens; when they agree in every pair, the fraction of
    KL(clean ‖ corrupted) of the next-token distribution that a patch removes. A batch that mixes
    the two cases, and prompts of unequal token length, are refused.
    """
    check_equal_lengths(clean, corrupted)
    device = model.cfg.device
    clean_logits, corrupted_logits = model(clean.to(device)), model(corrupted.to(device))
    return _normalised(clean_logits[:, -1].argmax(-1), corrupted_logits[:, -1].argmax(-1), clean_logits,
                       corrupted_logits, "next-token")


def _normalised(good: Int[Tensor, " batch"], bad: Int[Tensor, " batch"], clean_logits: Float[Tensor, "batch pos vocab"],
                corrupted_logits: Float[Tensor, "batch pos vocab"], answer: str) -> tuple[Metric, str]:
    """The restoration metric of clean answers `good` and corrupted answers `bad` (see
    `restoration_metric`), rescaled so that the corrupted run scores 0 and the clean run 1;
    `answer` (`first-digit`, `next-token`) names the answers in errors."""
    differs = good != bad
    if differs.all():
        raw, name = logit_diff(good, bad), LOGIT_DIFF
    elif not differs.any():
        raw, name = first_answer_kl(clean_logits), KL_RESTORED
    else:
        raise ValueError(f"the clean and corrupted prompts must either all differ or all agree in their {answer} "
                         f"answer, got {int(differs.sum())} of {len(differs)} differing")
    clean_value, corrupted_value = raw(clean_logits), raw(corrupted_logits)
    if abs(float(clean_value - corrupted_value)) < 1e-6:
        raise NothingToRestore(f"the model gives the same {answer} logits on the clean and the corrupted prompts "
                               f"({name} undefined): patching has nothing to restore")
    return (lambda logits: (raw(logits) - corrupted_value) / (clean_value - corrupted_value)), name


def check_equal_lengths(clean: Int[Tensor, "batch pos"], corrupted: Int[Tensor, "batch pos"]) -> None:
    """Refuse a clean and a corrupted prompt batch of different token lengths (or batch sizes)."""
    if clean.shape[-1] != corrupted.shape[-1]:
        raise ValueError(f"patching needs a clean and a corrupted prompt of equal token length: the clean prompt has "
                         f"{clean.shape[-1]} tokens, the corrupted one {corrupted.shape[-1]}")
    if clean.shape != corrupted.shape:
        raise ValueError(f"clean and corrupted prompts must have the same shape, got {tuple(clean.shape)} and "
                         f"{tuple(corrupted.shape)}")


def check_site(site: str) -> str:
    """`site` if it is one of `SITES`, else a one-line `ValueError` naming them."""
    if site not in SITES:
        raise ValueError(f"unknown patching site {site!r}; allowed: {list(SITES)}")
    return site


def check_method(method: str) -> str:
    """`method` if it is one of `METHODS` (`exact`, `attribution`), else a one-line `ValueError`."""
    if method not in METHODS:
        raise ValueError(f"unknown patching method {method!r}; allowed: {list(METHODS)}")
    return method


@torch.no_grad()
def patch_table(model: HookedTransformer, task: Addition, clean: Int[Tensor, "batch seq"],
                corrupted: Int[Tensor, "batch seq"], sites: Sequence[str] = SITES, *, method: str = "exact",
                dtype: torch.dtype | None = None, quiet: bool = True) -> tuple[pd.DataFrame, str]:
    """Patch every (layer, position) of each site from the clean into the corrupted run.

    Args:
        model: a poslens model trained on `task`.
        task: the addition task (its prompt length and position roles).
        clean: clean sequences (prompt and answer), `[batch, seq]`.
        corrupted: their corrupted copies (`corrupt`).
        sites: any of `SITES`.
        method: `exact` (activation patching, `hooks.patching.patch_grids`) or `attribution` (its gradient
            preview, `hooks.patching.attribution_grids`).
        dtype: the exact passes' precision (None: the model's; `torch.bfloat16` under autocast).
        quiet: no progress bar.

    Returns:
        The tidy table (`PATCHING_COLUMNS`: site, layer, position, role, value = `restoration_metric`)
        and the name of the metric used.
    """
    sites = [check_site(site) for site in sites]
    model.eval()
    metric, name = restoration_metric(model, clean, corrupted, task.prompt_len)
    prompts = slice(0, task.prompt_len)
    return _patch_rows(model, clean[:, prompts], corrupted[:, prompts], sites, metric, task.roles,
                       method=method, dtype=dtype, quiet=quiet), name


def model_sites(model: TransformerLensModel) -> list[str]:
    """The `SITES` whose hook every block of `model` has (GPT-NeoX's parallel residual has no `resid_mid`)."""
    return [site for site in patchable_sites(model) if site in SITES]


@torch.no_grad()
def prompt_patch_table(model: TransformerLensModel, clean: Int[Tensor, "batch pos"],
                       corrupted: Int[Tensor, "batch pos"], sites: Sequence[str] = RESIDUAL_SITES, *,
                       labels: Sequence[str] | None = None,
                       method: str = "exact", dtype: torch.dtype | None = None,
                       quiet: bool = True) -> tuple[pd.DataFrame, str]:
    """`patch_table` for any prompts of equal token length (free text on a language model).

    A site the model lacks (`model_sites`) is refused.

    Args:
        model: any TransformerLens model.
        clean: the clean prompts, `[batch, pos]`.
        corrupted: the corrupted prompts, the same shape.
        sites: any of `model_sites(model)`.
        labels: the `role` of each position; by default the first pair's token ids there
            (`clean→corrupted` where they differ).
        method: `exact` or `attribution` (as in `patch_table`).
        dtype: the exact passes' precision (as in `patch_table`).
        quiet: no progress bar.

    Returns:
        The tidy table (`PATCHING_COLUMNS`, value = `next_token_restoration`) and the metric's name.
    """
    check_equal_lengths(clean, corrupted)
    allowed = model_sites(model)
    for site in sites:
        if site not in allowed:
            raise ValueError(f"{check_site(site)} cannot be patched in this model (some block has no "
                             f"{get_act_name(site, 0).split('.', 2)[-1]} hook); allowed: {allowed}")
    if labels is None:
        labels = [str(a) if a == b else f"{a}→{b}" for a, b in zip(clean[0].tolist(), corrupted[0].tolist())]
    if len(labels) != clean.shape[-1]:
        raise ValueError(f"labels must name each of the {clean.shape[-1]} positions, got {len(labels)}")
    metric, name = next_token_restoration(model, clean, corrupted)
    return _patch_rows(model, clean, corrupted, sites, metric, labels, method=method, dtype=dtype, quiet=quiet), name


def _patch_rows(model: TransformerLensModel, clean: Int[Tensor, "batch pos"], corrupted: Int[Tensor, "batch pos"],
                sites: Sequence[str], metric: Metric, roles: Sequence[str], *, method: str,
                dtype: torch.dtype | None, quiet: bool) -> pd.DataFrame:
    """The `PATCHING_COLUMNS` table of each site's grid (clean → corrupted prompts) by `method`. The
    metrics here read only the last position's logits, so the exact passes unembed only that one."""
    if check_method(method) == "exact":
        grids = patch_grids(model, clean, corrupted, metric, check_sites(model, sites), last_position_only=True,
                            dtype=dtype, quiet=quiet)
    else:
        grids = attribution_grids(model, clean, corrupted, metric, check_sites(model, sites))
    rows = [{"site": site, "layer": layer, "position": position, "role": roles[position],
             "value": float(grid[layer, position])}
            for site, grid in grids.items() for layer in range(grid.shape[0]) for position in range(grid.shape[1])]
    return pd.DataFrame(rows, columns=list(PATCHING_COLUMNS))


def patching_sample(task: Addition, *, kind: str = "swap", positions: tuple[int, int] = (0, 2),
                    n_sequences: int = 64, seed: int = 0, permutation_seed: int = 0
                    ) -> tuple[Int[Tensor, "batch seq"], Int[Tensor, "batch seq"]]:
    """The clean and corrupted sequences `activation_patching` uses: up to `n_sequences` of a
    seeded sample of 4 × `n_sequences` held-out sequences (`task.sample_test(..., seed)`),
    those whose first answer digit the corruption changes. `permutation_seed` fixes the
    `permute` corruption (the same for every `seed`, so samples stay comparable)."""
    clean = task.sample_test(min(4 * n_sequences, task.n_test), seed)
    corrupted = corrupt(task, clean, kind, positions=positions, seed=permutation_seed)
    changed = clean[:, task.prompt_len] != corrupted[:, task.prompt_len]
    if not changed.any():
        raise ValueError(f"corruption {kind!r} {positions} changes no first answer digit in the test set")
    return clean[changed][:n_sequences], corrupted[changed][:n_sequences]


def fixed_by_construction(cfg: VariantConfig, table: pd.DataFrame, clean: Int[Tensor, "batch seq"],
                          corrupted: Int[Tensor, "batch seq"], prompt_len: int, readout: int | None = None
                          ) -> list[bool]:
    """For each row (site, layer, position) of a patching table: whether its value is fixed by
    the architecture (`construction.patch_fixed`), given which of the first `prompt_len` positions
    (the patched run's input) the corruption changes and whether it only permutes tokens among
    them. `readout`: where the output is read (default the last input position); under a causal
    mask only the positions up to it count as changed."""
    readout = prompt_len - 1 if readout is None else readout
    inputs = slice(0, readout + 1 if cfg.attention_dir == "causal" else prompt_len)
    changed = (clean[:, inputs] != corrupted[:, inputs]).any(0).nonzero().flatten()
    permutation = torch.equal(clean[:, changed].sort(-1).values, corrupted[:, changed].sort(-1).values)
    changed = changed.tolist()
    return [patch_fixed(cfg, row.site, row.layer, row.position, prompt_len, changed, permutation, readout)
            for row in table.itertuples()]


def activation_patching(model: HookedTransformer, task: Addition, *, kind: str = "swap",
                        positions: tuple[int, int] = (0, 2), n_sequences: int = 64, seed: int = 0,
                        permutation_seed: int = 0, quiet: bool = True) -> pd.DataFrame:
    """`patch_table` over every site on the `patching_sample` prompts, with a
    `fixed_by_construction` column (columns `ACTIVATION_PATCHING_COLUMNS`). Where the model
    answers both prompts alike (a NoPE-bidirectional model cannot tell them apart) every value
    is NaN: there is nothing to restore.

    Args:
        model: a trained addition model.
        task: its task (fixed format).
        kind: the corruption, `swap` or `permute` (`corrupt`).
        positions: the two operand-digit positions a `swap` exchanges.
        n_sequences: the most clean/corrupted pairs used.
        seed: draws the held-out sample.
        permutation_seed: draws a `permute` corruption.
        quiet: no progress bars.

    Returns:
        The table, columns `ACTIVATION_PATCHING_COLUMNS`.
    """
    clean, corrupted = patching_sample(task, kind=kind, positions=positions, n_sequences=n_sequences, seed=seed,
                                       permutation_seed=permutation_seed)
    try:
        table = patch_table(model, task, clean, corrupted, quiet=quiet)[0]
    except NothingToRestore:
        rows = [{"site": site, "layer": layer, "position": position, "role": task.roles[position],
                 "value": float("nan")}
                for site in SITES for layer in range(model.cfg.n_layers) for position in range(task.prompt_len)]
        table = pd.DataFrame(rows, columns=list(PATCHING_COLUMNS))
    return table.assign(fixed_by_construction=fixed_by_construction(model.cfg, table, clean, corrupted,
                                                                    task.prompt_len))


def patch_cell_hook(model: HookedTransformer, clean_prompt: Int[Tensor, "batch pos"], site: str, layer: int,
                    position: int) -> tuple[str, Callable]:
    """A forward hook (for `model.hooks`) that writes the clean run's `site` activation at
    (`layer`, `position`): one cell of a `patch_table`."""
    n_pos = clean_prompt.shape[1]
    if not 0 <= layer < model.cfg.n_layers or not 0 <= position < n_pos:
        raise ValueError(f"patch cell (layer {layer}, position {position}) is outside layers "
                         f"0..{model.cfg.n_layers - 1} and prompt positions 0..{n_pos - 1}")
    name = get_act_name(check_site(site), layer)
    _, clean_cache = model.run_with_cache(clean_prompt.to(model.cfg.device), names_filter=name)

    def hook(activation: Tensor, hook) -> Tensor:
        activation[:, position] = clean_cache[name][:, position]
        return activation

    return name, hook
