"""Residual-stream capture: every site, one forward pass per batch, memory bounded by the batch.

Everything here is written against TransformerLens's model protocol (`cfg`, `hook_dict`, `hooks`,
calling the model on tokens), so it runs unchanged on poslens's own `HookedTransformer` and on a
Hugging Face model wrapped in a `TransformerBridge` (`poslens.variants.load_any`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from poslens.variants.protocol import HookedModel
from poslens.variants.tokens import check_token_batch

EMBED = "embed"
BATCH_TOKENS = 8192  # tokens per forward pass when no batch size is given


def residual_sites(model: HookedModel) -> list[str]:
    """All residual-stream sites the model has, in order: `embed` (the stream entering block 0),
    then each block's `resid_mid` (where it exists) and `resid_post`, as TransformerLens hook names.

    A block whose attention and MLP read the same input in parallel (GPT-NeoX / Pythia's
    `use_parallel_residual`) has no `hook_resid_mid`; its sites are then only `resid_post`
    (`missing_resid_mid` names those blocks).

    Args:
        model: any TransformerLens model.

    Returns:
        The site names, from the embedding to the last block's `resid_post`.
    """
    hooks = model.hook_dict
    return [EMBED] + [site for block in range(model.cfg.n_layers) for site in
                      (f"blocks.{block}.hook_resid_mid", f"blocks.{block}.hook_resid_post") if site in hooks]


def missing_resid_mid(model: HookedModel) -> list[int]:
    """The blocks without a `hook_resid_mid` (parallel attention and MLP).

    Args:
        model: any TransformerLens model.

    Returns:
        The block indices that have no `resid_mid`.
    """
    return [block for block in range(model.cfg.n_layers) if f"blocks.{block}.hook_resid_mid" not in model.hook_dict]


def hook_name(site: str) -> str:
    """The hook that carries `site` (`embed` is block 0's `resid_pre`).

    Args:
        site: `embed` or a full hook name.

    Returns:
        The hook name to capture.
    """
    return "blocks.0.hook_resid_pre" if site == EMBED else site


@dataclass
class Capture:
    """Activations `[site, example, position, d_model]` with their site labels."""

    activations: Float[Tensor, "site example pos d_model"]
    sites: list[str]

    def __getitem__(self, site: str) -> Float[Tensor, "example pos d_model"]:
        return self.activations[self.sites.index(site)]


class _StopForward(Exception):
    """Raised after the last captured site: nothing downstream is needed."""


@torch.no_grad()
def capture_residuals(model: HookedModel, tokens: Int[Tensor, "example pos"], sites: list[str] | None = None,
                      batch_size: int | None = None, *, dtype: torch.dtype | None = None,
                      quiet: bool = True) -> Capture:
    """The residual stream at `sites` (default: all of `residual_sites`) for every example.

    Runs one forward pass per batch of `batch_size` examples (default: as many as make about
    `BATCH_TOKENS` tokens) on the model's device, writing straight into the result on the CPU, so
    peak memory is the result plus one batch's activations; each pass stops after the last
    requested site. `dtype` is the result's (default the model's; `torch.float16` halves it).

    Args:
        model: any TransformerLens model (a poslens variant or a bridge).
        tokens: `[example, pos]` token ids.
        sites: hook names (`residual_sites(model)` gives them; `embed` for the stream entering block 0).
        batch_size: examples per forward pass.
        dtype: the result's precision.
        quiet: no progress bar.

    Returns:
        A `Capture`: `activations` `[site, example, pos, d_model]` on the CPU, and `sites`;
        `capture[site]` is one site's `[example, pos, d_model]`.
    """
    allowed = residual_sites(model)
    sites = list(allowed if sites is None else sites)
    unknown = [site for site in sites if site not in allowed]
    if unknown or not sites or len(set(sites)) != len(sites):
        raise ValueError(f"sites must be distinct and among {allowed}; got {sites}")
    tokens = check_token_batch(tokens, model.cfg.n_ctx, model.cfg.d_vocab)
    if len(tokens) == 0:
        raise ValueError("cannot capture activations of an empty dataset (0 examples)")
    if batch_size is None:
        batch_size = max(1, BATCH_TOKENS // max(tokens.shape[1], 1))
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    dtype = dtype or model.cfg.dtype
    out = torch.empty(len(sites), *tokens.shape, model.cfg.d_model, dtype=dtype)
    last = max(range(len(sites)), key=lambda index: allowed.index(sites[index]))
    window = slice(0, 0)

    def writer(index: int):
        def hook(activation: Tensor, hook) -> None:
            out[index, window] = activation.to(device="cpu", dtype=dtype)
            if index == last:
                raise _StopForward

        return hook

    fwd_hooks = [(hook_name(site), writer(index)) for index, site in enumerate(sites)]
    was_training = model.training
    model.eval()
    try:
        with model.hooks(fwd_hooks=fwd_hooks):
            for start in tqdm(range(0, len(tokens), batch_size), desc="capture", disable=quiet):
                window = slice(start, start + batch_size)
                try:
                    model(tokens[window].to(model.cfg.device))
                except _StopForward:
                    pass
    finally:
        model.train(was_training)
    return Capture(out, sites)


@torch.no_grad()
def capture_patterns(model: HookedModel, tokens: Int[Tensor, "batch pos"]
                     ) -> tuple[Float[Tensor, "batch pos d_vocab"], Float[Tensor, "layer batch head query key"]]:
    """Logits and every layer's attention pattern (`blocks.{l}.attn.hook_pattern`), caching nothing else.

    Args:
        model: any TransformerLens model.
        tokens: the prompts.

    Returns:
        `(logits, patterns)`: `[batch, pos, d_vocab]` and `[layer, batch, head, query, key]`.
    """
    logits, cache = model.run_with_cache(tokens.to(model.cfg.device),
                                         names_filter=lambda name: name.endswith("attn.hook_pattern"))
    return logits, torch.stack([cache["pattern", layer] for layer in range(model.cfg.n_layers)])
