"""What a position-probe sweep of a real GPT-2 costs: the sweep on a randomly initialised GPT-2-small-shaped model.

    python benchmarks/real_model_sweep.py [--sequences 256] [--max-len 128] [--float16] [--sklearn-sites 2]
        [--threads N] [--repeats 3] [--device cuda]

Builds `GPT2LMHeadModel(GPT2Config())` locally (12 blocks, d_model 768, 12 heads, vocabulary 50,257,
n_ctx 1024; random weights, nothing downloaded) with a stand-in word-level tokenizer of the same size
whose BOS is GPT-2's `<|endoftext|>` (id 50256), and bridges it with `poslens.variants.load_any`. Then:

1. capture overhead: plain forward passes vs `hooks.capture_residuals` at all 25 residual sites,
   over the same batches of random-token sequences, interleaved, medians of `--repeats`;
2. the sweep: `run_probe_sweep` with every control (random-init twin, token identity, control task,
   chance) on `--sequences` random-token sequences of `--max-len` tokens: wall time and peak RSS;
3. scikit-learn at this scale: `LogisticRegression` (lbfgs, its defaults but max_iter) on the
   first `--sklearn-sites` sites' activations, one site after another, against `PositionProbe` on
   the same sites and tokens, both given the same thread budget and standardised features.

Peak RSS is the process's high-water mark (`ru_maxrss`), printed after each stage.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from poslens.analyses.measures.probe_sweep import run_probe_sweep
from poslens.analyses.measures.sequences import random_sequences
from poslens.hooks import capture_residuals, residual_sites
from poslens.probes import split_by_sequence, split_tokens
from poslens.variants import load_any

sys.path.insert(0, str(Path(__file__).parent))  # the benchmarks folder is not a package
from probe_scale import compare_with_sklearn, peak_gb  # noqa: E402


def stand_in_tokenizer(size: int) -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer with `size` tokens, the last `<|endoftext|>` (GPT-2's BOS and EOS)."""
    vocab = {f"w{i}": i for i in range(size - 1)} | {"<|endoftext|>": size - 1}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>",
                                                eos_token="<|endoftext|>", unk_token="w0")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=256)
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--float16", action="store_true", help="keep the sweep's activations in float16")
    parser.add_argument("--sklearn-sites", type=int, default=2, help="sites fitted by scikit-learn (0: skip)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds of the capture-overhead comparison")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    parser.add_argument("--device", default="cpu", help="where the model runs (the probes fit on the CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"$ python {shlex.join(sys.argv)}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} threads, "
          f"{os.cpu_count()} CPUs ({platform.machine()}); load average {os.getloadavg()[0]:.1f} at start")

    start = time.perf_counter()
    config = transformers.GPT2Config()
    torch.manual_seed(1)  # fresh_twin, the random-init control, draws with seed 0: a different model
    hf = transformers.GPT2LMHeadModel(config).eval()
    model = load_any(hf, tokenizer=stand_in_tokenizer(config.vocab_size), device=args.device)
    sites = residual_sites(model)
    tokens = random_sequences(model, args.sequences, args.max_len, seed=0)
    print(f"model: random GPT-2 small, {hf.num_parameters() / 1e6:.1f} M parameters "
          f"({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M in the bridge, which splits q/k/v), "
          f"{len(sites)} sites; built and bridged in {time.perf_counter() - start:.1f} s; peak RSS {peak_gb():.2f} GB")
    print(f"data: {args.sequences} random-token sequences x {args.max_len} tokens (BOS first) = {tokens.numel():,} "
          f"tokens; {args.max_len} position classes\n")

    # 1. capture overhead ------------------------------------------------------------------------------------------
    timings: dict[str, list[float]] = {"plain forward": [], "capture all sites": []}

    @torch.no_grad()
    def plain() -> None:
        for batch in tokens.split(args.batch_size):
            model(batch.to(args.device))

    def capture() -> None:
        capture_residuals(model, tokens, batch_size=args.batch_size)

    for _ in range(args.repeats):
        for name, run in (("plain forward", plain), ("capture all sites", capture)):
            began = time.perf_counter()
            run()
            timings[name].append(time.perf_counter() - began)
    medians = {name: statistics.median(times) for name, times in timings.items()}
    for name, seconds in medians.items():
        print(f"{name:>18}: {seconds:7.1f} s "
              f"(median of {args.repeats}: {', '.join(f'{t:.1f}' for t in timings[name])})")
    print(f"capture / plain = {medians['capture all sites'] / medians['plain forward']:.2f}x; "
          f"peak RSS {peak_gb():.2f} GB\n")

    # 2. the sweep --------------------------------------------------------------------------------------------------
    began = time.perf_counter()
    result = run_probe_sweep({"gpt2-random": [model]}, tokens, batch_size=args.batch_size,
                          activation_dtype=torch.float16 if args.float16 else None, quiet=True)
    sweep_seconds = time.perf_counter() - began
    print(f"run_probe_sweep, every control ({'float16' if args.float16 else 'float32'} activations): "
          f"{sweep_seconds:.0f} s; peak RSS {peak_gb():.2f} GB; {len(result.table)} rows, "
          f"{len(result.by_position)} by-position rows")
    accuracy = result.table.query("probe == 'position' and metric == 'accuracy'").pivot(
        index="site", columns="baseline", values="value").reindex(sites)
    print(accuracy.round(3).to_string(), "\n")

    # 3. scikit-learn on the first sites ------------------------------------------------------------------------------
    if args.sklearn_sites:
        chosen = sites[: args.sklearn_sites]
        acts = capture_residuals(model, tokens, sites=chosen, batch_size=args.batch_size).activations
        (X_train, y_train), (X_test, y_test) = split_tokens(acts, split_by_sequence(len(tokens), seed=0))
        print(compare_with_sklearn(X_train, y_train, X_test, y_test, threads=args.threads))
    print(f"load average {os.getloadavg()[0]:.1f} at end")


if __name__ == "__main__":
    main()
