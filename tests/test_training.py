"""Training: resumable bitwise, checkpoints verified, nothing overwritten, bad input named."""

import itertools
import json
import math
import shutil

import pytest
import torch

from poslens.analyses.runs import load_task
from poslens.tasks import MarkovICL
from poslens.variants import build, load, train, training
from poslens.variants.checkpoint import _stamped
from poslens.variants.config import available_devices
from poslens.variants.storage import read_json, read_tensors, save_tensors
from poslens.variants.training import (
    TrainSettings,
    list_snapshots,
    log_spaced_steps,
    restamp_run,
    snapshot_path,
    snapshot_schedule,
)

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


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_resume_after_a_kill_ends_bitwise_identical(tiny, tmp_path, addition, precision):
    cfg, settings = tiny("nope-causal"), {**SHORT, "precision": precision}
    full = train(cfg, addition, out_dir=tmp_path / "full", **settings)
    with pytest.raises(Killed):
        train(cfg, addition, out_dir=tmp_path / "killed", on_step=kill_at(13), **settings)
    state = json.loads((tmp_path / "killed" / "run.json").read_text())
    assert state["step"] == 10 and not state["finished"]
    resumed = train(cfg, addition, out_dir=tmp_path / "killed", resume=True, **settings)
    for name, tensor in weights(full.model).items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name
    assert [row["step"] for row in resumed.history] == [8, 16, 24]
    assert [row["test_loss"] for row in resumed.history] == [row["test_loss"] for row in full.history]
    reloaded = load(tmp_path / "killed")
    assert all(torch.equal(t, reloaded.state_dict()[n]) for n, t in weights(full.model).items())


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_training_is_deterministic_and_learns(tiny, tmp_path, addition, precision):
    settings = {**SHORT, "steps": 40, "precision": precision}
    runs = [train(tiny("learned-causal"), addition, out_dir=tmp_path / str(i), **settings) for i in range(2)]
    assert all(torch.equal(a, b)
               for a, b in zip(runs[0].model.state_dict().values(), runs[1].model.state_dict().values()))
    losses = [row["test_loss"] for row in runs[0].history]
    assert losses[-1] < losses[0] - 0.2
    assert all(tensor.dtype == torch.float32 for tensor in runs[0].model.state_dict().values())  # master weights
    recorded = read_json(tmp_path / "0" / "run.json")["settings"]
    assert recorded.get("precision") == (None if precision == "float32" else precision)  # default left unrecorded


def test_bfloat16_training_computes_in_bfloat16_and_precision_is_checked(tiny, tmp_path, addition):
    """The setting reaches the step (its weights differ from float32's) and a bad value is named."""
    runs = {precision: train(tiny("nope-causal"), addition, out_dir=tmp_path / precision,
                             **{**SHORT, "steps": 3, "precision": precision}) for precision in ("float32", "bfloat16")}
    assert not torch.equal(runs["float32"].model.W_E, runs["bfloat16"].model.W_E)
    with pytest.raises(ValueError, match=r"unknown precision 'fp8'; allowed: \['float32', 'bfloat16'\]"):
        TrainSettings(precision="fp8")


def test_finished_run_is_returned_and_never_overwritten(tiny, tmp_path, addition):
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


def test_load_refuses_corruption_and_mismatch(tiny, tmp_path, addition):
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
    (tmp_path / "config.json").write_text(json.dumps(_stamped(record)))  # edited, and its digest recomputed
    with pytest.raises(ValueError, match="do not match the config: missing blocks.2"):
        load(tmp_path)
    record["config"]["n_layers"], record["config"]["d_mlp"] = 2, 128
    (tmp_path / "config.json").write_text(json.dumps(_stamped(record)))
    with pytest.raises(ValueError, match=r"blocks.0.mlp.W_in has shape \(32, 64\), config expects \(32, 128\)"):
        load(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        load(tmp_path)
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load(tmp_path / "nowhere")


def test_train_rejects_bad_input(tiny, tmp_path, addition):
    with pytest.raises(ValueError, match="does not match task 'markov' alphabet '012'"):
        train(tiny("nope-causal"), MarkovICL(length=20), out_dir=tmp_path / "a", **SHORT)
    with pytest.raises(ValueError, match="n_ctx = 8 is shorter than the task's sequences"):
        train(tiny("nope-causal", n_ctx=8), addition, out_dir=tmp_path / "b", **SHORT)
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        TrainSettings(steps=0)
    with pytest.raises(ValueError, match="lr must be a finite number > 0 and <= 10, got -1"):
        TrainSettings(lr=-1)
    with pytest.raises(TypeError, match="bogus"):
        train(tiny("nope-causal"), addition, out_dir=tmp_path / "c", bogus=1)


def test_markov_task_trains(tiny, tmp_path):
    task = MarkovICL(length=24, n_test=64)
    result = train(tiny("nope-causal", alphabet=task.alphabet, n_ctx=24), task, out_dir=tmp_path, **SHORT)
    assert 0 <= result.history[-1]["exact_match"] <= 1


def test_learning_rate_schedule():
    settings = TrainSettings(steps=100, warmup_steps=10, lr=1.0)
    assert settings.lr_at(0) == pytest.approx(0.1) and settings.lr_at(9) == pytest.approx(1.0)
    assert settings.lr_at(55) == pytest.approx(0.5) and settings.lr_at(100) == pytest.approx(0.0)


def test_log_spaced_steps():
    assert log_spaced_steps(1000, 4) == [0, 1, 10, 100, 1000]
    assert log_spaced_steps(7, 1) == [0, 7] and log_spaced_steps(7, 0) == []
    assert log_spaced_steps(5, 5) == [0, 1, 2, 3, 4, 5]
    for total, k in ((24, 6), (2500, 15), (100, 30)):
        steps = log_spaced_steps(total, k)
        assert len(steps) == k + 1 and steps == sorted(set(steps)) and steps[0] == 0 and steps[1] == 1
        assert steps[-1] == total
        gaps = [b / a for a, b in zip(steps[1:], steps[2:])]
        assert max(gaps) < total ** (2 / (k - 1)) + 1  # no gap far wider than an even log spacing
    with pytest.raises(ValueError, match=r"k must be an integer in 0..5 .* got 6"):
        log_spaced_steps(5, 6)
    with pytest.raises(ValueError, match="total must be an integer >= 1, got 0"):
        log_spaced_steps(0, 1)
    with pytest.raises(ValueError, match=r"snapshot step 25 is out of range; allowed: integers in 0..24"):
        snapshot_schedule([0, 25], 24)
    with pytest.raises(ValueError, match=r"snapshot step -1 is out of range"):
        snapshot_schedule([-1, 3], 24)
    with pytest.raises(ValueError, match=r"snapshots must be an integer in 0..24 or a list of steps, got True"):
        snapshot_schedule(True, 24)
    assert snapshot_schedule([8, 0, 8, 3], 24) == [0, 3, 8]


def test_snapshots_land_on_the_schedule_and_survive_a_kill(tiny, tmp_path, addition):
    cfg, schedule = tiny("nope-causal"), [0, 1, 3, 7, 12, 13, 20, 24]
    full = train(cfg, addition, out_dir=tmp_path / "full", snapshots=schedule, **SHORT)
    assert [step for step, _ in list_snapshots(tmp_path / "full")] == schedule
    assert json.loads((tmp_path / "full" / "run.json").read_text())["snapshots"] == schedule
    initial = load(snapshot_path(tmp_path / "full", 0))
    assert all(torch.equal(t, build(cfg).state_dict()[n]) for n, t in initial.state_dict().items())
    final = load(snapshot_path(tmp_path / "full", 24))
    assert all(torch.equal(t, full.model.state_dict()[n]) for n, t in final.state_dict().items())

    with pytest.raises(Killed):  # after snapshot 13 is written; the last checkpoint is step 10
        train(cfg, addition, out_dir=tmp_path / "killed", snapshots=schedule, on_step=kill_at(13), **SHORT)
    written = {step: path.stat().st_mtime_ns for step, path in list_snapshots(tmp_path / "killed")}
    assert sorted(written) == [0, 1, 3, 7, 12, 13]
    with pytest.raises(ValueError, match="its snapshot schedule differs"):
        train(cfg, addition, out_dir=tmp_path / "killed", snapshots=3, resume=True, **SHORT)
    train(cfg, addition, out_dir=tmp_path / "killed", snapshots=schedule, resume=True, **SHORT)
    snapshots = list_snapshots(tmp_path / "killed")
    assert [step for step, _ in snapshots] == schedule
    assert sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir()) == [p.name for _, p in snapshots]
    for step, path in snapshots:
        assert (path / "model.safetensors").read_bytes() == (snapshot_path(tmp_path / "full", step)
                                                              / "model.safetensors").read_bytes(), step
        if step in written:  # written once, before the kill, and not rewritten on resume
            assert path.stat().st_mtime_ns == written[step]


def test_log_spaced_snapshots_and_no_snapshots(tiny, tmp_path, addition):
    train(tiny("nope-causal"), addition, out_dir=tmp_path / "log", snapshots=4, **SHORT)
    assert [step for step, _ in list_snapshots(tmp_path / "log")] == log_spaced_steps(24, 4) == [0, 1, 3, 8, 24]
    train(tiny("nope-causal"), addition, out_dir=tmp_path / "none", **SHORT)
    assert list_snapshots(tmp_path / "none") == [] and "snapshots" not in json.loads(
        (tmp_path / "none" / "run.json").read_text())
    with pytest.raises(ValueError, match=r"snapshot step 30 is out of range; allowed: integers in 0..24"):
        train(tiny("nope-causal"), addition, out_dir=tmp_path / "bad", snapshots=[0, 30], **SHORT)
    assert not (tmp_path / "bad").exists()


def test_settings_and_configs_are_finite_and_in_range(tiny):
    for bad, message in (
        ({"lr": float("inf")}, r"lr must be a finite number > 0 and <= 10, got inf"),
        ({"lr": float("nan")}, r"lr must be a finite number > 0 and <= 10, got nan"),
        ({"betas": (0.9, 1.0)}, r"betas\[1\] must be a finite number >= 0 and < 1, got 1.0"),
        ({"betas": (0.9,)}, r"betas must be a pair \(beta1, beta2\), got \(0.9,\)"),
        ({"grad_clip": float("nan")}, r"grad_clip must be a finite number > 0, got nan"),
        ({"weight_decay": -0.1}, r"weight_decay must be a finite number >= 0, got -0.1"),
        ({"warmup_steps": 1.5}, r"warmup_steps must be an integer, got 1.5"),
        ({"steps": True}, r"steps must be an integer, got True"),
        ({"seed": -1}, r"seed must be an integer from 0 to 4294967295, got -1"),
        ({"seed": 2**32}, r"seed must be an integer from 0 to 4294967295, got 4294967296"),
    ):
        with pytest.raises(ValueError, match=message):
            TrainSettings(**bad)
    assert TrainSettings(betas=[0.0, 0.5]).betas == (0.0, 0.5)
    for bad, message in (
        ({"init_std": float("nan")}, r"init_std must be a finite number > 0, got nan"),
        ({"init_std": 0.0}, r"init_std must be a finite number > 0, got 0.0"),
        ({"rotary_base": -1.0}, r"rotary_base must be a finite number > 1, got -1.0"),
        ({"rotary_base": float("inf")}, r"rotary_base must be a finite number > 1, got inf"),
        ({"eps": 0.0}, r"eps must be a finite number > 0, got 0.0"),
        ({"d_mlp": 0}, r"d_mlp must be >= 1, got 0"),
        ({"uses_rms_norm": True}, r"uses_rms_norm=True is not supported by poslens models"),
        ({"device": "tpu"}, r"device 'tpu' is not available here; allowed: \['cpu'"),
        ({"device": f"cuda:{torch.cuda.device_count()}"}, r"device 'cuda:\d+' is not available here"),
    ):
        with pytest.raises(ValueError, match=message):
            tiny("rotary-causal", **bad)
    assert available_devices()[0] == "cpu" and ("cuda" in available_devices()) == torch.cuda.is_available()


def strict_json(path):
    """The JSON at `path`, failing on NaN or infinities (which Python's reader would accept)."""
    return json.loads(path.read_text(), parse_constant=lambda constant: pytest.fail(f"{path} holds {constant}"))


def test_a_diverging_run_stops_naming_the_step_and_stays_resumable(tiny, addition, tmp_path, monkeypatch):
    """The training loss of step 2 turns NaN (a learning rate large enough to do that on its own is
    refused up front, `MAX_LR`, and clipped Adam steps stay finite below it)."""
    settings = {**SHORT, "warmup_steps": 0, "checkpoint_every": 1}
    real_loss = training.answer_loss
    for resume, poisoned_call in ((False, 2), (True, 1)):  # resuming reaches the same step again: nothing was
        calls = itertools.count(1)                          # committed past it
        monkeypatch.setattr(training, "answer_loss", lambda *args, calls=calls, poisoned=poisoned_call: real_loss(
            *args) * (math.nan if torch.is_grad_enabled() and next(calls) == poisoned else 1.0))
        with pytest.raises(FloatingPointError, match=r"training diverged: the loss is nan at step 2; .* keeps its last "
                                                     r"checkpoint \(step 1\); try a smaller lr \(now 0.003\)"):
            train(tiny("nope-causal"), addition, out_dir=tmp_path, resume=resume, **settings)
        assert strict_json(tmp_path / "run.json")["step"] == 1 and strict_json(tmp_path / "history.json") == []


def test_a_finished_state_is_never_trained_again(tiny, addition, tmp_path):
    cfg = tiny("nope-causal")
    train(cfg, addition, out_dir=tmp_path, **SHORT)
    files = {name: (tmp_path / name).read_bytes() for name in ("model.safetensors", "config.json", "run.json")}
    (tmp_path / "model.safetensors").unlink()  # as a kill after the final commit could leave the views
    (tmp_path / "config.json").unlink()
    (tmp_path / "run.json").write_text(json.dumps({**json.loads(files["run.json"]), "step": 20, "finished": False}))
    steps = []
    train(cfg, addition, out_dir=tmp_path, resume=True, on_step=steps.append, **SHORT)
    assert steps == [] and {name: (tmp_path / name).read_bytes() for name in files} == files


def test_resume_refuses_another_runs_state_and_a_corrupted_one(tiny, addition, tmp_path):
    cfg = tiny("nope-causal")
    for name, lr in (("a", 3e-3), ("b", 1e-3)):
        with pytest.raises(Killed):
            train(cfg, addition, out_dir=tmp_path / name, on_step=kill_at(7), **{**SHORT, "lr": lr})
    state = tmp_path / "a" / "train_state.safetensors"
    good = state.read_bytes()
    shutil.copy(tmp_path / "b" / "train_state.safetensors", state)
    with pytest.raises(ValueError, match=r"belongs to another run: its settings differ from this run's; it is not"):
        train(cfg, addition, out_dir=tmp_path / "a", resume=True, **SHORT)
    tensors, metadata = read_tensors(tmp_path / "a" / "train_state.safetensors")
    save_tensors(state, tensors, {**metadata, "progress": metadata["progress"].replace('"step": 5', '"step": 10')})
    for damaged, message in ((None, r"its contents do not match the sha256 recorded inside it"),  # edited step
                             (good[:-1] + bytes([good[-1] ^ 1]), r"its contents do not match the sha256"),  # a bit
                             (good[: len(good) // 2], r"is not a valid safetensors file")):  # truncated
        if damaged is not None:
            state.write_bytes(damaged)
        with pytest.raises(ValueError, match=message):
            train(cfg, addition, out_dir=tmp_path / "a", resume=True, **SHORT)
    state.write_bytes(good)
    resumed = train(cfg, addition, out_dir=tmp_path / "a", resume=True, **SHORT)
    full = train(cfg, addition, out_dir=tmp_path / "full", **SHORT)
    assert all(torch.equal(t, resumed.model.state_dict()[n]) for n, t in full.model.state_dict().items())


def test_load_requires_the_weights_digest_and_restamp_records_it(tiny, addition, tmp_path, run_cli):
    train(tiny("nope-causal"), addition, out_dir=tmp_path, **SHORT)
    record = json.loads((tmp_path / "config.json").read_text())
    unstamped = {k: v for k, v in record.items() if k not in ("weights_sha256", "sha256")}  # as poslens wrote at first
    (tmp_path / "config.json").write_text(json.dumps(unstamped))
    with pytest.raises(ValueError, match=r"records no weights_sha256, so .*model.safetensors cannot be verified; .*"
                                         r"`poslens restamp "):
        load(tmp_path)
    code, text, _ = run_cli("restamp", str(tmp_path))
    assert code == 0 and "recorded the digests of config and weights" in text
    assert json.loads((tmp_path / "config.json").read_text()) == record and load(tmp_path) is not None
    code, text, _ = run_cli("restamp", str(tmp_path))
    assert code == 0 and text == f"{tmp_path}: already current, verified\n"
    record["config"]["n_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in record.items()
                                                      if k not in ("weights_sha256", "sha256")}))
    code, _, err = run_cli("restamp", str(tmp_path))
    assert code == 2 and "do not match the config: missing blocks.2" in err


def test_restamp_upgrades_an_old_finished_run_and_refuses_an_unfinished_one(tiny, addition, tmp_path):
    cfg = tiny("nope-causal")
    first = train(cfg, addition, out_dir=tmp_path / "done", **SHORT)
    with pytest.raises(Killed):
        train(cfg, addition, out_dir=tmp_path / "killed", on_step=kill_at(7), **SHORT)
    for run, step in ((tmp_path / "done", 24), (tmp_path / "killed", 5)):  # the format before this one
        tensors, _ = read_tensors(run / "train_state.safetensors")
        save_tensors(run / "train_state.safetensors", tensors, {"step": str(step)})
        with pytest.raises(ValueError, match=r"written by an older poslens .* `poslens restamp "):
            train(cfg, addition, out_dir=run, resume=True, **SHORT)
    with pytest.raises(ValueError, match=r"unfinished run written by an older poslens"):
        restamp_run(tmp_path / "killed")
    assert restamp_run(tmp_path / "done") == [f"rewrote {tmp_path / 'done' / 'train_state.safetensors'} in the "
                                              "current format"]
    assert train(cfg, addition, out_dir=tmp_path / "done", resume=True, **SHORT).history == first.history
    assert restamp_run(tmp_path / "done") == []


def test_a_constant_learning_rate_is_a_recorded_setting_and_cosine_stays_unrecorded(tiny, addition, tmp_path):
    constant = TrainSettings(steps=100, warmup_steps=10, lr_schedule="constant")
    assert [constant.lr_at(step) for step in (0, 9, 10, 99)] == pytest.approx([3e-4, 3e-3, 3e-3, 3e-3])
    assert TrainSettings(steps=100, warmup_steps=10).lr_at(99) < 1e-5  # cosine decays to zero
    train(tiny("nope-causal", n_layers=1), addition, out_dir=tmp_path / "c", steps=2, batch_size=4, quiet=True,
          lr_schedule="constant")
    train(tiny("nope-causal", n_layers=1), addition, out_dir=tmp_path / "d", steps=2, batch_size=4, quiet=True)
    assert read_json(tmp_path / "c" / "run.json")["settings"]["lr_schedule"] == "constant"
    assert "lr_schedule" not in read_json(tmp_path / "d" / "run.json")["settings"]  # as runs recorded before it
    with pytest.raises(ValueError, match=r"unknown lr_schedule 'linear'; allowed: \['cosine', 'constant'\]"):
        TrainSettings(lr_schedule="linear")
