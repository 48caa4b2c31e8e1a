"""`poslens dynamics`: train with snapshots, then watch position and attention take shape.

For every snapshot a run kept (`train(..., snapshots=K)`, see `variants.training`) this
measures, on the task's first `n_sequences` held-out sequences: task loss and accuracy
(`variants.evaluate`); position-probe accuracy at every residual site with the token-identity
and chance bars (`measures.probe_sweep`; the step-0 snapshot *is* the random-init model); and
attention entropy per layer and head (`measures.entropy`). `write_dynamics` is the whole job,
for several variants and seeds at once (each run a unit of `analyses.executors`): train with
snapshots (resumably), measure, write tables, figures and a summary.

Tables: `metrics` (figures.dynamics.METRIC_COLUMNS), `probes`, `entropy`, `rebound` and
`decodable` (see `analyses.measures.entropy`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from poslens.analyses.claims import rebound_claims
from poslens.analyses.executors import Unit
from poslens.analyses.experiments.presets import (
    CONSTANT_LR,
    DYNAMICS_SEQUENCES,
    DYNAMICS_TASKS,
    MARKOV_MODEL,
    MARKOV_TASK,
    MARKOV_TRAINING,
    PRESETS,
)
from poslens.analyses.figures import file_name
from poslens.analyses.figures.dynamics import (
    METRIC_COLUMNS,
    attention_pattern_figure,
    entropy_figure,
    entropy_split_figure,
    probe_dynamics_figure,
    training_curves_figure,
)
from poslens.analyses.figures.induction import induction_figures
from poslens.analyses.measures.entropy import (
    ENTROPY_COLUMNS,
    ENTROPY_SPLIT_COLUMNS,
    PROBE_STEP_COLUMNS,
    attention_summary,
    decodable_steps,
    entropy_rebound,
    loss_queries,
    uniform_entropy_reference,
)
from poslens.analyses.measures.induction import induction_analysis
from poslens.analyses.measures.probe_sweep import probe_table
from poslens.analyses.report import Section
from poslens.analyses.runs import cached_results, load_task
from poslens.analyses.study import Committed, Study, check_runs, run_study
from poslens.tasks import make_task
from poslens.variants import TrainSettings, VariantConfig, evaluate, load, train, variant_config
from poslens.variants.config import check_integer
from poslens.variants.training import Task, list_snapshots, snapshot_schedule

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

    All measures use one seeded, unbiased sample of `n_sequences` held-out sequences
    (`task.sample_test`); probes are trained on three quarters of them and tested on the rest,
    split by sequence. Entropy is also split into loss-bearing queries and the rest.

    Args:
        run_dir: a run trained with snapshots.
        n_sequences: held-out sequences measured.
        device: where the snapshots run.
        quiet: no progress bars.

    Returns:
        A `DynamicsResult`: the tables and figures.
    """
    run_dir = Path(run_dir)
    snapshots = list_snapshots(run_dir)
    if not snapshots:
        raise ValueError(f"{run_dir} has no snapshots; train it with train(..., snapshots=K) "
                         "or `poslens dynamics`")
    check_integer("n_sequences", n_sequences, minimum=4)  # probes split by sequence
    task = load_task(run_dir)
    tokens = task.sample_test(n_sequences, seed=0)  # one unbiased draw, the same at every snapshot
    metrics, probes, entropy, patterns = [], [], [], []
    for step, path in tqdm(snapshots, desc="dynamics", disable=quiet):
        model = load(path, device=device)
        common = {"variant": model.cfg.name, "seed": model.cfg.seed, "step": step}
        metrics.append({**common, **evaluate(model, task, tokens)})
        table = probe_table({model.cfg.name: [model]}, task, n_sequences=n_sequences,
                            controls=("token_identity", "chance"), quiet=True)
        probes.append(table.assign(step=step))
        heads, pattern = attention_summary(model, tokens[:, :-1], loss_queries=loss_queries(task))
        entropy.append(heads.assign(**common))
        patterns.append(pattern)
    causal = model.cfg.attention_dir == "causal"
    uniform = uniform_entropy_reference(task.seq_len - 1, causal)
    entropy_table = pd.concat(entropy, ignore_index=True).assign(uniform_nats=uniform)
    return DynamicsResult(
        run_dir=run_dir, steps=[step for step, _ in snapshots],
        metrics=pd.DataFrame(metrics, columns=list(METRIC_COLUMNS)),
        probes=pd.concat(probes, ignore_index=True)[list(PROBE_STEP_COLUMNS)],
        entropy=entropy_table[[*ENTROPY_COLUMNS, *ENTROPY_SPLIT_COLUMNS]], patterns=torch.stack(patterns),
        uniform_nats=uniform)


ANALYSIS_VERSION = 1
"""Bumped whenever a per-run measure changes, so runs measured before are measured again."""


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
    cfg = variant_config(variant, task=task, **{**model, **sizes, "seed": seed, "device": device})
    return cfg, {**settings, **({} if steps is None else {"steps": steps}), "seed": seed}


def _task(name: str) -> Task:
    """The task of a dynamics run: addition as it is; markov with a loss on every drawn token
    (`MARKOV_TASK`: with the last token alone the 2-layer model did not learn in budget)."""
    if name not in DYNAMICS_TASKS:
        raise ValueError(f"unknown task {name!r}; allowed: {list(DYNAMICS_TASKS)}")
    return make_task(name, **(MARKOV_TASK if name == "markov" else {}))


def dynamics_run(run_dir: str, variant: str, task: str, seed: int, checkpoints: int, steps: int | None,
                 n_layers: int | None, d_model: int | None, n_sequences: int, lr_schedule: str = "cosine",
                 device: str = "cpu", force: bool = False) -> dict[str, pd.DataFrame | Tensor]:
    """One unit of `write_dynamics`: train `variant` on `task` into `run_dir` with step 0 and
    `checkpoints` log-spaced snapshots (resuming a killed run), then `training_dynamics` it
    (and, on markov, `induction_analysis` of the final model). Tables `metrics`, `probes`,
    `entropy` (and `induction_*`), each with `seed` and the run's label as `variant` (the variant,
    `...@constant-lr` under the constant learning-rate schedule), and the tensor `patterns`;
    cached in `run_dir/measures/`."""
    task_obj = _task(task)
    cfg, settings = _run_config(variant, task_obj, steps=steps, n_layers=n_layers, d_model=d_model, seed=seed,
                                device=device)
    trained = train(cfg, task_obj, out_dir=run_dir, resume=True, quiet=True, snapshots=checkpoints,
                    lr_schedule=lr_schedule, **settings)
    label = _label(variant, lr_schedule)

    def measure() -> dict[str, pd.DataFrame | Tensor]:
        result = training_dynamics(run_dir, n_sequences=n_sequences, device=device, quiet=True)
        found = {"metrics": result.metrics, "probes": result.probes, "entropy": result.entropy}
        if task == "markov":
            report = induction_analysis(trained.model, task_obj, n_sequences=n_sequences)
            found |= {f"induction_{name}": table.assign(seed=seed) for name, table in report.tables.items()}
        return {name: table.assign(variant=label) for name, table in found.items()} | {"patterns": result.patterns}

    stamp = {"n_sequences": n_sequences, "version": ANALYSIS_VERSION}
    return cached_results(Path(run_dir) / "measures", stamp, measure, weights=run_dir, force=force)


def _label(variant: str, lr_schedule: str) -> str:
    return variant if lr_schedule == "cosine" else f"{variant}{CONSTANT_LR}"


def write_dynamics(out_dir: str | Path, *, variants: Sequence[str], task: str, seeds: Sequence[int] = (0,),
                   checkpoints: int = 12, steps: int | None = None, n_layers: int | None = None,
                   d_model: int | None = None, n_sequences: int | None = None, constant_lr_control: bool = False,
                   device: str = "cpu", quiet: bool = False, force: bool = False,
                   **executor_options: Any) -> dict[str, pd.DataFrame]:
    """`poslens dynamics`: one `dynamics_run` per (variant, seed), each a unit of the study
    (`analyses.study.run_study`), into `out_dir/runs/<variant>-seed<k>/`.

    With `constant_lr_control`, the same runs again under a constant learning rate
    (`<variant>@constant-lr`), so a rebound of attention entropy cannot be the cosine decay's
    doing. Then the merged tables (`out_dir/tables/*.{csv,md,json}`: metrics, probes, entropy,
    rebound, decodable, claims (`analyses.claims.rebound_claims`), and induction_* on markov),
    one set of figures per run label (`out_dir/figures/`, averaged over seeds; attention
    patterns of the first seed), `out_dir/report.html` and `out_dir/summary.md`. Like every
    study this resumes: a rerun trains and measures only what is missing and writes the merged
    outputs anew; `force` measures every run again (trained runs are always kept and resumed).

    Args:
        out_dir: the study's folder.
        variants: variant names (`variants.variant_config`), distinct.
        task: `addition` or `markov`.
        seeds: training seeds, distinct.
        checkpoints: log-spaced snapshots besides step 0.
        steps: optimiser steps (None: the task's default).
        n_layers: blocks (None: the task's default).
        d_model: width (None: the task's default).
        n_sequences: held-out sequences measured (None: `DYNAMICS_SEQUENCES[task]`).
        constant_lr_control: also train every run under a constant learning rate.
        device: where units run.
        quiet: no progress bar.
        force: measure every run again.
        **executor_options: `analyses.executors.run_units` settings.

    Returns:
        Every committed table by name.
    """
    task_obj = _task(task)
    if isinstance(checkpoints, bool) or not isinstance(checkpoints, int) or checkpoints < 1:
        raise ValueError(f"checkpoints must be an integer >= 1 (log-spaced snapshots besides step 0), "
                         f"got {checkpoints!r}")
    variants, seeds = check_runs(variants, seeds)
    for variant in variants:  # bad settings are refused here, before any unit starts
        _, train_settings = _run_config(variant, task_obj, steps=steps, n_layers=n_layers, d_model=d_model,
                                        seed=seeds[0], device=device)
        total = TrainSettings(**train_settings).steps
        if checkpoints > total:
            raise ValueError(f"checkpoints must be at most the {total} training steps (each snapshot is a distinct "
                             f"step), got {checkpoints}")
        snapshot_schedule(checkpoints, total)
    out_dir = Path(out_dir)
    n_sequences = DYNAMICS_SEQUENCES[task] if n_sequences is None else check_integer("n_sequences", n_sequences,
                                                                                      minimum=4)
    settings = {"task": task, "checkpoints": checkpoints, "steps": steps, "n_layers": n_layers, "d_model": d_model,
                "n_sequences": n_sequences, "device": device, "force": force}
    schedules = ("cosine", "constant") if constant_lr_control else ("cosine",)
    units = [Unit(f"{_label(variant, schedule)}-seed{seed}", dynamics_run,
                  {"run_dir": str(out_dir / "runs" / f"{_label(variant, schedule)}-seed{seed}"), "variant": variant,
                   "seed": seed, "lr_schedule": schedule, **settings})
             for variant in variants for schedule in schedules for seed in seeds]
    labels = [_label(variant, schedule) for variant in variants for schedule in schedules]
    cfg, train_settings = _run_config(variants[0], task_obj, steps=steps, n_layers=n_layers, d_model=d_model,
                                      seed=seeds[0], device=device)
    meta = (f"{cfg.n_layers} blocks, d_model {cfg.d_model}, {cfg.n_heads} heads; {train_settings['steps']} steps, "
            f"batch {train_settings['batch_size']}; seeds {seeds}; {n_sequences} held-out sequences measured at "
            f"every snapshot.")
    study = Study("dynamics", f"poslens dynamics: {', '.join(variants)} on {task}", meta, units, derive=_derive,
                  figures=partial(_figures, labels=labels, first_seed=seeds[0]), sections=_sections,
                  formats=TABLE_FORMATS)
    return run_study(out_dir, study, quiet=quiet, **executor_options)


def _derive(merged: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """The rebound and decodability tables of every run, and the claims computed from the rebound."""
    rebound = entropy_rebound(merged["entropy"])
    return {"rebound": rebound, "decodable": decodable_steps(merged["probes"]), "claims": rebound_claims(rebound)}


def _figures(committed: Committed, labels: list[str], first_seed: int) -> dict[str, go.Figure]:
    """Each run label's curves (the mean over its seeds) and its first seed's attention patterns
    (and, on markov, its induction figures)."""
    figures = {}
    for variant in labels:
        own = {name: table[table["variant"] == variant] for name, table in committed.tables.items()
               if "variant" in table}
        steps = sorted(own["metrics"]["step"].unique().tolist())
        found = {"training_curves": training_curves_figure(own["metrics"]),
                 "probe_accuracy": probe_dynamics_figure(own["probes"]),
                 "attention_entropy": entropy_figure(own["entropy"]),
                 "attention_entropy_split": entropy_split_figure(own["entropy"]),
                 "attention_patterns": attention_pattern_figure(
                     committed.tensors[f"{variant}-seed{first_seed}"]["patterns"], steps)}
        first = {name.removeprefix("induction_"): table[table["seed"] == first_seed].reset_index(drop=True)
                 for name, table in own.items() if name.startswith("induction_")}
        if first:
            found |= {f"induction_{name}": figure for name, figure in induction_figures(first).items()}
        figures |= {f"{name}_{file_name(variant)}": figure for name, figure in found.items()}
    return figures


def _sections(committed: Committed, figures: dict[str, go.Figure]) -> list[Section]:
    """The report: the claims, the final metrics, the entropy rebound, decodability (and the
    induction analysis on markov); each run label's figures under the claims."""
    tables = committed.tables
    metrics = tables["metrics"]
    final = metrics[metrics["step"] == metrics["step"].max()]
    uniform = tables["entropy"]["uniform_nats"].iloc[0]
    sections = [
        Section("Claims: does attention entropy dip, then rebound (JoMA)?", howto="computed from the rebound table "
                "by the rule of docs/measures.md; runs labelled `@constant-lr` are the control under a constant "
                "learning rate.", figures=list(figures.values()),
                table=tables["claims"][["claim", "statistic", "value", "n", "p", "verdict"]]),
        Section("Final held-out metrics", howto=f"snapshots at steps {sorted(metrics['step'].unique().tolist())}; "
                "the last one's loss and accuracy.", table=final.drop(columns=["step"]),
                details={"metrics, every snapshot": metrics}),
        Section("Attention entropy: minimum and rebound per layer (mean over heads)",
                howto=f"JoMA's measure in nats (uniform attention: {uniform:.3f} nats) and normalised by ln(visible "
                      "keys) (uniform: 1).", table=tables["rebound"]),
        Section("First step at which position is decodable (probe ≥ token identity + margin; NaN: never)",
                table=tables["decodable"]),
    ]
    if "induction_icl_loss" in tables:
        loss = tables["induction_icl_loss"]
        sections.append(Section("Induction analysis of the final models",
                                table=loss[loss["predictor"].isin(["model", "bayes_posterior"])]))
    return sections
