"""Token sequences for probing a language model: a text chunked with the model's own tokenizer,
or uniformly random tokens, every sequence the same length and (by default) starting with BOS.

Position probes need every position in every sequence, so a text is tokenised as one stream,
cut into consecutive chunks of `max_len − 1` tokens (the tail that does not fill one is
dropped) and each chunk gets the model's BOS token in front, explicitly: whether a tokenizer
adds BOS by itself differs between models (GPT-2 and Llama yes, GPT-NeoX no), and position 0
should mean the same thing for all of them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from jaxtyping import Int
from torch import Tensor
from transformer_lens.model_protocol import TransformerLensModel

from poslens.variants.hub import bos_token_id, encode_text, model_name


def text_sequences(model: TransformerLensModel, text: str, max_len: int, *, bos: bool = True,
                   max_sequences: int | None = None) -> Int[Tensor, "sequence max_len"]:
    """Consecutive chunks of `text`, tokenised by `model`, as `[sequence, max_len]` token ids.

    Args:
        model: a model with a tokenizer.
        text: the text to cut.
        max_len: tokens per sequence, BOS included.
        bos: put the BOS token first.
        max_sequences: keep at most this many.

    Returns:
        The token ids.
    """
    _check_max_len(model, max_len, bos)
    ids = encode_text(model, text)
    first = _first_token(model, bos)
    body = max_len - len(first)
    n_sequences = len(ids) // body if max_sequences is None else min(len(ids) // body, max_sequences)
    if n_sequences < 1:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than the {body} that one sequence of max_len="
                         f"{max_len} needs{' after BOS' if bos else ''}")
    chunks = ids[: n_sequences * body].view(n_sequences, body)
    return torch.cat([torch.tensor(first, dtype=torch.long).expand(n_sequences, -1), chunks], dim=1)


def read_text(path: str | Path) -> str:
    """A UTF-8 text file's contents, with a clear error for a missing or non-UTF-8 file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file {path} does not exist")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text: {error}") from error


def random_sequences(model: TransformerLensModel, n_sequences: int, max_len: int, *, bos: bool = True,
                     seed: int = 0) -> Int[Tensor, "sequence max_len"]:
    """`[n_sequences, max_len]` tokens drawn uniformly from the model's ordinary tokens (its
    tokenizer's, less the special ones), the same for the same `seed`.

    Args:
        model: a model with a tokenizer.
        n_sequences: how many sequences.
        max_len: tokens per sequence, BOS included.
        bos: put the BOS token first.
        seed: fixes the draw.

    Returns:
        The token ids.
    """
    if n_sequences < 1:
        raise ValueError(f"n_sequences must be >= 1, got {n_sequences!r}")
    _check_max_len(model, max_len, bos)
    first = _first_token(model, bos)
    vocabulary = ordinary_tokens(model)
    generator = torch.Generator().manual_seed(seed)
    draws = vocabulary[torch.randint(len(vocabulary), (n_sequences, max_len - len(first)), generator=generator)]
    return torch.cat([torch.tensor(first, dtype=torch.long).expand(n_sequences, -1), draws], dim=1)


def ordinary_tokens(model: TransformerLensModel) -> Int[Tensor, " n"]:
    """The ids of the tokens that are not special (BOS, EOS, padding...), within the model's vocabulary."""
    tokenizer = getattr(model, "tokenizer", None)
    size = model.cfg.d_vocab if tokenizer is None else min(len(tokenizer), model.cfg.d_vocab)
    special = set(tokenizer.all_special_ids) if tokenizer is not None else {bos_token_id(model)}
    return torch.tensor([token for token in range(size) if token not in special], dtype=torch.long)


def _check_max_len(model: TransformerLensModel, max_len: int, bos: bool) -> None:
    if not isinstance(max_len, int) or not 1 + bos <= max_len <= model.cfg.n_ctx:
        raise ValueError(f"max_len must be an integer in {1 + bos}..{model.cfg.n_ctx} (the model's n_ctx), "
                         f"got {max_len!r}")


def _first_token(model: TransformerLensModel, bos: bool) -> list[int]:
    """`[bos_id]`, or `[]` without `bos`."""
    if not bos:
        return []
    bos_id = bos_token_id(model)
    if bos_id is None:
        raise ValueError(f"{model_name(model)} has no BOS token; pass bos=False (--no-bos)")
    return [bos_id]
