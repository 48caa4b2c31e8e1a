"""How long `poslens demo --model SPEC` takes to become ready, and to answer, on a tiny and a GPT-2-small-shaped model.

    python benchmarks/lm_demo_ready.py [--shape gpt2-small|tiny] [--sequences 128] [--max-len 64]
        [--prompt-tokens 16] [--threads N] [--repeats 3]

Builds a random-weight GPT-2 locally (`gpt2-small`: `GPT2Config()`, 12 blocks, d_model 768,
vocabulary 50,257; `tiny`: 2 blocks, d_model 32, vocabulary 96), with a stand-in word-level
tokenizer of its vocabulary's size (`real_model_sweep.stand_in_tokenizer`; nothing is downloaded),
and times what `serve` does before it listens, stage by stage: bridging (`load_lm_demo`), the
positional-encoding detection (`LMDemoModel.info`), the position probe (capture on `--sequences`
random-token sequences of `--max-len` tokens, then the fit) and building the app. Then what one
prompt of `--prompt-tokens` tokens (BOS included) costs in each panel: tokens and next tokens,
attention and the probe's predictions (medians of `--repeats`), and activation patching at each
site (one run each). The peers, measured in the same run: one plain forward pass over the probe's sequences
(against the probe stage), and a plain forward pass of the prompt times the layers × positions
that patching runs (against each patching panel).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

from poslens.demos.lm_app import make_app
from poslens.demos.lm_panels import (
    attention_figure,
    encode_prompt,
    load_lm_demo,
    patch_effects,
    probe_predictions,
    prompt_tokens,
    top_next_tokens,
)
from poslens.hooks import capture_residuals

sys.path.insert(0, str(Path(__file__).parent))  # the benchmarks folder is not a package
from probe_scale import peak_gb  # noqa: E402
from real_model_sweep import stand_in_tokenizer  # noqa: E402

SHAPES = {"gpt2-small": {},
          "tiny": {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64, "vocab_size": 96, "bos_token_id": 95,
                   "eos_token_id": 95}}


def timed(run: Callable[[], object], repeats: int = 1) -> tuple[float, object]:
    """The median seconds of `repeats` calls of `run`, and its last result."""
    seconds = []
    for _ in range(repeats):
        began = time.perf_counter()
        result = run()
        seconds.append(time.perf_counter() - began)
    return statistics.median(seconds), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="gpt2-small", choices=list(SHAPES))
    parser.add_argument("--sequences", type=int, default=128, help="probe sequences (the demo's default)")
    parser.add_argument("--max-len", type=int, help="tokens per probe sequence and prompt (default: the demo's)")
    parser.add_argument("--prompt-tokens", type=int, default=16, help="tokens of the timed prompt, BOS included")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds of each panel but patching")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"$ python {shlex.join(sys.argv)}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} threads, "
          f"{os.cpu_count()} CPUs ({platform.machine()}); load average {os.getloadavg()[0]:.1f} at start")

    config = transformers.GPT2Config(**SHAPES[args.shape])
    torch.manual_seed(1)
    hf = transformers.GPT2LMHeadModel(config).eval()
    stages: dict[str, float] = {}
    stages["bridge (load_lm_demo)"], demo = timed(lambda: load_lm_demo(
        hf, tokenizer=stand_in_tokenizer(config.vocab_size), n_sequences=args.sequences, max_len=args.max_len))
    stages["positional encodings (info)"], _ = timed(lambda: demo.info)
    tokens = demo.probe_tokens
    stages["position probe: capture"], capture = timed(lambda: capture_residuals(demo.model, tokens,
                                                                                 dtype=torch.float32))
    del capture
    stages["position probe: capture + fit"], _ = timed(lambda: demo.probe)
    stages["app (make_app)"], _ = timed(lambda: make_app(demo))
    ready = sum(seconds for name, seconds in stages.items() if name != "position probe: capture")

    @torch.no_grad()
    def plain_probe_forward() -> None:
        for batch in tokens.split(max(1, 8192 // tokens.shape[1])):
            demo.model(batch)

    plain, _ = timed(plain_probe_forward)
    print(f"\nmodel: random GPT-2 ({args.shape}), {hf.num_parameters() / 1e6:.1f} M parameters, "
          f"{config.n_layer} blocks, {len(demo.sites)} patching sites; probe on {demo.probe_data}")
    for name, seconds in stages.items():
        print(f"{name:>34}: {seconds:7.2f} s")
    print(f"{'ready (all but the lone capture)':>34}: {ready:7.2f} s; peak RSS {peak_gb():.2f} GB")
    print(f"{'peer: plain forward of probe data':>34}: {plain:7.2f} s; probe stage / plain forward = "
          f"{stages['position probe: capture + fit'] / plain:.1f}x\n")

    prompt = " ".join(f"w{(7 * i) % (config.vocab_size - 1)}" for i in range(args.prompt_tokens - 1))
    clean = encode_prompt(demo, prompt)
    corrupted = clean.clone()
    corrupted[0, clean.shape[1] // 2] = int(clean[0, clean.shape[1] // 2]) + 1
    n_layers, n_pos = demo.model.cfg.n_layers, clean.shape[1]
    with torch.no_grad():
        forward, _ = timed(lambda: demo.model(clean), args.repeats)
    panels = {"tokens + next tokens": lambda: (prompt_tokens(demo, clean), top_next_tokens(demo, clean)),
              "attention (one head)": lambda: attention_figure(demo, clean, n_layers - 1, 0),
              "probe predictions": lambda: probe_predictions(demo, clean)}
    panels |= {f"patching {site}": lambda site=site: patch_effects(demo, clean, corrupted, site)
               for site in demo.sites}
    print(f"one prompt of {n_pos} tokens; plain forward {forward * 1e3:.1f} ms (median of {args.repeats})")
    for name, run in panels.items():
        seconds, _ = timed(run, 1 if name.startswith("patching") else args.repeats)
        ratio = f"; / ({n_layers} x {n_pos} plain forwards) = {seconds / (n_layers * n_pos * forward):.2f}x" \
            if name.startswith("patching") else ""
        print(f"{name:>24}: {seconds:7.2f} s{ratio}")
    print(f"peak RSS {peak_gb():.2f} GB; load average {os.getloadavg()[0]:.1f} at end")


if __name__ == "__main__":
    main()
