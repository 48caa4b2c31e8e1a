"""What a model is, found from the model rather than from its config: its residual sites and the
positional encoding each layer's attention sees. Works on poslens models and bridges alike.

Per layer, `pe_kind` is one of `PE_KINDS`:

- `learned` / `sinusoidal`: an absolute position vector is added to the stream at the embedding
  (`hook_pos_embed` fires; a bridge lists that hook for every architecture, but only an additive
  encoding runs it). Which of the two is read off the config (`sinusoidal` if it says so);
- `rotary`: the layer's attention depends on relative position and the model has rotary hooks
  (`hook_rot_q`, `hook_cos`);
- `none`: the layer's attention carries no position of its own (NoPE);
- `other`: position-dependent attention from another mechanism (e.g. ALiBi).

The test for a layer's own mechanism: feed sequences of one repeated token with the additive
position vectors (if any) zeroed. Every position then holds the same stream in every layer
(attention over identical values returns that value, whatever the pattern), so a layer without
positional attention scores gives every visible key exactly the same weight, while rotary (or
ALiBi) weights differ by distance. This is how SmolLM3's NoPE layers are found, although its
config says `rotary` for every layer. Three different tokens are tried, and a layer counts as
`none` only if all three give uniform attention.
"""

from __future__ import annotations

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.model_protocol import TransformerLensModel

from poslens.analyses.measures.sequences import ordinary_tokens
from poslens.hooks import EMBED, missing_resid_mid, residual_sites
from poslens.variants.hub import model_name

PE_KINDS = ("learned", "sinusoidal", "rotary", "none", "other")
MODEL_COLUMNS = ("variant", "seed", "block", "pe_kind", "config_pe", "attention_spread", "resid_mid")
TEST_LENGTH = 16  # positions of the constant-token test
UNIFORM_SPREAD = 1e-4  # largest max/min − 1 of one attention row that still counts as uniform
ROTARY_HOOKS = ("hook_rot_q", "hook_cos")


@torch.no_grad()
def positional_encodings(model: TransformerLensModel) -> pd.DataFrame:
    """One row per block: `block`, `pe_kind`, `config_pe` (what the config claims), and
    `attention_spread`, the test's evidence: the largest max/min − 1 of an attention row over its
    visible keys (0 for exactly uniform attention; a layer is NoPE below `UNIFORM_SPREAD`).

    Args:
        model: any TransformerLens model.

    Returns:
        One row per block.
    """
    n_pos = min(model.cfg.n_ctx, TEST_LENGTH)
    candidates = ordinary_tokens(model)
    tokens = candidates[[len(candidates) // 4, len(candidates) // 2, 3 * len(candidates) // 4]]
    spreads, additive = {}, []

    def record(layer: int):
        def hook(pattern: Tensor, hook) -> None:
            spreads[layer] = max(spreads.get(layer, 0.0), row_spread(pattern))

        return hook

    def zero(pos_embed: Tensor, hook) -> Tensor:
        additive.append(True)
        return torch.zeros_like(pos_embed)

    fwd_hooks = [(f"blocks.{layer}.attn.hook_pattern", record(layer)) for layer in range(model.cfg.n_layers)
                 if f"blocks.{layer}.attn.hook_pattern" in model.hook_dict]
    if "hook_pos_embed" in model.hook_dict:
        fwd_hooks.append(("hook_pos_embed", zero))
    was_training = model.training
    try:
        with model.hooks(fwd_hooks=fwd_hooks):
            model.eval()
            model(tokens[:, None].expand(-1, n_pos).to(model.cfg.device))
    finally:
        model.train(was_training)
    rotary = any(name.endswith(ROTARY_HOOKS) for name in model.hook_dict)
    absolute = (("sinusoidal" if model.cfg.positional_embedding_type == "sinusoidal" else "learned")
                if additive else None)
    rows = []
    for block in range(model.cfg.n_layers):
        spread = spreads.get(block, float("nan"))
        own = "none" if spread < UNIFORM_SPREAD else "rotary" if rotary else "other"
        kind = own if absolute is None else absolute if own == "none" else f"{absolute}+{own}"
        rows.append({"block": block, "pe_kind": kind, "config_pe": model.cfg.positional_embedding_type,
                     "attention_spread": spread})
    return pd.DataFrame.from_records(rows)


def row_spread(pattern: Float[Tensor, "batch head query key"]) -> float:
    """The largest max/min − 1 of an attention row over its visible (non-zero) keys."""
    pattern = pattern.double()
    visible = pattern > 0
    largest = pattern.amax(-1)
    smallest = pattern.masked_fill(~visible, float("inf")).amin(-1)
    return float((largest / smallest - 1).max())


def model_info(model: TransformerLensModel, *, variant: str | None = None, seed: int = 0) -> pd.DataFrame:
    """The metadata record of a model (columns `MODEL_COLUMNS`, one row per block): its
    positional encoding per layer and whether the block has a `resid_mid` site."""
    table = positional_encodings(model)
    table["resid_mid"] = ~table["block"].isin(missing_resid_mid(model))
    table.insert(0, "seed", seed)
    table.insert(0, "variant", variant or model_name(model))
    return table[list(MODEL_COLUMNS)]


def layer_sites(model: TransformerLensModel, layers: list[int]) -> list[str]:
    """`embed` and the residual sites of blocks `layers` (a bad block number is named with the range)."""
    bad = [layer for layer in layers if not 0 <= layer < model.cfg.n_layers]
    if bad:
        raise ValueError(f"blocks {bad} do not exist; allowed: 0..{model.cfg.n_layers - 1}")
    return [EMBED] + [site for site in residual_sites(model)[1:] if int(site.split(".")[1]) in layers]


def site_note(model: TransformerLensModel) -> str | None:
    """A sentence for the output when some block has no `resid_mid` site, else None."""
    missing = missing_resid_mid(model)
    if not missing:
        return None
    return (f"blocks {missing} have no hook_resid_mid (attention and MLP read the same input in parallel, as in "
            "GPT-NeoX/Pythia): their residual sites are resid_post only, and resid_post of block l is resid_pre of "
            "block l + 1")


def describe(model: TransformerLensModel) -> dict:
    """A summary of the model for `poslens inspect`: sizes, tokenizer, residual sites, hook count.

    Args:
        model: any TransformerLens model.

    Returns:
        Name → value, ready to print.
    """
    cfg, tokenizer = model.cfg, getattr(model, "tokenizer", None)
    return {"model": model_name(model), "class": type(model).__name__, "n_layers": cfg.n_layers,
            "d_model": cfg.d_model, "n_heads": cfg.n_heads, "d_vocab": cfg.d_vocab, "n_ctx": cfg.n_ctx,
            "tokenizer": None if tokenizer is None else f"{type(tokenizer).__name__} ({len(tokenizer)} tokens)",
            "hooks": len(model.hook_dict), "residual_sites": residual_sites(model)}
