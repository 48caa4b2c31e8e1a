"""Activation patching in both directions, with two corruptions, every answer digit and per-prompt
intervals: the patching table a referee asks for (issue #23, "evidence of use").

`activation_patching` (in `patching`) answers one question: copying one clean activation into
the corrupted run, how much of the clean *first* answer digit comes back, as a ratio of batch
means. Here, for each corruption (`swap`: two operand digits exchanged; `permute`: every operand
digit moved) and each answer digit (teacher-forced, the carry digit included):

- **denoise** (clean → corrupted): the corrupted run gets one clean activation; the value is
  how much of the clean-vs-corrupted logit difference it *restores* (0: none, 1: the clean run).
  A high value says the cell is *sufficient* to carry the difference.
- **noise** (corrupted → clean): the clean run gets one corrupted activation; the value is how
  much of the difference it *destroys* (0: none, 1: the corrupted run). A high value says the
  clean run *needs* the cell. The two differ wherever the information is spread over several
  cells (redundancy, OR-like) or needs several at once (AND-like).

Each prompt is normalised by its own gap g = LD(clean) − LD(corrupted), LD = logit(clean digit)
− logit(corrupted digit) at the position the digit is read from. A prompt whose corruption leaves
that digit unchanged has nothing to restore (`n_unchanged`); a prompt whose |g| is below `guard`
× the median |g| of the changed prompts is excluded (`n_excluded`): dividing by a near-zero gap is
what let the ratio run to −0.72 and 1.70 on a run that never learned. `value` is the mean over
the kept prompts, `ci_low`/`ci_high` its BCa bootstrap interval over prompts
(`stats.bootstrap_mean_interval`; NaN below `MIN_INTERVAL_PROMPTS` kept prompts). Cells whose value
the architecture fixes (exactly 0 or 1, `construction.patch_fixed` at the digit's readout) are marked
`fixed_by_construction`.

The site is the residual stream entering each block (`resid_pre`, `EFFECT_SITES`: where
information sits between blocks; block l's `resid_post` is block l+1's `resid_pre`, and the last
block's output is fixed by construction; the sublayer outputs stay with `activation_patching`),
at every position of the teacher-forced sequence (the answer digits written so far included), in
`hooks.patching`'s batched engine: under a causal mask one pass set per (corruption, direction)
serves every answer digit.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from poslens.analyses.measures.patching import check_site, fixed_by_construction, patching_sample
from poslens.analyses.stats import bootstrap_mean_interval
from poslens.hooks.patching import patch_grids
from poslens.tasks import Addition
from poslens.variants import HookedTransformer

DIRECTIONS = ("denoise", "noise")
CORRUPTIONS = ("swap", "permute")
EFFECT_SITES = ("resid_pre",)
GUARD = 0.1
"""Prompts whose |clean − corrupted| gap is at most this fraction of the median gap are excluded."""
GAP_FLOOR = 1e-4
"""An absolute floor under the guard, in logits: a gap this small is float rounding (a model that cannot tell
the prompts apart, whose median gap is rounding too)."""
N_RESAMPLES = 1000
MIN_INTERVAL_PROMPTS = 5
"""Fewer kept prompts than this get no interval (NaN): a bootstrap of 2-4 values has a handful of distinct means."""
PATCHING_EFFECT_COLUMNS = ("direction", "corruption", "digit", "site", "layer", "position", "role", "value",
                           "ci_low", "ci_high", "n_prompts", "n_excluded", "n_unchanged", "fixed_by_construction")


def answer_logit_diffs(logits: Float[Tensor, "batch pos vocab"], good: Int[Tensor, "batch digit"],
                       bad: Int[Tensor, "batch digit"], reads: Sequence[int]) -> Float[Tensor, "batch digit"]:
    """Per prompt and answer digit: logit(`good`) − logit(`bad`) at the position that digit is read from.

    Args:
        logits: a teacher-forced run's logits.
        good: the clean answer digits.
        bad: the corrupted answer digits.
        reads: the position each digit is predicted at (`prompt_len − 1 + k`).

    Returns:
        The logit differences, `[batch, digit]`.
    """
    read = logits[:, list(reads)].float()  # [batch, digit, vocab]
    return read.gather(-1, good[..., None])[..., 0] - read.gather(-1, bad[..., None])[..., 0]


def guard_prompts(gap: Float[Tensor, "batch digit"], changed: Tensor, guard: float = GUARD) -> Tensor:
    """The prompts a normalised patching value is defined for, per answer digit: the corruption
    changes the digit, and |gap| > `guard` × the median |gap| of the changed prompts (and > `GAP_FLOOR`).

    Args:
        gap: LD(clean) − LD(corrupted) per prompt and digit.
        changed: whether the corruption changes each prompt's digit (bool, the same shape).
        guard: the relative guard, a fraction of the median gap.

    Returns:
        The kept prompts (bool, the shape of `gap`).
    """
    magnitude = gap.abs().where(changed, torch.nan)
    median = magnitude.nanmedian(0).values.nan_to_num(0.0)  # [digit]
    return changed & (magnitude > (guard * median).clamp(min=GAP_FLOOR))


@torch.no_grad()
def patching_effects(model: HookedTransformer, task: Addition, *, corruptions: Sequence[str] = CORRUPTIONS,
                     directions: Sequence[str] = DIRECTIONS, sites: Sequence[str] = EFFECT_SITES,
                     positions: tuple[int, int] = (0, 2), n_sequences: int = 64, seed: int = 0,
                     permutation_seed: int = 0, guard: float = GUARD, n_resamples: int = N_RESAMPLES,
                     quiet: bool = True) -> pd.DataFrame:
    """Denoising and noising patching of every (site, layer, position) for every answer digit,
    per corruption, with per-prompt BCa intervals and the relative guard (module docstring).

    Args:
        model: a trained addition model.
        task: its task (fixed format).
        corruptions: any of `CORRUPTIONS` (each draws its prompts with `patching.patching_sample`).
        directions: any of `DIRECTIONS`.
        sites: residual (or any `patching.SITES`) sites.
        positions: the two operand-digit positions a `swap` exchanges.
        n_sequences: the most clean/corrupted pairs per corruption.
        seed: draws the held-out sample and the bootstrap resamples.
        permutation_seed: draws the `permute` corruption.
        guard: the relative guard (a fraction of the median gap, in [0, 1)).
        n_resamples: bootstrap resamples per interval.
        quiet: no progress bars.

    Returns:
        The tidy table, columns `PATCHING_EFFECT_COLUMNS`, one row per (direction, corruption,
        digit, site, layer, position). Where every prompt of a digit is unchanged or excluded,
        `value` and the interval are NaN and `n_prompts` is 0; below `MIN_INTERVAL_PROMPTS` the interval is NaN.
    """
    for name, given, allowed in (("direction", directions, DIRECTIONS), ("corruption", corruptions, CORRUPTIONS)):
        for item in given:
            if item not in allowed:
                raise ValueError(f"unknown patching {name} {item!r}; allowed: {list(allowed)}")
    sites = [check_site(site) for site in sites]
    if not 0 <= guard < 1:
        raise ValueError(f"guard must be a fraction of the median gap in [0, 1), got {guard}")
    model.eval()
    device, start = model.cfg.device, task.prompt_len
    digits = task.roles[start:]
    reads = [start - 1 + k for k in range(len(digits))]
    generator = np.random.default_rng(seed)
    rows = []
    for corruption in corruptions:
        clean, corrupted = (tokens.to(device) for tokens in patching_sample(
            task, kind=corruption, positions=positions, n_sequences=n_sequences, seed=seed,
            permutation_seed=permutation_seed))
        changed = (clean[:, start:] != corrupted[:, start:]).cpu()
        clean_ld, corrupted_ld, patched = _patched(model, clean, corrupted, reads, sites, directions, quiet)
        gap = clean_ld - corrupted_ld
        kept = guard_prompts(gap, changed, guard)
        fixed = _fixed_cells(model, clean.cpu(), corrupted.cpu(), sites, reads)
        effects = {(direction, site): (values - corrupted_ld) / gap if direction == "denoise" else
                   (clean_ld - values) / gap
                   for direction, by_site in patched.items() for site, values in by_site.items()}
        rows += _summarise(effects, kept, changed, fixed, generator, n_resamples, corruption, digits, task.roles)
    order = {name: index for index, name in enumerate([*directions, *corruptions, *digits, *sites])}
    rows.sort(key=lambda row: (order[row["direction"]], order[row["corruption"]], order[row["digit"]],
                               order[row["site"]], row["layer"], row["position"]))
    return pd.DataFrame(rows, columns=list(PATCHING_EFFECT_COLUMNS))


def _inputs(model: HookedTransformer, n_pos: int, reads: Sequence[int]) -> list[tuple[int, list[int]]]:
    """`(input length, answer digits)` of each pass set: under a causal mask one teacher-forced
    input serves every digit; a bidirectional model would see the answer digits after the one it
    predicts, so each digit gets the input greedy decoding shows it (up to its readout)."""
    if model.cfg.attention_dir == "causal":
        return [(n_pos, list(range(len(reads))))]
    return [(read + 1, [k]) for k, read in enumerate(reads)]


def _patched(model: HookedTransformer, clean: Int[Tensor, "batch seq"], corrupted: Int[Tensor, "batch seq"],
             reads: Sequence[int], sites: Sequence[str], directions: Sequence[str], quiet: bool
             ) -> tuple[Tensor, Tensor, dict[str, dict[str, Tensor]]]:
    """The clean and the corrupted runs' answer logit differences `[batch, digit]`, and per
    direction and site the patched runs' `[layer, pos, batch, digit]` (a position after a
    digit's readout that its input lacks holds the unpatched run's value: the patch is a no-op)."""
    n_pos, start = clean.shape[1] - 1, reads[0] + 1
    good, bad = clean[:, start:], corrupted[:, start:]
    baseline: dict[str, list[Tensor]] = {"clean": [], "corrupted": []}
    patched: dict[str, dict[str, list[Tensor]]] = {direction: {site: [] for site in sites} for direction in directions}
    for length, group in _inputs(model, n_pos, reads):
        runs = {"clean": clean[:, :length], "corrupted": corrupted[:, :length]}
        group_reads = [reads[k] for k in group]

        def metric(logits: Tensor, good=good[:, group], bad=bad[:, group], group_reads=group_reads) -> Tensor:
            return answer_logit_diffs(logits, good, bad, group_reads)  # [batch, digit]: a value per prompt

        for name, tokens in runs.items():
            baseline[name].append(metric(model(tokens)).cpu())
        for direction in directions:
            source, run = ("clean", "corrupted") if direction == "denoise" else ("corrupted", "clean")
            unpatched = baseline[run][-1]
            # `patch_grids` keeps the metric's per-prompt shape: `[layer, pos, batch, digit]` per site
            for site, values in patch_grids(model, runs[source], runs[run], metric, sites, quiet=quiet).items():
                absent = unpatched.expand(values.shape[0], n_pos - length, *unpatched.shape)
                patched[direction][site].append(torch.cat([values, absent], dim=1))
    return (torch.cat(baseline["clean"], -1), torch.cat(baseline["corrupted"], -1),
            {direction: {site: torch.cat(parts, -1) for site, parts in by_site.items()}
             for direction, by_site in patched.items()})


def _fixed_cells(model: HookedTransformer, clean: Int[Tensor, "batch seq"], corrupted: Int[Tensor, "batch seq"],
                 sites: Sequence[str], reads: Sequence[int]) -> dict[str, Tensor]:
    """Per site, `[layer, pos, digit]`: whether the architecture fixes the cell's value for the
    digit read at `reads[k]` (`patching.fixed_by_construction` on that digit's input; the same in
    both directions). A position its input lacks is fixed at 0."""
    n_pos, n_layers = clean.shape[1] - 1, model.cfg.n_layers
    flags = torch.ones(len(sites), n_layers, n_pos, len(reads), dtype=torch.bool)
    for length, group in _inputs(model, n_pos, reads):
        cells = pd.DataFrame([{"site": site, "layer": layer, "position": position} for site in sites
                              for layer in range(n_layers) for position in range(length)])
        for k in group:
            found = fixed_by_construction(model.cfg, cells, clean[:, :length], corrupted[:, :length], length, reads[k])
            flags[:, :, :length, k] = torch.tensor(found).reshape(len(sites), n_layers, length)
    return dict(zip(sites, flags))


def _summarise(effects: dict[tuple[str, str], Float[Tensor, "layer pos batch digit"]], kept: Tensor, changed: Tensor,
               fixed: dict[str, Tensor], generator: np.random.Generator, n_resamples: int, corruption: str,
               digits: Sequence[str], roles: Sequence[str]) -> list[dict]:
    """The rows of one corruption: per (direction, site), digit and cell, the mean over the
    digit's kept prompts and its BCa interval (one set of resamples per digit serves every cell)."""
    stacked = torch.stack(list(effects.values()))  # [direction × site, layer, pos, batch, digit]
    n_groups, n_layers, n_pos = stacked.shape[:3]
    rows = []
    for k, digit in enumerate(digits):
        keep = kept[:, k]
        values = stacked[..., keep, k].reshape(n_groups * n_layers * n_pos, -1).double().numpy()  # [cells, kept]
        means = values.mean(1) if values.shape[1] else np.full(len(values), np.nan)
        low, high = bootstrap_mean_interval(values, n_resamples, seed=int(generator.integers(2**31))) if (
            values.shape[1] >= MIN_INTERVAL_PROMPTS) else (np.full(len(values), np.nan),) * 2
        counts = {"n_prompts": int(keep.sum()), "n_excluded": int((changed[:, k] & ~keep).sum()),
                  "n_unchanged": int((~changed[:, k]).sum())}
        for cell, ((direction, site), layer, position) in enumerate(
                (group, layer, position)
                for group in effects for layer in range(n_layers) for position in range(n_pos)):
            rows.append({"direction": direction, "corruption": corruption, "digit": digit, "site": site, "layer": layer,
                         "position": position, "role": roles[position], "value": float(means[cell]),
                         "ci_low": float(low[cell]), "ci_high": float(high[cell]), **counts,
                         "fixed_by_construction": bool(fixed[site][layer, position, k])})
    return rows


def strongest_cells(table: pd.DataFrame) -> pd.DataFrame:
    """For reading: per variant, direction, corruption and answer digit, the cell (not fixed by
    construction) with the largest mean value over seeds (its interval's ends averaged over seeds
    beside it), and the mean kept, excluded and unchanged prompts per run.

    Args:
        table: a merged `patching_effects` table with `variant` and `seed` columns.

    Returns:
        One row per (variant, direction, corruption, digit): site, layer, position, role, value,
        ci_low, ci_high (means over seeds), n_seeds, and the mean `n_prompts`, `n_excluded`, `n_unchanged`.
    """
    keys = ["variant", "direction", "corruption", "digit"]
    counts = table.groupby(keys, sort=False)[["n_prompts", "n_excluded", "n_unchanged"]].mean()
    free = table[~table["fixed_by_construction"] & table["value"].notna()]
    means = free.groupby([*keys, "site", "layer", "position", "role"], sort=False).agg(
        value=("value", "mean"), ci_low=("ci_low", "mean"), ci_high=("ci_high", "mean"),
        n_seeds=("seed", "nunique")).reset_index()
    best = means.loc[means.groupby(keys, sort=False)["value"].idxmax()] if len(means) else means
    found = best.merge(counts.reset_index(), on=keys, how="right")  # a digit without free cells: NaN
    return found.astype({"layer": "Int64", "position": "Int64", "n_seeds": "Int64"})

