"""Training on a task: AdamW, linear warm-up then cosine decay, loss on answer tokens only.

A run directory holds `config.json` + `model.safetensors` (the model, see `checkpoint`),
`train_state.safetensors` (weights and optimiser moments of the last checkpoint, in one file
so they can never disagree), `run.json` (task, settings, progress) and `history.json` (the
evaluations). With a snapshot schedule it also holds `checkpoints/step-000123/`, one model
checkpoint per scheduled step, so analyses can walk through training. Batches are a pure
function of (seed, step) and the learning rate a pure function of step, so a killed run
resumed from its last checkpoint ends bitwise-identical to one that was never interrupted.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from poslens.variants.checkpoint import check_state_matches, load, save
from poslens.variants.config import VariantConfig
from poslens.variants.model import HookedTransformer, build
from poslens.variants.storage import load_tensors, read_json, save_tensors, write_json

SNAPSHOT_DIR = "checkpoints"
_SNAPSHOT_NAME = re.compile(r"step-(\d{6,})")


class Task(Protocol):
    """What training reads of a task (`poslens.tasks` holds ready ones). A task is a frozen
    dataclass, so `run.json` can record it (`name` plus its fields) and resume can check it."""

    name: str
    alphabet: str
    seq_len: int
    prompt_len: int  # tokens before the answer; the loss is on the rest

    def train_batch(self, batch_size: int, seed: int) -> Tensor: ...

    def test_set(self) -> Tensor: ...


@dataclass(frozen=True)
class TrainSettings:
    """Everything besides the config that determines the trained weights."""

    steps: int = 3000
    batch_size: int = 256
    lr: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    betas: tuple[float, float] = (0.9, 0.999)
    seed: int = 0
    eval_every: int = 250
    checkpoint_every: int = 250

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.lr <= 0 or self.warmup_steps < 0 or self.grad_clip <= 0 or self.weight_decay < 0:
            raise ValueError(
                f"need lr > 0, warmup_steps >= 0, grad_clip > 0, weight_decay >= 0; got lr={self.lr!r}, "
                f"warmup_steps={self.warmup_steps!r}, grad_clip={self.grad_clip!r}, weight_decay={self.weight_decay!r}"
            )

    def lr_at(self, step: int) -> float:
        """Linear warm-up to `lr`, then cosine decay to zero at `steps`."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return self.lr * 0.5 * (1 + math.cos(math.pi * progress))

    def batch_seed(self, step: int) -> int:
        return self.seed * 2**32 + step


@dataclass
class TrainResult:
    model: HookedTransformer
    history: list[dict[str, Any]]
    out_dir: Path


def answer_loss(logits: Float[Tensor, "batch pos d_vocab"], tokens: Int[Tensor, "batch seq"], prompt_len: int) -> Tensor:
    """Mean cross-entropy of the answer tokens (`tokens[:, prompt_len:]`), teacher-forced."""
    predictions = logits[:, prompt_len - 1 : tokens.shape[1] - 1]
    return F.cross_entropy(predictions.flatten(0, 1), tokens[:, prompt_len:].flatten())


@torch.no_grad()
def evaluate(model: HookedTransformer, task: Task, tokens: Int[Tensor, "batch seq"] | None = None,
             batch_size: int = 1024) -> dict[str, float]:
    """Test loss, per-token accuracy and exact match of greedy-decoded answers."""
    tokens = task.test_set() if tokens is None else tokens
    was_training = model.training
    model.eval()
    loss_sum, token_hits, exact_hits = 0.0, 0, 0
    for chunk in tokens.split(batch_size):
        chunk = chunk.to(model.cfg.device)
        loss_sum += float(answer_loss(model(chunk[:, :-1]), chunk, task.prompt_len)) * len(chunk)
        answer = model.generate(chunk[:, : task.prompt_len], task.seq_len - task.prompt_len)
        correct = answer == chunk[:, task.prompt_len :]
        token_hits += int(correct.sum())
        exact_hits += int(correct.all(-1).sum())
    model.train(was_training)
    n = len(tokens)
    return {
        "test_loss": loss_sum / n,
        "token_accuracy": token_hits / (n * (task.seq_len - task.prompt_len)),
        "exact_match": exact_hits / n,
    }


def make_optimizer(model: HookedTransformer, settings: TrainSettings) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (biases, LayerNorm and other vectors are not decayed)."""
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    vectors = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": matrices, "weight_decay": settings.weight_decay}, {"params": vectors, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=settings.lr, betas=settings.betas, foreach=False)


def _save_train_state(out_dir: Path, model: HookedTransformer, optimizer: torch.optim.AdamW, step: int) -> None:
    names = {id(param): name for name, param in model.named_parameters()}
    tensors = {f"model.{name}": value for name, value in model.state_dict().items()}
    for param, state in optimizer.state.items():
        for key, value in state.items():
            tensors[f"optim.{key}.{names[id(param)]}"] = value
    save_tensors(out_dir / "train_state.safetensors", tensors, metadata={"step": str(step)})


def _load_train_state(out_dir: Path, model: HookedTransformer, optimizer: torch.optim.AdamW) -> None:
    tensors = load_tensors(out_dir / "train_state.safetensors")
    weights = {name.removeprefix("model."): t for name, t in tensors.items() if name.startswith("model.")}
    check_state_matches(model, weights, out_dir / "train_state.safetensors")
    model.load_state_dict(weights)
    device = model.cfg.device
    for name, param in model.named_parameters():
        state = {key: tensors[f"optim.{key}.{name}"].to(device) for key in ("step", "exp_avg", "exp_avg_sq")
                 if f"optim.{key}.{name}" in tensors}
        if state:
            state["step"] = state["step"].cpu()
            optimizer.state[param] = state


def _run_record(cfg: VariantConfig, task: Task, settings: TrainSettings, step: int, finished: bool,
                snapshots: list[int]) -> dict:
    """What `run.json` holds. The snapshot schedule is recorded (under `snapshots`, not under
    `settings`: it does not change the weights) only when there is one, so runs without
    snapshots keep exactly the record they always had."""
    record = {
        "variant": cfg.name,
        "config": cfg.to_json(),
        "task": {"name": task.name, **dataclasses.asdict(task)},
        "settings": dataclasses.asdict(settings),
        "step": step,
        "finished": finished,
    }
    return {**record, "snapshots": snapshots} if snapshots else record


def log_spaced_steps(total: int, k: int) -> list[int]:
    """Step 0 (the initial weights) and `k` distinct, roughly log-spaced steps from 1 to `total`.

    The steps are `total ** (i / (k - 1))` rounded, nudged up where rounding would repeat a
    step (early on, where log-spacing is denser than one step), so there are always exactly
    `k + 1` steps: `log_spaced_steps(1000, 4) == [0, 1, 10, 100, 1000]`. `k = 1` gives
    `[0, total]`; `k = 0` gives `[]` (no snapshots).
    """
    if isinstance(total, bool) or not isinstance(total, int) or total < 1:
        raise ValueError(f"total must be an integer >= 1, got {total!r}")
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= total:
        raise ValueError(f"k must be an integer in 0..{total} (distinct steps in 1..{total}), got {k!r}")
    if k == 0:
        return []
    steps: list[int] = []
    for i in range(k):
        target = total if k == 1 else round(total ** (i / (k - 1)))
        steps.append(min(max(target, steps[-1] + 1 if steps else 1), total - (k - 1 - i)))
    return [0, *steps]


def snapshot_schedule(snapshots: int | Sequence[int], total: int) -> list[int]:
    """The sorted, distinct steps a `train(..., snapshots=...)` argument stands for.

    An int K means `log_spaced_steps(total, K)`; a sequence means exactly those steps, each
    in 0..total (0 is the initial weights).
    """
    if isinstance(snapshots, int) and not isinstance(snapshots, bool):
        return log_spaced_steps(total, snapshots)
    steps = list(snapshots)
    bad = [step for step in steps
           if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= total]
    if bad:
        raise ValueError(f"snapshot step {bad[0]!r} is out of range; allowed: integers in 0..{total}")
    return sorted(set(steps))


def snapshot_path(out_dir: str | Path, step: int) -> Path:
    """Where the snapshot of `step` lives: `out_dir/checkpoints/step-000123`."""
    return Path(out_dir) / SNAPSHOT_DIR / f"step-{step:06d}"


def list_snapshots(out_dir: str | Path) -> list[tuple[int, Path]]:
    """`(step, checkpoint directory)` of every finished snapshot of a run, in step order.

    A snapshot is finished once its folder has its final name (it is written under a temporary
    name and renamed), so a kill mid-write leaves nothing here.
    """
    folder = Path(out_dir) / SNAPSHOT_DIR
    if not folder.is_dir():
        return []
    found = [(int(match.group(1)), path) for path in folder.iterdir()
             if path.is_dir() and (match := _SNAPSHOT_NAME.fullmatch(path.name))]
    return sorted(found)


def _save_snapshot(model: HookedTransformer, out_dir: Path, step: int) -> None:
    """Save `model` as the snapshot of `step`, atomically: into a temporary folder, then renamed.

    An existing snapshot is kept as it is: it was written by this very run before a kill, and
    resumed training is bitwise identical, so writing it again would change nothing.
    """
    final = snapshot_path(out_dir, step)
    if final.exists():
        return
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        tmp.chmod(0o755)  # mkdtemp's 0700 would make the snapshot private to its writer
        save(model, tmp)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def task_record(out_dir: str | Path) -> dict[str, Any]:
    """The record of the task a run was trained on (`name` and fields; `poslens.tasks.make_task(**record)`
    rebuilds it)."""
    return dict(read_json(Path(out_dir) / "run.json")["task"])


def train(
    cfg: VariantConfig,
    task: Task,
    *,
    out_dir: str | Path,
    resume: bool = False,
    quiet: bool = False,
    on_step: Callable[[int], None] | None = None,
    snapshots: int | Sequence[int] = 0,
    **settings: Any,
) -> TrainResult:
    """Train `build(cfg)` on `task`, checkpointing into `out_dir`; see `TrainSettings` for the knobs.

    With `resume=False` an `out_dir` holding a run is refused (nothing is overwritten);
    with `resume=True` training continues from its last checkpoint (or starts, if it has
    none), and a finished run is returned as it is. `on_step(step)` is called after every
    optimiser step. The settings' `seed` fixes the batches; `cfg.seed` fixes the initial
    weights (`poslens train --seed S` sets both).

    `snapshots` keeps model checkpoints during training (see `snapshot_schedule`): an int K
    saves step 0 and K log-spaced steps up to `steps`, a sequence saves exactly those steps;
    `list_snapshots(out_dir)` finds them. The schedule does not change the trained weights; it
    is recorded in `run.json`, and resuming with a different schedule is refused.
    """
    settings_obj = TrainSettings(**settings)
    schedule = snapshot_schedule(snapshots, settings_obj.steps)
    if cfg.d_vocab != len(task.alphabet) or cfg.alphabet != task.alphabet:
        raise ValueError(f"config alphabet {cfg.alphabet!r} does not match task {task.name!r} alphabet {task.alphabet!r}")
    if cfg.n_ctx < task.seq_len:
        raise ValueError(f"n_ctx = {cfg.n_ctx} is shorter than the task's sequences ({task.seq_len} tokens)")
    out_dir = Path(out_dir)
    record = _run_record(cfg, task, settings_obj, step=0, finished=False, snapshots=schedule)
    if (out_dir / "run.json").exists():
        if not resume:
            raise FileExistsError(f"{out_dir} already holds a training run; pass resume=True to continue it "
                                  "or choose another directory")
        saved = read_json(out_dir / "run.json")
        for key in ("config", "task", "settings"):
            if json.loads(json.dumps(record[key])) != saved[key]:
                raise ValueError(f"cannot resume {out_dir}: its {key} differs from the one given "
                                 f"(saved {saved[key]}, given {record[key]})")
        if saved.get("snapshots", []) != schedule:
            raise ValueError(f"cannot resume {out_dir}: its snapshot schedule differs from the one given "
                             f"(saved {saved.get('snapshots', [])}, given {schedule})")
        if saved["finished"]:
            return TrainResult(load(out_dir, device=cfg.device), read_json(out_dir / "history.json"), out_dir)
    elif out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty; choose a new directory for a training run")

    model = build(cfg).train()
    optimizer = make_optimizer(model, settings_obj)
    start, history = 0, []
    if (out_dir / "train_state.safetensors").exists():
        _load_train_state(out_dir, model, optimizer)
        start = read_json(out_dir / "run.json")["step"]
        history = [row for row in read_json(out_dir / "history.json") if row["step"] <= start]
    else:
        write_json(out_dir / "run.json", record)
        write_json(out_dir / "history.json", history)
        if 0 in schedule:
            _save_snapshot(model, out_dir, 0)

    test_tokens = task.test_set()
    started, loss_sum, loss_count = time.perf_counter(), 0.0, 0
    progress = tqdm(range(start, settings_obj.steps), initial=start, total=settings_obj.steps,
                    desc=f"train {cfg.name}", disable=quiet, leave=False)
    for step in progress:
        for group in optimizer.param_groups:
            group["lr"] = settings_obj.lr_at(step)
        tokens = task.train_batch(settings_obj.batch_size, settings_obj.batch_seed(step)).to(cfg.device)
        loss = answer_loss(model(tokens[:, :-1]), tokens, task.prompt_len)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings_obj.grad_clip)
        optimizer.step()
        loss_sum, loss_count = loss_sum + loss.item(), loss_count + 1
        done = step + 1
        if done % settings_obj.eval_every == 0 or done == settings_obj.steps:
            row = {"step": done, "train_loss": loss_sum / loss_count, "lr": settings_obj.lr_at(step),
                   **evaluate(model, task, test_tokens), "elapsed_s": time.perf_counter() - started}
            history.append(row)
            loss_sum, loss_count = 0.0, 0
            write_json(out_dir / "history.json", history)
            progress.set_postfix(loss=f"{row['train_loss']:.3f}", exact=f"{row['exact_match']:.3f}")
        if done in schedule:
            _save_snapshot(model, out_dir, done)
        if done % settings_obj.checkpoint_every == 0 and done < settings_obj.steps:
            _save_train_state(out_dir, model, optimizer, done)
            write_json(out_dir / "history.json", history)
            write_json(out_dir / "run.json", {**record, "step": done})
        if on_step is not None:
            on_step(done)
    progress.close()
    model.eval()
    save(model, out_dir)
    _save_train_state(out_dir, model, optimizer, settings_obj.steps)
    write_json(out_dir / "run.json", {**record, "step": settings_obj.steps, "finished": True})
    return TrainResult(model, history, out_dir)
