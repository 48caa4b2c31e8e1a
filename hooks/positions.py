"""Position interventions: run a model with the positions it is *told* changed and its tokens kept.

A vector swap (`analyses.measures.swaps.position_swap`) moves content and position
together. Here only the position ids change: each token keeps its embedding and its place in
the sequence (so the causal mask and everything per-token stay as they were), but the positional
encoding reads the id it is given. For a learned or sinusoidal encoding that is the vector
added at the embedding; for rotary it is the angle of q and k in every layer. Three edits
cover the usual questions:

- `shifted(n_pos, k)`: every id plus k. An absolute encoding sees new positions; rotary
  attention depends only on id differences, so a global shift changes nothing but float
  rounding (TransformerLens issue #985: rotary positions cannot be changed through hooks, which
  is why this goes through the model's `position_ids` and not a hook point);
- `swapped(n_pos, i, j)`: tokens i and j exchange their ids (content stays in place);
- `repeated(n_pos, source, target)`: token `target` is told `source`'s id (two tokens share one).

`with_positions(model, ids)` makes every forward pass of `model` inside it use `ids` (cut to
the input's length, so `generate` and `capture_residuals` work unchanged). It works for poslens
models (NoPE ignores ids by construction) and for bridged Hugging Face models whose forward
takes `position_ids` (GPT-2, GPT-NeoX/Pythia, Llama, Mistral, Qwen2, Gemma, Phi, OPT, GPT-J...).
`position_support` names the models that cannot: ALiBi models (BLOOM, MPT, Falcon with
`alibi=True`) have no position ids at all, only a bias on key-query distance computed from the
mask; T5-style relative buckets are computed from the sequence lengths; and a
TransformerLens `HookedTransformer` (not a bridge) has no `position_ids` argument.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from jaxtyping import Int
from torch import Tensor

from poslens.variants.model import HookedTransformer, check_position_ids
from poslens.variants.protocol import HookedModel

EDIT_KINDS = ("none", "shift", "swap", "repeat", "permute")


@dataclass(frozen=True)
class PositionEdit:
    """One intervention: its `name` (e.g. `shift+1`), `kind` (one of `EDIT_KINDS`) and the ids `[pos]`."""

    name: str
    kind: str
    position_ids: Int[Tensor, " pos"]

    def moved(self) -> Int[Tensor, " moved"]:
        """The token indices told a position other than their own."""
        return (self.position_ids != torch.arange(len(self.position_ids))).nonzero().squeeze(1)


def unchanged(n_pos: int) -> PositionEdit:
    """The identity: ids 0..n_pos-1 (the baseline every edit is compared with).

    Args:
        n_pos: the sequence length.

    Returns:
        The `PositionEdit` named `none`.
    """
    return PositionEdit("none", "none", torch.arange(_length(n_pos)))


def shifted(n_pos: int, k: int) -> PositionEdit:
    """Every token told its index plus `k` (`k` >= 0).

    Args:
        n_pos: sequence length.
        k: the shift.

    Returns:
        The edit `shift+k`.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"a shift must be an integer >= 0, got {k!r}")
    return PositionEdit(f"shift+{k}", "shift", torch.arange(_length(n_pos)) + k)


def swapped(n_pos: int, i: int, j: int) -> PositionEdit:
    """Tokens `i` and `j` told each other's position; their content stays where it is.

    Args:
        n_pos: sequence length.
        i: one token index.
        j: the other, distinct from `i`.

    Returns:
        The edit `swap i,j`.
    """
    ids = torch.arange(_length(n_pos))
    _check_indices(n_pos, i, j)
    ids[[i, j]] = ids[[j, i]]
    return PositionEdit(f"swap {i},{j}", "swap", ids)


def repeated(n_pos: int, source: int, target: int) -> PositionEdit:
    """Token `target` told `source`'s position, so two tokens share one id.

    Args:
        n_pos: sequence length.
        source: the token whose position is repeated.
        target: the token told it (distinct from `source`).

    Returns:
        The edit `repeat target=source`.
    """
    ids = torch.arange(_length(n_pos))
    _check_indices(n_pos, source, target)
    ids[target] = source
    return PositionEdit(f"repeat {target}={source}", "repeat", ids)


def permuted(order: Int[Tensor, " pos"] | list[int]) -> PositionEdit:
    """Token t told position `order[t]`; `order` must be a permutation of 0..pos-1.

    Args:
        order: the ids, one per token.

    Returns:
        The edit `permute` with those ids.
    """
    ids = torch.as_tensor(order, dtype=torch.long)
    if ids.ndim != 1 or not torch.equal(ids.sort().values, torch.arange(len(ids))):
        raise ValueError(f"order must be a permutation of 0..{len(ids) - 1}, got {ids.tolist()}")
    return PositionEdit("permute " + ",".join(map(str, ids.tolist())), "permute", ids)


def position_support(model: HookedModel) -> str | None:
    """None if `model` can be run with explicit position ids, else the reason it cannot (one sentence).

    Args:
        model: a poslens `HookedTransformer` or a `TransformerBridge`.

    Returns:
        None, or why position ids cannot be set for this model.
    """
    if isinstance(model, HookedTransformer):
        return None
    original = getattr(model, "original_model", None)
    if original is None:
        return (f"a {type(model).__name__} takes no position ids (TransformerLens's HookedTransformer has no "
                "position_ids argument); load the model as a TransformerBridge (poslens.variants.load_any)")
    config = getattr(original, "config", None)
    kind = getattr(config, "model_type", type(original).__name__)
    if getattr(config, "alibi", False) or kind in ("bloom", "mpt"):
        return (f"{kind} uses ALiBi: position enters only as a bias on the key-query distance computed from the "
                "attention mask, so there are no position ids to set")
    if getattr(config, "is_encoder_decoder", False):
        return f"{kind} is an encoder-decoder whose relative position buckets come from the sequence lengths"
    if "position_ids" not in inspect.signature(original.forward).parameters:
        return f"{kind}'s forward takes no position_ids, so its positions cannot be set from outside"
    return None


@contextmanager
def with_positions(model: HookedModel, position_ids: Int[Tensor, "*batch pos"] | PositionEdit
                   ) -> Iterator[HookedModel]:
    """Every forward pass of `model` inside the block runs with `position_ids` (cut to its input length).

    Implemented as a forward pre-hook on the model that adds `position_ids=` to its call: a hook
    point cannot do it, because a rotary model reads positions inside attention, not from the
    stream. The ids are checked at every call (shape, >= 0, below `n_ctx` for a learned table).

    Args:
        model: a poslens `HookedTransformer` or a bridge whose Hugging Face model takes `position_ids`.
        position_ids: `[pos]` ids for every sequence, `[batch, pos]` ids for a batch of exactly that
            size, or a `PositionEdit`.

    Returns:
        A context manager yielding `model`.
    """
    reason = position_support(model)
    if reason is not None:
        raise ValueError(reason)
    ids = position_ids.position_ids if isinstance(position_ids, PositionEdit) else position_ids
    if not isinstance(ids, Tensor) or ids.ndim not in (1, 2):
        raise ValueError(f"position_ids must be a [pos] or [batch, pos] integer tensor, got "
                         f"{tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__}")

    def inject(module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        tokens = args[0] if args else kwargs.get("input")
        if kwargs.get("position_ids") is not None:
            raise ValueError("position_ids given both to the call and by with_positions; give them once")
        if not isinstance(tokens, Tensor) or tokens.is_floating_point() or tokens.ndim != 2:
            raise ValueError("with_positions needs [batch, pos] token tensors as the model's input")
        n_pos = tokens.shape[1]
        if n_pos > ids.shape[-1]:
            raise ValueError(f"the input has {n_pos} tokens but only {ids.shape[-1]} position ids were given")
        if ids.ndim == 2 and len(ids) != len(tokens):
            raise ValueError(f"[batch, pos] position_ids are for a batch of {len(ids)}, the input has {len(tokens)}")
        cut = ids[..., :n_pos]
        cut = check_position_ids(cut if cut.ndim == 2 else cut.expand(len(tokens), -1), tokens, model.cfg)
        return args, {**kwargs, "position_ids": cut}

    handle = model.register_forward_pre_hook(inject, with_kwargs=True)
    try:
        yield model
    finally:
        handle.remove()


def _length(n_pos: int) -> int:
    if isinstance(n_pos, bool) or not isinstance(n_pos, int) or n_pos < 1:
        raise ValueError(f"n_pos must be an integer >= 1, got {n_pos!r}")
    return n_pos


def _check_indices(n_pos: int, a: int, b: int) -> None:
    if not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < n_pos for x in (a, b)) or a == b:
        raise ValueError(f"need two distinct token indices in 0..{n_pos - 1}, got {a!r} and {b!r}")
