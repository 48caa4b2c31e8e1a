"""What an addition model loses when one block's residual connection(s) are removed at inference.

`residual_cut_effects` cuts each block's connections in turn (`hooks.cut_residual`) and measures
the answers, their log-probability and whether position is still linearly readable at the end of
the stream. It draws its sequences with `task.sample_test(..., seed)`, an unbiased sample of the
held-out set, so each training seed can get its own draw.
"""

from __future__ import annotations

import pandas as pd
import torch

from poslens.hooks import capture_residuals, cut_residual, residual_sites
from poslens.probes import PositionProbe, split_by_sequence, split_tokens
from poslens.tasks import Addition
from poslens.variants import HookedTransformer, evaluate
from poslens.variants.config import SUBLAYERS


@torch.no_grad()
def residual_cut_effects(model: HookedTransformer, task: Addition, *, n_sequences: int = 500, C: float = 1.0,
                         seed: int = 0) -> pd.DataFrame:
    """Remove each block's residual connection(s) at inference and measure what is lost.

    One row per cut (`none` first, then every block × `attn` / `mlp` / `both`): exact-match
    accuracy, mean log-probability of the correct answer tokens (teacher-forced), and the
    accuracy of a position probe fitted afresh on the final residual stream of the cut model
    (is position still linearly readable downstream?). Deltas are against the intact model.
    All on a seeded sample of `n_sequences` held-out sequences (`seed` also splits the probe's data).

    A causal model's cut is measured in one teacher-forced pass (logits and final stream
    together): its greedy answer is all right exactly when every answer token is the argmax given
    the right earlier answer tokens, which is what that pass shows. A bidirectional model's
    earlier positions would see the answer, so its exact match is greedy-decoded.

    Args:
        model: an addition model.
        task: its task.
        n_sequences: held-out sequences measured.
        C: the inverse L2 strength of the position probe.
        seed: draws the sample and splits the probe's data.

    Returns:
        One row per cut.
    """
    tokens = task.sample_test(min(n_sequences, task.n_test), seed)
    split = split_by_sequence(len(tokens), test_fraction=0.25, seed=seed)
    final_site = residual_sites(model)[-1]
    answers = tokens[:, task.prompt_len :]
    rows = []
    cuts = [(None, "none")] + [(block, sublayer) for block in range(model.cfg.n_layers) for sublayer in SUBLAYERS]
    for block, sublayer in cuts:
        hooks = [] if block is None else cut_residual(block, sublayer)
        with model.hooks(fwd_hooks=hooks):
            if model.cfg.attention_dir == "causal":
                logits, cache = model.run_with_cache(tokens.to(model.cfg.device), names_filter=[final_site])
                logits, acts = logits[:, :-1].cpu(), cache[final_site][None].cpu()
                exact_match = float((logits[:, task.prompt_len - 1 :].argmax(-1) == answers).all(-1).double().mean())
            else:
                exact_match = evaluate(model, task, tokens)["exact_match"]
                logits = model(tokens[:, :-1].to(model.cfg.device)).cpu()
                acts = capture_residuals(model, tokens, sites=[final_site]).activations
        log_probs = logits[:, task.prompt_len - 1 :].log_softmax(-1)
        answer_logprob = log_probs.gather(-1, answers[..., None]).squeeze(-1).sum(-1).mean()
        train, test = split_tokens(acts.float(), split)
        rows.append({"block": -1 if block is None else block, "sublayer": sublayer, "exact_match": exact_match,
                     "answer_logprob": float(answer_logprob),
                     "probe_accuracy": float(PositionProbe(C=C).fit(*train).score(*test)[0])})
    table = pd.DataFrame(rows)
    for column in ("exact_match", "answer_logprob", "probe_accuracy"):
        table[f"delta_{column}"] = table[column] - table[column].iloc[0]
    return table
