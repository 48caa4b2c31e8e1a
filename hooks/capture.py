"""Residual-stream capture: every site, one forward pass per batch, memory bounded by the batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from poslens.variants import HookedTransformer

EMBED = "embed"


def residual_sites(model: HookedTransformer) -> list[str]:
    """All residual-stream sites in order: `embed` (the stream entering block 0), then each
    block's `resid_mid` and `resid_post`, as TransformerLens hook names."""
    return [EMBED] + [f"blocks.{block}.hook_{name}" for block in range(model.cfg.n_layers)
                      for name in ("resid_mid", "resid_post")]


def hook_name(site: str) -> str:
    """The hook that carries `site` (`embed` is block 0's `resid_pre`)."""
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
def capture_residuals(model: HookedTransformer, tokens: Int[Tensor, "example pos"], sites: list[str] | None = None,
                      batch_size: int = 512) -> Capture:
    """The residual stream at `sites` (default: all of `residual_sites`) for every example.

    Runs one forward pass per batch of `batch_size` examples, writing straight into the
    result on the CPU, so peak memory is the result plus one batch's activations.
    """
    allowed = residual_sites(model)
    sites = list(allowed if sites is None else sites)
    unknown = [site for site in sites if site not in allowed]
    if unknown or not sites or len(set(sites)) != len(sites):
        raise ValueError(f"sites must be distinct and among {allowed}; got {sites}")
    tokens = model.check_tokens(tokens)
    if len(tokens) == 0:
        raise ValueError("cannot capture activations of an empty dataset (0 examples)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    out = torch.empty(len(sites), *tokens.shape, model.cfg.d_model, dtype=model.cfg.dtype)
    last = max(range(len(sites)), key=lambda index: allowed.index(sites[index]))
    window = slice(0, 0)

    def writer(index: int):
        def hook(activation: Tensor, hook) -> None:
            out[index, window] = activation.to("cpu")
            if index == last:
                raise _StopForward

        return hook

    fwd_hooks = [(hook_name(site), writer(index)) for index, site in enumerate(sites)]
    was_training = model.training
    model.eval()
    try:
        with model.hooks(fwd_hooks=fwd_hooks):
            for start in range(0, len(tokens), batch_size):
                window = slice(start, start + batch_size)
                try:
                    model(tokens[window].to(model.cfg.device))
                except _StopForward:
                    pass
    finally:
        model.train(was_training)
    return Capture(out, sites)


@torch.no_grad()
def capture_patterns(model: HookedTransformer, tokens: Int[Tensor, "batch pos"]
                     ) -> tuple[Float[Tensor, "batch pos d_vocab"], Float[Tensor, "layer batch head query key"]]:
    """Logits and every layer's attention pattern (`blocks.{l}.attn.hook_pattern`), caching nothing else."""
    logits, cache = model.run_with_cache(tokens.to(model.cfg.device),
                                         names_filter=lambda name: name.endswith("attn.hook_pattern"))
    return logits, torch.stack([cache["pattern", layer] for layer in range(model.cfg.n_layers)])
