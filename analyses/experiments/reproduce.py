"""`poslens reproduce`: the paper's experiment set and the claims around it, end to end.

Trains NoPE-causal with residual cuts none / {0} / {0,1}, learned-PE causal and
NoPE-bidirectional on 3-digit addition, and NoPE-causal and learned-causal again on the
shifted format (where position and role come apart), several seeds each. Every run is measured
on its own seeded, unbiased sample of held-out sums: invariance, position and role probes with
their controls (per site and per position), block structure against its null, position
geometry, residual cuts, activation patching and the position swap with its readout (cells
the architecture fixes marked, not read as evidence). The merged tables go to `tables/`, the
claims table (`analyses.claims`) first in `report.html` and `summary.md`. Each (variant,
format, seed) is one unit of `analyses.executors`; finished runs and their measures are reused.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import torch
from torch import Tensor

from poslens.analyses.claims import missed_criterion, reproduce_claims
from poslens.analyses.executors import Unit
from poslens.analyses.experiments.presets import (
    DEFAULT_PRESET,
    LEARNED_CRITERION,
    MAX_SHIFT,
    PRESETS,
    REPRODUCE_VARIANTS,
    SHIFTED,
    SHIFTED_VARIANTS,
    ReproducePreset,
)
from poslens.analyses.figures.patching import residual_cut_delta_figure
from poslens.analyses.figures.positions import position_edit_figure, position_readout_figure
from poslens.analyses.figures.probes import probe_accuracy_figure, probe_position_figure
from poslens.analyses.figures.reproduce import (
    block_means_figure,
    convergence_figure,
    patching_directions_figure,
    patching_mean_heatmap,
    score_by_site_figure,
    swap_figure,
    swap_readout_figure,
)
from poslens.analyses.measures.correlation import block_means, block_scores, full_correlation
from poslens.analyses.measures.cut_effects import residual_cut_effects
from poslens.analyses.measures.geometry import position_geometry
from poslens.analyses.measures.invariance import permutation_test
from poslens.analyses.measures.patching import activation_patching
from poslens.analyses.measures.patching_directions import GUARD, patching_effects, strongest_cells
from poslens.analyses.measures.positions import position_interventions
from poslens.analyses.measures.probe_sweep import run_probe_sweep
from poslens.analyses.measures.shift import shift_probe
from poslens.analyses.measures.swaps import position_swap, swap_readout
from poslens.analyses.measures.symmetry import symmetry_twins
from poslens.analyses.measures.use import amnesic_probing, subspace_swap
from poslens.analyses.plan import REPRODUCE_PLAN
from poslens.analyses.report import Section
from poslens.analyses.runs import cached_results
from poslens.analyses.stats import ALPHA, RULE
from poslens.analyses.study import Committed, Study, run_study
from poslens.analyses.tables import mean_sd_text, seed_summary, side_by_side, site_layer
from poslens.hooks import capture_residuals
from poslens.tasks import Addition
from poslens.variants import HookedTransformer, TrainResult, build, load, train, variant_config
from poslens.variants.config import check_integer

ANALYSIS_VERSION = 5
"""Bumped whenever a per-run measure changes, so runs measured before are measured again."""
RUN_TABLES = ("training", "curves", "invariance", "probe", "probe_by_position", "correlation", "geometry",
              "variance", "cosine", "residual_cuts", "activation_patching", "position_swap", "swap_readout",
              "symmetry", "shift_probe", "position_task", "position_readout", "amnesic", "subspace_swap",
              "patching_effects")


def reproduce(out_dir: str | Path = "runs/reproduce", *, preset_name: str = DEFAULT_PRESET, seeds: int | None = None,
              force: bool = False, device: str = "cpu", quiet: bool = False,
              **executor_options: Any) -> dict[str, pd.DataFrame]:
    """Run (or resume) the whole experiment into `out_dir`; returns the merged tables and `claims`.

    Every (variant, format, seed) is one unit of the study (`analyses.study.run_study`; `executor_options`
    takes its executor settings): it trains into `out_dir/runs/<variant>-seed<k>/` and measures
    the run there (cached in `measures/`). The driver alone writes the merged `tables/`,
    `figures/`, `summary.md` and `report.html`, anew on every call (the study output rule).

    Args:
        out_dir: the study's folder.
        preset_name: the sizes of models, training and analyses, a key of `presets.PRESETS`
            (default `standard`).
        seeds: training seeds per variant, 0 .. seeds - 1 (default: the preset's; 5 for `standard`).
        force: measure every run again (weights are never deleted).
        device: where units run (`cuda` when Ray hands out GPUs).
        quiet: no progress bar.
        **executor_options: `analyses.executors.run_units` settings.

    Returns:
        Every committed table by name (`RUN_TABLES` and `claims`).
    """
    if preset_name not in PRESETS:
        raise ValueError(f"unknown preset {preset_name!r}; allowed: {sorted(PRESETS)}")
    seeds = PRESETS[preset_name].seeds if seeds is None else seeds
    check_integer("seeds", seeds, minimum=1)
    out_dir = Path(out_dir)
    device = "cuda" if executor_options.get("gpus_per_unit") else device
    studied = [(variant, 0) for variant in REPRODUCE_VARIANTS] + [(variant, MAX_SHIFT) for variant in SHIFTED_VARIANTS]
    units = [Unit(f"{_label(variant, shift)}-seed{seed}", measure_run,
                  {"run_dir": str(out_dir / "runs" / f"{_label(variant, shift)}-seed{seed}"), "variant": variant,
                   "seed": seed, "preset_name": preset_name, "shift": shift, "device": device, "force": force},
                  cost=SHIFTED_COST if shift else 1.0)
             for variant, shift in studied for seed in range(seeds)]
    labels = {unit.name: _label(unit.kwargs["variant"], unit.kwargs["shift"]) for unit in units}
    study = Study("reproduce", f"poslens reproduce ({preset_name} preset, {seeds} seed(s))", _meta(preset_name, seeds),
                  units, derive=lambda tables: {"claims": reproduce_claims(tables)},
                  figures=partial(_figures, labels=labels), sections=_sections,
                  alerts=lambda committed: missed_criterion(committed.tables["training"], LEARNED_CRITERION,
                                                            ("nope-bidirectional",)))
    return run_study(out_dir, study, quiet=quiet, **executor_options)


SHIFTED_COST = 1.4
"""A shifted-format unit's cost against a fixed-format one's (longer sequences: 365 against 255 s of
training at the quick preset), so the executors start them first."""


def _label(variant: str, shift: int) -> str:
    """A variant's name in the tables: `nope-causal`, or `nope-causal@shifted` on the shifted format."""
    return f"{variant}{SHIFTED}" if shift else variant


def _meta(preset_name: str, seeds: int) -> str:
    settings = PRESETS[preset_name]
    return (f"{settings.n_layers} blocks, d_model {settings.d_model}, heads of {settings.d_head}; {settings.steps} "
            f"steps of batch {settings.batch_size} in {settings.precision}; seeds 0..{seeds - 1}; "
            "every run measured on its own seeded "
            f"sample of {settings.n_probe_sequences} held-out sums (patching: {settings.n_patch_sequences}). "
            f"Shifted format: up to {MAX_SHIFT} filler tokens before the operands.")


def measure_run(run_dir: str, variant: str, seed: int, preset_name: str, shift: int = 0, device: str = "cpu",
                force: bool = False) -> dict[str, pd.DataFrame | Tensor]:
    """One unit of `reproduce`: train (or resume) `variant` with `seed` on `Addition(max_shift=shift)`
    into `run_dir`, then measure it (`RUN_TABLES`, each with `variant` and `seed`, and the
    block-means matrices `corr:<site>` the report draws). Cached in `run_dir/measures/`."""
    settings, task = PRESETS[preset_name], Addition(max_shift=shift)
    cfg = variant_config(variant, task=task, seed=seed, device=device, **settings.model)
    result = train(cfg, task, out_dir=run_dir, resume=True, quiet=True, seed=seed, **settings.training)
    stamp = {"preset": preset_name, "shift": shift, "version": ANALYSIS_VERSION}
    return cached_results(Path(run_dir) / "measures", stamp,
                          lambda: measure_trained(result, _label(variant, shift), seed, settings, task),
                          weights=run_dir, force=force)


def measure_trained(result: TrainResult, label: str, seed: int, settings: ReproducePreset,
                    task: Addition) -> dict[str, pd.DataFrame | Tensor]:
    """Every per-run measure of `reproduce` on one trained run (`RUN_TABLES` that apply to its
    format, labelled `label` and `seed`), at `settings`' sample sizes."""
    model, labels = result.model.eval(), {"variant": label, "seed": seed}
    history = pd.DataFrame(result.history)
    sample = task.sample_test(settings.n_probe_sequences, seed=seed)
    targets = ("position", "role") if task.max_shift else ("position",)
    probes = run_probe_sweep({label: [model]}, task, n_sequences=settings.n_probe_sequences, seed=seed, targets=targets,
                          quiet=True)
    found = {"training": _training(history, labels), "probe": probes.table, "probe_by_position": probes.by_position,
             "curves": history[["step", "exact_match", "test_loss"]].assign(**labels),
             **_structure(model, sample, labels, seed)}
    if task.max_shift:  # the interventions swap operand digits of the fixed format
        return found | {"shift_probe": shift_probe(model, task, n_sequences=settings.n_probe_sequences,
                                                   seed=seed).assign(**labels)}
    if label == "nope-causal":  # the symmetry grid's untrained twins, once per seed
        found["symmetry"] = symmetry_twins(task, sizes=settings.model, seed=seed).assign(**labels)
    tables = {
        "invariance": _invariance(model, result.out_dir, task, seed, labels),
        "residual_cuts": residual_cut_effects(model, task, n_sequences=settings.n_probe_sequences, seed=seed),
        "activation_patching": activation_patching(model, task, n_sequences=settings.n_patch_sequences, seed=seed),
        "patching_effects": patching_effects(model, task, n_sequences=settings.n_patch_sequences, seed=seed),
        "position_swap": position_swap(model, task, n_sequences=settings.n_patch_sequences * 2, seed=seed),
        "swap_readout": swap_readout(model, task, n_sequences=settings.n_probe_sequences, seed=seed),
        **position_interventions(model, task, n_sequences=settings.n_probe_sequences, seed=seed),
        "amnesic": amnesic_probing(model, task, n_sequences=min(settings.n_probe_sequences, 256), seed=seed),
        "subspace_swap": subspace_swap(model, task, n_sequences=min(settings.n_patch_sequences, 128), seed=seed),
    }
    return found | {name: table.assign(**labels) for name, table in tables.items()}


def _training(history: pd.DataFrame, labels: dict) -> pd.DataFrame:
    """One row: final exact match and loss, the mean exact match over the evaluations (how fast the
    run learned), the first step at `LEARNED_CRITERION` (NaN: never) and whether it ended there."""
    final = history.iloc[-1]
    reached = history.loc[history["exact_match"] >= LEARNED_CRITERION, "step"]
    return pd.DataFrame([{**labels, "steps": int(final["step"]), "exact_match": final["exact_match"],
                          "test_loss": final["test_loss"], "mean_exact_match": history["exact_match"].mean(),
                          "steps_to_criterion": float(reached.iloc[0]) if len(reached) else float("nan"),
                          "learned": bool(final["exact_match"] >= LEARNED_CRITERION)}])


def _structure(model: HookedTransformer, sample: Tensor, labels: dict, seed: int) -> dict[str, pd.DataFrame | Tensor]:
    """Block scores against their null at every block output and the position geometry at every
    residual site, of the trained model and its untrained twin; the block-means matrices of the
    trained model at every block output."""
    sites = [f"blocks.{block}.hook_resid_post" for block in range(model.cfg.n_layers)]
    correlation, geometry, variance, cosine, matrices = [], [], [], [], {}
    for weights, candidate in (("trained", model), ("random_init", build(model.cfg))):
        capture = capture_residuals(candidate, sample, sites=sites)
        for site in sites:
            correlation.append(block_scores(capture[site], seed=seed).assign(site=site, weights=weights))
            if weights == "trained":
                matrices[f"corr:{site}"] = block_means(full_correlation(capture[site]), model.cfg.d_model).float()
        tables = position_geometry(candidate, sample, seed=seed)
        geometry.append(tables.scores.assign(weights=weights))
        variance.append(tables.variance.assign(weights=weights))
        cosine.append(tables.cosine.assign(weights=weights))
    return {name: pd.concat(parts, ignore_index=True).assign(**labels)
            for name, parts in (("correlation", correlation), ("geometry", geometry), ("variance", variance),
                                ("cosine", cosine))} | matrices


def _invariance(model: HookedTransformer, run_dir: Path, task: Addition, seed: int, labels: dict) -> pd.DataFrame:
    """The symmetry test in float64 on the trained weights, the untrained twin, and (for NoPE-causal)
    a one-layer untrained twin, which the theorem says is still invariant at the last position."""
    prompts = task.sample_test(32, seed=seed)[:, : task.prompt_len]
    double = dataclasses.replace(model.cfg, dtype=torch.float64)
    candidates = {"trained": load(run_dir, dtype=torch.float64), "random": build(double)}
    if labels["variant"] == "nope-causal":
        candidates["random, 1 layer"] = build(dataclasses.replace(double, n_layers=1))
    return pd.concat([permutation_test(candidate, prompts, n_perms=10).assign(weights=weights)
                      for weights, candidate in candidates.items()], ignore_index=True)


# the report ----------------------------------------------------------------------------------------------------------

HOWTO = {
    "claims": "one row per claim, computed from the tables below; " + RULE.format(alpha=ALPHA) + ".",
    "symmetry": "the largest change of the last position's logits over random permutations of the earlier tokens, "
                "in float64; invariant means within float rounding (1e-10).",
    "learning": "exact match = all four answer digits right under greedy decoding, on held-out sums whose "
                "commutative twins were never trained on either.",
    "residual cuts": "Δ exact match when one block's residual connection is removed at inference (0 = no loss).",
    "vertical slices": "block contrast = mean |corr| within a position's own dimensions minus between positions, "
                       "above the same score on shuffled examples (0 = no more than noise).",
    "position probes": "accuracy of a linear probe for the token's position, beside the same probe on the untrained "
                       "twin, on the one-hot token (token identity), on the role alone, and chance.",
    "geometry": "variance slope: log-log slope of the hidden state's variance on position (−1 = Chi et al.'s σ²/t); "
                "adjacency: cosine of neighbours minus cosine of distant positions; each above its "
                "position-shuffled null.",
    "patching": "how much of the clean first answer digit a patch of one (layer, position) restores (1 = all).",
    "patching directions": "denoise: the share of the clean-vs-corrupted logit difference of one answer digit that "
                           "one clean residual vector restores in the corrupted run; noise: the share one corrupted "
                           "vector destroys in the clean run (1 = all, 0 = none); each prompt normalised by its own "
                           f"gap, prompts with a gap under {GUARD:g} × the median left out (n_excluded), BCa 95% "
                           "interval over prompts; the strongest cell not fixed by construction per digit "
                           "(s3 = the carry).",
    "swap": "after exchanging two positions' vectors: does the answer (or a position probe) follow the vectors or "
            "their places?",
    "positions told": "the tokens stay where they are, only the position ids the encoding reads change (shifted by "
                      "k, two swapped, one repeated): exact match, answers unchanged, answers that follow the told "
                      "order; a probe fitted on unedited runs reads the told or the real position (docs/positions.md).",
    "use": "amnesic: Δ answer log-probability and KL from the intact answers when the position probe's subspace "
           "(or a random one of the same rank: placebo) is removed at a site, trained and untrained weights; "
           "subspace swap: how often the answer follows when only the probe subspace of two digits trades places.",
}


def _verdicts(claims: pd.DataFrame, section: str) -> str:
    rows = claims[claims["section"] == section]
    return " ".join(f"[{row.verdict}] {row.claim}: {row.statistic} = {row.value:.3g} (n {row.n}"
                    + ("" if pd.isna(row.p) else f", p {row.p:.2g}") + ")." for row in rows.itertuples())


def _figures(committed: Committed, labels: dict[str, str]) -> dict[str, go.Figure]:
    """Every figure of the report, from the committed tables and the block-means matrices
    (`labels`: each unit's variant label, to average its matrices over seeds)."""
    tables, probe = committed.tables, committed.tables["probe"]
    fixed = ~probe["variant"].str.endswith(SHIFTED)
    matrices = {}
    for variant in ("nope-causal", "nope-causal+cut0", "nope-causal+cut0,1"):
        runs = [tensors for unit, tensors in committed.tensors.items() if labels[unit] == variant]
        sites = sorted((key.removeprefix("corr:") for key in runs[0] if key.startswith("corr:")), key=site_layer)
        matrices[variant] = {site: torch.stack([run[f"corr:{site}"] for run in runs]).mean(0) for site in sites}
    return {
        "convergence": convergence_figure(tables["curves"]),
        "residual_cuts": residual_cut_delta_figure(seed_summary(tables["residual_cuts"], ["variant", "block",
                                                                                           "sublayer"],
                                                                ["delta_exact_match"])),
        "block_contrast": score_by_site_figure(tables["correlation"], "contrast", "block contrast above its "
                                               "null, per block output", "excess mean |corr|"),
        "block_means": block_means_figure(matrices, "mean |corr| between positions' dimensions (mean over seeds)"),
        "probe_accuracy": probe_accuracy_figure(probe[fixed]),
        "probe_by_position": probe_position_figure(tables["probe_by_position"], "nope-causal"),
        "shifted_position": probe_accuracy_figure(probe[~fixed]),
        "shifted_role": probe_accuracy_figure(probe[~fixed], probe="role"),
        "variance_slope": score_by_site_figure(tables["geometry"], "variance_slope", "variance slope above its null",
                                               "excess slope"),
        "adjacency": score_by_site_figure(tables["geometry"], "adjacency", "adjacency above its null", "excess"),
        "patching_nope": patching_mean_heatmap(tables["activation_patching"], "nope-causal"),
        "patching_learned": patching_mean_heatmap(tables["activation_patching"], "learned-causal"),
        "patching_directions": patching_directions_figure(tables["patching_effects"], "nope-causal"),
        "position_swap": swap_figure(tables["position_swap"]),
        "swap_readout": swap_readout_figure(tables["swap_readout"], "nope-causal"),
        "position_edits": position_edit_figure(tables["position_task"]),
        "position_edit_readout": position_readout_figure(tables["position_readout"], "learned-causal"),
    }


def _sections(committed: Committed, figures: dict[str, go.Figure]) -> list[Section]:
    """The report: the claims table, then one section per claim group with its figures, a
    compact table (mean ± sd over seeds) and the long tables folded."""
    tables = committed.tables
    claims, probe = tables["claims"], tables["probe"]
    fixed = ~probe["variant"].str.endswith(SHIFTED)
    training = tables["training"]
    return [
        Section("Claims and verdicts", howto=HOWTO["claims"], table=claims.drop(columns=["rule", "key"])),
        Section(f"Analysis plan, version {REPRODUCE_PLAN.version}", REPRODUCE_PLAN.header(),
                table=REPRODUCE_PLAN.table()),
        Section("Symmetry", _verdicts(claims, "symmetry"), HOWTO["symmetry"],
                table=tables["invariance"].groupby(["variant", "weights", "n_layers"], sort=False).agg(
                    n=("seed", "count"), max_abs_delta=("max_abs_delta", "max"), invariant=("invariant", "all"))
                .reset_index(), details={"invariance, every run": tables["invariance"]}),
        Section("Learning the task", _verdicts(claims, "learning"), HOWTO["learning"], [figures["convergence"]],
                mean_sd_text(training, ["variant"], ["exact_match", "mean_exact_match", "steps_to_criterion"]),
                {"training, every run": training}),
        Section("Residual connections", _verdicts(claims, "residual cuts"), HOWTO["residual cuts"],
                [figures["residual_cuts"]], details={"residual cuts at inference, every run": tables["residual_cuts"]}),
        Section("Vertical slices: block structure", _verdicts(claims, "vertical slices"), HOWTO["vertical slices"],
                [figures["block_contrast"], figures["block_means"]],
                mean_sd_text(tables["correlation"][tables["correlation"]["score"] == "contrast"],
                             ["variant", "site", "weights"], ["excess", "z"]),
                {"block scores, every run": tables["correlation"]}),
        Section("Position probes", _verdicts(claims, "position probes"), HOWTO["position probes"],
                [figures["probe_accuracy"], figures["probe_by_position"], figures["shifted_position"],
                 figures["shifted_role"]], side_by_side(probe[fixed]),
                {"position and role probes, every run": probe, "by position": tables["probe_by_position"]}),
        Section("Geometry of positions", _verdicts(claims, "geometry"), HOWTO["geometry"],
                [figures["variance_slope"], figures["adjacency"]],
                mean_sd_text(tables["geometry"], ["variant", "score", "site", "weights"], ["excess", "z"]),
                {"geometry scores, every run": tables["geometry"]}),
        Section("Activation patching", howto=HOWTO["patching"],
                figures=[figures["patching_nope"], figures["patching_learned"]],
                details={"activation patching, every run": tables["activation_patching"]}),
        Section("Patching in both directions, every answer digit", howto=HOWTO["patching directions"],
                figures=[figures["patching_directions"]], table=strongest_cells(tables["patching_effects"]),
                details={"mean ± sd over seeds, cells not fixed by construction": mean_sd_text(
                    tables["patching_effects"][~tables["patching_effects"]["fixed_by_construction"]],
                    ["variant", "direction", "corruption", "digit", "site", "layer", "position", "role"],
                    ["value", "ci_low", "ci_high"])}),
        Section("Position swap", howto=HOWTO["swap"], figures=[figures["position_swap"], figures["swap_readout"]],
                table=mean_sd_text(tables["position_swap"], ["variant", "site", "fixed_by_construction"],
                                   ["follows_swap", "keeps_original"]),
                details={"swap readout, every run": tables["swap_readout"]}),
        Section("Positions told", howto=HOWTO["positions told"],
                figures=[figures["position_edits"], figures["position_edit_readout"]],
                table=mean_sd_text(tables["position_task"], ["variant", "edit", "fixed_by_construction"],
                                   ["exact_match", "keeps_answer", "follows_told"]),
                details={"position-id readout, every run": tables["position_readout"]}),
        Section("Evidence of use: removing and swapping the position subspace", howto=HOWTO["use"],
                table=mean_sd_text(tables["amnesic"][tables["amnesic"]["condition"] != "intact"],
                                   ["variant", "weights", "site", "condition"], ["delta_answer_logprob", "answer_kl"]),
                details={"amnesic probing, every run": tables["amnesic"],
                         "probe-subspace swap, every run": tables["subspace_swap"]}),
    ]
