"""Linear probes at every residual site, with the controls that keep them honest.

For each model the sequences are split *by sequence* into probe-train and probe-test parts,
the residual stream is captured at every site, and one batched `PositionProbe` per target is
fitted over all sites at once. Targets: `position` (always) and `role` (a task's
`role_labels(tokens)`: the role id of each token, e.g. `x2` or `=` in addition; for a fixed
format it equals the position). Beside each accuracy the tables carry:

- `random_init`: the same architecture, untrained (`variants.hub.fresh_twin`): what the
  architecture alone gives;
- `token_identity`: a probe that sees only the token's id (fixed formats like `ddd+ddd=`
  leak position through the token: `+` and `=` reveal their own place; so does BOS);
- `bag_of_prefix` (position target): a probe that sees the token's id and the share of each
  token type in its prefix (`probes.bag_of_prefix_features`), what one causal NoPE layer can
  compute from content alone: the bar for "position beyond content";
- `<target>_control` / `selectivity`: the Hewitt & Liang control task, labels reassigned at
  random but consistently per token type; selectivity = accuracy − control accuracy;
- `chance`: the majority-class rate, and the random-guess MAD (T² − 1) / (3T).

`run_probe_sweep` returns a `ProbeSweep` of three tidy tables (`probe_table` returns the first alone):

- `table`: one row per (variant, seed, site, probe, metric, baseline), the schema
  `analyses.tables.PROBE_COLUMNS` (what `probe_table` returns);
- `by_position`: the same measurements on the test tokens of each position,
  `PROBE_POSITION_COLUMNS` = (variant, seed, site, layer, probe, position, metric, value,
  baseline), one row per (variant, seed, site, probe, position, metric, baseline); metrics
  `accuracy` (and `mad` for the position probe) of the trained and `random_init` probes and of
  the `token_identity` and `chance` baselines (here chance is a guess drawn from the training
  labels' distribution: 1/T and Σ_j |j − t| / T for positions; averaged over positions these
  are the per-site chance rows), so that Haviv et al.'s "sharp early, fuzzier late" can be
  read off a curve;
- `models`: the metadata of every model probed (`analyses.measures.discovery.MODEL_COLUMNS`:
  the positional encoding detected per layer, and whether each block has a `resid_mid` site).

`ProbeSweep.export(path)` writes them as `path`, `<stem>.by_position<suffix>` and
`<stem>.models<suffix>`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens.model_protocol import TransformerLensModel

from poslens.analyses.measures.discovery import model_info
from poslens.analyses.tables import PROBE_COLUMNS, PROBE_DTYPES, check_writable, export_table, site_layer
from poslens.hooks import capture_residuals
from poslens.probes import (
    PositionProbe,
    RidgePositionProbe,
    bag_of_prefix_predictions,
    chance_accuracy,
    control_labels,
    random_guess_mad,
    selectivity,
    split_by_sequence,
    token_identity_predictions,
)
from poslens.variants.deprecation import renamed_attributes
from poslens.variants.hub import fresh_twin
from poslens.variants.threads import uses_threads
from poslens.variants.training import Task

CONTROLS = ("random_init", "token_identity", "bag_of_prefix", "control_task", "chance")
TARGETS = ("position", "role")
PROBE_POSITION_COLUMNS: tuple[str, ...] = ("variant", "seed", "site", "layer", "probe", "position", "metric", "value",
                                           "baseline")
PROBE_POSITION_DTYPES: dict[str, str] = {**PROBE_DTYPES, "position": "int64"}
SIDECARS = ("by_position", "models")


@dataclass
class ProbeSweep:
    """The three tables of a probe sweep (`run_probe_sweep`; see the module docstring)."""

    table: pd.DataFrame
    by_position: pd.DataFrame
    models: pd.DataFrame

    def export(self, path: str | Path, *, overwrite: bool = False) -> list[Path]:
        """Write `table` to `path` and the other two beside it (`sidecar_paths`), in `path`'s format;
        refuses, before writing any, if one exists and not `overwrite`."""
        paths = [Path(path), *sidecar_paths(path).values()]
        for target in paths:
            check_writable(target, overwrite=overwrite)
        return [export_table(frame, target, overwrite=overwrite)
                for frame, target in zip((self.table, self.by_position, self.models), paths)]


def sidecar_paths(path: str | Path) -> dict[str, Path]:
    """Where `ProbeSweep.export(path)` writes the by-position and models tables."""
    path = Path(path)
    return {name: path.with_name(f"{path.stem}.{name}{path.suffix}") for name in SIDECARS}


@uses_threads
def run_probe_sweep(models_by_variant: Mapping[str, Sequence[TransformerLensModel]], data: Task | Tensor, *,
                    n_sequences: int | None = None, targets: Sequence[str] = ("position",),
                    sites: Sequence[str] | None = None, test_fraction: float = 0.25, seed: int = 0, C: float = 1.0,
                    controls: Sequence[str] = CONTROLS, activation_dtype: torch.dtype | None = None,
                    batch_size: int | None = None, quiet: bool = False) -> ProbeSweep:
    """Probe every model on `data`: a task (its held-out sequences, and its role labels if it has
    them) or a `[sequence, position]` token tensor (e.g. `sequences.text_sequences`).

    `models_by_variant` maps a name to its models (one per training seed; the seed column is a
    poslens model's `cfg.seed`, 0 for others). A task's held-out sequences (all, or a sample of
    `n_sequences` drawn with `seed`) or a tensor's first `n_sequences` are split by sequence with
    `seed`. A `role` target on data without role labels is skipped with a warning.
    Activations are kept in `activation_dtype` (default the model's; `torch.float16` halves the
    memory) and captured `batch_size` sequences at a time (`hooks.capture_residuals`).
    `threads=N` pins torch to N threads (default: the policy of `variants.threads`).

    Args:
        models_by_variant: variant name → its models (one per seed).
        data: a task or a `[sequence, position]` token tensor.
        n_sequences: sequences used; default all.
        targets: what to probe: `position`, `role`.
        sites: the residual sites; default all.
        test_fraction: the share of sequences held out from the probes' training.
        seed: draws the sample and the split.
        C: the probes' inverse L2 strength.
        controls: the baselines computed (`CONTROLS`).
        activation_dtype: the captured activations' precision.
        batch_size: sequences per forward pass.
        quiet: no progress bars.

    Returns:
        A `ProbeSweep`: `.table`, `.by_position`, `.models` and `.export(path)`.
    """
    _check_choices("controls", controls, CONTROLS)
    _check_choices("targets", targets, TARGETS)
    if not models_by_variant or not all(models_by_variant.values()):
        raise ValueError("a probe sweep needs at least one model for every variant")
    tokens, labels = _labels(data, n_sequences, targets, seed)
    if len(tokens) < 4:
        raise ValueError(f"need at least 4 sequences to split by sequence, got {len(tokens)}")
    split = split_by_sequence(len(tokens), test_fraction=test_fraction, seed=seed)
    site_baselines, position_baselines = [], []
    for target, label in labels.items():
        per_site, per_position = _task_baselines(tokens, label, target, split, controls, C, labels.get("role"))
        site_baselines += per_site
        position_baselines += per_position
    records, by_position, infos = [], [], []
    jobs = [(variant, model) for variant, models in models_by_variant.items() for model in models]
    options = {"sites": sites, "C": C, "seed": seed, "dtype": activation_dtype, "batch_size": batch_size}
    for variant, model in tqdm(jobs, desc="probe sweep", disable=quiet):
        common = {"variant": variant, "seed": int(getattr(model.cfg, "seed", None) or 0)}
        infos.append(model_info(model, variant=variant, seed=common["seed"]))
        rows, position_rows = probe_model(model, tokens, labels, split, control="control_task" in controls, **options)
        records += [{**common, **row, "baseline": "trained"} for row in rows]
        by_position += [{**common, **row, "baseline": "trained"} for row in position_rows]
        if "random_init" in controls:
            rows, position_rows = probe_model(fresh_twin(model), tokens, labels, split, control=False, **options)
            records += [{**common, **row, "baseline": "random_init"} for row in rows if row["probe"] in labels]
            by_position += [{**common, **row, "baseline": "random_init"} for row in position_rows]
        site_names = list(dict.fromkeys(row["site"] for row in rows))
        records += [{**common, "site": site, **row} for row in site_baselines for site in site_names]
        by_position += [{**common, "site": site, **row} for row in position_baselines for site in site_names]
    return ProbeSweep(_tidy(records, PROBE_COLUMNS, PROBE_DTYPES),
                      _tidy(by_position, PROBE_POSITION_COLUMNS, PROBE_POSITION_DTYPES),
                      pd.concat(infos, ignore_index=True))


def probe_table(models_by_variant: Mapping[str, Sequence[TransformerLensModel]], task: Task, *,
                n_sequences: int = 1000, **options) -> pd.DataFrame:
    """The tidy probe table (schema `analyses.tables.PROBE_COLUMNS`) for every model, on an
    unbiased sample of `n_sequences` of the task's held-out sequences: `run_probe_sweep(...).table`
    (same options).

    Args:
        models_by_variant: variant name → its models (one per seed).
        task: the task whose held-out sequences are probed.
        n_sequences: how many held-out sequences to sample.
        **options (Any): any other option of `run_probe_sweep`.

    Returns:
        The tidy probe table.
    """
    return run_probe_sweep(models_by_variant, task, n_sequences=n_sequences, **options).table


__getattr__ = renamed_attributes(__name__, {"probe_sweep": "probe_table", "sweep_probes": "run_probe_sweep"})


def probe_model(model: TransformerLensModel, tokens: Int[Tensor, "seq pos"], labels: Mapping[str, Tensor],
                split: tuple[Tensor, Tensor], *, sites: Sequence[str] | None = None, C: float = 1.0,
                control: bool = True, seed: int = 0, dtype: torch.dtype | None = None,
                batch_size: int | None = None) -> tuple[list[dict], list[dict]]:
    """Rows (site, probe, metric, value) of the probes of every target in `labels` (each
    `[seq, pos]`) on `model`'s residual stream, and the same per position: classification
    accuracy (and for position MAD, ridge R² and MAE) and, with `control`, the control-task
    accuracy and selectivity (control labels drawn with `seed`)."""
    train_seq, test_seq = split
    order, n_train = torch.cat([train_seq, test_seq]), len(train_seq)
    capture = capture_residuals(model, tokens[order], sites=list(sites) if sites else None, batch_size=batch_size,
                                dtype=dtype)
    acts = capture.activations  # sequences in `order`, so train and test tokens are views, not copies
    X_train, X_test = acts[:, :n_train].flatten(1, 2), acts[:, n_train:].flatten(1, 2)
    metrics, per_position = {}, {}
    for target, label in labels.items():
        y_train, y_test = label[order][:n_train].flatten(), label[order][n_train:].flatten()
        predicted = PositionProbe(C=C).fit(X_train, y_train).predict(X_test)
        correct = (predicted == y_test).double()
        metrics[(target, "accuracy")] = correct.mean(-1)
        per_position[(target, "accuracy")] = _by_position(correct, len(test_seq))
        if target == "position":
            error = (predicted - y_test).abs().double()
            metrics[(target, "mad")] = error.mean(-1)
            per_position[(target, "mad")] = _by_position(error, len(test_seq))
            ridge = RidgePositionProbe().fit(X_train, y_train)
            metrics[("position_ridge", "r2")] = ridge.score(X_test, y_test)
            metrics[("position_ridge", "mae")] = ridge.mae(X_test, y_test)
        if control:
            shuffled = control_labels(tokens, label, seed=seed)[order]
            control_accuracy = PositionProbe(C=C).fit(X_train, shuffled[:n_train].flatten()).score(
                X_test, shuffled[n_train:].flatten())
            metrics[(f"{target}_control", "accuracy")] = control_accuracy
            metrics[(target, "selectivity")] = selectivity(metrics[(target, "accuracy")], control_accuracy)
    rows = [{"site": site, "probe": probe, "metric": metric, "value": float(values[index])}
            for (probe, metric), values in metrics.items() for index, site in enumerate(capture.sites)]
    position_rows = [{"site": site, "probe": probe, "position": position, "metric": metric,
                      "value": float(values[index, position])}
                     for (probe, metric), values in per_position.items() for index, site in enumerate(capture.sites)
                     for position in range(values.shape[1])]
    return rows, position_rows


def _labels(data: Task | Tensor, n_sequences: int | None, targets: Sequence[str],
            seed: int) -> tuple[Tensor, dict[str, Tensor]]:
    """The tokens and `{target: [seq, pos] labels}` the sweep probes: a token tensor's first
    `n_sequences`; a task's whole held-out set, or an unbiased sample of `n_sequences` of it
    drawn with `seed` (`task.sample_test`)."""
    if isinstance(data, Tensor):
        tokens = data[:n_sequences]
    else:
        tokens = data.test_set() if n_sequences is None else data.sample_test(n_sequences, seed=seed)
    labels = {"position": torch.arange(tokens.shape[1]).expand_as(tokens)}
    if "role" in targets:
        if hasattr(data, "role_labels"):
            labels["role"] = torch.as_tensor(data.role_labels(tokens), dtype=torch.long)
        else:
            warnings.warn(f"{getattr(data, 'name', 'these tokens')} have no role labels (a task's role_labels); "
                          "probing position only", UserWarning, stacklevel=3)
    return tokens, labels


def _task_baselines(tokens: Tensor, label: Tensor, target: str, split: tuple[Tensor, Tensor],
                    controls: Sequence[str], C: float, roles: Tensor | None = None) -> tuple[list[dict], list[dict]]:
    """Rows of the bars that depend only on the tokens, not on any model: per site and per position.
    With `roles` (a task's role labels), the position target also gets the `role_identity` bar: a
    probe that sees only each token's role, which a position probe must beat on a format where
    position and role come apart."""
    per_site, per_position, (train_seq, test_seq) = [], [], split
    n_positions = tokens.shape[1]
    identities = {"token_identity": tokens}
    if roles is not None and target == "position":  # what knowing each token's role alone says of its position
        identities["role_identity"] = roles
    for baseline, identity in identities.items() if "token_identity" in controls else ():
        predicted = token_identity_predictions(identity, label, train_seq, test_seq, C=C)[None]
        truth = label[test_seq].flatten()
        values = {"accuracy": (predicted == truth).double()}
        if target == "position":
            values["mad"] = (predicted - truth).abs().double()
        site_rows, position_rows = _bar_rows(values, target, baseline, len(test_seq))
        per_site, per_position = per_site + site_rows, per_position + position_rows
    if "bag_of_prefix" in controls and target == "position":
        predicted = bag_of_prefix_predictions(tokens, label, train_seq, test_seq, C=C)[None]
        truth = label[test_seq].flatten()
        values = {"accuracy": (predicted == truth).double(), "mad": (predicted - truth).abs().double()}
        site_rows, position_rows = _bar_rows(values, target, "bag_of_prefix", len(test_seq))
        per_site, per_position = per_site + site_rows, per_position + position_rows
    if "chance" in controls:
        per_site.append({"probe": target, "metric": "accuracy", "value": chance_accuracy(label), "baseline": "chance"})
        frequency = torch.bincount(label[train_seq].flatten(), minlength=int(label.max()) + 1).double()
        frequency /= frequency.sum()
        per_position += _position_rows(target, "accuracy", frequency[label[test_seq]].mean(0), "chance")
        if target == "position":
            per_site.append({"probe": target, "metric": "mad", "value": random_guess_mad(n_positions),
                             "baseline": "chance"})
            positions = torch.arange(n_positions, dtype=torch.float64)
            guess_error = (positions[:, None] - positions[None]).abs() @ frequency[:n_positions]
            per_position += _position_rows(target, "mad", guess_error, "chance")
    return per_site, per_position


def _bar_rows(values: dict[str, Tensor], target: str, baseline: str, n_test: int) -> tuple[list[dict], list[dict]]:
    """The per-site and per-position rows of one bar, from its per-token `values` per metric."""
    per_site = [{"probe": target, "metric": metric, "value": value.mean().item(), "baseline": baseline}
                for metric, value in values.items()]
    per_position = [row for metric, value in values.items()
                    for row in _position_rows(target, metric, _by_position(value, n_test)[0], baseline)]
    return per_site, per_position


def _position_rows(target: str, metric: str, values: Tensor, baseline: str) -> list[dict]:
    return [{"probe": target, "position": position, "metric": metric, "value": float(value), "baseline": baseline}
            for position, value in enumerate(values)]


def _by_position(values: Tensor, n_sequences: int) -> Tensor:
    """`[site, sequence·position]` per-token values → their mean per position, `[site, position]`."""
    return values.view(values.shape[0], n_sequences, -1).mean(1)


def _tidy(records: list[dict], columns: tuple[str, ...], dtypes: dict[str, str]) -> pd.DataFrame:
    table = pd.DataFrame.from_records(records)
    table["layer"] = table["site"].map(site_layer)
    return table[list(columns)].astype(dtypes)


def _check_choices(name: str, given: Sequence[str], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ValueError(f"unknown {name} {unknown}; allowed: {list(allowed)}")
