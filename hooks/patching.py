"""Activation patching at interactive speed: every cell of a grid in a few batched forward passes.

`transformer_lens.patching` runs one forward pass per cell (one (layer, position) or (layer, head)
patch): a 12 × 16 `resid_pre` grid on GPT-2 small is 192 full passes. It cannot do better through
its interface (a hook per cell, a metric per pass), so this engine does the same patches differently,
on any model TransformerLens can hook (poslens's `HookedTransformer`, a `TransformerBridge`):

- the clean and corrupted runs are computed once, caching only the hooks of the sites asked for;
- a cell whose clean and corrupted activations are equal (for every prompt of a pass) is not run: its
  patch writes what is already there, so its value is the corrupted run's metric. In a causal model
  that is every position before the first corrupted token, in every block, and in block 0's
  `resid_pre` every position whose token is unchanged: about half of a grid whose corruption is
  mid-prompt (tests check that these cells skip their pass and still equal TransformerLens's);
- the batch axis carries the cells. One pass starts with the corrupted prompts (`B` rows: the
  corrupted run itself), and at the stream entering block `l` (`blocks.l.hook_resid_pre`) the
  cells patched in block `l` join the batch as copies of that corrupted stream (`B` rows each);
  their patch is written at the site's hook. So each cell's rows run the blocks from its own layer
  on, starting from the corrupted run's stream, and blocks before it are computed once for all
  cells, on `B` rows. (A bridge's own `start_at_layer` still runs the Hugging Face blocks below the
  start, so growing the batch inside the pass is what saves the work there too.)
- the cells are split into chunks whose estimated working memory (`chunk_cells`) stays within
  `memory_mb`; the corrupted rows are recomputed once per chunk;
- with `last_position_only` (a metric that reads only the last position's logits) the unembedding
  runs on the last position alone (the readout hook slices the final normalised stream);
- `dtype=torch.bfloat16` runs the passes under one autocast context (fast on CPUs with AMX and on GPUs;
  one context, so each weight is cast once per call, not once per pass);
  float32, the default, equals TransformerLens's per-cell loop to float rounding (tests: 1e-5).

Growing the batch inside a pass needs a model whose blocks take whatever batch the stream has, with
masks and rotary tables that broadcast over it: true of poslens's model and of the Hugging Face
GPT-2, GPT-NeoX and Llama bridges without padding (the tests compare every site to TransformerLens).

`attribution_grids` is the gradient preview (attribution patching): one clean forward, one corrupted
forward and one backward give every cell's first-order estimate `(a_clean − a_corrupted) · ∂metric/∂a`
at once. It uses TransformerLens 4.3's `cache_activation_and_gradient` (the gradient cache under its
`attribution_patch`) rather than `attribution_patch` itself, because that scores only the embedding,
attention heads (`z`) and MLP outputs (not the residual stream), one prompt pair at a time with a
per-pair metric; on one pair its `z` and `mlp_out` node scores are the same numbers (tests check it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens.tools.analysis.attribution_patching import cache_activation_and_gradient
from transformer_lens.utilities import get_act_name

from poslens.variants.model import HookedTransformer
from poslens.variants.protocol import HookedModel

Metric = Callable[[Float[Tensor, "batch pos vocab"]], Tensor]

POSITION_SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")  # grid: layer × position
HEAD_SITES = ("z",)  # grid: layer × head, every position of the head's output patched at once
PATCH_SITES = POSITION_SITES + HEAD_SITES
DEFAULT_MEMORY_MB = 1024
# The input of the unembedding: a bridge's `unembed.hook_in` (after Hugging Face's final reshape), else the
# final LayerNorm's output (poslens's model).
READOUT_HOOKS = ("unembed.hook_in", "ln_final.hook_normalized")
EMBED_HOOK = "hook_embed"


def patchable_sites(model: HookedModel) -> list[str]:
    """The `PATCH_SITES` whose hook every block of `model` has (GPT-NeoX's parallel residual has no `resid_mid`).

    Args:
        model: any TransformerLens model (ours or a bridge).

    Returns:
        The site names, in `PATCH_SITES` order.
    """
    return [site for site in PATCH_SITES
            if all(get_act_name(site, layer) in model.hook_dict for layer in range(model.cfg.n_layers))]


def check_sites(model: HookedModel, sites: Sequence[str]) -> list[str]:
    """`sites` as a list if `model` can patch each of them, else a one-line `ValueError` naming the allowed ones.

    Args:
        model: any TransformerLens model.
        sites: site names (`PATCH_SITES`).

    Returns:
        The sites, in the order given.
    """
    allowed = patchable_sites(model)
    for site in sites:
        if site not in PATCH_SITES:
            raise ValueError(f"unknown patching site {site!r}; allowed: {list(PATCH_SITES)}")
        if site not in allowed:
            raise ValueError(f"{site} cannot be patched in this model (some block has no "
                             f"{get_act_name(site, 0).split('.', 2)[-1]} hook); allowed: {allowed}")
    if not sites:
        raise ValueError(f"give at least one patching site; allowed: {allowed}")
    return list(sites)


def grid_shape(model: HookedModel, site: str, n_pos: int) -> tuple[int, int]:
    """`(n_layers, n_pos)` for a position site, `(n_layers, n_heads)` for `z`."""
    return model.cfg.n_layers, (model.cfg.n_heads if site in HEAD_SITES else n_pos)


def chunk_cells(model: HookedModel, n_prompts: int, n_pos: int, *, last_position_only: bool = False,
                memory_mb: float = DEFAULT_MEMORY_MB) -> int:
    """How many cells one pass carries so that its estimated working memory stays within `memory_mb`.

    The estimate, per row (one prompt of one cell, float32): the stream and the few block
    intermediates alive at once (6 · d_model + 2 · d_mlp per position), the attention scores and
    pattern (3 · n_heads · n_pos per position) and the logits with the metric's softmax
    (3 · d_vocab per position read). A pass has `n_prompts` corrupted rows plus `n_prompts` per cell.

    Args:
        model: any TransformerLens model.
        n_prompts: prompts per cell (the corrupted batch size).
        n_pos: tokens per prompt.
        last_position_only: whether only the last position is unembedded.
        memory_mb: the budget, in MiB.

    Returns:
        Cells per pass, at least 1.
    """
    cfg = model.cfg
    d_mlp = getattr(cfg, "d_mlp", None) or 4 * cfg.d_model
    n_read = 1 if last_position_only else n_pos
    row_bytes = 4 * (n_pos * (6 * cfg.d_model + 2 * d_mlp + 3 * cfg.n_heads * n_pos) + 3 * n_read * cfg.d_vocab)
    return max(1, int(memory_mb * 2**20 // (n_prompts * row_bytes)) - 1)


def _autocast(model: HookedModel, dtype: torch.dtype | None):
    """Autocast to `dtype` on the model's device, or nothing for float32 / None."""
    if dtype in (None, torch.float32):
        return nullcontext()
    assert model.cfg.device is not None  # TransformerLensConfig.__post_init__ sets it
    return torch.autocast(device_type=torch.device(model.cfg.device).type, dtype=dtype)


def _readout_hook(model: HookedModel) -> str:
    for name in READOUT_HOOKS:
        if name in model.hook_dict:
            return name
    raise ValueError(f"this model has none of the readout hooks {list(READOUT_HOOKS)}: use last_position_only=False")


def _chunk_hooks(site: str, cells: list[tuple[int, int]], clean: dict[str, Tensor], n_prompts: int
                 ) -> list[tuple[str, Callable]]:
    """The forward hooks of one pass over `cells` ((layer, position or head), sorted by layer): at each
    layer's `resid_pre` the cells of that layer join the batch as copies of the first `n_prompts` rows
    (the corrupted run); at the site's hook each cell's rows get the clean activation at its index."""
    by_layer: dict[int, list[tuple[int, int]]] = {}
    for row_block, (layer, index) in enumerate(cells, start=1):
        by_layer.setdefault(layer, []).append((row_block, index))
    steps: dict[str, list[Callable]] = {}
    for layer, entries in by_layer.items():
        def grow(activation: Tensor, n_new: int = len(entries)) -> Tensor:
            corrupted = activation[:n_prompts]
            return torch.cat([activation, corrupted.repeat(n_new, *[1] * (activation.ndim - 1))])

        def patch(activation: Tensor, entries: list[tuple[int, int]] = entries,
                  source: Tensor = clean[get_act_name(site, layer)]) -> Tensor:  # noqa: B008 (bound per cell)
            for row_block, index in entries:
                rows = slice(row_block * n_prompts, (row_block + 1) * n_prompts)
                if site in HEAD_SITES:
                    activation[rows, :, index] = source[:, :, index].to(activation.dtype)
                else:
                    activation[rows, index] = source[:, index].to(activation.dtype)
            return activation

        steps.setdefault(get_act_name("resid_pre", layer), []).append(grow)
        steps.setdefault(get_act_name(site, layer), []).append(patch)

    def run_steps(functions: list[Callable]) -> Callable:
        def hook(activation: Tensor, hook) -> Tensor:
            for function in functions:
                activation = function(activation)
            return activation

        return hook

    return [(name, run_steps(functions)) for name, functions in steps.items()]


@torch.no_grad()
def patch_grids(model: HookedModel, clean_tokens: Int[Tensor, "batch pos"],
                corrupted_tokens: Int[Tensor, "batch pos"], metric: Metric, sites: Sequence[str] = ("resid_pre",), *,
                last_position_only: bool = False, memory_mb: float = DEFAULT_MEMORY_MB,
                dtype: torch.dtype | None = None, quiet: bool = True) -> dict[str, Float[Tensor, "layer index"]]:
    """Activation patching of every cell of each site's grid, clean → corrupted: the grids that
    `transformer_lens.patching` computes (`get_act_patch_resid_pre`, ..., `get_act_patch_attn_head_out_all_pos`
    for `z`), in a few batched passes (see the module docstring).

    Args:
        model: a TransformerLens model in eval mode (poslens's `HookedTransformer` or a `TransformerBridge`).
        clean_tokens: the clean prompts, `[batch, pos]`.
        corrupted_tokens: the corrupted prompts, the same shape.
        metric: maps the logits of the corrupted prompts (`[batch, pos, vocab]`, or `[batch, 1, vocab]` with
            `last_position_only`) to a scalar, as TransformerLens's patching metric does, or to a tensor of
            one fixed shape (e.g. one value per prompt, `[batch]`), which each grid cell then holds.
        sites: any of `PATCH_SITES` the model has (`patchable_sites`).
        last_position_only: the metric reads only the last position, so only it is unembedded (faster).
        memory_mb: the working-memory budget of one pass (`chunk_cells`).
        dtype: None or float32 (default) runs in the model's precision; `torch.bfloat16` (or float16) under
            autocast.
        quiet: no progress bar.

    Returns:
        Each site's grid, `[n_layers, n_pos]` (`[n_layers, n_heads]` for `z`) followed by the metric's own
        shape (none for a scalar metric), float32 on the CPU.
    """
    sites = check_sites(model, sites)
    if clean_tokens.shape != corrupted_tokens.shape or clean_tokens.ndim != 2:
        raise ValueError(f"clean and corrupted prompts must be [batch, pos] of the same shape, got "
                         f"{tuple(clean_tokens.shape)} and {tuple(corrupted_tokens.shape)}")
    device = model.cfg.device
    clean_tokens, corrupted_tokens = clean_tokens.to(device), corrupted_tokens.to(device)
    n_pos = corrupted_tokens.shape[1]
    names = [get_act_name(site, layer) for site in sites for layer in range(model.cfg.n_layers)]
    readout = [(_readout_hook(model), lambda activation, hook: activation[:, -1:])] if last_position_only else []
    groups = _prompt_groups(model, len(corrupted_tokens))
    per_pass = chunk_cells(model, groups[0].stop - groups[0].start, n_pos, last_position_only=last_position_only,
                           memory_mb=memory_mb)
    grids = {}
    # One autocast context for every pass: its cache casts each weight to `dtype` once per call, not once per pass.
    with _autocast(model, dtype):
        _, cache = model.run_with_cache(clean_tokens, names_filter=names)
        clean = {name: cache[name] for name in names}
        logits, cache = model.run_with_cache(corrupted_tokens, names_filter=names)
        corrupted = {name: cache[name] for name in names}
        corrupted_logits = (logits[:, -1:] if last_position_only else logits).float()
        del cache, logits
        unpatched = _value(metric(corrupted_logits))  # every no-op cell's value, whatever the site
        for site in sites:
            shape = grid_shape(model, site, n_pos)
            cells = [(layer, index) for layer in range(shape[0]) for index in range(shape[1])]
            # Per prompt group, the cells whose patch writes what is already there; their rows would be the
            # corrupted run's own (in a causal model, every position before the first corrupted token).
            active = [{cell for cell in cells if _changes(site, cell, clean, corrupted, group)} for group in groups]
            to_run = [cell for cell in cells if any(cell in cells_of_group for cells_of_group in active)]
            values = dict.fromkeys(cells, unpatched)
            with tqdm(total=len(cells), desc=f"patching {site}", disable=quiet) as bar:
                bar.update(len(cells) - len(to_run))
                for start in range(0, len(to_run), per_pass):
                    chunk = to_run[start:start + per_pass]
                    per_group = []
                    for group, cells_of_group in zip(groups, active):
                        per_group.append(_run_chunk(model, site, chunk, cells_of_group, clean, corrupted_tokens,
                                                    corrupted_logits, group, readout))
                    values.update((cell, _value(metric(torch.cat(blocks)))) for cell, *blocks in
                                  zip(chunk, *per_group))
                    bar.update(len(chunk))
            grids[site] = torch.stack([values[cell] for cell in cells]).reshape(*shape, *unpatched.shape)
    return grids


def _value(metric_value: Tensor | float) -> Tensor:
    """A metric's value as a float32 tensor on the CPU (a scalar, or one value per prompt)."""
    return torch.as_tensor(metric_value).detach().float().cpu()


def _changes(site: str, cell: tuple[int, int], clean: dict[str, Tensor], corrupted: dict[str, Tensor],
             group: slice) -> bool:
    """Whether patching `cell` of `site` changes the corrupted activation of the prompts in `group`."""
    layer, index = cell
    name = get_act_name(site, layer)
    where = (group, slice(None), index) if site in HEAD_SITES else (group, index)
    return not torch.equal(clean[name][where], corrupted[name][where])


def _run_chunk(model: HookedModel, site: str, chunk: list[tuple[int, int]], changing: set,
               clean: dict[str, Tensor], corrupted_tokens: Int[Tensor, "batch pos"],
               corrupted_logits: Float[Tensor, "batch read vocab"], group: slice, readout: list
               ) -> list[Float[Tensor, "prompt read vocab"]]:
    """The logits of `group`'s prompts for each cell of `chunk`: one pass over the cells in `changing`, the
    corrupted run's logits for the others (their patch is a no-op)."""
    run = [cell for cell in chunk if cell in changing]
    logits_of = {}
    if run:
        hooks = _chunk_hooks(site, run, {name: act[group] for name, act in clean.items()}, group.stop - group.start)
        with model.hooks(fwd_hooks=hooks + readout):
            logits = model(corrupted_tokens[group]).float()
        logits_of = dict(zip(run, logits.split(group.stop - group.start)[1:]))
    return [logits_of.get(cell, corrupted_logits[group]) for cell in chunk]


def _prompt_groups(model: HookedModel, n_prompts: int) -> list[slice]:
    """The prompts one pass carries: all of them on poslens's model, one at a time on any other model (a
    Hugging Face model may build a `[batch, ...]` attention mask up front, which a grown batch does not match
    unless batch is 1)."""
    if isinstance(model, HookedTransformer):
        return [slice(0, n_prompts)]
    return [slice(prompt, prompt + 1) for prompt in range(n_prompts)]


def attribution_grids(model: HookedModel, clean_tokens: Int[Tensor, "batch pos"],
                      corrupted_tokens: Int[Tensor, "batch pos"], metric: Metric, sites: Sequence[str] = ("resid_pre",)
                      ) -> dict[str, Float[Tensor, "layer index"]]:
    """Attribution patching (the gradient approximation of `patch_grids`): every cell's metric estimated
    as the corrupted run's metric plus `(a_clean − a_corrupted) · ∂metric/∂a` at the corrupted run, summed
    over the batch and the feature axis (and, for `z`, over positions), from one clean forward and one
    corrupted forward + backward. Like `patch_grids`, a grid of metric values, so the two compare directly.

    Exact where the metric is linear in the patched activation; elsewhere a preview (see
    `docs/guide/patching.md` for its measured correlation with the exact grid).

    Args:
        model: a TransformerLens model in eval mode.
        clean_tokens: the clean prompts, `[batch, pos]`.
        corrupted_tokens: the corrupted prompts, the same shape.
        metric: as for `patch_grids` (differentiable; it sees every position's logits).
        sites: any of `PATCH_SITES` the model has.

    Returns:
        Each site's estimated grid, the shapes of `patch_grids`.
    """
    sites = check_sites(model, sites)
    if clean_tokens.shape != corrupted_tokens.shape or clean_tokens.ndim != 2:
        raise ValueError(f"clean and corrupted prompts must be [batch, pos] of the same shape, got "
                         f"{tuple(clean_tokens.shape)} and {tuple(corrupted_tokens.shape)}")
    device = model.cfg.device
    names = [get_act_name(site, layer) for site in sites for layer in range(model.cfg.n_layers)]
    skips = _skip_gradients(model) if "resid_mid" in sites else {}
    names += [name for name in skips.values() if name not in names]
    # TransformerLens: the most upstream cached point's backward hook never fires, and a bridge's converted
    # points (`attn.hook_z`) get no gradient from the fallback; the embedding, upstream of every site, takes that role.
    names += [EMBED_HOOK] if EMBED_HOOK in model.hook_dict else []
    with torch.enable_grad():
        clean = cache_activation_and_gradient(model, clean_tokens.to(device), metric, names_filter=names,
                                              compute_gradient=False)
        corrupted = cache_activation_and_gradient(model, corrupted_tokens.to(device), metric, names_filter=names)
    grids = {}
    for site in sites:
        rows = []
        for layer in range(model.cfg.n_layers):
            name = get_act_name(site, layer)
            gradient = _total(corrupted.gradients.get(name), corrupted.gradients.get(skips.get(name, "")))
            effect = (clean.activations[name] - corrupted.activations[name]) * gradient
            rows.append(corrupted.metric
                        + (effect.sum(dim=(0, 1, 3)) if site in HEAD_SITES else effect.sum(dim=(0, 2))))
        grids[site] = torch.stack(rows).float().cpu()
    return grids


def _skip_gradients(model: HookedModel) -> dict[str, str]:
    """For each block whose `hook_resid_mid` is its second LayerNorm's input (a bridge's alias to
    `ln2.hook_in`): that hook → the block's `hook_resid_post`.

    There the backward hook sees only the gradient through the LayerNorm; the stream also reaches
    `resid_post` through the skip connection, whose gradient is `resid_post`'s. Patching `resid_mid`
    replaces both (the tensor is shared), so its attribution needs the sum."""
    pairs = {}
    for layer in range(model.cfg.n_layers):
        mid = get_act_name("resid_mid", layer)
        if mid in model.hook_dict and model.hook_dict[mid] is model.hook_dict.get(f"blocks.{layer}.ln2.hook_in"):
            pairs[mid] = get_act_name("resid_post", layer)
    return pairs


def _total(gradient: Tensor | None, skip: Tensor | None) -> Tensor | float:
    """The gradient at a hook plus its skip connection's (None where the metric does not depend on it)."""
    parts = [part for part in (gradient, skip) if part is not None]
    return sum(parts) if parts else 0.0
