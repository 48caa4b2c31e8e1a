"""The thread policy (`variants.threads`): one rule for every entry point, checked, and the same bits for
the same settings, seed and threads."""

from __future__ import annotations

import inspect

import pytest
import torch

from poslens.analyses.measures.invariance import invariance_table
from poslens.analyses.measures.probe_sweep import run_probe_sweep
from poslens.tasks import Addition
from poslens.variants import train
from poslens.variants.threads import DEFAULT_THREADS, check_threads, resolve_threads, torch_threads, usable_cores


def test_the_default_is_one_thread_and_a_block_pins_its_own():
    assert resolve_threads() == DEFAULT_THREADS == 1
    torch.set_num_threads(usable_cores())
    try:
        with torch_threads(1) as outer:
            assert outer == torch.get_num_threads() == 1 and resolve_threads() == 1
        assert torch.get_num_threads() == usable_cores()  # restored
    finally:
        torch.set_num_threads(1)


def test_a_thread_count_beyond_the_usable_cores_is_refused_naming_them():
    cores = usable_cores()
    for bad in (0, cores + 1, 999, 1.5, True):
        with pytest.raises(ValueError, match=rf"threads must be an integer from 1 to {cores} \(the cores this process "
                                             rf"may use\), got {bad!r}"):
            check_threads(bad)


def test_every_entry_point_takes_threads():
    for function in (train, run_probe_sweep, invariance_table):
        assert inspect.signature(function).parameters["threads"].default is None, function.__name__


def test_train_runs_at_the_policy_threads_and_gives_the_same_bits(tiny, tmp_path):
    task, seen = Addition(), []
    torch.set_num_threads(usable_cores())  # what torch would use on its own
    try:
        for name in ("a", "b"):
            train(tiny("nope-causal", n_layers=1), task, out_dir=tmp_path / name, steps=4, batch_size=8, quiet=True,
                  on_step=lambda _: seen.append(torch.get_num_threads()))
        assert torch.get_num_threads() == usable_cores()  # left as it was
    finally:
        torch.set_num_threads(1)
    assert seen == [1] * 8
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    train(tiny("nope-causal", n_layers=1), task, out_dir=tmp_path / "c", steps=2, batch_size=8, quiet=True,
          threads=usable_cores(), on_step=lambda _: seen.append(torch.get_num_threads()))
    assert seen[-2:] == [usable_cores()] * 2


def test_the_cli_takes_threads_and_refuses_too_many(run_cli, tmp_path):
    code, _, err = run_cli("train", "--variant", "nope-causal", "--out", str(tmp_path / "r"), "--threads", "999")
    assert code == 2 and err == (f"poslens train: error: threads must be an integer from 1 to {usable_cores()} (the "
                                 "cores this process may use), got 999\n")
    assert not (tmp_path / "r").exists()
    code, out, _ = run_cli("invariance", "--variant", "nope-causal", "--layers", "1", "--perms", "2", "--threads", "1")
    assert code == 0 and "nope-causal" in out
