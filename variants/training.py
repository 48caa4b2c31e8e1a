"""Training on a task: AdamW, linear warm-up then cosine decay, loss on answer tokens only.

A run directory holds `config.json` + `model.safetensors` (the model, see `checkpoint`),
`train_state.safetensors`, `run.json` (task, settings, progress) and `history.json` (the
evaluations). With a snapshot schedule it also holds `checkpoints/step-000123/`, one model
checkpoint per scheduled step, so analyses can walk through training.

**One commit point per checkpoint.** `train_state.safetensors` is the run's only source of
truth: one atomically replaced file holding the weights, the optimiser moments, the step, the
evaluation history, the running train-loss window, the run's identity (config, task, settings,
snapshot schedule) and the sha256 of all of it. A checkpoint is committed when that file is
renamed into place; `run.json`, `history.json` and the final `config.json` + `model.safetensors`
are views derived from it afterwards, and resume rewrites any view a kill left behind. Resume
refuses a state whose digest or identity does not match, and a finished state (step = steps) is
never trained again: its model files are rewritten from it if a kill interrupted them. Batches
are a pure function of (seed, step) and the learning rate a pure function of step, so a run
killed at any point and resumed ends bitwise-identical to one that was never interrupted
(`tests/test_crash_consistency.py` kills one at every durable write point). A run directory is
locked while it is trained (`variants.locking`): a second writer is refused.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from poslens.variants.checkpoint import check_state_matches, load, restamp, save
from poslens.variants.config import MAX_SEED, VariantConfig, check_integer, check_memory, check_number
from poslens.variants.locking import LOCK_FILE, locked_directory
from poslens.variants.model import HookedTransformer, build
from poslens.variants.storage import (
    commit_folder,
    content_digest,
    dumps_json,
    is_temporary,
    read_json,
    read_tensors,
    save_tensors,
    temporary_folder,
    write_json,
)
from poslens.variants.threads import uses_threads

SNAPSHOT_DIR = "checkpoints"
_SNAPSHOT_NAME = re.compile(r"step-(\d{6,})")


class Task(Protocol):
    """What training reads of a task (`poslens.tasks` holds ready ones). A task is a frozen
    dataclass, so `run.json` can record it (`name` plus its fields) and resume can check it."""

    __dataclass_fields__: ClassVar[dict[str, Any]]  # a dataclass (what `dataclasses.asdict` takes)
    name: str
    alphabet: str
    seq_len: int
    prompt_len: int  # tokens before the answer; the loss is on the rest

    def train_batch(self, batch_size: int, seed: int) -> Tensor: ...

    def test_set(self) -> Tensor: ...


LR_SCHEDULES = ("cosine", "constant")
PRECISIONS = ("float32", "bfloat16")
"""Training precisions: `float32`, or `bfloat16` autocast of the forward and backward passes
(weights, gradients and optimiser moments stay float32; on CPUs with AMX and on GPUs the matmuls
run in bfloat16). Evaluation and every measure run in the model's own float32."""
MAX_LR = 10.0  # an AdamW step moves each weight by about lr: far below this every run already diverges


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
    lr_schedule: str = "cosine"  # after the warm-up: "cosine" decay to zero, or "constant" (a control)
    precision: str = "float32"  # "bfloat16": autocast forward and backward (see PRECISIONS)

    def __post_init__(self) -> None:
        """Every setting an integer or a finite number in its range, named with the range if not."""
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown lr_schedule {self.lr_schedule!r}; allowed: {list(LR_SCHEDULES)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; allowed: {list(PRECISIONS)}")
        for name in ("steps", "batch_size", "eval_every", "checkpoint_every"):
            check_integer(name, getattr(self, name), minimum=1)
        check_integer("warmup_steps", self.warmup_steps, minimum=0)
        check_integer("seed", self.seed, minimum=0, maximum=MAX_SEED)
        check_number("lr", self.lr, above=0, at_most=MAX_LR)
        check_number("weight_decay", self.weight_decay, at_least=0)
        check_number("grad_clip", self.grad_clip, above=0)
        if not isinstance(self.betas, (tuple, list)) or len(self.betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {self.betas!r}")
        for index, beta in enumerate(self.betas):
            check_number(f"betas[{index}]", beta, at_least=0, below=1)
        object.__setattr__(self, "betas", tuple(self.betas))

    def lr_at(self, step: int) -> float:
        """Linear warm-up to `lr`, then cosine decay to zero at `steps` (or `lr` throughout, constant)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.lr_schedule == "constant":
            return self.lr
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return self.lr * 0.5 * (1 + math.cos(math.pi * progress))

    def batch_seed(self, step: int) -> int:
        return self.seed * 2**32 + step

    def autocast(self, device: str | torch.device) -> torch.autocast:
        """The context the training forward and loss run in: bfloat16 autocast, or a disabled one."""
        device_type = torch.device(device).type
        return torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.precision == "bfloat16")


@dataclass
class TrainResult:
    model: HookedTransformer
    history: list[dict[str, Any]]
    out_dir: Path


def answer_loss(logits: Float[Tensor, "batch pos d_vocab"], tokens: Int[Tensor, "batch seq"],
                prompt_len: int) -> Tensor:
    """Mean cross-entropy of the answer tokens (`tokens[:, prompt_len:]`), teacher-forced."""
    predictions = logits[:, prompt_len - 1 : tokens.shape[1] - 1]
    return F.cross_entropy(predictions.flatten(0, 1), tokens[:, prompt_len:].flatten())


@torch.no_grad()
def evaluate(model: HookedTransformer, task: Task, tokens: Int[Tensor, "batch seq"] | None = None,
             batch_size: int = 1024) -> dict[str, float]:
    """Test loss, per-token accuracy and exact match of greedy-decoded answers.

    Args:
        model: the model to evaluate (put in eval mode).
        task: the task whose answers are scored (loss and accuracy on the answer tokens only).
        tokens: the sequences to score; default the task's whole held-out set.
        batch_size: sequences per forward pass.

    Returns:
        `{"test_loss", "token_accuracy", "exact_match"}` as floats.
    """
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
    """AdamW with weight decay on matrices only (biases, LayerNorm and other vectors are not decayed),
    as torch's fused kernel: one pass over all parameters instead of about ten small ops per
    tensor (deterministic, like the per-tensor loop it replaces; its rounding differs from it)."""
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    vectors = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": matrices, "weight_decay": settings.weight_decay}, {"params": vectors, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=settings.lr, betas=settings.betas, fused=True)


STATE_FILE = "train_state.safetensors"
STATE_FORMAT = "2"
RUN_FIELDS = ("variant", "config", "task", "settings", "step", "finished", "snapshots")
IDENTITY = ("config", "task", "settings", "snapshots")


@dataclass
class Progress:
    """Where a run stands at a checkpoint, besides its tensors: the step, the evaluations so far,
    and the train losses summed since the last evaluation (so the next row's `train_loss`
    averages the same steps whether or not the run was interrupted in between)."""

    step: int = 0
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    loss_sum: float = 0.0
    loss_count: int = 0


def _run_record(cfg: VariantConfig, task: Task, settings: TrainSettings, snapshots: list[int]) -> dict:
    """What `run.json` holds at step 0, JSON-normalised (tuples as lists). The snapshot schedule
    is recorded (under `snapshots`, not under `settings`: it does not change the weights) only
    when there is one, so runs without snapshots keep exactly the record they always had."""
    recorded = dataclasses.asdict(settings)
    for name, default in (("lr_schedule", "cosine"), ("precision", "float32")):
        if recorded[name] == default:  # defaults are left out, so that runs from before the field still resume
            del recorded[name]
    record = {
        "variant": cfg.name,
        "config": cfg.to_json(),
        "task": {"name": task.name, **dataclasses.asdict(task)},
        "settings": recorded,
        "step": 0,
        "finished": False,
    }
    return json.loads(dumps_json({**record, "snapshots": snapshots} if snapshots else record))


def _identity(record: dict) -> dict:
    """What makes a run this run: config, task, settings and snapshot schedule."""
    return {key: record.get(key, []) for key in IDENTITY}


def read_run_record(out_dir: str | Path) -> dict[str, Any]:
    """`out_dir/run.json`, checked: a JSON object with the fields `train` writes and no others.
    (Runs written before snapshot schedules were recorded lack `snapshots`: none were kept.)"""
    path = Path(out_dir) / "run.json"
    record = read_json(path)
    if not isinstance(record, dict):
        raise ValueError(f"{path} is not a poslens run record (a JSON object expected)")
    unknown = sorted(set(record) - set(RUN_FIELDS))
    if unknown:
        raise ValueError(f"{path} has unexpected fields {unknown}; allowed: {list(RUN_FIELDS)}")
    missing = sorted(set(RUN_FIELDS) - {"snapshots"} - set(record))
    if missing:
        raise ValueError(f"{path} lacks the fields {missing} of a poslens run record")
    return record


def _save_state(out_dir: Path, model: HookedTransformer, optimizer: torch.optim.AdamW, identity: dict,
                progress: Progress) -> None:
    """Commit a checkpoint: everything resume needs, with its own digest, in one atomic file."""
    bad = [name for name, param in model.named_parameters() if not torch.isfinite(param).all()]
    if bad:
        raise FloatingPointError(f"training diverged: parameter {bad[0]} is not finite after step {progress.step}; "
                                 f"{out_dir} keeps its last checkpoint; try a smaller lr")
    names = {id(param): name for name, param in model.named_parameters()}
    tensors = {f"model.{name}": value for name, value in model.state_dict().items()}
    for param, state in optimizer.state.items():
        for key, value in state.items():
            tensors[f"optim.{key}.{names[id(param)]}"] = value
    _write_state(out_dir, tensors, identity, progress)


def _write_state(out_dir: Path, tensors: dict[str, Tensor], identity: dict, progress: Progress) -> None:
    """`train_state.safetensors`: the tensors, and in its metadata the identity, the progress and
    the sha256 of all of them (`storage.content_digest`)."""
    metadata = {"format": STATE_FORMAT, "identity": dumps_json(identity),
                "progress": dumps_json(dataclasses.asdict(progress))}
    save_tensors(out_dir / STATE_FILE, tensors, {**metadata, "sha256": content_digest(tensors, metadata)})


def _read_state(out_dir: Path, identity: dict | None) -> tuple[dict[str, Tensor], Progress]:
    """The tensors and progress of `out_dir`'s committed checkpoint, refused if its digest does not
    match its contents or, when `identity` is given, it belongs to another run."""
    path = out_dir / STATE_FILE
    tensors, metadata = read_tensors(path)
    if metadata.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} was written by an older poslens (no step, history or digest inside), so it cannot "
                         f"be verified; a finished run is upgraded by `poslens restamp {out_dir}`, an unfinished one "
                         "must be trained again in a new directory")
    recorded = metadata.pop("sha256", None)
    if recorded != content_digest(tensors, metadata):
        raise ValueError(f"{path} is corrupted: its contents do not match the sha256 recorded inside it")
    saved = json.loads(metadata["identity"])
    if identity is not None and saved != identity:
        differ = [key for key in IDENTITY if saved.get(key) != identity.get(key)]
        raise ValueError(f"{path} belongs to another run: its {', '.join(differ)} differ from this run's; "
                         "it is not resumed")
    return tensors, Progress(**json.loads(metadata["progress"]))


def _restore(tensors: dict[str, Tensor], model: HookedTransformer, optimizer: torch.optim.AdamW,
             source: Path) -> None:
    """Load a checkpoint's weights into `model` and its moments into `optimizer`."""
    weights = {name.removeprefix("model."): t for name, t in tensors.items() if name.startswith("model.")}
    check_state_matches(model, weights, source)
    model.load_state_dict(weights)
    device = model.cfg.device
    for name, param in model.named_parameters():
        state = {key: tensors[f"optim.{key}.{name}"].to(device) for key in ("step", "exp_avg", "exp_avg_sq")
                 if f"optim.{key}.{name}" in tensors}
        if state:
            state["step"] = state["step"].cpu()
            optimizer.state[param] = state


def _write_view(path: Path, obj: Any) -> None:
    """Write a JSON view of the committed state unless it already says exactly that."""
    try:
        if read_json(path) == json.loads(dumps_json(obj)):
            return
    except (FileNotFoundError, ValueError):
        pass
    write_json(path, obj)


def _write_views(out_dir: Path, record: dict, progress: Progress, finished: bool) -> None:
    """`run.json` (first: in a new directory it is what marks it as a run's) and `history.json`."""
    _write_view(out_dir / "run.json", {**record, "step": progress.step, "finished": finished})
    _write_view(out_dir / "history.json", progress.history)


def _publish(out_dir: Path, model: HookedTransformer, record: dict, progress: Progress) -> None:
    """Derive a finished run's views from its committed final state: `config.json` +
    `model.safetensors` (rewritten only if missing or different, e.g. after a kill during them),
    `history.json` and `run.json`."""
    try:
        saved = load(out_dir, device=model.cfg.device).state_dict()
        same = all(torch.equal(tensor, saved[name]) for name, tensor in model.state_dict().items())
    except (FileNotFoundError, ValueError, KeyError):
        same = False
    if not same:
        save(model, out_dir)
    _write_views(out_dir, record, progress, finished=True)


def restamp_run(run_dir: str | Path) -> list[str]:
    """Bring a run directory written by an older poslens up to the current checks; returns what
    was done. Records the digests (config and weights) of its model and snapshots where missing
    (`checkpoint.restamp`), and rewrites an old-format `train_state.safetensors` of a *finished*
    run in the current format, after checking that it holds the final weights and that
    `run.json` says it finished (an unfinished old run cannot be verified: train it again).
    Holds the run directory's lock while it works."""
    with locked_directory(run_dir, clean=()) as run_dir:
        return _restamp_run(run_dir)


def _restamp_run(run_dir: Path) -> list[str]:
    done = [f"recorded the digests of config and weights in {path / 'config.json'}"
            for path in [run_dir, *(path for _, path in list_snapshots(run_dir))]
            if (path / "config.json").is_file() and restamp(path)]
    if not (run_dir / STATE_FILE).is_file():
        return done
    tensors, metadata = read_tensors(run_dir / STATE_FILE)
    if metadata.get("format") == STATE_FORMAT:
        _read_state(run_dir, None)  # verifies its digest
        return done
    record = read_run_record(run_dir)
    steps = record["settings"]["steps"]
    if not record["finished"] or metadata.get("step") != str(steps):
        raise ValueError(f"{run_dir} is an unfinished run written by an older poslens; its progress cannot be "
                         "verified, so it cannot be restamped: train it again in a new directory")
    model = load(run_dir)
    check_state_matches(model, {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")},
                        run_dir / STATE_FILE)
    if not all(torch.equal(tensor, tensors[f"model.{name}"]) for name, tensor in model.state_dict().items()):
        raise ValueError(f"{run_dir / STATE_FILE} does not hold the weights of {run_dir / 'model.safetensors'}; "
                         "it cannot be restamped")
    _write_state(run_dir, tensors, _identity(record), Progress(steps, read_json(run_dir / "history.json")))
    return [*done, f"rewrote {run_dir / STATE_FILE} in the current format"]


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
        if not 0 <= snapshots <= total:
            raise ValueError(f"snapshots must be an integer in 0..{total} (distinct log-spaced steps of the {total} "
                             f"training steps), got {snapshots}")
        return log_spaced_steps(total, snapshots)
    if isinstance(snapshots, bool):
        raise ValueError(f"snapshots must be an integer in 0..{total} or a list of steps, got {snapshots}")
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
    tmp = temporary_folder(final)
    try:
        save(model, tmp)
        commit_folder(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # the folder this call created
        raise


def task_record(out_dir: str | Path) -> dict[str, Any]:
    """The record of the task a run was trained on (`name` and fields; `poslens.tasks.make_task(**record)`
    rebuilds it).

    Args:
        out_dir: a run directory (holds `run.json`).

    Returns:
        `{"name": ..., **fields}`.
    """
    return dict(read_run_record(out_dir)["task"])


@uses_threads
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
    with `resume=True` training continues from its last committed checkpoint (or starts, if it
    has none), and a finished run is returned as it is. `on_step(step)` is called after every
    optimiser step. The settings' `seed` fixes the batches; `cfg.seed` fixes the initial
    weights (`poslens train --seed S` sets both). `out_dir` is locked for the whole call
    (`locking.DirectoryLocked` if another process holds it). A loss that stops being finite
    raises `FloatingPointError` naming the step; the run keeps its last checkpoint.

    `snapshots` keeps model checkpoints during training (see `snapshot_schedule`): an int K
    saves step 0 and K log-spaced steps up to `steps`, a sequence saves exactly those steps;
    `list_snapshots(out_dir)` finds them. The schedule does not change the trained weights; it
    is recorded in `run.json`, and resuming with a different schedule is refused.

    `threads=N` (a keyword added by `variants.threads.uses_threads`) pins torch to N threads for
    the call; left out, the policy of `variants.threads` gives 1 (or the enclosing
    `torch_threads` block's). The weights depend on it: same settings, seed and threads, same bits.

    Args:
        cfg: the model's configuration (`variant_config`).
        task: the task to train on.
        out_dir: the run directory, locked while training.
        resume: continue the run in `out_dir` instead of refusing it.
        quiet: no progress bar.
        on_step: called with the step number after every optimiser step.
        snapshots: an int K (step 0 and K log-spaced steps) or the exact steps to keep.
        **settings: `TrainSettings` fields (`steps`, `lr`, `batch_size`, `seed`, ...).

    Returns:
        A `TrainResult`: the trained model (eval mode), its evaluation history and the run folder.
    """
    settings_obj = TrainSettings(**settings)
    schedule = snapshot_schedule(snapshots, settings_obj.steps)
    if cfg.d_vocab != len(task.alphabet) or cfg.alphabet != task.alphabet:
        raise ValueError(f"config alphabet {cfg.alphabet!r} does not match task {task.name!r} "
                         f"alphabet {task.alphabet!r}")
    if cfg.n_ctx < task.seq_len:
        raise ValueError(f"n_ctx = {cfg.n_ctx} is shorter than the task's sequences ({task.seq_len} tokens)")
    check_memory(cfg, settings_obj.batch_size)
    record = _run_record(cfg, task, settings_obj, schedule)

    def check_run_dir(out_dir: Path) -> None:
        """Refuse, before its leftovers are cleaned, a directory that is not this run's."""
        if (out_dir / "run.json").exists():
            if not resume:
                raise FileExistsError(f"{out_dir} already holds a training run; pass resume=True to continue it "
                                      "or choose another directory")
            saved, given = _identity(read_run_record(out_dir)), _identity(record)
            for key in IDENTITY:
                if saved[key] != given[key]:
                    what = "snapshot schedule" if key == "snapshots" else key
                    raise ValueError(f"cannot resume {out_dir}: its {what} differs from the one given "
                                     f"(saved {saved[key]}, given {given[key]})")
        elif any(path.name != LOCK_FILE and not is_temporary(path.name) for path in out_dir.iterdir()):
            raise FileExistsError(f"{out_dir} exists and is not empty; choose a new directory for a training run")

    with locked_directory(out_dir, clean=(".", SNAPSHOT_DIR), check=check_run_dir) as out_dir:
        return _train(cfg, task, out_dir, record, settings_obj, schedule, quiet=quiet, on_step=on_step)


def _train(cfg: VariantConfig, task: Task, out_dir: Path, record: dict, settings: TrainSettings, schedule: list[int],
           *, quiet: bool, on_step: Callable[[int], None] | None) -> TrainResult:
    """`train` in its locked, checked `out_dir`: resume from the committed state, if any, and commit
    a checkpoint every `checkpoint_every` steps and at the end."""
    identity = _identity(record)
    model = build(cfg).train()
    optimizer = make_optimizer(model, settings)
    progress = Progress()
    if (out_dir / STATE_FILE).exists():
        tensors, progress = _read_state(out_dir, identity)
        _restore(tensors, model, optimizer, out_dir / STATE_FILE)
    if progress.step == settings.steps:
        _publish(out_dir, model.eval(), record, progress)
        return TrainResult(model, progress.history, out_dir)
    _write_views(out_dir, record, progress, finished=False)
    if progress.step == 0 and 0 in schedule:
        _save_snapshot(model, out_dir, 0)

    test_tokens = task.test_set()
    started = time.perf_counter()
    bar = tqdm(range(progress.step, settings.steps), initial=progress.step, total=settings.steps,
               desc=f"train {cfg.name}", disable=quiet, leave=False)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = settings.lr_at(step)
        tokens = task.train_batch(settings.batch_size, settings.batch_seed(step)).to(cfg.device)
        with settings.autocast(cfg.device):
            loss = answer_loss(model(tokens[:, :-1]), tokens, task.prompt_len)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"training diverged: the loss is {loss_value} at step {step + 1}; {out_dir} "
                                     f"keeps its last checkpoint (step {progress.step}); try a smaller lr (now "
                                     f"{settings.lr}) or init_std (now {cfg.init_std})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        done = step + 1
        progress.loss_sum, progress.loss_count = progress.loss_sum + loss_value, progress.loss_count + 1
        if done % settings.eval_every == 0 or done == settings.steps:
            row = {"step": done, "train_loss": progress.loss_sum / progress.loss_count, "lr": settings.lr_at(step),
                   **evaluate(model, task, test_tokens), "elapsed_s": time.perf_counter() - started}
            if not all(math.isfinite(value) for value in row.values()):
                raise FloatingPointError(f"training diverged: the evaluation at step {done} is not finite ({row}); "
                                         f"{out_dir} keeps its last checkpoint (step {progress.step}); "
                                         "try a smaller lr")
            progress.history.append(row)
            progress.loss_sum, progress.loss_count = 0.0, 0
            write_json(out_dir / "history.json", progress.history)  # a view, for whoever watches the run
            bar.set_postfix(loss=f"{row['train_loss']:.3f}", exact=f"{row['exact_match']:.3f}")
        if done in schedule:
            _save_snapshot(model, out_dir, done)
        if done % settings.checkpoint_every == 0 or done == settings.steps:
            progress.step = done
            _save_state(out_dir, model, optimizer, identity, progress)
            if done < settings.steps:
                _write_views(out_dir, record, progress, finished=False)
        if on_step is not None:
            on_step(done)
    bar.close()
    _publish(out_dir, model.eval(), record, progress)
    return TrainResult(model, progress.history, out_dir)
