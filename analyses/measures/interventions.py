"""Interventions on the residual stream of an addition model: position swaps and residual cuts.

The position-swap counterfactual tests the "vertical slice" reading directly: exchange the
residual vectors of two positions at one site and ask whether the model now answers as if the
two digits had swapped places (position is carried by the column) or as before (the vectors
carry their own position with them). A residual cut removes one block's residual
connection(s) at inference and measures what is lost.
"""

from __future__ import annotations

import pandas as pd
import torch
from torch import Tensor

from poslens.analyses.measures.patching import corrupt
from poslens.hooks import capture_residuals, cut_residual, hook_name, residual_sites
from poslens.probes import PositionProbe, flatten_tokens, split_by_sequence
from poslens.tasks import Addition
from poslens.variants import HookedTransformer, evaluate
from poslens.variants.config import SUBLAYERS


@torch.no_grad()
def position_swap(model: HookedTransformer, task: Addition, *, positions: tuple[int, int] = (0, 2),
                  n_sequences: int = 256) -> pd.DataFrame:
    """At every residual site, exchange the vectors of two positions and record how often the
    model's greedy answer becomes its own answer to the digit-swapped prompt (`follows_swap`)
    or stays its answer to the original prompt (`keeps_original`), on prompts where the
    model's two answers differ."""
    n_answer = task.seq_len - task.prompt_len
    sequences = task.test_set()[: n_sequences * 4]
    prompts = sequences[:, : task.prompt_len]
    swapped_prompts = corrupt(task, sequences, "swap", positions=positions)[:, : task.prompt_len]
    original = model.generate(prompts.to(model.cfg.device), n_answer).cpu()
    swapped = model.generate(swapped_prompts.to(model.cfg.device), n_answer).cpu()
    differs = (original != swapped).any(-1)
    prompts, original, swapped = prompts[differs][:n_sequences], original[differs][:n_sequences], swapped[differs][:n_sequences]
    i, j = positions

    def exchange(activation: Tensor, hook) -> Tensor:
        activation = activation.clone()
        activation[:, [i, j]] = activation[:, [j, i]]
        return activation

    rows = []
    for site in residual_sites(model):
        with model.hooks(fwd_hooks=[(hook_name(site), exchange)]):
            answer = model.generate(prompts.to(model.cfg.device), n_answer).cpu()
        rows.append({"site": site, "follows_swap": float((answer == swapped).all(-1).double().mean()),
                     "keeps_original": float((answer == original).all(-1).double().mean()),
                     "n_sequences": len(prompts)})
    return pd.DataFrame(rows)


@torch.no_grad()
def residual_cut_effects(model: HookedTransformer, task: Addition, *, n_sequences: int = 500, C: float = 1.0,
                         seed: int = 0) -> pd.DataFrame:
    """Remove each block's residual connection(s) at inference and measure what is lost.

    One row per cut (`none` first, then every block × `attn` / `mlp` / `both`): exact-match
    accuracy, mean log-probability of the correct answer tokens (teacher-forced), and the
    accuracy of a position probe fitted afresh on the final residual stream of the cut model
    (is position still linearly readable downstream?). Deltas are against the intact model.
    """
    tokens = task.test_set()[:n_sequences]
    train_seq, test_seq = split_by_sequence(len(tokens), test_fraction=0.25, seed=seed)
    final_site = residual_sites(model)[-1]
    rows = []
    cuts = [(None, "none")] + [(block, sublayer) for block in range(model.cfg.n_layers) for sublayer in SUBLAYERS]
    for block, sublayer in cuts:
        hooks = [] if block is None else cut_residual(block, sublayer)
        with model.hooks(fwd_hooks=hooks):
            scores = evaluate(model, task, tokens)
            logits = model(tokens[:, :-1].to(model.cfg.device)).cpu()
            capture = capture_residuals(model, tokens, sites=[final_site])
        log_probs = logits[:, task.prompt_len - 1 :].log_softmax(-1)
        answer_logprob = log_probs.gather(-1, tokens[:, task.prompt_len :, None]).squeeze(-1).sum(-1).mean()
        acts = capture.activations.float()
        probe = PositionProbe(C=C).fit(*flatten_tokens(acts, train_seq))
        rows.append({"block": -1 if block is None else block, "sublayer": sublayer,
                     "exact_match": scores["exact_match"], "answer_logprob": float(answer_logprob),
                     "probe_accuracy": float(probe.score(*flatten_tokens(acts, test_seq))[0])})
    table = pd.DataFrame(rows)
    for column in ("exact_match", "answer_logprob", "probe_accuracy"):
        table[f"delta_{column}"] = table[column] - table[column].iloc[0]
    return table
