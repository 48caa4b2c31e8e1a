"""Predicting the shift itself: does the stream know where the operands were put?

In the shifted format (`Addition(max_shift=P)`) each sequence has k ∈ 0..P filler tokens
before its operands. On an operand digit the role is fixed (say `x1`) and the position is
role + k, so decoding k from an operand token's vector is decoding position beyond role,
with nothing else mixed in. `shift_probe` fits one `PositionProbe` per residual site on
the operand tokens of three quarters of a seeded sample of held-out sequences (split by
sequence) and reports its accuracy on the rest, beside:

- `random_init`: the same probe on the untrained twin;
- `token_identity`: a probe fed only the token's id (on operand tokens it says nothing about
  k, so it sits at chance up to sampling);
- `bag_of_prefix`: a probe fed the token's id and the share of each token type in its
  prefix (`probes.bag_of_prefix_features`), what one causal NoPE layer can compute. The
  share of fillers determines k (k / (k + r + 1) at role index r), but not linearly across
  roles, so a linear probe on these features reads it only in part (about 0.6 at 5 shifts
  on 150 training sequences): the bar for "the shift beyond content";
- `chance`: the majority shift's share.

Columns `SHIFT_COLUMNS` (site, layer, baseline, value = accuracy).
"""

from __future__ import annotations

import pandas as pd
import torch
from jaxtyping import Bool, Int
from torch import Tensor

from poslens.analyses.tables import site_layer
from poslens.hooks import capture_residuals
from poslens.probes import (
    PositionProbe,
    bag_of_prefix_features,
    chance_accuracy,
    split_by_sequence,
    token_identity_predictions,
)
from poslens.tasks import Addition
from poslens.variants import HookedTransformer
from poslens.variants.hub import fresh_twin

SHIFT_COLUMNS = ("site", "layer", "baseline", "value")


@torch.no_grad()
def shift_probe(model: HookedTransformer, task: Addition, *, n_sequences: int = 1000, seed: int = 0,
                C: float = 1.0) -> pd.DataFrame:
    """Accuracy of a probe for the shift k on operand tokens at every residual site, with its
    bars (module docstring), on a seeded sample of `n_sequences` held-out sequences.

    Args:
        model: a model trained (or not) on `task`.
        task: a shifted-format addition task (`max_shift` >= 1).
        n_sequences: held-out sequences sampled (`task.sample_test`, seeded by `seed`).
        seed: draws the sample and the split.
        C: inverse L2 strength of every probe.

    Returns:
        One row per (site, baseline) for trained and random_init, and per baseline for the
        model-free bars repeated at every site (`SHIFT_COLUMNS`).
    """
    if not getattr(task, "max_shift", 0):
        raise ValueError("shift_probe needs a shifted-format task (Addition(max_shift >= 1)); this one has no shift")
    tokens = task.sample_test(n_sequences, seed=seed)
    roles = task.role_labels(tokens)
    operand = torch.tensor([name[0] in "xy" for name in task.role_names])[roles]  # [seq, pos]
    shift = task.shifts(tokens)[:, None].expand_as(tokens)
    train_seq, test_seq = split_by_sequence(len(tokens), seed=seed)
    y_train, y_test = shift[train_seq][operand[train_seq]], shift[test_seq][operand[test_seq]]
    rows = []
    for baseline, candidate in (("trained", model), ("random_init", fresh_twin(model))):
        capture = capture_residuals(candidate, tokens)
        X_train = capture.activations[:, train_seq][:, operand[train_seq]]
        X_test = capture.activations[:, test_seq][:, operand[test_seq]]
        accuracy = PositionProbe(C=C).fit(X_train, y_train).score(X_test, y_test)
        rows += [{"site": site, "baseline": baseline, "value": float(value)}
                 for site, value in zip(capture.sites, accuracy)]
    features = bag_of_prefix_features(tokens)
    bag = PositionProbe(C=C).fit(features[train_seq][operand[train_seq]], y_train).predict(
        features[test_seq][operand[test_seq]])
    identity = _operand_identity(tokens, shift, operand, train_seq, test_seq, C)
    bars = {"token_identity": float((identity == y_test).double().mean()),
            "bag_of_prefix": float((bag == y_test).double().mean()), "chance": chance_accuracy(y_train)}
    rows += [{"site": site, "baseline": baseline, "value": value} for baseline, value in bars.items()
             for site in capture.sites]
    table = pd.DataFrame(rows)
    return table.assign(layer=table["site"].map(site_layer))[list(SHIFT_COLUMNS)]


def _operand_identity(tokens: Int[Tensor, "seq pos"], shift: Int[Tensor, "seq pos"], operand: Bool[Tensor, "seq pos"],
                      train_seq: Tensor, test_seq: Tensor, C: float) -> Int[Tensor, " n_test_tokens"]:
    """Token-identity predictions of the shift for the operand tokens of the test sequences
    (one row per operand token, split by the sequence it belongs to)."""
    flat_ids, flat_shift = tokens[operand][:, None], shift[operand][:, None]
    sequence = torch.arange(len(tokens))[:, None].expand_as(tokens)[operand]
    train = torch.isin(sequence, train_seq).nonzero().flatten()
    test = torch.isin(sequence, test_seq).nonzero().flatten()
    return token_identity_predictions(flat_ids, flat_shift, train, test, C=C)
