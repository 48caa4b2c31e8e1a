"""What every task shares about its held-out set: a seeded random draw of it for analyses.

An analysis that uses fewer sequences than the held-out set must not take its first rows:
`Addition.test_set()` is sorted by operand pair, so its first rows all have a small first
operand. `sample_test(n, seed)` draws `n` held-out sequences uniformly without replacement, in
random order, so each training seed (or any other seed) can get its own unbiased sample.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from jaxtyping import Int
from torch import Tensor


class HeldOutSample:
    """Mixin for a task with `n_test` and `test_set()`: adds `sample_test`."""

    n_test: int  # the task's own field
    if TYPE_CHECKING:  # the task's own method, declared for the type checker

        def test_set(self) -> Int[Tensor, "n_test seq"]: ...

    def sample_test(self, n: int, seed: int) -> Int[Tensor, "n seq"]:
        """`n` held-out sequences drawn uniformly without replacement, in random order; a pure
        function of `seed` (and the task)."""
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= self.n_test:
            raise ValueError(f"sample size n must be an integer in 1..{self.n_test} (the held-out set), got {n!r}")
        order = torch.randperm(self.n_test, generator=torch.Generator().manual_seed(seed))
        return self.test_set()[order[:n]]
