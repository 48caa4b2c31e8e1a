"""Training: resumable bitwise, checkpoints verified, nothing overwritten, bad input named."""

import json

import pytest
import torch

from tasks import MarkovICL
from tests.conftest import tiny
from variants import load, load_task, train
from variants.training import TrainSettings

SHORT = {"steps": 24, "batch_size": 32, "warmup_steps": 4, "eval_every": 8, "checkpoint_every": 5, "quiet": True}


class Killed(Exception):
    pass


def kill_at(step):
    def on_step(done):
        if done == step:
            raise Killed

    return on_step


def weights(model):
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def test_resume_after_a_kill_ends_bitwise_identical(tmp_path, addition):
    cfg = tiny("nope-causal")
    full = train(cfg, addition, out_dir=tmp_path / "full", **SHORT)
    with pytest.raises(Killed):
        train(cfg, addition, out_dir=tmp_path / "killed", on_step=kill_at(13), **SHORT)
    state = json.loads((tmp_path / "killed" / "run.json").read_text())
    assert state["step"] == 10 and not state["finished"]
    resumed = train(cfg, addition, out_dir=tmp_path / "killed", resume=True, **SHORT)
    for name, tensor in weights(full.model).items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name
    assert [row["step"] for row in resumed.history] == [8, 16, 24]
    assert [row["test_loss"] for row in resumed.history] == [row["test_loss"] for row in full.history]
    reloaded = load(tmp_path / "killed")
    assert all(torch.equal(t, reloaded.state_dict()[n]) for n, t in weights(full.model).items())


def test_training_is_deterministic_and_learns(tmp_path, addition):
    runs = [train(tiny("learned-causal"), addition, out_dir=tmp_path / str(i), **{**SHORT, "steps": 40}) for i in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(runs[0].model.state_dict().values(), runs[1].model.state_dict().values()))
    losses = [row["test_loss"] for row in runs[0].history]
    assert losses[-1] < losses[0] - 0.2


def test_finished_run_is_returned_and_never_overwritten(tmp_path, addition):
    cfg = tiny("nope-causal")
    first = train(cfg, addition, out_dir=tmp_path, **SHORT)
    with pytest.raises(FileExistsError, match="already holds a training run; pass resume=True"):
        train(cfg, addition, out_dir=tmp_path, **SHORT)
    again = train(cfg, addition, out_dir=tmp_path, resume=True, **SHORT)
    assert again.history == first.history
    with pytest.raises(ValueError, match="cannot resume .* its settings differs"):
        train(cfg, addition, out_dir=tmp_path, resume=True, **{**SHORT, "lr": 1e-4})
    with pytest.raises(ValueError, match="cannot resume .* its config differs"):
        train(tiny("nope-causal", seed=9), addition, out_dir=tmp_path, resume=True, **SHORT)
    (tmp_path.parent / "other").mkdir()
    (tmp_path.parent / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        train(cfg, addition, out_dir=tmp_path.parent / "other", **SHORT)
    assert load_task(tmp_path) == addition


def test_load_refuses_corruption_and_mismatch(tmp_path, addition):
    train(tiny("nope-causal"), addition, out_dir=tmp_path, **SHORT)
    weights_file = tmp_path / "model.safetensors"
    good = weights_file.read_bytes()
    weights_file.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(ValueError, match="is corrupted: its sha256 does not match"):
        load(tmp_path)
    weights_file.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="corrupted"):
        load(tmp_path)
    weights_file.write_bytes(good)
    record = json.loads((tmp_path / "config.json").read_text())
    record["config"]["n_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="do not match the config: missing blocks.2"):
        load(tmp_path)
    record["config"]["n_layers"], record["config"]["d_mlp"] = 2, 128
    (tmp_path / "config.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"blocks.0.mlp.W_in has shape \(32, 64\), config expects \(32, 128\)"):
        load(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        load(tmp_path)
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load(tmp_path / "nowhere")


def test_train_rejects_bad_input(tmp_path, addition):
    with pytest.raises(ValueError, match="does not match task 'markov' alphabet '012'"):
        train(tiny("nope-causal"), MarkovICL(length=20), out_dir=tmp_path / "a", **SHORT)
    with pytest.raises(ValueError, match="n_ctx = 8 is shorter than the task's sequences"):
        train(tiny("nope-causal", n_ctx=8), addition, out_dir=tmp_path / "b", **SHORT)
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        TrainSettings(steps=0)
    with pytest.raises(ValueError, match="lr=-1"):
        TrainSettings(lr=-1)
    with pytest.raises(TypeError, match="bogus"):
        train(tiny("nope-causal"), addition, out_dir=tmp_path / "c", bogus=1)


def test_markov_task_trains(tmp_path):
    task = MarkovICL(length=24, n_test=64)
    result = train(tiny("nope-causal", alphabet=task.alphabet, n_ctx=24), task, out_dir=tmp_path, **SHORT)
    assert 0 <= result.history[-1]["exact_match"] <= 1


def test_learning_rate_schedule():
    settings = TrainSettings(steps=100, warmup_steps=10, lr=1.0)
    assert settings.lr_at(0) == pytest.approx(0.1) and settings.lr_at(9) == pytest.approx(1.0)
    assert settings.lr_at(55) == pytest.approx(0.5) and settings.lr_at(100) == pytest.approx(0.0)
