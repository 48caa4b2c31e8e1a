"""The `poslens` command: each subcommand is a thin wrapper over a function you can call."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch

from poslens.analyses.executors import EXECUTORS, UnitsFailed, check_executor
from poslens.analyses.experiments.dynamics import write_dynamics
from poslens.analyses.experiments.induction import write_induction
from poslens.analyses.experiments.patch import ALIGN_RULES, pairs_table, read_pairs, task_table, write_patching
from poslens.analyses.experiments.positions import position_study
from poslens.analyses.experiments.presets import DEFAULT_PRESET, DYNAMICS_TASKS, MARKOV_VARIANT, PRESETS
from poslens.analyses.experiments.reproduce import reproduce
from poslens.analyses.figures import check_html_path, file_name, write_figure
from poslens.analyses.figures.probes import probe_accuracy_figure, probe_position_figure
from poslens.analyses.measures.discovery import describe, layer_sites, model_info, site_note
from poslens.analyses.measures.invariance import invariance_table
from poslens.analyses.measures.patching import METHODS, SITES
from poslens.analyses.measures.probe_sweep import CONTROLS, TARGETS, run_probe_sweep, sidecar_paths
from poslens.analyses.measures.sequences import random_sequences, read_text, text_sequences
from poslens.analyses.report import compact
from poslens.analyses.runs import load_models_by_variant, load_task
from poslens.analyses.tables import EXPORT_SUFFIXES, check_writable, render_table, side_by_side
from poslens.demos.discovery import DEFAULT_MODEL_DIR, default_model, demo_models, discover_models
from poslens.demos.lm_panels import DEFAULT_SEQUENCES, MAX_PROMPT_TOKENS, load_lm_demo
from poslens.demos.static import write_static_page
from poslens.tasks import TASKS, make_task
from poslens.variants import HookedTransformer, TrainSettings, load_any, train, variant_config
from poslens.variants.checkpoint import restamp
from poslens.variants.config import DTYPES, MAX_SEED, check_device, check_integer, check_number
from poslens.variants.hub import load_tokenizer, model_name
from poslens.variants.locking import DirectoryLocked
from poslens.variants.processes import Stopped, stop_on_signals
from poslens.variants.threads import torch_threads, usable_cores
from poslens.variants.training import MAX_LR, PRECISIONS, restamp_run

MODEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MAX_LEN = 128  # tokens per text / random sequence when --max-len is not given
DEFAULT_MODEL_SEQUENCES = 200  # sequences of text / random tokens when --sequences is not given


def _train(args: argparse.Namespace) -> None:
    task = make_task(args.task)
    sizes = {key: value for key, value in (("n_layers", args.layers), ("d_model", args.d_model)) if value is not None}
    cfg = variant_config(args.variant, task=task, seed=args.seed, device=args.device, **sizes)
    settings = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
                "precision": args.precision}
    result = train(cfg, task, out_dir=args.out, resume=args.resume, quiet=args.quiet,
                   **{k: v for k, v in settings.items() if v is not None})
    final = result.history[-1] if result.history else {}
    print(f"{cfg.name} on {task.name}: step {final.get('step')}, exact match {final.get('exact_match')}, "
          f"saved to {result.out_dir}")


def _invariance(args: argparse.Namespace) -> None:
    table = invariance_table(args.variant or [], args.checkpoint or [], n_layers=args.layers,
                             dtype=DTYPES[args.dtype],
                             n_perms=args.perms, seed=args.seed)
    sys.stdout.write(render_table(table, args.format))


def _probe(args: argparse.Namespace) -> None:
    if bool(args.checkpoints) == bool(args.model):
        raise ValueError("give either checkpoint directories or --model SPEC (not both)")
    for path in (args.out, *sidecar_paths(args.out).values()):
        check_writable(path, overwrite=args.overwrite)
    if args.figure:
        check_html_path(args.figure, overwrite=args.overwrite)
    if args.model:
        model = _load_model(args)
        models, (data, n_sequences) = {_display_name(model, args.model): [model]}, _model_data(model, args)
    else:
        if args.text or args.random_tokens:
            raise ValueError("--text and --random-tokens go with --model; checkpoints are probed on their task")
        if _load_options_given(args):
            raise ValueError(f"{', '.join(_load_options_given(args))} go with --model SPEC; checkpoints load on "
                             "--device")
        tasks = {load_task(directory) for directory in args.checkpoints}
        if len(tasks) != 1:
            raise ValueError(f"checkpoints were trained on different tasks ({sorted(map(str, tasks))}); "
                             "probe them separately")
        models, data = load_models_by_variant(args.checkpoints, device=args.device), tasks.pop()
        n_sequences = 1000 if args.sequences is None else args.sequences
    first = next(iter(models.values()))[0]
    sites = args.sites or (layer_sites(first, args.layers) if args.layers else None)
    result = run_probe_sweep(models, data, n_sequences=n_sequences, sites=sites, controls=args.control,
                          targets=args.targets, activation_dtype=torch.float16 if args.float16 else None,
                          quiet=args.quiet)
    paths = result.export(args.out, overwrite=args.overwrite)
    if args.model:
        print(render_table(result.models, "md"), end="")
        _print_note(first)
    print(render_table(side_by_side(result.table), "md"), end="")
    if args.figure:
        paths.append(write_figure(probe_accuracy_figure(result.table), args.figure, overwrite=args.overwrite))
        for variant in models:
            by_position = Path(args.figure).with_name(f"{Path(args.figure).stem}.{file_name(variant)}.by_position.html")
            paths.append(write_figure(probe_position_figure(result.by_position, variant), by_position,
                                      overwrite=args.overwrite))
    print("wrote " + ", ".join(map(str, paths)))


def _model_data(model, args: argparse.Namespace):
    """What `poslens probe --model` probes, and how many sequences of it: a text, random tokens, or a
    poslens run's own task."""
    if args.text or args.random_tokens:
        max_len = min(DEFAULT_MAX_LEN, model.cfg.n_ctx) if args.max_len is None else args.max_len
        n_sequences = DEFAULT_MODEL_SEQUENCES if args.sequences is None else args.sequences
        bos = not args.no_bos
        if args.text:
            return text_sequences(model, read_text(args.text), max_len, bos=bos, max_sequences=n_sequences), None
        return random_sequences(model, n_sequences, max_len, bos=bos, seed=args.seed), None
    if isinstance(model, HookedTransformer) and Path(args.model).is_dir():
        return load_task(args.model), 1000 if args.sequences is None else args.sequences
    raise ValueError(f"say what to probe {args.model} on: --text FILE or --random-tokens")


def _load_model(args: argparse.Namespace):
    """`--model` with its `--tokenizer`, `--device` and `--dtype`, and the loading options."""
    return load_any(args.model, tokenizer=_tokenizer(args), dtype=MODEL_DTYPES[args.dtype], **_load_options(args))


def _load_options(args: argparse.Namespace) -> dict:
    """`--device` (unless `--device-map` or `--n-devices` places the model), `--device-map`, `--n-devices`,
    `--trust-remote-code` and `--allow-pickle`; says so on stdout when code shipped with the model may run."""
    device_map = args.device_map
    if isinstance(device_map, str) and device_map.startswith("{"):
        try:
            device_map = json.loads(device_map)
        except json.JSONDecodeError as error:
            raise ValueError(f"--device-map {args.device_map} is not a JSON object: {error}") from None
    placed = device_map is not None or args.n_devices is not None
    if args.trust_remote_code:
        print(f"note: --trust-remote-code is on: Python code shipped with {args.model} may run")
    return {"device": None if placed else args.device, "device_map": device_map, "n_devices": args.n_devices,
            "trust_remote_code": args.trust_remote_code, "allow_pickle": args.allow_pickle}


def _load_options_given(args: argparse.Namespace) -> list[str]:
    """The `_add_model_load_options` options given on the command line."""
    return [option for option, value in (("--device-map", args.device_map), ("--n-devices", args.n_devices),
                                         ("--trust-remote-code", args.trust_remote_code),
                                         ("--allow-pickle", args.allow_pickle)) if value not in (None, False)]


def _tokenizer(args: argparse.Namespace):
    """`--tokenizer` (a folder or hub id, for AutoTokenizer), or None."""
    return load_tokenizer(args.tokenizer, trust_remote_code=args.trust_remote_code) if args.tokenizer else None


def _add_model_load_options(p: argparse.ArgumentParser) -> None:
    """How a `--model` folder or hub id is loaded and placed (variants.load_any)."""
    p.add_argument("--device-map", help="with --model: how transformers places a large model's layers, e.g. auto, "
                                        "balanced, cpu, or a JSON object such as '{\"\": \"cuda:0\"}' "
                                        "(replaces --device)")
    p.add_argument("--n-devices", type=int, help="with --model: split the model over this many CUDA devices "
                                                 "(replaces --device)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="with --model: let the model run the Python code it ships (its config's auto_map); off "
                        "unless given")
    p.add_argument("--allow-pickle", action="store_true",
                   help="with --model: accept a folder whose only weights are pickle files (pytorch_model.bin), "
                        "read through torch's weights_only loader; off unless given")


def _display_name(model, spec: str) -> str:
    """The variant column of a `--model`: the model's name, or its folder's name for a local folder."""
    name = model_name(model)
    return Path(spec).name if Path(spec).is_dir() and not isinstance(model, HookedTransformer) else name


def _print_note(model) -> None:
    note = site_note(model)
    if note:
        print(f"note: {note}")


def _inspect(args: argparse.Namespace) -> None:
    model = _load_model(args)
    summary = describe(model)
    sites = summary.pop("residual_sites")
    for key, value in summary.items():
        print(f"{key}: {value}")
    print(f"residual sites ({len(sites)}): {', '.join(sites)}")
    _print_note(model)
    print(render_table(model_info(model, variant=_display_name(model, args.model)), "md"), end="")


def _patch(args: argparse.Namespace) -> None:
    if bool(args.checkpoints) == bool(args.model):
        raise ValueError("give either checkpoint directories or --model SPEC (not both)")
    if args.model and not args.pairs:
        raise ValueError("--model needs --pairs FILE (clean<TAB>corrupted prompts, one pair per line)")
    dtype = torch.bfloat16 if args.bfloat16 else None
    options = {"method": args.method, "dtype": dtype, "quiet": args.quiet}
    if args.model:
        model = _load_model(args)
        table, metric = pairs_table(model, read_pairs(args.pairs), sites=args.sites or ["resid_pre"],
                                    align=args.align, **options)
    else:
        models = [load_any(directory, device=args.device) for directory in args.checkpoints]
        if args.pairs:
            results = [pairs_table(model, read_pairs(args.pairs), sites=args.sites or list(SITES), align=args.align,
                                   **options) for model in models]
        else:
            results = [task_table(model, load_task(directory), kind=args.corruption, positions=tuple(args.positions),
                                  n_sequences=args.sequences, seed=args.seed, **options)
                       for model, directory in zip(models, args.checkpoints)]
        table = pd.concat([result[0] for result in results], ignore_index=True)
        metric = ", ".join(dict.fromkeys(result[1] for result in results))
        if args.sites:
            table = table[table["site"].isin(args.sites)].reset_index(drop=True)
    paths = write_patching(table, args.out, title=f"{args.method} patching, {metric}", overwrite=args.overwrite)
    print(f"{args.method} patching, metric: {metric}; {len(table)} cells")
    print("wrote " + ", ".join(map(str, paths)))


def _positions(args: argparse.Namespace) -> None:
    model = _load_model(args)
    data, n_sequences = _model_data(model, args)
    tables = position_study(model, data, args.out, shifts=args.shift or [1], n_sequences=n_sequences or 1000,
                            seed=args.seed, overwrite=args.overwrite)
    print(render_table(tables.get("position_task", tables.get("position_lm")), "md"), end="")
    print(f"wrote {args.out}/tables/ and {args.out}/figures/")


def _dynamics(args: argparse.Namespace) -> None:
    tables = write_dynamics(args.out, variants=args.variant, task=args.task,
                            seeds=range(args.seed, args.seed + args.seeds), checkpoints=args.checkpoints,
                            steps=args.steps, n_layers=args.layers, d_model=args.d_model, n_sequences=args.sequences,
                            constant_lr_control=args.constant_lr_control, device=args.device, quiet=args.quiet,
                            force=args.force, **_executor_options(args))
    print(render_table(compact(tables["claims"][["claim", "value", "n", "p", "p_adjusted", "verdict"]]), "md"), end="")
    n_steps = tables["metrics"]["step"].nunique()
    print(f"wrote {args.out}/summary.md, {args.out}/tables/ and {args.out}/figures/ "
          f"({n_steps} snapshots per run in {args.out}/runs/)")


def _induction(args: argparse.Namespace) -> None:
    tables = write_induction(args.out, variants=args.variant or [MARKOV_VARIANT],
                             seeds=range(args.seed, args.seed + args.seeds), n_sequences=args.sequences,
                             steps=args.steps, device=args.device, quiet=args.quiet, force=args.force,
                             **_executor_options(args))
    print(render_table(tables["roles"], "md"), end="")
    print(f"wrote {args.out}/summary.md, {args.out}/tables/ and {args.out}/figures/")


def _executor_options(args: argparse.Namespace) -> dict:
    """The `analyses.executors.run_units` settings of a study subcommand."""
    return {"executor": args.executor, "workers": args.workers, "threads": args.threads,
            "ray_address": args.ray_address, "gpus_per_unit": args.gpus_per_unit}


def _reproduce(args: argparse.Namespace) -> None:
    tables = reproduce(args.out, preset_name=args.preset, seeds=args.seeds, force=args.force, device=args.device,
                       quiet=args.quiet, **_executor_options(args))
    print(render_table(compact(tables["claims"][["claim", "value", "n", "p", "p_adjusted", "verdict"]]), "md"), end="")
    print(f"wrote {args.out}/report.html, {args.out}/summary.md, {args.out}/tables/ and {args.out}/figures/")


def _demo(args: argparse.Namespace) -> None:
    if args.model and args.static:
        raise ValueError("--static writes the addition demo's page; the language-model demo (--model) is served only")
    given = [option for option, value in (("--tokenizer", args.tokenizer), ("--dtype", args.dtype),
                                          ("--text", args.text), ("--sequences", args.sequences),
                                          ("--max-len", args.max_len)) if value is not None]
    given += _load_options_given(args)
    if given and not args.model:
        raise ValueError(f"{', '.join(given)} go with --model SPEC (the language-model demo)")
    if args.static:
        check_html_path(args.static, overwrite=args.overwrite)
    else:
        try:  # the server needs the optional `demo` extra (dash); the static page does not
            from poslens.demos.app import serve
            from poslens.demos.lm_app import serve as serve_language_model
            from poslens.demos.server import check_hosts, check_port
        except ImportError as error:
            raise ValueError(f"the demo server needs dash: pip install 'poslens[demo]' ({error})") from error
        check_port(args.port)
        check_hosts(args.allow_host)
    if args.model:
        demo = load_lm_demo(args.model, tokenizer=_tokenizer(args), dtype=MODEL_DTYPES[args.dtype or "float32"],
                            text=args.text,
                            n_sequences=DEFAULT_SEQUENCES if args.sequences is None else args.sequences,
                            max_len=args.max_len, seed=args.seed, **_load_options(args))
        return serve_language_model(demo, port=args.port, allow_hosts=args.allow_host, quiet=args.quiet)
    models, skipped = demo_models(discover_models(args.models or default_model(device=args.device, quiet=args.quiet)))
    for name, reason in skipped.items() if not args.quiet else ():
        print(f"skipping {name}: it {reason}", file=sys.stderr)
    if args.static:
        path = write_static_page(models, args.static, overwrite=args.overwrite, device=args.device, quiet=args.quiet,
                                 skipped=skipped)
        print(f"wrote {path}")
    else:
        serve(models, port=args.port, device=args.device, allow_hosts=args.allow_host, quiet=args.quiet)


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (`poslens train: error: argument --lr: ...`), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


OPTION_RANGES = {  # every numeric option's range, checked before any work (0 is never a stand-in for a default)
    **dict.fromkeys(("steps", "batch_size", "layers", "d_model", "perms", "sequences", "max_len", "checkpoints",
                     "seeds", "workers", "threads"), {"minimum": 1}),
    "seed": {"minimum": 0, "maximum": MAX_SEED},
    "lr": {"above": 0, "at_most": MAX_LR},
    "gpus_per_unit": {"at_least": 0},
}


def check_options(args: argparse.Namespace) -> None:
    """Refuse a numeric option outside its range (`OPTION_RANGES`), naming the option and the range;
    `probe --layers` takes block indices (>= 0) and `demo --port` is checked by the demo."""
    for dest, bounds in OPTION_RANGES.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        if dest == "layers" and isinstance(value, list):
            bounds = {"minimum": 0}
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str):  # a positional of the same name holding paths (`probe CHECKPOINTS`)
                continue
            name = "--" + dest.replace("_", "-")
            if isinstance(item, float):
                check_number(name, item, **bounds)
            else:
                check_integer(name, item, **bounds)
    if getattr(args, "seeds", None) and hasattr(args, "seed") and args.seed + args.seeds - 1 > MAX_SEED:
        raise ValueError(f"--seed + --seeds - 1 must be at most {MAX_SEED}, got {args.seed + args.seeds - 1}")


def _add_executor_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--executor", default="local", choices=EXECUTORS,
                   help="where the (variant, seed) units run: serial, local worker processes (default), or ray")
    p.add_argument("--workers", type=int, help="worker processes (local; default: usable cores // --threads) or CPUs "
                                               "of a Ray instance started here")
    p.add_argument("--threads", type=int, default=1, help="torch threads per unit (default 1, at most the usable "
                                                               "cores; numbers depend on it)")
    p.add_argument("--ray-address", help="a running Ray cluster (an address, or 'auto'); default: start one here")
    p.add_argument("--gpus-per-unit", type=float, default=0.0,
                   help="GPU share of each Ray unit (e.g. 0.25 packs four runs on one GPU; runs on cuda)")


def _restamp(args: argparse.Namespace) -> None:
    for directory in map(Path, args.directories):
        if (directory / "run.json").is_file():  # a run: its model, snapshots and training state
            done = restamp_run(directory)
        else:  # a bare checkpoint
            done = [f"recorded the digests of config and weights in {directory / 'config.json'}"] \
                if restamp(directory) else []
        print(f"{directory}: " + ("; ".join(done) if done else "already current, verified"))


def _add_study_options(p: argparse.ArgumentParser) -> None:
    """What every multi-run study subcommand takes besides its own settings (dynamics, induction)."""
    p.add_argument("--out", required=True, help="output directory; the training runs go to OUT/runs/VARIANT-seedK")
    p.add_argument("--seed", type=int, default=0, help="the first seed (initial weights and data order; default 0)")
    p.add_argument("--seeds", type=int, default=1, help="seeds per variant: --seed, --seed + 1, ... (default 1)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (those this torch offers)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--force", action="store_true", help="measure every run again (a rerun without it resumes; "
                   "the trained runs are kept)")
    _add_executor_options(p)


def build_parser() -> argparse.ArgumentParser:
    """The parser of every `poslens` subcommand."""
    parser = _Parser(prog="poslens", description="Where does a transformer keep token position?")
    commands = parser.add_subparsers(dest="command", required=True)
    defaults = TrainSettings()

    p = commands.add_parser("reproduce", help="the paper's experiment set on 3-digit addition, end to end (resumable)")
    p.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS),
                   help=f"model, training and analysis sizes (default {DEFAULT_PRESET})")
    p.add_argument("--seeds", type=int, help="training seeds per variant (default: the preset's; "
                   f"{PRESETS[DEFAULT_PRESET].seeds} for {DEFAULT_PRESET}, 1 for the others)")
    p.add_argument("--out", default="runs/reproduce", help="output directory (default runs/reproduce)")
    p.add_argument("--force", action="store_true", help="recompute tables and figures (trained runs are kept)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (those this torch offers)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_executor_options(p)
    p.set_defaults(run=_reproduce)

    p = commands.add_parser("train", help="train a variant on a task (resumable)")
    p.add_argument("--variant", required=True, help="e.g. nope-causal, learned-causal, nope-causal+cut0,1")
    p.add_argument("--task", default="addition", choices=sorted(TASKS))
    p.add_argument("--steps", type=int, help=f"optimiser steps (default {defaults.steps})")
    p.add_argument("--batch-size", type=int, help=f"default {defaults.batch_size}")
    p.add_argument("--lr", type=float, help=f"peak learning rate (default {defaults.lr})")
    p.add_argument("--precision", choices=PRECISIONS, help=f"training precision (default {defaults.precision}; "
                   "bfloat16: autocast forward and backward, float32 weights)")
    p.add_argument("--layers", type=int, help="number of blocks (default: the preset's)")
    p.add_argument("--d-model", type=int, help="residual width (default: the preset's)")
    p.add_argument("--out", required=True, help="run directory (refused if it already holds a run, unless --resume)")
    p.add_argument("--seed", type=int, default=0, help="seeds the initial weights and the data order")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (those this torch offers)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=int, help="torch threads (default 1: variants.threads; at most the usable cores)")
    p.set_defaults(run=_train)

    p = commands.add_parser("invariance", help="last-position logit change under permutations of earlier tokens")
    p.add_argument("--variant", action="append", help="variant with random weights (repeatable)")
    p.add_argument("--checkpoint", action="append", help="trained run directory (repeatable)")
    p.add_argument("--layers", type=int, help="number of blocks for --variant models")
    p.add_argument("--dtype", default="float64", choices=sorted(DTYPES))
    p.add_argument("--perms", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", default="md", choices=[suffix.lstrip(".") for suffix in EXPORT_SUFFIXES])
    p.add_argument("--threads", type=int, help="torch threads (default 1: variants.threads; at most the usable cores)")
    p.set_defaults(run=_invariance)

    p = commands.add_parser("probe", help="linear position probes at every residual site, with controls")
    p.add_argument("checkpoints", nargs="*", metavar="CHECKPOINT_DIR", help="trained run directories")
    p.add_argument("--model", help="instead: one model, a Hugging Face hub id, a save_pretrained folder or a "
                                    "poslens run directory (see docs/real-models.md)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--text", metavar="FILE", help="with --model: probe a UTF-8 text, chunked into sequences of "
                                                       "--max-len tokens with the model's tokenizer, BOS first")
    source.add_argument("--random-tokens", action="store_true", help="with --model: probe uniformly random tokens")
    p.add_argument("--max-len", type=int, help=f"tokens per text / random sequence, BOS included "
                                               f"(default {DEFAULT_MAX_LEN}, or n_ctx if smaller)")
    p.add_argument("--no-bos", action="store_true", help="do not put the BOS token first")
    p.add_argument("--tokenizer", help="with --model: a tokenizer folder or hub id (for a folder without one)")
    p.add_argument("--dtype", default="float32", choices=list(MODEL_DTYPES), help="with --model: weight precision")
    _add_model_load_options(p)
    p.add_argument("--out", required=True, help="tidy table: .csv, .md, .tex or .json; OUT_STEM.by_position and "
                                                "OUT_STEM.models tables are written beside it")
    p.add_argument("--sites", nargs="+", help="residual sites as hook names, e.g. blocks.0.hook_resid_post "
                                              "(default: embed and every resid_mid / resid_post)")
    p.add_argument("--layers", nargs="+", type=int, help="instead of --sites: embed and the sites of these blocks")
    p.add_argument("--targets", nargs="+", default=["position"], choices=list(TARGETS),
                   help="what to probe (role needs a task with role labels; default position)")
    p.add_argument("--control", nargs="+", default=list(CONTROLS), choices=list(CONTROLS),
                   help="baselines to compute beside the trained probes (default: all)")
    p.add_argument("--sequences", type=int, help="sequences to probe, split by sequence (default 1000 held-out task "
                                                 f"sequences, {DEFAULT_MODEL_SEQUENCES} of text or random tokens)")
    p.add_argument("--seed", type=int, default=0, help="seeds the random tokens")
    p.add_argument("--float16", action="store_true", help="keep the captured activations in float16 (half the memory)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--figure", help="also write the accuracy-vs-layer figure as an offline .html (and one "
                                    "accuracy-by-position figure per variant beside it; they share plotly.min.js)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=int, help="torch threads (default 1: variants.threads; at most the usable cores)")
    p.set_defaults(run=_probe)

    p = commands.add_parser("inspect", help="a model's layers, residual sites and per-layer positional encoding")
    p.add_argument("--model", required=True, help="a Hugging Face hub id, a save_pretrained folder or a poslens run")
    p.add_argument("--tokenizer", help="a tokenizer folder or hub id (for a folder without one)")
    p.add_argument("--dtype", default="float32", choices=list(MODEL_DTYPES), help="weight precision")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    _add_model_load_options(p)
    p.set_defaults(run=_inspect)

    p = commands.add_parser("patch", help="activation patching (exact or attribution) of checkpoints on their task's "
                                           "corruptions, or of any model on a file of prompt pairs")
    p.add_argument("checkpoints", nargs="*", metavar="CHECKPOINT_DIR", help="trained run directories")
    p.add_argument("--model", help="instead: one model, a Hugging Face hub id, a save_pretrained folder or a "
                                    "poslens run directory (needs --pairs)")
    p.add_argument("--pairs", metavar="FILE", help="clean<TAB>corrupted prompts, one pair per line")
    p.add_argument("--align", default="equal", choices=list(ALIGN_RULES),
                   help="prompts of unequal token length: refuse them (equal, default) or compare positions "
                        "counted from the end, cutting longer prompts' earliest tokens after BOS (end)")
    p.add_argument("--sites", nargs="+", choices=list(SITES),
                   help="activation names, each patched in every block (default: all for checkpoints, resid_pre "
                        "for --model)")
    p.add_argument("--method", default="exact", choices=list(METHODS),
                   help="exact activation patching, or its gradient estimate (attribution; one backward pass)")
    p.add_argument("--corruption", default="swap", choices=["swap", "permute"], help="checkpoints without --pairs")
    p.add_argument("--positions", nargs=2, type=int, default=[0, 2], metavar=("I", "J"),
                   help="operand-digit positions that swap exchanges (default 0 2)")
    p.add_argument("--sequences", type=int, default=64, help="task prompts patched at once (default 64)")
    p.add_argument("--seed", type=int, default=0, help="seeds the task prompts' sample")
    p.add_argument("--bfloat16", action="store_true", help="run the exact passes under bfloat16 autocast")
    p.add_argument("--tokenizer", help="with --model: a tokenizer folder or hub id (for a folder without one)")
    p.add_argument("--dtype", default="float32", choices=list(MODEL_DTYPES), help="with --model: weight precision")
    p.add_argument("--out", required=True, help="output folder: patching.{csv,md,tex,json} and "
                                                "patching.MODEL.SITE.html heatmaps")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (those this torch offers)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_model_load_options(p)
    p.set_defaults(run=_patch)

    p = commands.add_parser("positions", help="task accuracy / next-token loss and position-probe readout when the "
                                              "position ids a model is told are shifted, swapped or repeated")
    p.add_argument("--model", required=True, help="a poslens run directory (measured on its task), a Hugging Face hub "
                                                  "id or a save_pretrained folder (with --text or --random-tokens)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--text", metavar="FILE", help="a UTF-8 text, chunked into --max-len tokens, BOS first")
    source.add_argument("--random-tokens", action="store_true", help="uniformly random tokens")
    p.add_argument("--max-len", type=int, help=f"tokens per sequence, BOS included (default {DEFAULT_MAX_LEN}, or "
                                               "n_ctx if smaller)")
    p.add_argument("--no-bos", action="store_true", help="do not put the BOS token first")
    p.add_argument("--sequences", type=int, help="sequences measured (default 1000 held-out sums, "
                                                 f"{DEFAULT_MODEL_SEQUENCES} of text or random tokens)")
    p.add_argument("--shift", type=int, action="append", help="a global shift of the position ids (repeatable; "
                                                              "default 1)")
    p.add_argument("--tokenizer", help="a tokenizer folder or hub id (for a folder without one)")
    p.add_argument("--dtype", default="float32", choices=list(MODEL_DTYPES), help="weight precision")
    p.add_argument("--seed", type=int, default=0, help="seeds the sample, the random tokens and the probes' split")
    p.add_argument("--out", required=True, help="output directory: OUT/tables/ and OUT/figures/")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    _add_model_load_options(p)
    p.set_defaults(run=_positions)

    p = commands.add_parser("dynamics", help="train with log-spaced snapshots; loss, probes and attention entropy "
                                             "over training")
    p.add_argument("--variant", required=True, action="append",
                   help="e.g. nope-causal, rotary-causal (repeat for several variants)")
    p.add_argument("--task", required=True, choices=list(DYNAMICS_TASKS))
    p.add_argument("--checkpoints", type=int, default=12, help="log-spaced snapshots besides step 0 (default 12)")
    p.add_argument("--steps", type=int, help="optimiser steps (default: the quick preset on addition, "
                                             "MARKOV_TRAINING on markov; analyses.experiments.presets)")
    p.add_argument("--layers", type=int, help="number of blocks (default: the task's)")
    p.add_argument("--d-model", type=int, help="residual width (default: the task's)")
    p.add_argument("--sequences", type=int, help="held-out sequences measured (default 1000 addition, 200 markov)")
    p.add_argument("--constant-lr-control", action="store_true",
                   help="also train every run under a constant learning rate (the control for an entropy rebound)")
    _add_study_options(p)
    p.set_defaults(run=_dynamics)

    p = commands.add_parser("induction", help="train on n-gram Markov in-context learning; copier and classifier "
                                              "heads, head scores, loss against Bayes")
    p.add_argument("--variant", action="append", help=f"repeatable (default {MARKOV_VARIANT})")
    p.add_argument("--steps", type=int,
                   help="optimiser steps (default: MARKOV_TRAINING of analyses.experiments.presets)")
    p.add_argument("--sequences", type=int, default=1000, help="fresh sequences analysed per model (default 1000)")
    _add_study_options(p)
    p.set_defaults(run=_induction)

    p = commands.add_parser("demo", help="interactive activation-patching app (local web page), or --static OUT.html; "
                                          "--model SPEC: a language model on free-text prompts")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--models", help="a reproduce output folder or a checkpoint folder (default: train or load "
                                        f"the built-in model in {DEFAULT_MODEL_DIR})")
    which.add_argument("--model", help="instead: a language model for free-text prompts, a Hugging Face hub id, a "
                                       "save_pretrained folder or a poslens run directory (see docs/real-models.md)")
    p.add_argument("--tokenizer", help="with --model: a tokenizer folder or hub id (for a folder without one)")
    p.add_argument("--dtype", choices=list(MODEL_DTYPES), help="with --model: weight precision (default float32)")
    _add_model_load_options(p)
    p.add_argument("--text", metavar="FILE", help="with --model: fit the position probe on this UTF-8 text, chunked "
                                                  "with the model's tokenizer (default: random tokens)")
    p.add_argument("--sequences", type=int, help="with --model: sequences the position probe is fitted on "
                                                 f"(default {DEFAULT_SEQUENCES})")
    p.add_argument("--max-len", type=int, help="with --model: tokens of a prompt and of each probe sequence, BOS "
                                               f"included (default {MAX_PROMPT_TOKENS}, or n_ctx if smaller)")
    p.add_argument("--seed", type=int, default=0, help="with --model: seeds the probe's random tokens")
    p.add_argument("--port", type=int, default=8050, help="port on 127.0.0.1 (default 8050; 0 = any free port)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="repeatable: also answer requests addressed to NAME (a reverse proxy's host name; "
                        "'.example.org' for its subdomains); default: loopback names only (see docs/guide/demos.md)")
    p.add_argument("--static", metavar="OUT.html", help="write one self-contained HTML page instead of serving")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --static file")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (those this torch offers)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or request log")
    p.add_argument("--threads", type=int, help="torch threads (default 1: variants.threads; at most the usable cores)")
    p.set_defaults(run=_demo)

    p = commands.add_parser("restamp", help="record the digests (config and weights) of checkpoints written without "
                                            "them, and upgrade finished runs written by an older poslens (after "
                                            "checking them)")
    p.add_argument("directories", nargs="+", metavar="DIR", help="run or checkpoint directories")
    p.set_defaults(run=_restamp)
    return parser


def error_line(error: BaseException) -> str:
    """One line for a user error: an `OSError` about a path names the path and the problem."""
    if isinstance(error, OSError) and error.filename is not None:
        paths = f"{error.filename}" + (f" -> {error.filename2}" if error.filename2 is not None else "")
        return f"{paths}: {error.strerror or error}"
    return str(error) or type(error).__name__


RESUME_HINTS = {"train": "; rerun with --resume to continue", "reproduce": "; rerun the same command to resume",
                "dynamics": "; rerun the same command to resume", "induction": "; rerun the same command to resume"}


def _threads(args: argparse.Namespace) -> int | None:
    """The torch threads of this process: `--threads` (checked against the usable cores), or None
    for the policy's default (`variants.threads`). A study's driver only merges, so it takes at
    most the usable cores whatever its units get (those are checked by `run_units`)."""
    threads = getattr(args, "threads", None)
    if threads is not None and hasattr(args, "executor"):
        return min(threads, usable_cores())
    return threads


def main(argv: Sequence[str] | None = None) -> int:
    """Run one `poslens` subcommand; a user error (bad value, path problem, locked directory,
    diverged training) is one line on stderr and exit code 2, never a traceback. SIGTERM, SIGHUP
    and SIGINT stop it cleanly (workers stopped, locks released) with one line and exit code
    128 + the signal's number."""
    args = build_parser().parse_args(argv)
    with stop_on_signals():
        try:
            if getattr(args, "device", None) is not None:
                check_device(args.device)
            check_options(args)
            if hasattr(args, "executor"):  # a study: its executor settings, before any folder is touched
                check_executor(**_executor_options(args))
            with torch_threads(_threads(args)):
                args.run(args)
        except (ValueError, OSError, DirectoryLocked, FloatingPointError, UnitsFailed) as error:
            print(f"poslens {args.command}: error: {error_line(error)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as stop:  # `Stopped` by a signal, or Ctrl-C where no handler could be set
            signum = stop.signum if isinstance(stop, Stopped) else signal.SIGINT
            print(f"poslens {args.command}: stopped by {signal.Signals(signum).name}"
                  f"{RESUME_HINTS.get(args.command, '')}", file=sys.stderr)
            return 128 + signum
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
