"""The `poslens` command: each subcommand is a thin wrapper over a function you can call."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from analyses.invariance import invariance_table
from analyses.tables import render_table
from tasks import TASKS, make_task
from variants import TrainSettings, preset, train

def _train(args: argparse.Namespace) -> None:
    task = make_task(args.task)
    sizes = {key: value for key, value in (("n_layers", args.layers), ("d_model", args.d_model)) if value is not None}
    cfg = preset(args.variant, alphabet=task.alphabet, n_ctx=task.seq_len, seed=args.seed, device=args.device, **sizes)
    settings = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed}
    result = train(cfg, task, out_dir=args.out, resume=args.resume, quiet=args.quiet,
                   **{k: v for k, v in settings.items() if v is not None})
    final = result.history[-1] if result.history else {}
    print(f"{cfg.name} on {task.name}: step {final.get('step')}, exact match {final.get('exact_match')}, "
          f"saved to {result.out_dir}")


def _invariance(args: argparse.Namespace) -> None:
    table = invariance_table(args.variant or [], args.checkpoint or [], n_layers=args.layers,
                             dtype={"float32": torch.float32, "float64": torch.float64}[args.dtype],
                             n_perms=args.perms, seed=args.seed)
    sys.stdout.write(render_table(table, args.format))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="poslens", description="Where does a transformer keep token position?")
    commands = parser.add_subparsers(dest="command", required=True)
    defaults = TrainSettings()

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
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_train)

    p = commands.add_parser("invariance", help="last-position logit change under permutations of earlier tokens")
    p.add_argument("--variant", action="append", help="variant with random weights (repeatable)")
    p.add_argument("--checkpoint", action="append", help="trained run directory (repeatable)")
    p.add_argument("--layers", type=int, help="number of blocks for --variant models")
    p.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    p.add_argument("--perms", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", default="md", choices=["csv", "md", "tex", "json"])
    p.set_defaults(run=_invariance)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileExistsError, FileNotFoundError) as error:
        print(f"poslens {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
