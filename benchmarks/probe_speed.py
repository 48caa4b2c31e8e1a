"""How fast is `PositionProbe` on every site of a 6-layer model, next to scikit-learn per site?

    python benchmarks/probe_speed.py [--quick] [--threads N] [--repeats R]

Activations are synthetic but shaped like a real residual stream: 13 sites (embed, then
resid_mid and resid_post of 6 blocks), d_model 64, 12 positions, 2,000 sequences (24k tokens;
75% of sequences to train). Token and position embeddings enter at the embed site; each block
adds a uniform causal-attention mix of earlier tokens and an MLP of the LayerNormed stream
(random weights), plus noise, so position is encoded more weakly and more entangled with token
identity at every site. Both fitters get the same standardisation, C, thread budget and
training tokens; scikit-learn keeps its defaults (lbfgs, tol=1e-4) apart from max_iter, raised
so that it converges. Timings are the best of `--repeats` runs, fitting only. Needs scikit-learn.

On a machine busy with other work, compare with `--threads 1`: with more threads than free
cores, both libraries spend most of their time waiting for descheduled threads.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
import warnings

import einops
import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from poslens.probes import PositionProbe, split_by_sequence, split_tokens

N_LAYERS, D_MODEL, N_POSITIONS, VOCAB = 6, 64, 12, 50
C, SKLEARN_MAX_ITER = 1.0, 2000


def site_names() -> list[str]:
    return ["embed"] + [f"blocks.{layer}.{site}" for layer in range(N_LAYERS) for site in ("resid_mid", "resid_post")]


def residual_stream(n_sequences: int, seed: int = 0) -> torch.Tensor:
    """Synthetic activations `[site, sequence, position, d_model]` at the 13 sites of `site_names`."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return scale * torch.randn(*shape, generator=generator)

    tokens = torch.randint(VOCAB, (n_sequences, N_POSITIONS), generator=generator)
    x = randn(VOCAB, D_MODEL)[tokens] + randn(N_POSITIONS, D_MODEL, scale=0.5)
    causal = torch.ones(N_POSITIONS, N_POSITIONS).tril()
    causal /= causal.sum(-1, keepdim=True)
    sites = [x]
    for _ in range(N_LAYERS):
        values = x @ randn(D_MODEL, D_MODEL, scale=D_MODEL**-0.5)
        mixed = einops.einsum(causal, values, "query key, sequence key d -> sequence query d")
        x = x + mixed + randn(*x.shape, scale=0.5)
        sites.append(x)
        normed = torch.nn.functional.layer_norm(x, (D_MODEL,))
        hidden = torch.relu(normed @ randn(D_MODEL, 4 * D_MODEL, scale=D_MODEL**-0.5))
        x = x + hidden @ randn(4 * D_MODEL, D_MODEL, scale=(4 * D_MODEL) ** -0.5) + randn(*x.shape, scale=0.5)
        sites.append(x)
    return torch.stack(sites)


def best_time(fit, repeats: int):
    """The result of the last run and the fastest wall time over `repeats` runs."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fit()
        times.append(time.perf_counter() - start)
    return result, min(times), times


def fit_sklearn(X_train: np.ndarray, y_train: np.ndarray) -> list[tuple[StandardScaler, LogisticRegression]]:
    fitted = []
    for site in X_train:
        scaler = StandardScaler().fit(site)
        fitted.append((scaler, LogisticRegression(C=C, max_iter=SKLEARN_MAX_ITER).fit(scaler.transform(site), y_train)))
    return fitted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="500 sequences and one repeat, as a smoke test")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="threads for torch and for scikit-learn's BLAS/OpenMP (default: torch's default)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per fitter (default 3, 1 with --quick)")
    parser.add_argument("--tol", type=float, default=PositionProbe().tol,
                        help="our stopping tolerance (default: PositionProbe's, the same as scikit-learn's 1e-4); "
                             "scikit-learn always keeps its default")
    args = parser.parse_args()
    n_sequences, repeats = (500, 1) if args.quick else (2000, 3)
    repeats = args.repeats or repeats
    torch.set_num_threads(args.threads)

    print(f"command: python {shlex.join(sys.argv)}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} torch threads; scikit-learn BLAS/OpenMP limited to "
          f"{args.threads} threads; {os.cpu_count()} CPUs ({platform.machine()}); "
          f"load average {os.getloadavg()[0]:.1f} at start")

    activations = residual_stream(n_sequences)
    (X_train, y_train), (X_test, y_test) = split_tokens(activations, split_by_sequence(n_sequences, seed=0))
    print(f"{activations.shape[0]} sites x {X_train.shape[1]} training tokens x d_model {D_MODEL}, "
          f"{N_POSITIONS} classes; {X_test.shape[1]} test tokens; C={C}; our tol={args.tol}; "
          f"best of {repeats} run(s)\n")

    probe, ours_time, ours_times = best_time(lambda: PositionProbe(C=C, tol=args.tol).fit(X_train, y_train), repeats)
    ours_accuracy = probe.score(X_test, y_test).numpy()
    X_train_np, y_train_np, X_test_np, y_test_np = X_train.numpy(), y_train.numpy(), X_test.numpy(), y_test.numpy()
    with threadpool_limits(args.threads), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        fitted, sklearn_time, sklearn_times = best_time(lambda: fit_sklearn(X_train_np, y_train_np), repeats)
    sklearn_accuracy = np.array([model.score(scaler.transform(X), y_test_np)
                                 for (scaler, model), X in zip(fitted, X_test_np)])
    sklearn_iters = [int(model.n_iter_[0]) for _, model in fitted]

    print(f"{'site':<22}{'ours acc':>10}{'sklearn acc':>13}{'gap':>9}{'ours iters':>12}{'sklearn iters':>15}")
    for name, ours, theirs, ours_iter, their_iter in zip(site_names(), ours_accuracy, sklearn_accuracy,
                                                         probe.n_iter_.tolist(), sklearn_iters):
        print(f"{name:<22}{ours:>10.4f}{theirs:>13.4f}{ours - theirs:>+9.4f}{ours_iter:>12}{their_iter:>15}")
    gap = np.abs(ours_accuracy - sklearn_accuracy).max()
    warned = sum(issubclass(w.category, ConvergenceWarning) for w in caught)
    runs = ", ".join(f"{t:.3f}" for t in ours_times)
    print(f"\nPositionProbe, all 13 sites at once: {ours_time:.3f} s  (runs: {runs})")
    print(f"scikit-learn, loop over sites:       {sklearn_time:.3f} s  (runs: "
          f"{', '.join(f'{t:.3f}' for t in sklearn_times)}; {warned} ConvergenceWarning(s))")
    print(f"speed ratio (sklearn / ours): {sklearn_time / ours_time:.1f}x;  max accuracy gap: {100 * gap:.2f} points")
    # The ratio is (iterations saved) x (cost of one site-iteration): the first factor comes from the solver,
    # the second from batching the sites into large float32 matmuls.
    ours_total, sklearn_total = int(probe.n_iter_.sum()), sum(sklearn_iters)
    print(f"site-iterations: ours {ours_total}, scikit-learn {sklearn_total}; time per site-iteration: ours "
          f"{1e3 * ours_time / ours_total:.2f} ms, scikit-learn {1e3 * sklearn_time / sklearn_total:.2f} ms")
    print(f"load average {os.getloadavg()[0]:.1f} at end")


if __name__ == "__main__":
    main()
