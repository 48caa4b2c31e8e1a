"""The `poslens` command: each subcommand is a thin wrapper over a function you can call."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from poslens.analyses.experiments.dynamics import write_dynamics
from poslens.analyses.experiments.induction import write_induction
from poslens.analyses.experiments.presets import DYNAMICS_TASKS, MARKOV_VARIANT, PRESETS
from poslens.analyses.experiments.reproduce import reproduce
from poslens.analyses.figures import check_html_path, file_name, write_figure
from poslens.analyses.figures.probes import probe_accuracy_figure, probe_position_figure
from poslens.analyses.measures.discovery import describe, layer_sites, model_info, site_note
from poslens.analyses.measures.invariance import invariance_table
from poslens.analyses.measures.probe_sweep import CONTROLS, TARGETS, sidecar_paths, sweep_probes
from poslens.analyses.measures.sequences import random_sequences, read_text, text_sequences
from poslens.analyses.report import compact
from poslens.analyses.runs import load_models_by_variant, load_task
from poslens.analyses.sweep import EXECUTORS, UnitsFailed
from poslens.analyses.tables import EXPORT_SUFFIXES, check_writable, render_table, side_by_side
from poslens.demos.lm_panels import DEFAULT_SEQUENCES, MAX_PROMPT_TOKENS, load_lm_demo
from poslens.demos.panels import DEFAULT_MODEL_DIR, default_model, discover_models
from poslens.demos.static import write_static_page
from poslens.tasks import TASKS, make_task
from poslens.variants import HookedTransformer, TrainSettings, load_any, preset, train
from poslens.variants.checkpoint import restamp
from poslens.variants.config import DTYPES, check_device
from poslens.variants.hub import model_name
from poslens.variants.locking import DirectoryLocked
from poslens.variants.training import restamp_run

MODEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MAX_LEN = 128  # tokens per text / random sequence when --max-len is not given
DEFAULT_MODEL_SEQUENCES = 200  # sequences of text / random tokens when --sequences is not given


def _train(args: argparse.Namespace) -> None:
    task = make_task(args.task)
    sizes = {key: value for key, value in (("n_layers", args.layers), ("d_model", args.d_model)) if value is not None}
    cfg = preset(args.variant, task=task, seed=args.seed, device=args.device, **sizes)
    settings = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed}
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
        tasks = {load_task(directory) for directory in args.checkpoints}
        if len(tasks) != 1:
            raise ValueError(f"checkpoints were trained on different tasks ({sorted(map(str, tasks))}); "
                             "probe them separately")
        models, data = load_models_by_variant(args.checkpoints, device=args.device), tasks.pop()
        n_sequences = args.sequences or 1000
    first = next(iter(models.values()))[0]
    sites = args.sites or (layer_sites(first, args.layers) if args.layers else None)
    result = sweep_probes(models, data, n_sequences=n_sequences, sites=sites, controls=args.control,
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
        max_len = args.max_len or min(DEFAULT_MAX_LEN, model.cfg.n_ctx)
        n_sequences, bos = args.sequences or DEFAULT_MODEL_SEQUENCES, not args.no_bos
        if args.text:
            return text_sequences(model, read_text(args.text), max_len, bos=bos, max_sequences=n_sequences), None
        return random_sequences(model, n_sequences, max_len, bos=bos, seed=args.seed), None
    if isinstance(model, HookedTransformer) and Path(args.model).is_dir():
        return load_task(args.model), args.sequences or 1000
    raise ValueError(f"say what to probe {args.model} on: --text FILE or --random-tokens")


def _load_model(args: argparse.Namespace):
    """`--model` with its `--tokenizer`, `--device` and `--dtype`."""
    return load_any(args.model, tokenizer=_tokenizer(args), device=args.device, dtype=MODEL_DTYPES[args.dtype])


def _tokenizer(args: argparse.Namespace):
    """`--tokenizer` (a folder or hub id, for AutoTokenizer), or None."""
    if not args.tokenizer:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(args.tokenizer)


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


def _dynamics(args: argparse.Namespace) -> None:
    tables = write_dynamics(args.out, variants=args.variant, task=args.task,
                            seeds=range(args.seed, args.seed + args.seeds), checkpoints=args.checkpoints,
                            steps=args.steps, n_layers=args.layers, d_model=args.d_model, n_sequences=args.sequences,
                            constant_lr_control=args.constant_lr_control, device=args.device, quiet=args.quiet,
                            force=args.force, **_sweep_options(args))
    print(render_table(compact(tables["claims"][["claim", "value", "n", "p", "verdict"]]), "md"), end="")
    n_steps = tables["metrics"]["step"].nunique()
    print(f"wrote {args.out}/summary.md, {args.out}/tables/ and {args.out}/figures/ "
          f"({n_steps} snapshots per run in {args.out}/runs/)")


def _induction(args: argparse.Namespace) -> None:
    tables = write_induction(args.out, variants=args.variant or [MARKOV_VARIANT],
                             seeds=range(args.seed, args.seed + args.seeds), n_sequences=args.sequences,
                             steps=args.steps, device=args.device, quiet=args.quiet, force=args.force,
                             **_sweep_options(args))
    print(render_table(tables["roles"], "md"), end="")
    print(f"wrote {args.out}/summary.md, {args.out}/tables/ and {args.out}/figures/")


def _sweep_options(args: argparse.Namespace) -> dict:
    """The `analyses.sweep.run_units` settings of a study subcommand."""
    return {"executor": args.executor, "workers": args.workers, "threads": args.threads,
            "ray_address": args.ray_address, "gpus_per_unit": args.gpus_per_unit}


def _reproduce(args: argparse.Namespace) -> None:
    tables = reproduce(args.out, preset_name=args.preset, seeds=args.seeds, force=args.force, device=args.device,
                       quiet=args.quiet, **_sweep_options(args))
    print(render_table(compact(tables["claims"][["claim", "value", "n", "p", "verdict"]]), "md"), end="")
    print(f"wrote {args.out}/report.html, {args.out}/summary.md, {args.out}/tables/ and {args.out}/figures/")


def _demo(args: argparse.Namespace) -> None:
    if args.model and args.static:
        raise ValueError("--static writes the addition demo's page; the language-model demo (--model) is served only")
    given = [option for option, value in (("--tokenizer", args.tokenizer), ("--dtype", args.dtype),
                                          ("--text", args.text), ("--sequences", args.sequences),
                                          ("--max-len", args.max_len)) if value is not None]
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
        demo = load_lm_demo(args.model, tokenizer=_tokenizer(args), device=args.device,
                            dtype=MODEL_DTYPES[args.dtype or "float32"], text=args.text,
                            n_sequences=DEFAULT_SEQUENCES if args.sequences is None else args.sequences,
                            max_len=args.max_len, seed=args.seed)
        return serve_language_model(demo, port=args.port, allow_hosts=args.allow_host, quiet=args.quiet)
    models = discover_models(args.models or default_model(device=args.device, quiet=args.quiet))
    if args.static:
        path = write_static_page(models, args.static, overwrite=args.overwrite, device=args.device, quiet=args.quiet)
        print(f"wrote {path}")
    else:
        serve(models, port=args.port, device=args.device, allow_hosts=args.allow_host, quiet=args.quiet)


def _add_sweep_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--executor", default="local", choices=EXECUTORS,
                   help="where the (variant, seed) units run: serial, local worker processes (default), or ray")
    p.add_argument("--workers", type=int, help="worker processes (local; default: usable cores // --threads) or CPUs "
                                               "of a Ray instance started here")
    p.add_argument("--threads", type=int, default=1, help="torch threads per unit (default 1; numbers depend on it)")
    p.add_argument("--ray-address", help="a running Ray cluster (an address, or 'auto'); default: start one here")
    p.add_argument("--gpus-per-unit", type=float, default=0.0,
                   help="GPU share of each Ray unit (e.g. 0.25 packs four runs on one GPU; runs on cuda)")


def _restamp(args: argparse.Namespace) -> None:
    for directory in map(Path, args.directories):
        if (directory / "run.json").is_file():  # a run: its model, snapshots and training state
            done = restamp_run(directory)
        else:  # a bare checkpoint
            done = [f"recorded the weights digest in {directory / 'config.json'}"] if restamp(directory) else []
        print(f"{directory}: " + ("; ".join(done) if done else "already current, verified"))


def _add_study_options(p: argparse.ArgumentParser) -> None:
    """What every multi-run study subcommand takes besides its own settings (dynamics, induction)."""
    p.add_argument("--out", required=True, help="output directory; the training runs go to OUT/runs/VARIANT-seedK")
    p.add_argument("--seed", type=int, default=0, help="the first seed (initial weights and data order; default 0)")
    p.add_argument("--seeds", type=int, default=1, help="seeds per variant: --seed, --seed + 1, ... (default 1)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (those this torch offers)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--force", action="store_true", help="recompute existing outputs (the trained runs are kept)")
    _add_sweep_options(p)


def build_parser() -> argparse.ArgumentParser:
    """The parser of every `poslens` subcommand."""
    parser = argparse.ArgumentParser(prog="poslens", description="Where does a transformer keep token position?")
    commands = parser.add_subparsers(dest="command", required=True)
    defaults = TrainSettings()

    p = commands.add_parser("reproduce", help="the paper's experiment set on 3-digit addition, end to end (resumable)")
    p.add_argument("--preset", default="quick", choices=sorted(PRESETS), help="model and run sizes (default quick)")
    p.add_argument("--seeds", type=int, default=1, help="training seeds per variant (default 1)")
    p.add_argument("--out", default="runs/reproduce", help="output directory (default runs/reproduce)")
    p.add_argument("--force", action="store_true", help="recompute tables and figures (trained runs are kept)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (those this torch offers)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_sweep_options(p)
    p.set_defaults(run=_reproduce)

    p = commands.add_parser("train", help="train a variant on a task (resumable)")
    p.add_argument("--variant", required=True, help="e.g. nope-causal, learned-causal, nope-causal+cut0,1")
    p.add_argument("--task", default="addition", choices=sorted(TASKS))
    p.add_argument("--steps", type=int, help=f"optimiser steps (default {defaults.steps})")
    p.add_argument("--batch-size", type=int, help=f"default {defaults.batch_size}")
    p.add_argument("--lr", type=float, help=f"peak learning rate (default {defaults.lr})")
    p.add_argument("--layers", type=int, help="number of blocks (default: the preset's)")
    p.add_argument("--d-model", type=int, help="residual width (default: the preset's)")
    p.add_argument("--out", required=True, help="run directory (refused if it already holds a run, unless --resume)")
    p.add_argument("--seed", type=int, default=0, help="seeds the initial weights and the data order")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (those this torch offers)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_train)

    p = commands.add_parser("invariance", help="last-position logit change under permutations of earlier tokens")
    p.add_argument("--variant", action="append", help="variant with random weights (repeatable)")
    p.add_argument("--checkpoint", action="append", help="trained run directory (repeatable)")
    p.add_argument("--layers", type=int, help="number of blocks for --variant models")
    p.add_argument("--dtype", default="float64", choices=sorted(DTYPES))
    p.add_argument("--perms", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", default="md", choices=[suffix.lstrip(".") for suffix in EXPORT_SUFFIXES])
    p.set_defaults(run=_invariance)

    p = commands.add_parser("probe", help="linear position probes at every residual site, with controls")
    p.add_argument("checkpoints", nargs="*", metavar="CHECKPOINT_DIR", help="trained run directories")
    p.add_argument("--model", help="instead: one model, a Hugging Face hub id, a save_pretrained folder or a "
                                    "poslens run directory (see README, Real models)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--text", metavar="FILE", help="with --model: probe a UTF-8 text, chunked into sequences of "
                                                       "--max-len tokens with the model's tokenizer, BOS first")
    source.add_argument("--random-tokens", action="store_true", help="with --model: probe uniformly random tokens")
    p.add_argument("--max-len", type=int, help=f"tokens per text / random sequence, BOS included "
                                               f"(default {DEFAULT_MAX_LEN}, or n_ctx if smaller)")
    p.add_argument("--no-bos", action="store_true", help="do not put the BOS token first")
    p.add_argument("--tokenizer", help="with --model: a tokenizer folder or hub id (for a folder without one)")
    p.add_argument("--dtype", default="float32", choices=list(MODEL_DTYPES), help="with --model: weight precision")
    p.add_argument("--out", required=True, help="tidy table: .csv, .md, .tex or .json; OUT_STEM.by_position and "
                                                "OUT_STEM.models tables are written beside it")
    p.add_argument("--sites", nargs="+", help="residual sites (default: embed and every resid_mid / resid_post)")
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
    p.set_defaults(run=_probe)

    p = commands.add_parser("inspect", help="a model's layers, residual sites and per-layer positional encoding")
    p.add_argument("--model", required=True, help="a Hugging Face hub id, a save_pretrained folder or a poslens run")
    p.add_argument("--tokenizer", help="a tokenizer folder or hub id (for a folder without one)")
    p.add_argument("--dtype", default="float32", choices=list(MODEL_DTYPES), help="weight precision")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.set_defaults(run=_inspect)

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
    p.add_argument("--steps", type=int, help="optimiser steps (default: MARKOV_TRAINING of analyses.experiments.presets)")
    p.add_argument("--sequences", type=int, default=1000, help="fresh sequences analysed per model (default 1000)")
    _add_study_options(p)
    p.set_defaults(run=_induction)

    p = commands.add_parser("demo", help="interactive activation-patching app (local web page), or --static OUT.html; "
                                          "--model SPEC: a language model on free-text prompts")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--models", help="a reproduce output folder or a checkpoint folder (default: train or load "
                                        f"the built-in model in {DEFAULT_MODEL_DIR})")
    which.add_argument("--model", help="instead: a language model for free-text prompts, a Hugging Face hub id, a "
                                       "save_pretrained folder or a poslens run directory (see README, Real models)")
    p.add_argument("--tokenizer", help="with --model: a tokenizer folder or hub id (for a folder without one)")
    p.add_argument("--dtype", choices=list(MODEL_DTYPES), help="with --model: weight precision (default float32)")
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
                        "'.example.org' for its subdomains); default: loopback names only (see docs/demos.md)")
    p.add_argument("--static", metavar="OUT.html", help="write one self-contained HTML page instead of serving")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --static file")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (those this torch offers)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or request log")
    p.set_defaults(run=_demo)

    p = commands.add_parser("restamp", help="record the weights digest of checkpoints written without one, and "
                                            "upgrade finished runs written by an older poslens (after checking them)")
    p.add_argument("directories", nargs="+", metavar="DIR", help="run or checkpoint directories")
    p.set_defaults(run=_restamp)
    return parser


def error_line(error: BaseException) -> str:
    """One line for a user error: an `OSError` about a path names the path and the problem."""
    if isinstance(error, OSError) and error.filename is not None:
        paths = f"{error.filename}" + (f" -> {error.filename2}" if error.filename2 is not None else "")
        return f"{paths}: {error.strerror or error}"
    return str(error) or type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run one `poslens` subcommand; a user error (bad value, path problem, locked directory,
    diverged training) is one line on stderr and exit code 2, never a traceback."""
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "device", None) is not None:
            check_device(args.device)
        args.run(args)
    except (ValueError, OSError, DirectoryLocked, FloatingPointError, UnitsFailed) as error:
        print(f"poslens {args.command}: error: {error_line(error)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
