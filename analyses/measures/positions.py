"""What a model does when the positions it is told change and its tokens do not (`hooks.positions`).

Three tidy tables, each with one row per edit (and site), measured against the unedited run:

- `task_under_positions` (a task model, e.g. addition; columns `TASK_COLUMNS`): exact match of
  the greedy answer, per-digit accuracy, `keeps_answer` (the share of answers equal to the
  model's own unedited answer) and, for a swap or permutation inside the prompt, `follows_told`
  (the share equal to the model's own answer to the prompt with its tokens *moved* to the told
  positions: the model read order from the position ids, not from where the tokens are);
- `lm_under_positions` (any model on token sequences, e.g. a bridged language model; columns
  `LM_COLUMNS`): next-token cross-entropy and top-1 agreement with the unedited predictions;
- `readout_under_positions` (columns `READOUT_COLUMNS`): a `PositionProbe` per site, fitted on
  unedited activations, applied to the edited run at the moved tokens only: does it read the
  position the token was told (`reads_told`), its real index (`reads_index`) or something else?
  `accuracy_unedited` is the same probe on the same tokens without the edit.

The expectation: a model that reads absolute position (learned, sinusoidal) breaks under a
global shift; a relative one (rotary) cannot, by construction; NoPE has no position ids and is
unchanged by every edit, by construction. Rows whose outcome the architecture fixes are marked
`fixed_by_construction` (`edit_fixed`) and are not evidence. Decodable is not the same as used:
a probe reading the told position says the ids reached the stream, the task columns say whether
the model's answer depends on them.
"""

from __future__ import annotations

from collections.abc import Sequence

import einops
import pandas as pd
import torch
from jaxtyping import Int
from torch import Tensor
from transformer_lens.model_protocol import TransformerLensModel

from poslens.analyses.measures.discovery import positional_encodings
from poslens.hooks import EMBED, capture_residuals, residual_sites
from poslens.hooks.positions import PositionEdit, repeated, shifted, swapped, unchanged, with_positions
from poslens.probes import PositionProbe, flatten_tokens, split_by_sequence
from poslens.tasks import Addition
from poslens.variants import HookedTransformer

TASK_COLUMNS = ("edit", "kind", "position_ids", "exact_match", "token_accuracy", "keeps_answer", "follows_told",
                "delta_exact_match", "fixed_by_construction", "n_sequences")
LM_COLUMNS = ("edit", "kind", "position_ids", "loss", "delta_loss", "agreement", "fixed_by_construction",
              "n_sequences")
READOUT_COLUMNS = ("edit", "kind", "site", "reads_told", "reads_index", "reads_other", "accuracy_unedited",
                   "n_tokens", "fixed_by_construction")
CONFIG_KINDS = {"standard": "learned", "sinusoidal": "sinusoidal", "rotary": "rotary"}
LM_TOKENS_PER_BATCH = 2**15  # tokens per forward pass of `lm_under_positions` (bounds the logits in memory)


def default_edits(model: TransformerLensModel, n_pos: int, *, shifts: Sequence[int] = (1,),
                  swap: tuple[int, int] = (0, 2), repeat: tuple[int, int] = (0, 2)) -> list[PositionEdit]:
    """The baseline, a global shift by each of `shifts`, one swap and one repeated position.

    Args:
        model: the model the edits are for (a learned table limits the shifts to ids below `n_ctx`).
        n_pos: the length of the sequences the edits apply to.
        shifts: the global shifts; one that takes a learned model's ids past its table is an error.
        swap: the two tokens that exchange their positions.
        repeat: `(source, target)`: token `target` is told `source`'s position.

    Returns:
        `[unchanged, shift+k..., swap i,j, repeat target=source]`.
    """
    if model.cfg.positional_embedding_type == "standard":
        too_far = [k for k in shifts if k + n_pos > model.cfg.n_ctx]
        if too_far:
            raise ValueError(f"shifts {too_far} take positions past the learned table of n_ctx={model.cfg.n_ctx} rows "
                             f"for {n_pos} tokens; allowed: 0..{model.cfg.n_ctx - n_pos}")
    return [unchanged(n_pos), *(shifted(n_pos, k) for k in shifts), swapped(n_pos, *swap),
            repeated(n_pos, *repeat)]


def pe_kinds(model: TransformerLensModel) -> set[str]:
    """The positional encoding of every layer: from the config for a poslens model, found from the
    model (`discovery.positional_encodings`) for a bridge."""
    if isinstance(model, HookedTransformer):
        return {CONFIG_KINDS.get(model.cfg.positional_embedding_type, "none")}
    return set(positional_encodings(model)["pe_kind"])


def edit_fixed(kinds: set[str], kind: str, site: str | None = None) -> bool:
    """Whether the architecture alone makes an edited run equal the unedited one (to float rounding).

    True when no layer has a positional encoding (NoPE: ids are never read); when the edit is a
    global shift and every encoding is rotary or none (rotary scores depend only on id
    differences); and, for a probe at the `embed` site, when no encoding is additive (rotary adds
    nothing to the stream). The unedited baseline (`none`) is the reference, never marked.

    Args:
        kinds: the layers' encodings (`pe_kinds`).
        kind: the edit's kind (`hooks.positions.EDIT_KINDS`).
        site: the residual site read, for a probe readout.

    Returns:
        Whether the row is fixed by construction.
    """
    if kind == "none":
        return False
    no_additive = kinds <= {"rotary", "none"}
    return kinds <= {"none"} or (kind == "shift" and no_additive) or (site == EMBED and no_additive)


@torch.no_grad()
def task_under_positions(model: HookedTransformer, task: Addition, edits: Sequence[PositionEdit] | None = None, *,
                         n_sequences: int = 500, seed: int = 0) -> pd.DataFrame:
    """Greedy answers to held-out prompts under every edit of the positions (columns `TASK_COLUMNS`).

    Args:
        model: a model trained on `task`.
        task: a task with a prompt and an answer (`Addition`); edits cover its `seq_len - 1` input tokens.
        edits: default `default_edits(model, task.seq_len - 1)`.
        n_sequences: held-out sequences (a seeded sample).
        seed: seeds the sample.

    Returns:
        One row per edit; `delta_exact_match` against the unedited row.
    """
    n_pos, n_answer = task.seq_len - 1, task.seq_len - task.prompt_len
    edits = default_edits(model, n_pos) if edits is None else list(edits)
    _check_lengths(edits, n_pos)
    sequences = task.sample_test(min(n_sequences, task.n_test), seed)
    prompts, truth = sequences[:, : task.prompt_len], sequences[:, task.prompt_len:]
    own = _answers(model, prompts, n_answer, None)
    kinds, rows = pe_kinds(model), []
    for edit in edits:
        answer = _answers(model, prompts, n_answer, edit)
        moved_prompt = _moved_prompt(prompts, edit)
        follows = (float((answer == _answers(model, moved_prompt, n_answer, None)).all(-1).double().mean())
                   if moved_prompt is not None else float("nan"))
        rows.append({"edit": edit.name, "kind": edit.kind, "position_ids": _ids_text(edit),
                     "exact_match": float((answer == truth).all(-1).double().mean()),
                     "token_accuracy": float((answer == truth).double().mean()),
                     "keeps_answer": float((answer == own).all(-1).double().mean()), "follows_told": follows,
                     "fixed_by_construction": edit_fixed(kinds, edit.kind), "n_sequences": len(prompts)})
    return _with_delta(rows, TASK_COLUMNS, "exact_match")


@torch.no_grad()
def lm_under_positions(model: TransformerLensModel, tokens: Int[Tensor, "sequence pos"],
                       edits: Sequence[PositionEdit] | None = None) -> pd.DataFrame:
    """Next-token loss and agreement with the unedited predictions under every edit (columns `LM_COLUMNS`).

    Args:
        model: any model `with_positions` supports (a bridged language model, a poslens model).
        tokens: `[sequence, pos]` token ids (text chunks or random tokens, `analyses.measures.sequences`).
        edits: default `default_edits(model, pos)`.

    Returns:
        One row per edit: mean cross-entropy of every next token (`loss`, `delta_loss` against the
        unedited row) and the share of next-token argmaxes equal to the unedited ones (`agreement`).
    """
    n_pos = tokens.shape[1]
    edits = default_edits(model, n_pos) if edits is None else list(edits)
    _check_lengths(edits, n_pos)
    batch = max(1, LM_TOKENS_PER_BATCH // n_pos)
    reference, kinds, rows = None, pe_kinds(model), []
    for edit in edits:
        losses, predictions = [], []
        with with_positions(model, edit.position_ids):
            for chunk in tokens.split(batch):
                logits = model(chunk.to(model.cfg.device))[:, :-1].float()
                targets = chunk[:, 1:].to(logits.device)
                losses.append(torch.nn.functional.cross_entropy(
                    einops.rearrange(logits, "b p v -> (b p) v"), targets.flatten(), reduction="none").cpu())
                predictions.append(logits.argmax(-1).cpu())
        predicted = torch.cat(predictions)
        reference = predicted if reference is None else reference
        rows.append({"edit": edit.name, "kind": edit.kind, "position_ids": _ids_text(edit),
                     "loss": float(torch.cat(losses).double().mean()),
                     "agreement": float((predicted == reference).double().mean()),
                     "fixed_by_construction": edit_fixed(kinds, edit.kind), "n_sequences": len(tokens)})
    return _with_delta(rows, LM_COLUMNS, "loss")


@torch.no_grad()
def readout_under_positions(model: TransformerLensModel, tokens: Int[Tensor, "sequence pos"],
                            edits: Sequence[PositionEdit] | None = None, *, sites: list[str] | None = None,
                            C: float = 1.0, seed: int = 0) -> pd.DataFrame:
    """Which position a probe reads from the tokens whose position ids were edited (`READOUT_COLUMNS`).

    A `PositionProbe` per site is fitted on the unedited activations of three quarters of the
    sequences (split by sequence, seeded); on the other quarter, under each edit, it is applied
    to the moved tokens whose told position it knows (told id < pos): `reads_told`,
    `reads_index`, `reads_other` are shares of those tokens × sequences.

    Args:
        model: any model `with_positions` supports.
        tokens: `[sequence, pos]` token ids, at least 2 sequences.
        edits: default `default_edits(model, pos)` (the unedited baseline gets no row).
        sites: residual sites (default all of `residual_sites`).
        C: the probes' inverse regularisation.
        seed: seeds the split.

    Returns:
        One row per (edit, site).
    """
    n_pos = tokens.shape[1]
    edits = default_edits(model, n_pos) if edits is None else list(edits)
    _check_lengths(edits, n_pos)
    sites = residual_sites(model) if sites is None else sites
    train_seq, test_seq = split_by_sequence(len(tokens), test_fraction=0.25, seed=seed)
    activations = capture_residuals(model, tokens, sites).activations.float()
    probe = PositionProbe(C=C, n_classes=n_pos).fit(*flatten_tokens(activations, train_seq))
    unedited = _predicted(probe, activations[:, test_seq])
    kinds, rows = pe_kinds(model), []
    for edit in edits:
        moved = edit.moved()
        moved = moved[edit.position_ids[moved] < n_pos]
        if len(moved) == 0:
            continue
        told = edit.position_ids[moved]
        with with_positions(model, edit.position_ids):
            edited = capture_residuals(model, tokens[test_seq], sites).activations.float()
        read = _predicted(probe, edited[:, :, moved])  # [site, sequence, moved]
        for index, site in enumerate(sites):
            answers = read[index]
            rows.append({"edit": edit.name, "kind": edit.kind, "site": site,
                         "reads_told": float((answers == told).double().mean()),
                         "reads_index": float((answers == moved).double().mean()),
                         "reads_other": float(((answers != told) & (answers != moved)).double().mean()),
                         "accuracy_unedited": float((unedited[index][:, moved] == moved).double().mean()),
                         "n_tokens": answers.numel(), "fixed_by_construction": edit_fixed(kinds, edit.kind, site)})
    return pd.DataFrame(rows, columns=list(READOUT_COLUMNS))


def position_interventions(model: TransformerLensModel, data: Addition | Tensor, *, n_sequences: int = 500,
                           edits: Sequence[PositionEdit] | None = None, seed: int = 0) -> dict[str, pd.DataFrame]:
    """Every position-edit measure of `model` on `data`: `position_task` (an `Addition` task) or
    `position_lm` (token sequences), and `position_readout`.

    Args:
        model: a model trained on `data`, or any model `with_positions` supports for token sequences.
        data: an `Addition` task (measured on a seeded sample of `n_sequences` held-out sums, the full
            input of `seq_len - 1` tokens for the probes) or `[sequence, pos]` tokens.
        n_sequences: held-out sums for a task (token sequences are all used).
        edits: default `default_edits(model, pos)`.
        seed: seeds the sample and the probes' split.

    Returns:
        The tables by name.
    """
    if isinstance(data, Addition):
        tokens = data.sample_test(min(n_sequences, data.n_test), seed)[:, :-1]
        return {"position_task": task_under_positions(model, data, edits, n_sequences=n_sequences, seed=seed),
                "position_readout": readout_under_positions(model, tokens, edits, seed=seed)}
    return {"position_lm": lm_under_positions(model, data, edits),
            "position_readout": readout_under_positions(model, data, edits, seed=seed)}


def _answers(model: HookedTransformer, prompts: Tensor, n_answer: int, edit: PositionEdit | None) -> Tensor:
    """Greedy answers, with the edit's ids for the prompt and every generated token."""
    prompts = prompts.to(model.cfg.device)
    if edit is None:
        return model.generate(prompts, n_answer).cpu()
    with with_positions(model, edit.position_ids):
        return model.generate(prompts, n_answer).cpu()


def _moved_prompt(prompts: Tensor, edit: PositionEdit) -> Tensor | None:
    """The prompts with each token put where its id says, for an edit that permutes prompt tokens
    among themselves (a swap or permutation inside the prompt); else None."""
    n_prompt = prompts.shape[1]
    ids = edit.position_ids
    if edit.kind not in ("swap", "permute") or not torch.equal(ids[:n_prompt].sort().values, torch.arange(n_prompt)):
        return None
    moved = torch.empty_like(prompts)
    moved[:, ids[:n_prompt]] = prompts
    return moved


def _predicted(probe: PositionProbe, activations: Tensor) -> Tensor:
    """The probe's position for every token, `[site, sequence, pos]`."""
    flat = einops.rearrange(activations, "site sequence pos d -> site (sequence pos) d")
    return einops.rearrange(probe.predict(flat), "site (sequence pos) -> site sequence pos", pos=activations.shape[2])


def _check_lengths(edits: list[PositionEdit], n_pos: int) -> None:
    wrong = [edit.name for edit in edits if len(edit.position_ids) != n_pos]
    if wrong:
        raise ValueError(f"edits {wrong} are not for {n_pos} tokens (the length of the sequences measured)")


def _ids_text(edit: PositionEdit) -> str:
    return " ".join(map(str, edit.position_ids.tolist()))


def _with_delta(rows: list[dict], columns: tuple[str, ...], value: str) -> pd.DataFrame:
    """The rows as a table, `delta_<value>` against the unedited row (NaN without one)."""
    table = pd.DataFrame(rows)
    baseline = table.loc[table["kind"] == "none", value]
    table[f"delta_{value}"] = table[value] - (baseline.iloc[0] if len(baseline) else float("nan"))
    return table[list(columns)]
