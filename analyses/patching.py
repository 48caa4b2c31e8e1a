"""Causal localisation of position: activation patching and position-swap counterfactuals.

Activation patching uses `transformer_lens.patching` unchanged on clean/corrupted addition
prompts; the corruption swaps two operand digits (or permutes all of them), so the clean and
corrupted prompts differ only in *where* digits are, and the metric is the normalised logit
difference of the first answer digit: 0 = the corrupted run, 1 = the clean run.

The position-swap counterfactual tests the "vertical slice" reading directly: exchange the
residual vectors of two positions at one site and ask whether the model now answers as if
the two digits had swapped places (position is carried by the column) or as before (the
vectors carry their own position with them).
"""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import patching

from hooks import capture_residuals, cut_residual, hook_name, residual_sites
from probes import PositionProbe, flatten_tokens, split_by_sequence
from tasks import Addition
from variants import HookedTransformer, evaluate
from variants.config import SUBLAYERS

PATCH_SITES = {"resid_pre": patching.get_act_patch_resid_pre, "resid_mid": patching.get_act_patch_resid_mid}


def corrupt(task: Addition, tokens: Int[Tensor, "batch seq"], kind: str = "swap", *, positions: tuple[int, int] = (0, 2),
            seed: int = 0) -> Int[Tensor, "batch seq"]:
    """Corrupted copies of addition `tokens`: `swap` exchanges the operand digits at prompt
    `positions` (default: the first operand's hundreds and units); `permute` shuffles all
    operand digit positions (one random permutation for the batch); the answer is recomputed."""
    operand_slots = task.operand_positions
    if kind == "swap":
        if not set(positions) <= set(operand_slots) or len(set(positions)) != 2:
            raise ValueError(f"swap positions must be two distinct operand-digit positions {operand_slots}, got {positions}")
        order = list(range(task.seq_len))
        order[positions[0]], order[positions[1]] = positions[1], positions[0]
    elif kind == "permute":
        generator = torch.Generator().manual_seed(seed)
        shuffled = [operand_slots[i] for i in torch.randperm(len(operand_slots), generator=generator).tolist()]
        order = list(range(task.seq_len))
        for slot, source in zip(operand_slots, shuffled):
            order[slot] = source
    else:
        raise ValueError(f"unknown corruption {kind!r}; allowed: ['swap', 'permute']")
    return task.encode(*task.decode_operands(tokens[:, order]))


def first_answer_logit_diff(clean: Int[Tensor, "batch seq"], corrupted: Int[Tensor, "batch seq"], prompt_len: int):
    """Metric on prompt logits: mean over the batch of logit(clean first answer digit) −
    logit(corrupted first answer digit) at the last prompt position."""
    rows = torch.arange(len(clean))
    good, bad = clean[:, prompt_len], corrupted[:, prompt_len]

    def metric(logits: Float[Tensor, "batch pos vocab"]) -> Tensor:
        last = logits[:, -1]
        return (last[rows, good] - last[rows, bad]).mean()

    return metric


@torch.no_grad()
def activation_patching(model: HookedTransformer, task: Addition, *, kind: str = "swap",
                        positions: tuple[int, int] = (0, 2), n_sequences: int = 64, seed: int = 0) -> pd.DataFrame:
    """Normalised logit difference after patching each (layer, position) of the clean run into
    the corrupted one, for `resid_pre`, `resid_mid` and the block outputs; a tidy table with
    columns site, layer, position, role, value. Only examples whose first answer digit
    changes under the corruption are used."""
    clean = task.test_set()[: n_sequences * 4]
    corrupted = corrupt(task, clean, kind, positions=positions, seed=seed)
    changed = clean[:, task.prompt_len] != corrupted[:, task.prompt_len]
    clean, corrupted = clean[changed][:n_sequences], corrupted[changed][:n_sequences]
    if len(clean) == 0:
        raise ValueError(f"corruption {kind!r} {positions} changes no first answer digit in the test set")
    model.eval()
    prompt = slice(0, task.prompt_len)
    metric = first_answer_logit_diff(clean, corrupted, task.prompt_len)
    corrupted_prompts = corrupted[:, prompt].to(model.cfg.device)
    clean_logits, clean_cache = model.run_with_cache(clean[:, prompt].to(model.cfg.device))
    clean_value, corrupted_value = metric(clean_logits), metric(model(corrupted_prompts))

    def normalised(logits: Tensor) -> Tensor:
        return (metric(logits) - corrupted_value) / (clean_value - corrupted_value)

    results = {name: fn(model, corrupted_prompts, clean_cache, normalised) for name, fn in PATCH_SITES.items()}
    block_every = patching.get_act_patch_block_every(model, corrupted_prompts, clean_cache, normalised)
    results["attn_out"], results["mlp_out"] = block_every[1], block_every[2]
    rows = [{"site": site, "layer": layer, "position": position, "role": task.roles[position],
             "value": float(grid[layer, position])}
            for site, grid in results.items() for layer in range(grid.shape[0]) for position in range(grid.shape[1])]
    return pd.DataFrame(rows)


def patching_heatmap(table: pd.DataFrame, site: str = "resid_pre", title: str = "") -> go.Figure:
    """Layer × position heatmap of one site's normalised patching effect."""
    grid = table[table["site"] == site].pivot(index="layer", columns="position", values="value")
    roles = table.drop_duplicates("position").set_index("position")["role"]
    figure = go.Figure(go.Heatmap(z=grid.to_numpy(), x=[f"{p}:{roles[p]}" for p in grid.columns], y=list(grid.index),
                                  zmid=0, colorscale="RdBu", colorbar={"title": "normalised<br>logit diff"}))
    figure.update_layout(title=title or f"activation patching, {site}", xaxis_title="position:role",
                         yaxis_title="layer", yaxis={"autorange": "reversed"})
    return figure


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
