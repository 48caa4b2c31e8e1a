"""Three-digit addition (and n-digit): the order-sensitive task of Zuo & Guerzhoy.

A sequence is `a2a1a0+b2b1b0=` followed by the (n+1)-digit sum, written least-significant
digit first by default (`reverse_answer=True`, see docs/background.md), e.g.
`123+456=9750` for 123 + 456 = 0579. Operands are zero-padded, so every sequence has the same
length and, in this fixed format, every position has a fixed role.

`max_shift=P` separates position from role: each sequence gets a random k ∈ 0..P filler
tokens `_` before the operands and P − k after `=` (`__123+456=_9750` for P = 3, k = 2), so
operand digits, `+` and `=` move by up to P positions while every sequence keeps the same
length and the answer stays at fixed positions. `role_labels(tokens)` says which role each
token plays.

Train and test sets are disjoint by operand pair; with `exclude_twins` (the default) training
also never sees b+a for a held-out a+b, so a commutative model cannot answer a test prompt
from its training twin.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from poslens.tasks.heldout import HeldOutSample

DIGITS = "0123456789"
BOS = "^"
FILLER = "_"
PAD_ROLES = ("pad_lead", "pad_gap")  # fillers before the operands, fillers between `=` and the answer


@dataclass(frozen=True)
class Addition(HeldOutSample):
    """`a+b=` → sum, character tokens. `seed` fixes the held-out operand pairs (and, with
    `max_shift`, their shifts)."""

    n_digits: int = 3
    reverse_answer: bool = True
    bos: bool = False
    n_test: int = 1000
    seed: int = 0
    exclude_twins: bool = True
    max_shift: int = 0

    name = "addition"
    # What a run record written before a field existed meant by leaving it out (see `tasks.from_record`).
    LEGACY_FIELDS: ClassVar[dict] = {"exclude_twins": False}

    def __post_init__(self) -> None:
        if not 1 <= self.n_digits <= 9:
            raise ValueError(f"n_digits must be in 1..9, got {self.n_digits!r}")
        if isinstance(self.max_shift, bool) or not isinstance(self.max_shift, int) or self.max_shift < 0:
            raise ValueError(f"max_shift must be an integer >= 0, got {self.max_shift!r}")
        share, why = (4, "a quarter") if self.exclude_twins else (2, "half")
        if not 1 <= self.n_test <= self.n_pairs // share:
            twins = ", since each test pair's twin b+a leaves training too" if self.exclude_twins else ""
            raise ValueError(f"n_test must be in 1..{self.n_pairs // share} ({why} of the {self.n_pairs} operand "
                             f"pairs{twins}), got {self.n_test!r}")

    @property
    def alphabet(self) -> str:
        """Token characters; token id = index. Digits map to their own value."""
        return DIGITS + "+=" + (BOS if self.bos else "") + (FILLER if self.max_shift else "")

    @property
    def n_pairs(self) -> int:
        return 10 ** (2 * self.n_digits)

    @property
    def prompt_len(self) -> int:
        """Tokens before the answer: what the model sees before answering."""
        return int(self.bos) + 2 * self.n_digits + 2 + self.max_shift

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.n_digits + 1

    @property
    def _fixed_roles(self) -> list[str]:
        n = self.n_digits
        operand = lambda letter: [f"{letter}{k}" for k in reversed(range(n))]  # noqa: E731
        answer = [f"s{k}" for k in range(n + 1)]
        return (["BOS"] if self.bos else []) + operand("x") + ["+"] + operand("y") + ["="] + (
            answer if self.reverse_answer else answer[::-1]
        )

    @property
    def roles(self) -> list[str]:
        """Role of each position: `x{k}`/`y{k}` operand digit of place value 10^k, `s{k}` sum digit.
        Only the fixed format has one; with `max_shift` use `role_labels`."""
        if self.max_shift:
            raise ValueError(f"positions of a shifted-format task (max_shift={self.max_shift}) have no fixed role; "
                             "use role_labels(tokens)")
        return self._fixed_roles

    @property
    def role_names(self) -> list[str]:
        """Every role, indexed by role id: the fixed format's roles in order, then (with
        `max_shift`) the two filler roles `pad_lead` and `pad_gap`."""
        return self._fixed_roles + (list(PAD_ROLES) if self.max_shift else [])

    @property
    def operand_positions(self) -> list[int]:
        """Positions of the operand digits (roles `x{k}` and `y{k}`): the ones a corruption may exchange."""
        return [position for position, role in enumerate(self.roles) if role[0] in "xy"]

    def encode(self, a: Tensor, b: Tensor, shift: Tensor | None = None) -> Int[Tensor, "batch seq"]:
        """Token sequences `[batch, seq]` for operand tensors `a`, `b` shaped `[batch]`, with
        `shift` (`[batch]`, each in 0..max_shift; default 0) fillers before the operands."""
        n = self.n_digits
        high_first = 10 ** torch.arange(n - 1, -1, -1)
        low_first = 10 ** torch.arange(n + 1)
        digits = lambda value, powers: (value[:, None] // powers) % 10  # noqa: E731
        answer = digits(a + b, low_first if self.reverse_answer else low_first.flip(0))
        symbol = lambda char: torch.full_like(a[:, None], self.alphabet.index(char))  # noqa: E731
        body = torch.cat([digits(a, high_first), symbol("+"), digits(b, high_first), symbol("=")], dim=1)
        shift = torch.zeros_like(a) if shift is None else shift
        if shift.shape != a.shape or (shift < 0).any() or (shift > self.max_shift).any():
            raise ValueError(f"shift must be [batch] = {tuple(a.shape)} with values in 0..{self.max_shift}, "
                             f"got shape {tuple(shift.shape)} with values {shift.unique().tolist()}")
        if self.max_shift:
            columns = shift[:, None] + torch.arange(body.shape[1])
            body = symbol(FILLER).repeat(1, body.shape[1] + self.max_shift).scatter_(1, columns, body)
        return torch.cat(([symbol(BOS)] if self.bos else []) + [body, answer], dim=1)

    def shifts(self, tokens: Int[Tensor, "batch pos"]) -> Int[Tensor, " batch"]:
        """The number of fillers before the operands of each sequence (0 in the fixed format)."""
        if not self.max_shift:
            return torch.zeros(len(tokens), dtype=torch.long)
        start = int(self.bos)
        lead = tokens[:, start : start + self.max_shift] == self.alphabet.index(FILLER)
        return lead.long().cumprod(-1).sum(-1)

    def decode_operands(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """The operands `(a, b)`, each `[batch]`, written in token sequences `[batch, seq]`."""
        n = self.n_digits
        start = int(self.bos) + self.shifts(tokens)[:, None] + torch.arange(n)
        high_first = 10 ** torch.arange(n - 1, -1, -1)
        a = (tokens.gather(1, start) * high_first).sum(-1)
        b = (tokens.gather(1, start + n + 1) * high_first).sum(-1)
        return a, b

    def role_labels(self, tokens: Int[Tensor, "batch pos"]) -> Int[Tensor, "batch pos"]:
        """Role id (an index into `role_names`) of every token of `tokens` (whole sequences or
        their first `pos` tokens). In the fixed format it is the position itself."""
        if tokens.ndim != 2 or tokens.shape[1] > self.seq_len:
            raise ValueError(f"tokens must be [batch, pos] with pos <= {self.seq_len}, got shape {tuple(tokens.shape)}")
        position = torch.arange(tokens.shape[1]).expand(tokens.shape[0], -1)
        if not self.max_shift:
            return position.clone()
        shift, start, body = self.shifts(tokens)[:, None], int(self.bos), 2 * self.n_digits + 2
        lead, gap = (len(self._fixed_roles) + index for index in range(2))
        labels = torch.where(position < start + shift, lead, position - shift)
        labels = torch.where(position >= start + shift + body, gap, labels)
        labels = torch.where(position >= self.prompt_len, position - self.max_shift, labels)
        return torch.where(position < start, position, labels)

    @cached_property
    def test_pair_ids(self) -> Tensor:
        """Sorted ids `a * 10^n + b` of the held-out operand pairs."""
        generator = torch.Generator().manual_seed(self.seed)
        chosen: set[int] = set()
        while len(chosen) < self.n_test:
            draws = torch.randint(self.n_pairs, (self.n_test,), generator=generator).tolist()
            chosen.update(draws[: self.n_test - len(chosen)])
        return torch.tensor(sorted(chosen), dtype=torch.long)

    @cached_property
    def excluded_pair_ids(self) -> Tensor:
        """Ids training never draws: the held-out pairs and, with `exclude_twins`, their twins b+a."""
        if not self.exclude_twins:
            return self.test_pair_ids
        a, b = self._split_ids(self.test_pair_ids)
        return torch.cat([self.test_pair_ids, b * 10**self.n_digits + a]).unique()

    def _split_ids(self, pair_ids: Tensor) -> tuple[Tensor, Tensor]:
        base = 10**self.n_digits
        return pair_ids // base, pair_ids % base

    def test_set(self) -> Tensor:
        """The held-out sequences `[n_test, seq]`, sorted by operand pair (so take a
        `sample_test`, not the first rows, for an unbiased subset)."""
        shift = None
        if self.max_shift:  # a stream of its own, independent of the one that drew the pairs
            shift = torch.from_numpy(np.random.default_rng([self.seed, 1]).integers(0, self.max_shift + 1, self.n_test))
        return self.encode(*self._split_ids(self.test_pair_ids), shift)

    def train_batch(self, batch_size: int, seed: int) -> Tensor:
        """`batch_size` training sequences `[batch, seq]`, drawn uniformly from the pairs not in
        `excluded_pair_ids` (and, with `max_shift`, uniform shifts).

        A pure function of `seed`, so training can resume anywhere without saved data state.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(self.n_pairs, (batch_size,), generator=generator)
        held_out = torch.isin(ids, self.excluded_pair_ids)
        while held_out.any():
            ids[held_out] = torch.randint(self.n_pairs, (int(held_out.sum()),), generator=generator)
            held_out = torch.isin(ids, self.excluded_pair_ids)
        shift = torch.randint(self.max_shift + 1, (batch_size,), generator=generator) if self.max_shift else None
        return self.encode(*self._split_ids(ids), shift)
