"""Is the position a probe reads *used*? Amnesic probing (INLP) and an interchange on the probe's subspace.

A probe that reads position off a site shows that position is decodable there, not that the
model uses it. Two interventions on the probe's own subspace ask the second question:

- `amnesic_probing` (Elazar et al., 2021; INLP, Ravfogel et al., 2020) removes the subspace the
  position probe reads (the span of its class weights; with `iterations` > 1, INLP: refit on
  what is left and add the new span) from the residual stream at one site, at every position,
  and measures the task: exact match, answer log-probability and the KL divergence of the
  answer distributions from the intact model's.
- `subspace_swap` exchanges only the probe-subspace coordinates of two operand positions'
  vectors (tokens stay in place, their position codes trade places) and asks whether the
  answer becomes the model's answer to the digit-swapped prompt: the interchange intervention
  `h' = h_base + (h_source - h_base) B Bᵀ` with the base the prompt and the source the same
  prompt with those two positions' vectors exchanged.

Controls, in every table: a placebo (a seeded random orthonormal subspace of the same rank;
norm-matched for the swap, so it moves each vector exactly as far) and the untrained
(random-init) twin (`weights` = `random_init`), fitted and measured the same way. The statistic
is the difference between the position subspace and its placebo, not the raw effect.

TransformerLens 4.3's `tools.analysis.interchange` supplies the pieces: `probe_basis` (a
probe's class weights → an orthonormal span; our probe's weights are first mapped back from
standardised to raw features, as its docstring asks), `random_basis` (the placebo),
`SubspaceInterchange` and `NormMatchedPlacebo` (the interventions themselves). Its runners
(`run_with_intervention`, `intervened_logits`) take one position per example and a single
forward pass of task logits; here the subspace is removed at every position, and the answer
is greedy-decoded over four tokens, so the hooks that apply the interventions are ours.
`fit_das` (a learned subspace) would answer a different question: whether *some* subspace
carries position, not whether the probe's does.
"""

from __future__ import annotations

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.tools.analysis.interchange import (
    NormMatchedPlacebo,
    SubspaceInterchange,
    probe_basis,
    random_basis,
)
from transformer_lens.tools.analysis.projection_kernel import orthonormal_subspace

from poslens.analyses.measures.construction import attention_layers_before, parse_site
from poslens.analyses.measures.patching import corrupt
from poslens.hooks import EMBED, capture_residuals, hook_name
from poslens.probes import PositionProbe, split_by_sequence, split_tokens
from poslens.tasks import Addition
from poslens.variants import HookedTransformer, build

AMNESIC_COLUMNS = ("weights", "site", "condition", "rank", "probe_accuracy", "exact_match", "answer_logprob",
                   "answer_kl", "delta_exact_match", "delta_answer_logprob", "n_sequences")
SUBSPACE_SWAP_COLUMNS = ("weights", "site", "condition", "rank", "changed", "follows_swap", "keeps_original",
                         "n_sequences", "fixed_by_construction")


def use_sites(model: HookedTransformer) -> list[str]:
    """The sites both measures visit: the embedding and every block's output (`resid_post`)."""
    return [EMBED] + [f"blocks.{block}.hook_resid_post" for block in range(model.cfg.n_layers)]


def position_bases(activations: Float[Tensor, "site example pos d_model"], split: tuple[Tensor, Tensor], *,
                   iterations: int = 1, C: float = 1.0) -> tuple[list[Tensor], Tensor]:
    """The subspace a position probe reads at each site (INLP when `iterations` > 1).

    Args:
        activations: `[site, example, pos, d_model]`, e.g. `capture_residuals(...).activations`.
        split: `(train, test)` sequence indices; the probe is fitted on `train`.
        iterations: probes fitted in turn, each on what the previous spans left (1: the probe's span only).
        C: the probe's inverse regularisation strength.

    Returns:
        One orthonormal basis `[d_model, rank]` per site, and the first probe's test accuracy `[site]`.
    """
    if not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an integer >= 1, got {iterations!r}")
    (X, y), (X_test, y_test) = split_tokens(activations.float(), split)
    bases: list[Tensor] = [torch.zeros(X.shape[-1], 0) for _ in range(X.shape[0])]
    accuracy = None
    for _ in range(iterations):
        left = torch.stack([X[site] - X[site] @ basis @ basis.T for site, basis in enumerate(bases)])
        probe = PositionProbe(C=C).fit(left, y)
        accuracy = probe.score(X_test, y_test) if accuracy is None else accuracy
        raw = probe.weight_ / probe.scale_.mT  # [site, d_model, class]: weights on raw (unstandardised) features
        seen = torch.isfinite(probe.bias_)  # classes absent from training carry no direction
        bases = [orthonormal_subspace(torch.cat([basis, probe_basis(raw[site][:, seen[site]].T)], 1),
                                      rank=min(basis.shape[1] + int(seen[site].sum()) - 1, X.shape[-1])).basis
                 for site, basis in enumerate(bases)]
    return bases, accuracy


def remove(basis: Float[Tensor, "d_model rank"], mean: Float[Tensor, " d_model"]):
    """A forward hook that sets every vector's coordinates inside `basis` to those of `mean`
    (INLP's projection, about the mean so that only variation is removed)."""
    interchange = SubspaceInterchange(basis)

    def hook(activation: Tensor, hook) -> Tensor:
        return interchange(activation, mean.to(activation))

    return hook


@torch.no_grad()
def task_scores(model: HookedTransformer, task: Addition, tokens: Int[Tensor, "batch seq"], hooks: list,
                reference: Float[Tensor, "batch answer vocab"] | None = None) -> tuple[dict[str, float], Tensor]:
    """Exact match, mean answer log-probability (summed over answer tokens) and KL from `reference`
    log-probabilities, under `hooks`; with them the answer log-probabilities `[batch, answer, vocab]`.

    A causal model's exact match is read from one teacher-forced pass (all answer tokens the
    argmax given the right earlier ones is exactly a right greedy answer); a bidirectional
    model's is greedy-decoded, since its earlier positions would see the answer."""
    tokens, answers = tokens.to(model.cfg.device), tokens[:, task.prompt_len:].to(model.cfg.device)
    with model.hooks(fwd_hooks=hooks):
        log_probs = model(tokens[:, :-1])[:, task.prompt_len - 1:].log_softmax(-1).float()
        if model.cfg.attention_dir == "causal":
            right = (log_probs.argmax(-1) == answers).all(-1)
        else:
            right = (model.generate(tokens[:, : task.prompt_len], answers.shape[1]) == answers).all(-1)
    reference = log_probs if reference is None else reference
    kl = (reference.exp() * (reference - log_probs)).sum(-1).mean()
    return ({"exact_match": float(right.double().mean()),
             "answer_logprob": float(log_probs.gather(-1, answers[..., None]).sum((-1, -2)).mean()),
             "answer_kl": float(kl)}, log_probs.cpu())


def subspace_effects(model: HookedTransformer, task: Addition, tokens: Int[Tensor, "batch seq"],
                     bases: dict[str, Tensor], means: dict[str, Tensor], *, seed: int = 0) -> pd.DataFrame:
    """Remove each site's subspace (`bases[site]`, about `means[site]`) and, as its placebo, a random
    subspace of the same rank; one row per site × condition (`intact`, `position`, `placebo`)
    with the task scores of `task_scores` and their change from intact."""
    intact, reference = task_scores(model, task, tokens, [])
    rows = []
    for index, (site, basis) in enumerate(bases.items()):
        placebo = random_basis(basis.shape[0], basis.shape[1], seed=seed * 1000 + index)
        for condition, hooks in (("intact", []), ("position", [(hook_name(site), remove(basis, means[site]))]),
                                 ("placebo", [(hook_name(site), remove(placebo, means[site]))])):
            scores = intact | {"answer_kl": 0.0} if not hooks else task_scores(model, task, tokens, hooks,
                                                                                reference.to(model.cfg.device))[0]
            rows.append({"site": site, "condition": condition, "rank": basis.shape[1], **scores,
                         "delta_exact_match": scores["exact_match"] - intact["exact_match"],
                         "delta_answer_logprob": scores["answer_logprob"] - intact["answer_logprob"],
                         "n_sequences": len(tokens)})
    return pd.DataFrame(rows)


@torch.no_grad()
def amnesic_probing(model: HookedTransformer, task: Addition, *, n_sequences: int = 256, iterations: int = 1,
                    C: float = 1.0, seed: int = 0, twin: bool = True) -> pd.DataFrame:
    """Remove the position probe's subspace at each residual site and measure the task, beside a
    random subspace of the same rank, on the trained weights and their untrained twin.

    Args:
        model: the model to test (its untrained twin is `build(model.cfg)`).
        task: the addition task; prompts are a seeded sample of its held-out set.
        n_sequences: sequences sampled; half fit the probes, the other half are measured.
        iterations: INLP rounds (1: amnesic probing with the probe's span alone).
        C: the probes' inverse regularisation strength.
        seed: the sample, the split and the placebo subspaces.
        twin: also measure the untrained twin.

    Returns:
        One row per weights × site × condition, columns `AMNESIC_COLUMNS`. `probe_accuracy` is
        the position probe's held-out accuracy at that site (how readable position is there at all).
    """
    tokens = task.sample_test(min(n_sequences, task.n_test), seed)
    fit, test = split = split_by_sequence(len(tokens), test_fraction=0.5, seed=seed)
    tables = []
    for weights, candidate in (("trained", model), ("random_init", build(model.cfg)))[: 1 + twin]:
        candidate.eval()
        capture = capture_residuals(candidate, tokens[:, :-1], sites=use_sites(candidate))
        bases, accuracy = position_bases(capture.activations, split, iterations=iterations, C=C)
        means = {site: capture[site][fit].float().mean((0, 1)) for site in capture.sites}
        table = subspace_effects(candidate, task, tokens[test], dict(zip(capture.sites, bases)), means, seed=seed)
        tables.append(table.assign(weights=weights, probe_accuracy=table["site"].map(
            dict(zip(capture.sites, accuracy.tolist())))))
    return pd.concat(tables, ignore_index=True)[list(AMNESIC_COLUMNS)]


@torch.no_grad()
def subspace_swap(model: HookedTransformer, task: Addition, *, positions: tuple[int, int] = (0, 2),
                  n_sequences: int = 256, C: float = 1.0, seed: int = 0, twin: bool = True) -> pd.DataFrame:
    """Exchange only the position-probe subspace of two operand positions' vectors at each site
    and record whether the greedy answer changes (`changed`), becomes the model's answer to the
    digit-swapped prompt (`follows_swap`) or stays its answer to the prompt (`keeps_original`).

    Args:
        model: the model to test (its untrained twin is `build(model.cfg)`).
        task: the addition task (fixed format: `positions` are operand-digit positions).
        positions: the two operand positions whose position codes trade places.
        n_sequences: at most this many held-out sums measured, those of a seeded sample of 4 × `n_sequences`
            whose answer changes when the two digits are swapped (the probes are fitted on `n_sequences` others).
        C: the probes' inverse regularisation strength.
        seed: the sample, the split and the placebo subspaces.
        twin: also measure the untrained twin.

    Returns:
        One row per weights × site × condition (`position`: the probe's span; `placebo`: a random
        subspace of the same rank, each vector moved exactly as far), columns `SUBSPACE_SWAP_COLUMNS`.
        `fixed_by_construction`: no attention layer follows the site, so the answer positions never
        read the swapped positions again and every answer stays as it was; such rows are not
        evidence. (`construction.swap_fixed` does not apply: a subspace swap leaves no permutation
        of the vectors, so attention's indifference to key order does not fix it.)
    """
    n_answer = task.seq_len - task.prompt_len
    tokens = task.sample_test(min(5 * n_sequences, task.n_test), seed)
    split = split_by_sequence(len(tokens), test_fraction=0.8, seed=seed)
    readouts = range(task.prompt_len - 1, task.seq_len - 1)
    rows = []
    for weights, candidate in (("trained", model), ("random_init", build(model.cfg)))[: 1 + twin]:
        candidate.eval()
        device = candidate.cfg.device
        capture = capture_residuals(candidate, tokens[:, : task.prompt_len], sites=use_sites(candidate))
        bases, _ = position_bases(capture.activations, split, C=C)
        prompts = tokens[split[1], : task.prompt_len]
        swapped_prompts = corrupt(task, tokens[split[1]], "swap", positions=positions)[:, : task.prompt_len]
        original = candidate.generate(prompts.to(device), n_answer).cpu()
        swapped = candidate.generate(swapped_prompts.to(device), n_answer).cpu()
        differs = (original != swapped).any(-1)
        prompts, original, swapped = (x[differs][:n_sequences] for x in (prompts, original, swapped))
        for index, (site, basis) in enumerate(zip(capture.sites, bases)):
            position = SubspaceInterchange(basis)
            placebo = NormMatchedPlacebo(position,
                                         random_basis(basis.shape[0], basis.shape[1], seed=seed * 1000 + index))
            for condition, intervention in (("position", position), ("placebo", placebo)):
                with candidate.hooks(fwd_hooks=[(hook_name(site), exchange_within(intervention, positions))]):
                    answer = candidate.generate(prompts.to(device), n_answer).cpu()
                rows.append({"weights": weights, "site": site, "condition": condition, "rank": basis.shape[1],
                             "changed": float((answer != original).any(-1).double().mean()),
                             "follows_swap": float((answer == swapped).all(-1).double().mean()),
                             "keeps_original": float((answer == original).all(-1).double().mean()),
                             "n_sequences": len(prompts),
                             "fixed_by_construction":
                                 min(attention_layers_after(candidate.cfg, site), len(readouts)) == 0})
    return pd.DataFrame(rows, columns=list(SUBSPACE_SWAP_COLUMNS))


def attention_layers_after(cfg, site: str) -> int:
    """Attention layers that run after the residual `site` (`embed` or a hook name)."""
    return cfg.n_layers - attention_layers_before(*parse_site(site))


def exchange_within(intervention, positions: tuple[int, int]):
    """A forward hook applying an interchange `intervention(base, source)` at two positions, each
    taking the other's vector as its source (prompt positions only: later, generated positions
    are left alone)."""
    i, j = positions

    def hook(activation: Tensor, hook) -> Tensor:
        if activation.shape[1] <= max(i, j):
            return activation
        activation = activation.clone()
        base = activation[:, [i, j]]
        activation[:, [i, j]] = intervention(base, base.flip(1))
        return activation

    return hook

