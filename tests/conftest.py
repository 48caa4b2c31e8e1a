"""Shared tiny models and tasks: small enough that the whole suite runs in minutes on 2 cores."""

from __future__ import annotations

import io
from contextlib import redirect_stderr, redirect_stdout

import pytest
import torch

from demos.cli import main
from tasks import Addition
from variants import preset, train

# Tiny models gain nothing from intra-op threads, and on a shared machine spinning threads slow them down 10-100×.
torch.set_num_threads(1)

TINY = {"d_model": 32, "d_head": 8, "d_mlp": 64}


def run_cli(*argv: str) -> tuple[int, str, str]:
    """`poslens ARGV...` in process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def tiny(name: str, **overrides):
    """A tiny config for the addition task."""
    return preset(name, **{**TINY, "n_layers": 2, **overrides})


@pytest.fixture(scope="session")
def addition() -> Addition:
    return Addition()


@pytest.fixture(scope="session")
def trained_runs(tmp_path_factory, addition):
    """Briefly trained tiny models (weights far from their initialisation) for invariance checks."""
    runs = {}
    for name, layers in (("nope-bidirectional", 2), ("nope-causal", 1), ("nope-causal", 2), ("learned-causal", 2)):
        out = tmp_path_factory.mktemp(f"{name}-{layers}")
        train(tiny(name, n_layers=layers), addition, out_dir=out, steps=60, batch_size=64, lr=1e-2,
              warmup_steps=5, eval_every=60, quiet=True)
        runs[(name, layers)] = out
    return runs
