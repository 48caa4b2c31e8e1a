"""Linear position probes at every residual site, with the controls that keep them honest.

For each model the held-out sequences are split *by sequence* into probe-train and probe-test
halves, the residual stream is captured at every site, and one batched `PositionProbe` per
target is fitted over all sites at once. Beside each accuracy the table carries:

- `random_init`: the same architecture and seed, untrained (what architecture alone gives);
- `token_identity`: a probe on the one-hot token (fixed formats like `ddd+ddd=` leak
  position through the token: `+` and `=` reveal their own place);
- `position_control` / `selectivity`: the Hewitt & Liang control task, positions
  reassigned at random but consistently per token type; selectivity = accuracy − control;
- `chance`: the majority-class rate, and the random-guess MAD (T² − 1) / (3T).

The result is a tidy table in the schema of `analyses.tables` (one row per variant, seed,
site, probe, metric and baseline), ready for `wide_table`, `export_table` and
`probe_accuracy_figure`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd
import torch
from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm

from poslens.analyses.tables import PROBE_COLUMNS, PROBE_DTYPES, site_layer
from poslens.hooks import capture_residuals
from poslens.probes import (
    PositionProbe,
    RidgePositionProbe,
    chance_accuracy,
    control_labels,
    flatten_tokens,
    random_guess_mad,
    selectivity,
    split_by_sequence,
    token_identity_baseline,
)
from poslens.variants import HookedTransformer, build
from poslens.variants.training import Task

CONTROLS = ("random_init", "token_identity", "control_task", "chance")


def probe_sites(model: HookedTransformer, tokens: Int[Tensor, "seq pos"], *, sites: Sequence[str] | None = None,
                test_fraction: float = 0.25, seed: int = 0, C: float = 1.0, control: bool = True) -> list[dict]:
    """Rows (site, probe, metric, value) of position probes on `model`'s residual stream:
    classification accuracy and MAD, ridge R² and MAE, and (with `control`) the control-task
    accuracy and selectivity."""
    train_seq, test_seq = split_by_sequence(len(tokens), test_fraction=test_fraction, seed=seed)
    capture = capture_residuals(model, tokens, sites=list(sites) if sites else None)
    acts = capture.activations.float()
    (X_train, y_train), (X_test, y_test) = flatten_tokens(acts, train_seq), flatten_tokens(acts, test_seq)
    predicted = PositionProbe(C=C).fit(X_train, y_train).predict(X_test)
    accuracy = (predicted == y_test).double().mean(-1)
    mad = (predicted - y_test).abs().double().mean(-1)
    ridge = RidgePositionProbe().fit(X_train, y_train)
    r2, mae = ridge.score(X_test, y_test), ridge.mae(X_test, y_test)
    metrics = {("position", "accuracy"): accuracy, ("position", "mad"): mad,
               ("position_ridge", "r2"): r2, ("position_ridge", "mae"): mae}
    if control:
        shuffled = control_labels(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), seed=seed)
        (_, c_train), (_, c_test) = flatten_tokens(acts, train_seq, shuffled), flatten_tokens(acts, test_seq, shuffled)
        control_accuracy = PositionProbe(C=C).fit(X_train, c_train).score(X_test, c_test)
        metrics[("position_control", "accuracy")] = control_accuracy
        metrics[("position", "selectivity")] = selectivity(accuracy, control_accuracy)
    return [{"site": site, "probe": probe, "metric": metric, "value": float(values[index])}
            for (probe, metric), values in metrics.items() for index, site in enumerate(capture.sites)]


def probe_sweep(models_by_variant: Mapping[str, Sequence[HookedTransformer]], task: Task, *,
                n_sequences: int = 1000, sites: Sequence[str] | None = None, test_fraction: float = 0.25,
                seed: int = 0, C: float = 1.0, controls: Sequence[str] = CONTROLS, quiet: bool = False) -> pd.DataFrame:
    """The tidy probe table (schema `analyses.tables.PROBE_COLUMNS`) for every model.

    `models_by_variant` maps a variant name to its models (one per training seed; the seed
    column is each model's `cfg.seed`). Probes are trained and tested on the task's held-out
    sequences (the first `n_sequences`), split by sequence with `seed`.
    """
    unknown = sorted(set(controls) - set(CONTROLS))
    if unknown:
        raise ValueError(f"unknown controls {unknown}; allowed: {list(CONTROLS)}")
    if not models_by_variant or not all(models_by_variant.values()):
        raise ValueError("probe_sweep needs at least one model for every variant")
    tokens = task.test_set()[:n_sequences]
    if len(tokens) < 4:
        raise ValueError(f"need at least 4 sequences to split by sequence, got {len(tokens)}")
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    train_seq, test_seq = split_by_sequence(len(tokens), test_fraction=test_fraction, seed=seed)
    # Bars that depend only on the tokens, not on any model: (metric, baseline) -> value.
    task_level = {}
    if "token_identity" in controls:
        task_level[("accuracy", "token_identity")] = token_identity_baseline(tokens, positions, train_seq, test_seq, C=C)
    if "chance" in controls:
        task_level[("accuracy", "chance")] = chance_accuracy(positions)
        task_level[("mad", "chance")] = random_guess_mad(tokens.shape[1])
    records = []
    jobs = [(variant, model) for variant, models in models_by_variant.items() for model in models]
    for variant, model in tqdm(jobs, desc="probe sweep", disable=quiet):
        common = {"variant": variant, "seed": model.cfg.seed}
        kwargs = {"sites": sites, "test_fraction": test_fraction, "seed": seed, "C": C}
        trained = probe_sites(model, tokens, control="control_task" in controls, **kwargs)
        records += [{**common, **row, "baseline": "trained"} for row in trained]
        if "random_init" in controls:
            untrained = probe_sites(build(model.cfg), tokens, control=False, **kwargs)
            records += [{**common, **row, "baseline": "random_init"} for row in untrained
                        if row["probe"] == "position"]
        site_names = list(dict.fromkeys(row["site"] for row in trained))
        records += [{**common, "site": site, "probe": "position", "metric": metric, "value": float(value),
                     "baseline": baseline} for (metric, baseline), value in task_level.items() for site in site_names]
    table = pd.DataFrame.from_records(records)
    table["layer"] = table["site"].map(site_layer)
    return table[list(PROBE_COLUMNS)].astype(PROBE_DTYPES)
