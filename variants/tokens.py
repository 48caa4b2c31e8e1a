"""Character tokenisation of a poslens model (one character of `cfg.alphabet`, one token, id = index), and
the check every token batch passes before any model (ours or a bridged Hugging Face one) runs on it."""

from __future__ import annotations

import reprlib
from typing import Any, cast

import torch
from torch import Tensor


def excerpt(value: Any, limit: int = 40) -> str:
    """`repr(value)`, cut after about `limit` characters (a string's length is then given), so that
    an error message never echoes a huge input back; a huge list or dict is not even rendered
    whole (`reprlib` stops after a few items)."""
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]!r}… ({len(value)} characters)"
    short = reprlib.Repr()
    short.maxlevel, short.maxstring, short.maxother = 3, limit, limit
    short.maxlist = short.maxtuple = short.maxdict = short.maxset = 4
    text = short.repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def tokenize(text: str | list[str], alphabet: str) -> Tensor:
    """Map text to token ids `[pos]` (or `[batch, pos]` for a list of equal-length strings).

    Any character outside `alphabet` is an error naming the character, where it is, and the
    allowed characters, so a typo never becomes a silent wrong token.
    """
    if isinstance(text, str):
        lookup = {char: index for index, char in enumerate(alphabet)}
        for position, char in enumerate(text):
            if char not in lookup:
                raise ValueError(
                    f"character {char!r} at index {position} of {excerpt(text)} is not in the vocabulary; "
                    f"allowed characters: {alphabet!r}"
                )
        return torch.tensor([lookup[char] for char in text], dtype=torch.long)
    if not text:
        raise ValueError("cannot tokenize an empty list of strings")
    lengths = {len(item) for item in text}
    if len(lengths) != 1:
        raise ValueError(f"strings in a batch must have equal length, got lengths {sorted(lengths)}")
    return torch.stack([tokenize(item, alphabet) for item in text])


def detokenize(tokens: Tensor, alphabet: str) -> str | list[str]:
    """Inverse of `tokenize`: `[pos]` → str, `[batch, pos]` → list of str."""
    if tokens.ndim == 2:
        return cast(list[str], [detokenize(row, alphabet) for row in tokens])  # [pos] rows give strings
    if tokens.ndim != 1:
        raise ValueError(f"expected tokens shaped [pos] or [batch, pos], got shape {tuple(tokens.shape)}")
    bad = tokens[(tokens < 0) | (tokens >= len(alphabet))]
    if bad.numel():
        raise ValueError(
            f"token id {int(bad[0])} is outside the vocabulary of {len(alphabet)} tokens ({alphabet!r})"
        )
    return "".join(alphabet[int(index)] for index in tokens)


def check_token_batch(tokens: Tensor, n_ctx: int, d_vocab: int) -> Tensor:
    """`tokens` if they are an integer `[batch, pos]` batch of ids below `d_vocab` and at most `n_ctx`
    long, else a `ValueError` naming what is wrong."""
    if tokens.ndim != 2 or tokens.dtype not in (torch.long, torch.int32):
        raise ValueError(f"tokens must be an integer tensor [batch, pos], got {tuple(tokens.shape)} {tokens.dtype}")
    if tokens.shape[1] > n_ctx:
        raise ValueError(f"sequence length {tokens.shape[1]} is longer than the model's n_ctx = {n_ctx}")
    if tokens.numel() and (tokens.min() < 0 or tokens.max() >= d_vocab):
        bad = tokens[(tokens < 0) | (tokens >= d_vocab)][0]
        raise ValueError(f"token id {int(bad)} is outside the vocabulary; allowed: 0..{d_vocab - 1}")
    return tokens
