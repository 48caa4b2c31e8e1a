"""Shared fixtures: tiny models and tasks, small enough that the whole suite runs in minutes."""

from __future__ import annotations

import io
from contextlib import redirect_stderr, redirect_stdout

import pytest
import torch

from poslens.cli import main
from poslens.tasks import Addition
from poslens.variants import preset, train

# Tiny models gain nothing from intra-op threads, and on a busy machine spinning threads slow them down 10-100×.
torch.set_num_threads(1)

TINY_SIZES = {"d_model": 32, "d_head": 8, "d_mlp": 64}


@pytest.fixture(scope="session")
def tiny_sizes() -> dict[str, int]:
    """The width of every tiny test model."""
    return dict(TINY_SIZES)


@pytest.fixture(scope="session")
def tiny():
    """`tiny(name, **overrides)`: a 2-block config of that variant for the addition task."""

    def make(name: str, **overrides):
        return preset(name, task=Addition(), **{**TINY_SIZES, "n_layers": 2, **overrides})

    return make


@pytest.fixture(scope="session")
def run_cli():
    """`run_cli(*argv)`: `poslens ARGV...` in process, returning (exit code, stdout, stderr)."""

    def run(*argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            code = main(list(argv))
        return code, out.getvalue(), err.getvalue()

    return run


@pytest.fixture(scope="session")
def addition() -> Addition:
    return Addition()


@pytest.fixture(scope="session")
def trained_runs(tmp_path_factory, addition, tiny):
    """Briefly trained tiny models (weights far from their initialisation) for invariance checks."""
    runs = {}
    for name, layers in (("nope-bidirectional", 2), ("nope-causal", 1), ("nope-causal", 2), ("learned-causal", 2)):
        out = tmp_path_factory.mktemp(f"{name}-{layers}")
        train(tiny(name, n_layers=layers), addition, out_dir=out, steps=60, batch_size=64, lr=1e-2,
              warmup_steps=5, eval_every=60, quiet=True)
        runs[(name, layers)] = out
    return runs
