"""Activation patching: TransformerLens's per-cell loop against poslens's batched engine (`hooks.patching`).

    python benchmarks/patching_speed.py [--prompt-tokens 16] [--corrupted-position P] [--quick-sequences 64]
        [--threads N] [--models quick gpt2-small] [--correlations]

Same prompts, same machine, one run. Two models, both with random weights built locally (nothing is
downloaded):
- `quick`: poslens's quick preset size (learned-causal, 4 blocks, d_model 64), on `--quick-sequences`
  addition prompts with the first operand's digits swapped, every site (what `poslens reproduce`'s
  `activation_patching` computes), with its restoration metric;
- `gpt2-small`: `GPT2Config()` (12 blocks, d_model 768, vocabulary 50,257) through a `TransformerBridge`,
  one prompt of `--prompt-tokens` random tokens and a copy with one token changed (the middle one, or
  `--corrupted-position`), the `resid_pre` grid (12 × 16 by default), with the next-token restoration
  metric. The engine does not run the cells before the changed token (their patch is a no-op in a causal
  model), so its speed-up depends on that position: `--corrupted-position 0` is its worst case.
For each: TL's loop (`transformer_lens.patching`, float32), the engine in float32 and under bfloat16
autocast, and the attribution preview; seconds, speed-up over TL, max |difference| from TL's grid, the
preview's Pearson correlation with the exact grid, and the process's peak RSS after each step (it only
grows, so a step's own peak shows only where it raises it).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from functools import partial
from pathlib import Path

import torch
import transformers
from transformer_lens import patching

from poslens.analyses.measures.patching import SITES, corrupt, next_token_restoration, restoration_metric
from poslens.hooks.patching import _readout_hook, attribution_grids, patch_grids
from poslens.tasks import Addition
from poslens.variants import build, load_any, variant_config

sys.path.insert(0, str(Path(__file__).parent))  # the benchmarks folder is not a package
from probe_scale import peak_gb  # noqa: E402

CORRELATION_VARIANTS = ("nope-causal", "learned-causal", "sinusoidal-causal", "rotary-causal", "learned-bidirectional",
                        "nope-causal+cut0")
TL_GRIDS = {"resid_pre": patching.get_act_patch_resid_pre, "resid_mid": patching.get_act_patch_resid_mid,
            "resid_post": partial(patching.generic_activation_patch, patch_setter=patching.layer_pos_patch_setter,
                                  activation_name="resid_post", index_axis_names=("layer", "pos")),
            "attn_out": patching.get_act_patch_attn_out, "mlp_out": patching.get_act_patch_mlp_out}


def quick_case(n_sequences: int, variant: str = "learned-causal"):
    """poslens's quick-size model on swapped addition prompts: (name, model, clean, corrupted, metric, sites)."""
    task = Addition()
    model = build(variant_config(variant, task=task, n_layers=4, d_model=64, d_head=16)).eval()
    clean = task.sample_test(4 * n_sequences, 0)
    corrupted = corrupt(task, clean, "swap", positions=(0, 2))
    changed = clean[:, task.prompt_len] != corrupted[:, task.prompt_len]
    clean, corrupted = clean[changed][:n_sequences], corrupted[changed][:n_sequences]
    metric = restoration_metric(model, clean, corrupted, task.prompt_len)[0]
    prompts = slice(0, task.prompt_len)
    return "quick (4 blocks, d_model 64)", model, clean[:, prompts], corrupted[:, prompts], metric, list(SITES)


def gpt2_case(n_tokens: int, position: int | None = None):
    """A GPT-2-small-shaped random bridge, one prompt and a one-token change at `position` (default: the
    middle one): (name, model, ..., sites)."""
    torch.manual_seed(1)
    model = load_any(transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval())
    clean = torch.randint(model.cfg.d_vocab, (1, n_tokens), generator=torch.Generator().manual_seed(0))
    corrupted = clean.clone()
    position = n_tokens // 2 if position is None else position
    corrupted[0, position] = (clean[0, position] + 1) % model.cfg.d_vocab
    metric = next_token_restoration(model, clean, corrupted)[0]
    return "GPT-2 small shape (bridge)", model, clean, corrupted, metric, ["resid_pre"]


def timed(run):
    began = time.perf_counter()
    result = run()
    return time.perf_counter() - began, result


@torch.no_grad()
def tl_grids(model, clean, corrupted, metric, sites):
    _, cache = model.run_with_cache(clean)
    original, patching.tqdm = patching.tqdm, partial(patching.tqdm, disable=True)
    try:
        return {site: TL_GRIDS[site](model, corrupted, cache, metric).float() for site in sites}
    finally:
        patching.tqdm = original


def flat(grids, sites):
    return torch.cat([grids[site].flatten() for site in sites])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, default=16, help="tokens of the GPT-2 prompt (default 16)")
    parser.add_argument("--corrupted-position", type=int, help="the GPT-2 prompt's changed token (default: the "
                                                                   "middle one)")
    parser.add_argument("--quick-sequences", type=int, default=64, help="addition prompts per cell for the quick "
                                                                        "model (default 64, reproduce's)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--models", nargs="+", default=["quick", "gpt2-small"], choices=["quick", "gpt2-small"])
    parser.add_argument("--correlations", action="store_true", help="also: the preview's correlation with the exact "
                                                                    "grid, per site, on every positional encoding")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"$ python {shlex.join(sys.argv)}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} threads, "
          f"{os.cpu_count()} CPUs ({platform.machine()}); load average {os.getloadavg()[0]:.1f} at start")
    cases = {"quick": lambda: quick_case(args.quick_sequences),
             "gpt2-small": lambda: gpt2_case(args.prompt_tokens, args.corrupted_position)}
    print("\n| model | sites | grid (cells × prompts) | method | seconds | speed-up vs TL | max abs diff vs TL "
          "| corr. with exact | peak RSS GB |\n|---|---|---|---|---|---|---|---|---|")
    notes = []
    for key in args.models:
        name, model, clean, corrupted, metric, sites = cases[key]()
        n_cells = len(sites) * model.cfg.n_layers * clean.shape[1]
        shape = f"{len(sites)} × {model.cfg.n_layers} × {clean.shape[1]} ({n_cells} × {clean.shape[0]})"
        reference_seconds, reference = timed(lambda: tl_grids(model, clean, corrupted, metric, sites))
        rows = [("TL per-cell loop, float32", reference_seconds, reference, peak_gb())]
        for label, dtype in (("engine, float32", None), ("engine, bfloat16 autocast", torch.bfloat16)):
            seconds, grids = timed(lambda dtype=dtype: patch_grids(model, clean, corrupted, metric, sites,
                                                                   last_position_only=True, dtype=dtype))
            rows.append((label, seconds, grids, peak_gb()))
        seconds, preview = timed(lambda: attribution_grids(model, clean, corrupted, metric, sites))
        rows.append(("attribution preview, float32", seconds, preview, peak_gb()))
        with torch.no_grad():  # the same logits unembedded on one position and on all: float reassociation only
            one = model.run_with_hooks(corrupted, fwd_hooks=[(_readout_hook(model), lambda act, hook: act[:, -1:])])
            noise = abs(float(metric(one)) - float(metric(model(corrupted))))
        notes.append(f"{name}: the metric's float noise floor, |metric(corrupted logits unembedded on the last "
                     f"position alone) - metric(all positions)| = {noise:.1e}")
        for label, seconds, grids, peak in rows:
            difference = float((flat(grids, sites) - flat(reference, sites)).abs().max())
            correlation = float(torch.corrcoef(torch.stack([flat(grids, sites), flat(reference, sites)]))[0, 1])
            print(f"| {name} | {', '.join(sites)} | {shape} | {label} | {seconds:.2f} | "
                  f"{reference_seconds / seconds:.1f}x | {difference:.1e} | {correlation:.3f} | {peak:.2f} |")
    print("", *notes, sep="\n")
    if args.correlations:
        print("\n| variant (quick size, random weights) | site | Pearson r, preview vs exact | max abs diff |"
              "\n|---|---|---|---|")
        for variant in CORRELATION_VARIANTS:
            _, model, clean, corrupted, metric, sites = quick_case(args.quick_sequences, variant)
            exact = patch_grids(model, clean, corrupted, metric, sites, last_position_only=True)
            preview = attribution_grids(model, clean, corrupted, metric, sites)
            for site in sites:
                r = float(torch.corrcoef(torch.stack([exact[site].flatten(), preview[site].flatten()]))[0, 1])
                print(f"| {variant} | {site} | {r:.3f} | {float((exact[site] - preview[site]).abs().max()):.2f} |")
    print(f"\nload average {os.getloadavg()[0]:.1f} at end")


if __name__ == "__main__":
    main()
