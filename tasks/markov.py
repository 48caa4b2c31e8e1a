"""n-gram Markov in-context learning: the data of *Unveiling Induction Heads* (Chen et al. 2024).

Every sequence has its own transition table: for each context of the previous `n_parents`
tokens the next-token distribution is drawn from Dirichlet(alpha · 1). The first `n_parents`
tokens are uniform; the model must infer the table in context to predict the last token.
With `targets="all"` every token drawn from the table is a training target (teacher-forced),
not only the last: the same data with length − n_parents targets per sequence instead of one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from poslens.tasks.heldout import HeldOutSample

TARGETS = ("last", "all")


@dataclass(frozen=True)
class MarkovICL(HeldOutSample):
    """Sequences over `vocab` symbols; predict the last of `length` tokens."""

    vocab: int = 3
    length: int = 100
    n_parents: int = 2
    alpha: float = 0.1
    n_test: int = 1000
    seed: int = 0
    targets: str = "last"

    name = "markov"

    def __post_init__(self) -> None:
        if not 2 <= self.vocab <= 10:
            raise ValueError(f"vocab must be in 2..10 (digit symbols), got {self.vocab!r}")
        if not 1 <= self.n_parents < self.length:
            raise ValueError(f"n_parents must be in 1..{self.length - 1}, got {self.n_parents!r}")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha!r}")
        if self.n_test < 1:
            raise ValueError(f"n_test must be >= 1, got {self.n_test!r}")
        if self.targets not in TARGETS:
            raise ValueError(f"unknown targets {self.targets!r}; allowed: {list(TARGETS)}")

    @property
    def alphabet(self) -> str:
        return "0123456789"[: self.vocab]

    @property
    def seq_len(self) -> int:
        return self.length

    @property
    def prompt_len(self) -> int:
        """`targets="last"`: everything but the last token is context, the last token is the
        answer. `targets="all"`: only the first `n_parents` (uniform) tokens are context."""
        return self.length - 1 if self.targets == "last" else self.n_parents

    @property
    def roles(self) -> list[str]:
        return ["context"] * self.prompt_len + ["answer"] * (self.length - self.prompt_len)

    @property
    def role_names(self) -> list[str]:
        """Every role, indexed by role id: `context` (0) and `answer` (1, a position the loss is on)."""
        return ["context", "answer"]

    def role_labels(self, tokens: Int[Tensor, "batch pos"]) -> Int[Tensor, "batch pos"]:
        """Role id (an index into `role_names`) of every token: 1 from `prompt_len` on, else 0."""
        if tokens.ndim != 2 or tokens.shape[1] > self.seq_len:
            raise ValueError(f"tokens must be [batch, pos] with pos <= {self.seq_len}, got shape {tuple(tokens.shape)}")
        return (torch.arange(tokens.shape[1]) >= self.prompt_len).long().expand(tokens.shape[0], -1).clone()

    def sample(self, batch_size: int, seed: int) -> tuple[Tensor, Tensor]:
        """Sequences `[batch, length]` and their transition tables `[batch, context, vocab]`.

        Context index of parents (t_{i-k}, ..., t_{i-1}) is their base-`vocab` number, most
        distant parent first.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        rng = np.random.default_rng(seed)
        n_contexts = self.vocab**self.n_parents
        gammas = rng.gamma(self.alpha, size=(batch_size, n_contexts, self.vocab))
        tables = gammas / gammas.sum(-1, keepdims=True)
        tokens = np.empty((batch_size, self.length), dtype=np.int64)
        tokens[:, : self.n_parents] = rng.integers(self.vocab, size=(batch_size, self.n_parents))
        cumulative = tables.cumsum(-1)
        rows = np.arange(batch_size)
        for i in range(self.n_parents, self.length):
            context = np.zeros(batch_size, dtype=np.int64)
            for parent in tokens[:, i - self.n_parents : i].T:
                context = context * self.vocab + parent
            uniform = rng.random(batch_size)[:, None]
            choice = (uniform > cumulative[rows, context]).sum(-1)
            tokens[:, i] = np.minimum(choice, self.vocab - 1)
        return torch.from_numpy(tokens), torch.from_numpy(tables)

    def train_batch(self, batch_size: int, seed: int) -> Tensor:
        """Fresh training sequences `[batch, length]`, a pure function of `seed`."""
        return self.sample(batch_size, seed * 2 + 1)[0]

    def test_set(self) -> Tensor:
        """Held-out sequences `[n_test, length]` (an even seed stream, disjoint from training's)."""
        return self.sample(self.n_test, self.seed * 2)[0]
