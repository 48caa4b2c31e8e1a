"""Three-digit addition (and n-digit): the order-sensitive task of Zuo & Guerzhoy.

A sequence is `a2a1a0+b2b1b0=` followed by the (n+1)-digit sum, written least-significant
digit first by default (`reverse_answer=True`, see docs/background.md), e.g.
`123+456=9750` for 123 + 456 = 0579. Operands are zero-padded, so every sequence has the same
length and every position has a fixed role. Train and test sets are disjoint by operand pair.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

DIGITS = "0123456789"
BOS = "^"


@dataclass(frozen=True)
class Addition:
    """`a+b=` → sum, character tokens. `seed` fixes the held-out operand pairs."""

    n_digits: int = 3
    reverse_answer: bool = True
    bos: bool = False
    n_test: int = 1000
    seed: int = 0

    name = "addition"

    def __post_init__(self) -> None:
        if not 1 <= self.n_digits <= 9:
            raise ValueError(f"n_digits must be in 1..9, got {self.n_digits!r}")
        if not 1 <= self.n_test <= self.n_pairs // 2:
            raise ValueError(
                f"n_test must be in 1..{self.n_pairs // 2} (half of the {self.n_pairs} operand pairs), "
                f"got {self.n_test!r}"
            )

    @property
    def alphabet(self) -> str:
        """Token characters; token id = index. Digits map to their own value."""
        return DIGITS + "+=" + (BOS if self.bos else "")

    @property
    def n_pairs(self) -> int:
        return 10 ** (2 * self.n_digits)

    @property
    def prompt_len(self) -> int:
        """Tokens up to and including `=`: what the model sees before answering."""
        return int(self.bos) + 2 * self.n_digits + 2

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.n_digits + 1

    @property
    def roles(self) -> list[str]:
        """Role of each position: `x{k}`/`y{k}` operand digit of place value 10^k, `s{k}` sum digit."""
        n = self.n_digits
        operand = lambda letter: [f"{letter}{k}" for k in reversed(range(n))]  # noqa: E731
        answer = [f"s{k}" for k in range(n + 1)]
        return (["BOS"] if self.bos else []) + operand("x") + ["+"] + operand("y") + ["="] + (
            answer if self.reverse_answer else answer[::-1]
        )

    @property
    def operand_positions(self) -> list[int]:
        """Positions of the operand digits (roles `x{k}` and `y{k}`): the ones a corruption may exchange."""
        return [position for position, role in enumerate(self.roles) if role[0] in "xy"]

    def encode(self, a: Tensor, b: Tensor) -> Tensor:
        """Token sequences `[batch, seq]` for operand tensors `a`, `b` shaped `[batch]`."""
        n = self.n_digits
        high_first = 10 ** torch.arange(n - 1, -1, -1)
        low_first = 10 ** torch.arange(n + 1)
        digits = lambda value, powers: (value[:, None] // powers) % 10  # noqa: E731
        answer = digits(a + b, low_first if self.reverse_answer else low_first.flip(0))
        plus = torch.full_like(a[:, None], self.alphabet.index("+"))
        equals = torch.full_like(a[:, None], self.alphabet.index("="))
        parts = [digits(a, high_first), plus, digits(b, high_first), equals, answer]
        if self.bos:
            parts.insert(0, torch.full_like(a[:, None], self.alphabet.index(BOS)))
        return torch.cat(parts, dim=1)

    def decode_operands(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """The operands `(a, b)`, each `[batch]`, written in token sequences `[batch, seq]`."""
        n, start = self.n_digits, int(self.bos)
        high_first = 10 ** torch.arange(n - 1, -1, -1)
        a = (tokens[:, start : start + n] * high_first).sum(-1)
        b = (tokens[:, start + n + 1 : start + 2 * n + 1] * high_first).sum(-1)
        return a, b

    @cached_property
    def test_pair_ids(self) -> Tensor:
        """Sorted ids `a * 10^n + b` of the held-out operand pairs."""
        generator = torch.Generator().manual_seed(self.seed)
        chosen: set[int] = set()
        while len(chosen) < self.n_test:
            draws = torch.randint(self.n_pairs, (self.n_test,), generator=generator).tolist()
            chosen.update(draws[: self.n_test - len(chosen)])
        return torch.tensor(sorted(chosen), dtype=torch.long)

    def _split_ids(self, pair_ids: Tensor) -> tuple[Tensor, Tensor]:
        base = 10**self.n_digits
        return pair_ids // base, pair_ids % base

    def test_set(self) -> Tensor:
        """The held-out sequences `[n_test, seq]`, in a fixed order."""
        return self.encode(*self._split_ids(self.test_pair_ids))

    def train_batch(self, batch_size: int, seed: int) -> Tensor:
        """`batch_size` training sequences `[batch, seq]`, drawn uniformly from the non-test pairs.

        A pure function of `seed`, so training can resume anywhere without saved data state.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(self.n_pairs, (batch_size,), generator=generator)
        held_out = torch.isin(ids, self.test_pair_ids)
        while held_out.any():
            ids[held_out] = torch.randint(self.n_pairs, (int(held_out.sum()),), generator=generator)
            held_out = torch.isin(ids, self.test_pair_ids)
        return self.encode(*self._split_ids(ids))

