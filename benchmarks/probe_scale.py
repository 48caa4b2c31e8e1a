"""PositionProbe at language-model scale: 1,024 position classes × d_model 768, memory and speed against scikit-learn.

    python benchmarks/probe_scale.py [--sites 2] [--sequences 16] [--positions 1024] [--d-model 768]
        [--max-iter 200] [--sklearn-sites 1] [--threads N]

Evaluated at once, the logits of a position probe on a GPT-2-sized sweep (1,024 classes × 100k tokens ×
25 sites) would take ~10 GB; `PositionProbe` evaluates them one site and `LOGITS_PER_CHUNK` logits at a
time and fits sites in groups within `memory_limit`. This script fits synthetic activations of that
shape and prints the peak RSS beside the size of the inputs and of the logits evaluated at once;
or, with `--sklearn-sites K`, times scikit-learn's `LogisticRegression` (lbfgs, its defaults but
max_iter, float64) on the first K sites, one after another, against `PositionProbe` on the same
sites at once, both with standardised features and the same thread budget.

Activations: `--sequences` sequences of `--positions` tokens drawn from 2,000 token types; at each
site a token is its type's embedding plus a position code (a smooth random walk over positions, so
nearby positions are alike, scaled down site by site) plus noise. 75% of the sequences train.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shlex
import sys
import time
import warnings

import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from poslens.probes import PositionProbe, split_by_sequence, split_tokens
from poslens.probes.logistic import LOGITS_PER_CHUNK

N_TYPES = 2000


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def activations(n_sites: int, n_sequences: int, n_positions: int, d_model: int, seed: int = 0) -> torch.Tensor:
    """Synthetic `[site, sequence, position, d_model]` activations (see the module docstring)."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(N_TYPES, (n_sequences, n_positions), generator=generator)
    embedding = torch.randn(N_TYPES, d_model, generator=generator)
    walk = torch.randn(n_positions, d_model, generator=generator).cumsum(0) / n_positions**0.5
    out = torch.empty(n_sites, n_sequences, n_positions, d_model)
    for site in range(n_sites):
        noise = torch.randn(n_sequences, n_positions, d_model, generator=generator)
        out[site] = embedding[tokens] + 3.0 / (1 + site) * walk + noise
    return out


def compare_with_sklearn(X_train: torch.Tensor, y_train: torch.Tensor, X_test: torch.Tensor, y_test: torch.Tensor, *,
                         threads: int, max_iter: int = 200) -> str:
    """`PositionProbe` on all sites of `X_train` against scikit-learn's `LogisticRegression` (lbfgs,
    max_iter 2000, float64) site by site, on standardised features with the same thread budget:
    times, iterations and test accuracies, as a report."""
    began = time.perf_counter()
    ours = PositionProbe(max_iter=max_iter).fit(X_train, y_train)
    ours_seconds = time.perf_counter() - began
    theirs_seconds, theirs_accuracy, theirs_iters = 0.0, [], []
    with threadpool_limits(threads), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        for site in range(len(X_train)):
            began = time.perf_counter()
            scaler = StandardScaler().fit(X_train[site].numpy())
            fitted = LogisticRegression(max_iter=2000).fit(scaler.transform(X_train[site].numpy()), y_train.numpy())
            theirs_seconds += time.perf_counter() - began
            theirs_accuracy.append(round(fitted.score(scaler.transform(X_test[site].numpy()), y_test.numpy()), 4))
            theirs_iters.append(int(fitted.n_iter_[0]))
    warned = sum(issubclass(w.category, ConvergenceWarning) for w in caught)
    return (f"{len(X_train)} site(s) x {X_train.shape[1]:,} training tokens x d_model {X_train.shape[2]}, "
            f"{int(y_train.max()) + 1} classes:\n"
            f"  PositionProbe (sites batched): {ours_seconds:.1f} s, iterations {ours.n_iter_.tolist()}, test accuracy "
            f"{[round(a, 4) for a in ours.score(X_test, y_test).tolist()]}\n"
            f"  scikit-learn (site by site):   {theirs_seconds:.1f} s, iterations {theirs_iters}, test accuracy "
            f"{theirs_accuracy}, {warned} ConvergenceWarning(s)\n"
            f"  speed ratio (scikit-learn / ours): {theirs_seconds / ours_seconds:.1f}x; peak RSS {peak_gb():.2f} GB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=2)
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--positions", type=int, default=1024)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--max-iter", type=int, default=200, help="ours (scikit-learn gets 2000)")
    parser.add_argument("--sklearn-sites", type=int, default=1, help="sites fitted by scikit-learn (0: skip)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"$ python {shlex.join(sys.argv)}")
    print(f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs ({platform.machine()}); "
          f"load average {os.getloadavg()[0]:.1f} at start")

    acts = activations(args.sites, args.sequences, args.positions, args.d_model)
    (X_train, y_train), (X_test, y_test) = split_tokens(acts, split_by_sequence(args.sequences, seed=0))
    del acts
    n_train = X_train.shape[1]
    inputs = (X_train.numel() + X_test.numel()) * 4 / 1024**3
    at_once = args.sites * args.positions * n_train * 4 / 1024**3
    print(f"{args.sites} sites x {n_train:,} training tokens x d_model {args.d_model}, {args.positions} classes; "
          f"inputs {inputs:.2f} GB; logits of every site at once {at_once:.2f} GB (chunks of {LOGITS_PER_CHUNK:,} "
          f"logits = {LOGITS_PER_CHUNK * 4 / 1024**2:.0f} MB); peak RSS before fitting {peak_gb():.2f} GB")

    if args.sklearn_sites:
        print(compare_with_sklearn(X_train[: args.sklearn_sites], y_train, X_test[: args.sklearn_sites], y_test,
                                   threads=args.threads, max_iter=args.max_iter))
    else:
        began = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # max_iter may be set low on purpose (a memory run)
            ours = PositionProbe(max_iter=args.max_iter).fit(X_train, y_train)
        print(f"PositionProbe, all sites: {time.perf_counter() - began:.1f} s, iterations {ours.n_iter_.tolist()}, "
              f"test accuracy {[round(a, 4) for a in ours.score(X_test, y_test).tolist()]}; "
              f"peak RSS {peak_gb():.2f} GB")
    print(f"load average {os.getloadavg()[0]:.1f} at end")


if __name__ == "__main__":
    main()
