"""`poslens dynamics`: train with snapshots, then watch position and attention take shape.

For every snapshot a run kept (`train(..., snapshots=K)`, see `variants.training`) this
measures, on the task's first `n_sequences` held-out sequences: task loss and accuracy
(`variants.evaluate`); position-probe accuracy at every residual site with the token-identity
and chance bars (`measures.probe_sweep`; the step-0 snapshot *is* the random-init model); and
attention entropy per layer and head (`measures.entropy`). `write_dynamics` is the whole job:
train with snapshots (resumably), measure, write tables, figures and a summary.

Tables: `metrics` (figures.dynamics.METRIC_COLUMNS), `probes`, `entropy`, `rebound` and
`decodable` (see `analyses.measures.entropy`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from poslens.analyses.experiments.presets import (
    DYNAMICS_SEQUENCES,
    DYNAMICS_TASKS,
    MARKOV_MODEL,
    MARKOV_TASK,
    MARKOV_TRAINING,
    PRESETS,
)
from poslens.analyses.figures import write_figure
from poslens.analyses.figures.dynamics import (
    METRIC_COLUMNS,
    attention_pattern_figure,
    entropy_figure,
    probe_dynamics_figure,
    training_curves_figure,
)
from poslens.analyses.figures.induction import induction_figures
from poslens.analyses.measures.entropy import (
    ENTROPY_COLUMNS,
    PROBE_STEP_COLUMNS,
    attention_summary,
    decodable_steps,
    entropy_rebound,
    uniform_entropy_reference,
)
from poslens.analyses.measures.induction import InductionReport, induction_analysis
from poslens.analyses.measures.probe_sweep import probe_sweep
from poslens.analyses.runs import load_task
from poslens.analyses.tables import export_tables, render_table
from poslens.tasks import make_task
from poslens.variants import VariantConfig, evaluate, load, preset, train
from poslens.variants.locking import holds_lock
from poslens.variants.storage import atomic_write
from poslens.variants.training import Task, list_snapshots

TABLE_FORMATS = (".csv", ".md", ".json")


@dataclass
class DynamicsResult:
    """What `training_dynamics` measured on one run (see the module docstring for the tables)."""

    run_dir: Path
    steps: list[int]
    metrics: pd.DataFrame
    probes: pd.DataFrame
    entropy: pd.DataFrame
    patterns: Float[Tensor, "step layer head query key"]  # mean attention over the sequences
    uniform_nats: float
    induction: InductionReport | None = field(default=None)  # on the final model (markov only)

    @property
    def rebound(self) -> pd.DataFrame:
        return entropy_rebound(self.entropy)

    @property
    def decodable(self) -> pd.DataFrame:
        return decodable_steps(self.probes)

    def tables(self) -> dict[str, pd.DataFrame]:
        return {"metrics": self.metrics, "probes": self.probes, "entropy": self.entropy, "rebound": self.rebound,
                "decodable": self.decodable}

    def figures(self) -> dict[str, go.Figure]:
        return {"training_curves": training_curves_figure(self.metrics),
                "probe_accuracy": probe_dynamics_figure(self.probes),
                "attention_entropy": entropy_figure(self.entropy),
                "attention_patterns": attention_pattern_figure(self.patterns, self.steps)}


def training_dynamics(run_dir: str | Path, *, n_sequences: int = 1000, device: str = "cpu",
                      quiet: bool = False) -> DynamicsResult:
    """Measure every snapshot of the run in `run_dir` (loss, accuracy, probes, attention entropy).

    All measures use the task's first `n_sequences` held-out sequences; probes are trained on
    three quarters of them and tested on the rest, split by sequence.
    """
    run_dir = Path(run_dir)
    snapshots = list_snapshots(run_dir)
    if not snapshots:
        raise ValueError(f"{run_dir} has no snapshots; train it with train(..., snapshots=K) "
                         "or `poslens dynamics`")
    if isinstance(n_sequences, bool) or not isinstance(n_sequences, int) or n_sequences < 4:
        raise ValueError(f"n_sequences must be an integer >= 4 (probes split by sequence), got {n_sequences!r}")
    task = load_task(run_dir)
    tokens = task.test_set()[:n_sequences]
    metrics, probes, entropy, patterns = [], [], [], []
    for step, path in tqdm(snapshots, desc="dynamics", disable=quiet):
        model = load(path, device=device)
        common = {"variant": model.cfg.name, "seed": model.cfg.seed, "step": step}
        metrics.append({**common, **evaluate(model, task, tokens)})
        table = probe_sweep({model.cfg.name: [model]}, task, n_sequences=n_sequences,
                            controls=("token_identity", "chance"), quiet=True)
        probes.append(table.assign(step=step))
        heads, pattern = attention_summary(model, tokens[:, :-1])
        entropy.append(heads.assign(**common))
        patterns.append(pattern)
    causal = model.cfg.attention_dir == "causal"
    uniform = uniform_entropy_reference(task.seq_len - 1, causal)
    entropy_table = pd.concat(entropy, ignore_index=True).assign(uniform_nats=uniform)
    return DynamicsResult(
        run_dir=run_dir, steps=[step for step, _ in snapshots],
        metrics=pd.DataFrame(metrics, columns=list(METRIC_COLUMNS)),
        probes=pd.concat(probes, ignore_index=True)[list(PROBE_STEP_COLUMNS)],
        entropy=entropy_table[list(ENTROPY_COLUMNS)], patterns=torch.stack(patterns), uniform_nats=uniform)


def _run_config(variant: str, task: Task, *, steps: int | None, n_layers: int | None, d_model: int | None,
                seed: int, device: str) -> tuple[VariantConfig, dict]:
    """The config and `train` settings of a dynamics run: the reproduce `quick` sizes on
    addition, the presets' MARKOV_MODEL / MARKOV_TRAINING on markov; given sizes win."""
    sizes = {key: value for key, value in (("n_layers", n_layers), ("d_model", d_model)) if value is not None}
    if task.name == "addition":
        model, settings = PRESETS["quick"].model, PRESETS["quick"].training
    else:
        model, settings = dict(MARKOV_MODEL), dict(MARKOV_TRAINING)
        if d_model is not None:  # the head count then follows from d_head
            model.pop("n_heads", None)
    cfg = preset(variant, task=task, **{**model, **sizes, "seed": seed, "device": device})
    return cfg, {**settings, **({} if steps is None else {"steps": steps}), "seed": seed}


@holds_lock("out_dir", clean=(".", "tables", "figures"))  # one writer; a killed one's temporaries removed
def write_dynamics(out_dir: str | Path, *, variant: str, task: str, checkpoints: int = 12, steps: int | None = None,
                   n_layers: int | None = None, d_model: int | None = None, seed: int = 0,
                   n_sequences: int | None = None, device: str = "cpu", quiet: bool = False,
                   force: bool = False) -> DynamicsResult:
    """`poslens dynamics`: train `variant` on `task` into `out_dir/run` with step 0 and
    `checkpoints` log-spaced snapshots (resuming a killed run), run `training_dynamics`, and
    write `out_dir/tables/*.{csv,md,json}`, `out_dir/figures/*.html` and `out_dir/summary.md`.

    On markov the task is `MarkovICL(**MARKOV_TASK)` (loss on every token drawn from the table:
    with the last token alone the 2-layer model did not learn in budget, benchmarks/RESULTS.md), and
    the final model also goes through `analyses.measures.induction.induction_analysis`
    (on `n_sequences` sequences), whose tables and figures are written with an `induction_`
    prefix. Finished outputs are never overwritten: if any exist, this refuses before training
    unless `force=True`, which recomputes the analyses (the trained run is always kept and
    resumed, never retrained).
    """
    if task not in DYNAMICS_TASKS:
        raise ValueError(f"unknown task {task!r}; allowed: {list(DYNAMICS_TASKS)}")
    if isinstance(checkpoints, bool) or not isinstance(checkpoints, int) or checkpoints < 1:
        raise ValueError(f"checkpoints must be an integer >= 1 (log-spaced snapshots besides step 0), "
                         f"got {checkpoints!r}")
    out_dir = Path(out_dir)
    outputs = [out_dir / name for name in ("summary.md", "tables", "figures")]
    existing = [path.name for path in outputs if path.exists()]
    if existing and not force:
        raise FileExistsError(f"{out_dir} already holds dynamics outputs ({', '.join(existing)}); "
                              "pass force=True (--force) to recompute them (the trained run is kept)")
    task_obj = make_task(task, **(MARKOV_TASK if task == "markov" else {}))
    n_sequences = DYNAMICS_SEQUENCES[task] if n_sequences is None else n_sequences
    cfg, settings = _run_config(variant, task_obj, steps=steps, n_layers=n_layers, d_model=d_model, seed=seed,
                                device=device)
    trained = train(cfg, task_obj, out_dir=out_dir / "run", resume=True, quiet=quiet, snapshots=checkpoints,
                    **settings)
    result = training_dynamics(out_dir / "run", n_sequences=n_sequences, device=device, quiet=quiet)
    tables, figures = result.tables(), result.figures()
    if task == "markov":
        result.induction = induction_analysis(trained.model, task_obj, n_sequences=n_sequences, quiet=quiet)
        tables |= {f"induction_{name}": table for name, table in result.induction.tables.items()}
        figures |= {f"induction_{name}": figure for name, figure in induction_figures(result.induction.tables).items()}
    for name, table in tables.items():
        export_tables(table, out_dir / "tables", name, formats=TABLE_FORMATS, overwrite=force)
    for name, figure in figures.items():
        write_figure(figure, out_dir / "figures" / f"{name}.html", overwrite=force, standalone=False)
    atomic_write(out_dir / "summary.md", _summary(result, cfg, settings, task), overwrite=force)
    return result


def _summary(result: DynamicsResult, cfg: VariantConfig, settings: dict, task: str) -> str:
    """A short Markdown summary: the run, the final metrics, the entropy rebound, decodability."""
    final = result.metrics.iloc[-1]
    rebound = result.rebound
    decodable = result.decodable
    lines = [
        f"# poslens dynamics: {cfg.name} on {task}\n",
        f"{cfg.n_layers} blocks, d_model {cfg.d_model}, {cfg.n_heads} heads; {settings['steps']} steps, batch "
        f"{settings['batch_size']}, seed {cfg.seed}; snapshots at steps {result.steps}.\n",
        f"Final held-out loss {final['test_loss']:.4f}, exact match {final['exact_match']:.3f}, "
        f"token accuracy {final['token_accuracy']:.3f}.\n",
        f"## Attention entropy: minimum and rebound per layer (mean over heads)\n\nJoMA's measure in nats "
        f"(uniform attention: {result.uniform_nats:.3f} nats) and normalised by ln(visible keys) (uniform: 1).\n",
        render_table(rebound.drop(columns=["variant", "seed"]), "md"),
        "## First step at which position is decodable (probe ≥ token identity + margin; NaN: never)\n",
        render_table(decodable.drop(columns=["variant", "seed"]), "md"),
    ]
    if result.induction is not None:
        facts = "".join(f"- {key}: {value}\n" for key, value in result.induction.summary.items())
        lines.append(f"## Induction analysis of the final model\n\n{facts}")
    return "\n".join(lines)
