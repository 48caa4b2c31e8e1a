"""What the language-model demo (`poslens demo --model SPEC`) shows, for one model and free-text prompts.

Plain functions returning DataFrames and plotly figures, used by the Dash app (`demos.lm_app`)
and tested without a browser. They run on any model `variants.load_any` returns that can read
text: a bridged Hugging Face model with its tokenizer, or a poslens run (its characters are its
tokens). A prompt is tokenised by the model's own tokenizer with the model's BOS token put first
explicitly, as the probe's sequences are (`analyses.measures.sequences`), so position 0 means the
same in both. Bad input becomes a `ValueError` whose message the app shows inline, quoting at most
a short prefix of the prompt. Token tensors stay on the CPU; each function moves what it runs to
the model's device.

Table schemas (one row per measurement):

- `summary`: property, value (`analyses.measures.discovery.describe`); `LMDemoModel.info`:
  `discovery.MODEL_COLUMNS` (the positional encoding detected in each block).
- `prompt_tokens`: position, token_id, token.
- `top_next_tokens`: rank, token_id, token, probability, logit.
- `probe_predictions`: site, position, token, predicted, probability, true_probability (as the
  addition demo's, `demos.panels.probe_rows`).
- `patch_effects`: `analyses.measures.patching.PATCHING_COLUMNS`; `role` is the token at that
  position (`clean→corrupted` where the prompts differ).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Int
from torch import Tensor
from transformer_lens.model_protocol import TransformerLensModel

from poslens.analyses.measures.discovery import describe, model_info, site_note
from poslens.analyses.measures.patching import RESIDUAL_SITES, model_sites, prompt_patch_table
from poslens.analyses.measures.sequences import random_sequences, read_text, text_sequences
from poslens.demos.panels import fit_position_probe, probe_rows
from poslens.probes import PositionProbe
from poslens.variants import load_any
from poslens.variants.hub import bos_token_id, encode_text, model_name
from poslens.variants.tokens import excerpt

MAX_PROMPT_TOKENS = 64  # a prompt's tokens (BOS included), and the length of the probe's sequences
DEFAULT_SEQUENCES = 128  # sequences the position probe is fitted on
TOP_K = 10


@dataclass
class LMDemoModel:
    """A language model with what the demo computes once per model (lazily, then cached).

    `max_len` bounds a prompt's tokens (BOS included) and is the length of the `n_sequences`
    sequences the position probe is fitted on: random tokens drawn with `seed`, or consecutive
    chunks of `text` when one is given."""

    name: str
    model: TransformerLensModel
    max_len: int
    text: str | None = None
    n_sequences: int = DEFAULT_SEQUENCES
    seed: int = 0

    @property
    def bos(self) -> bool:
        return bos_token_id(self.model) is not None

    @cached_property
    def info(self) -> pd.DataFrame:
        """The positional encoding detected in each block (`discovery.model_info`)."""
        return model_info(self.model, variant=self.name)

    @cached_property
    def probe_tokens(self) -> Int[Tensor, "sequence max_len"]:
        """The sequences the position probe is fitted on."""
        if self.text is None:
            return random_sequences(self.model, self.n_sequences, self.max_len, bos=self.bos, seed=self.seed)
        return text_sequences(self.model, self.text, self.max_len, bos=self.bos, max_sequences=self.n_sequences)

    @cached_property
    def probe(self) -> PositionProbe:
        """A position probe at every residual site, fitted on every token of `probe_tokens`."""
        return fit_position_probe(self.model, self.probe_tokens)

    @property
    def probe_data(self) -> str:
        """What the probe was fitted on, in words."""
        n, length = self.probe_tokens.shape
        source = "random-token" if self.text is None else "text"
        return f"{n} {source} sequences of {length} tokens{', BOS first' if self.bos else ''}"

    @property
    def sites(self) -> list[str]:
        """The residual sites this model's activations can be patched at (`resid_mid` only where every block has it)."""
        return [site for site in RESIDUAL_SITES if site in model_sites(self.model)]

    def prepare(self) -> LMDemoModel:
        """Detect the positional encodings and fit the probe now rather than on first use."""
        _ = self.info, self.probe  # cached properties: computed here, once
        return self


def load_lm_demo(spec: Any, *, tokenizer: Any = None, device: str | None = None, dtype: torch.dtype | None = None,
                 text: str | Path | None = None, n_sequences: int = DEFAULT_SEQUENCES, max_len: int | None = None,
                 seed: int = 0, **load_options: Any) -> LMDemoModel:
    """The demo model of `spec` (anything `variants.load_any` takes, with its `tokenizer`, `device`
    and `dtype`, and `load_options` such as `device_map`, `trust_remote_code`, `allow_pickle`); its
    probe will be fitted on `n_sequences` chunks of the UTF-8 file `text`, or on random tokens, of
    `max_len` tokens (default `MAX_PROMPT_TOKENS`, or the model's context if shorter). A model that
    cannot read text (no tokenizer) is refused here.

    Args:
        spec: the model, as `load_any` takes it.
        tokenizer: a tokenizer for a folder without one.
        device: where the model runs.
        dtype: the weights' precision.
        text: a UTF-8 file to fit the probe on; default random tokens.
        n_sequences: sequences the probe is fitted on.
        max_len: tokens per sequence.
        seed: draws the random tokens.
        **load_options: further `variants.load_any` options (`device_map`, `trust_remote_code`, ...).

    Returns:
        The `LMDemoModel`.
    """
    model = load_any(spec, tokenizer=tokenizer, device=device, dtype=dtype, **load_options)
    encode_text(model, "")  # a clear error now, not at the first prompt, when the model has no tokenizer
    max_len = min(MAX_PROMPT_TOKENS, model.cfg.n_ctx) if max_len is None else max_len
    if isinstance(max_len, bool) or not isinstance(max_len, int) or not 2 <= max_len <= model.cfg.n_ctx:
        raise ValueError(f"max_len must be an integer in 2..{model.cfg.n_ctx} (the model's n_ctx), got {max_len!r}")
    if isinstance(n_sequences, bool) or not isinstance(n_sequences, int) or n_sequences < 2:
        raise ValueError(f"the probe needs at least 2 sequences, got {n_sequences!r}")
    name = Path(spec).name if isinstance(spec, (str, Path)) and Path(spec).is_dir() else model_name(model)
    return LMDemoModel(name, model, max_len, None if text is None else read_text(text), n_sequences, seed)


# the model and the prompt --------------------------------------------------------------------------------------------

def summary(demo: LMDemoModel) -> pd.DataFrame:
    """The model's sizes, tokenizer, hook count and residual sites, one (property, value) row each,
    with a note where some block has no `resid_mid`."""
    facts = describe(demo.model)
    facts["residual_sites"] = ", ".join(facts["residual_sites"])
    note = site_note(demo.model)
    if note:
        facts["note"] = note
    return pd.DataFrame({"property": list(facts), "value": [str(value) for value in facts.values()]})


def encode_prompt(demo: LMDemoModel, text: str, what: str = "prompt") -> Int[Tensor, "1 pos"]:
    """`text` as `[1, pos]` token ids: the model's BOS token, then the text's tokens. Refuses an
    empty text and one longer than `demo.max_len` tokens, naming the count."""
    ids = encode_text(demo.model, text)
    if len(ids) == 0:
        raise ValueError(f"the {what} is empty: type some text")
    first = [bos_token_id(demo.model)] if demo.bos else []
    tokens = torch.cat([torch.tensor(first, dtype=torch.long), ids])
    if len(tokens) > demo.max_len:
        raise ValueError(f"the {what} {excerpt(text)} has {len(tokens)} tokens{' with BOS' if demo.bos else ''}; "
                         f"the demo takes at most {demo.max_len}")
    return tokens[None]


def token_strings(demo: LMDemoModel, tokens: Int[Tensor, "1 pos"]) -> list[str]:
    """Each token as the model's tokenizer writes it, newlines and tabs shown escaped."""
    return [token.replace("\n", "\\n").replace("\t", "\\t") for token in demo.model.to_str_tokens(tokens[0])]


def token_labels(demo: LMDemoModel, tokens: Int[Tensor, "1 pos"]) -> list[str]:
    """`position:token` for each token (axis labels)."""
    return [f"{position}:{token}" for position, token in enumerate(token_strings(demo, tokens))]


def prompt_tokens(demo: LMDemoModel, tokens: Int[Tensor, "1 pos"]) -> pd.DataFrame:
    """One row per token of the prompt: position, token_id, token."""
    return pd.DataFrame({"position": range(tokens.shape[1]), "token_id": tokens[0].tolist(),
                         "token": token_strings(demo, tokens)})


@torch.no_grad()
def top_next_tokens(demo: LMDemoModel, tokens: Int[Tensor, "1 pos"], k: int = TOP_K) -> pd.DataFrame:
    """The `k` most likely next tokens after the prompt: rank, token_id, token, probability, logit."""
    logits = demo.model(tokens.to(demo.model.cfg.device))[0, -1].float().cpu()
    top = logits.topk(min(k, len(logits)))
    ids = top.indices[:, None]
    return pd.DataFrame({"rank": range(1, len(ids) + 1), "token_id": top.indices.tolist(),
                         "token": token_strings(demo, ids.T), "probability": logits.softmax(-1)[top.indices].tolist(),
                         "logit": top.values.tolist()})


def top_tokens_figure(table: pd.DataFrame, title: str = "") -> go.Figure:
    """Horizontal bars of a `top_next_tokens` table, the most likely on top."""
    figure = go.Figure(go.Bar(x=table["probability"], y=[f"{row.rank}: {row.token!r}" for row in table.itertuples()],
                              orientation="h", text=[f"{p:.3f}" for p in table["probability"]]))
    figure.update_layout(title=title or "most likely next tokens", xaxis_title="probability",
                         yaxis={"autorange": "reversed"}, height=120 + 25 * len(table))
    return figure


# attention, probe, patching ------------------------------------------------------------------------------------------

@torch.no_grad()
def attention_figure(demo: LMDemoModel, tokens: Int[Tensor, "1 pos"], layer: int, head: int) -> go.Figure:
    """Attention pattern (query × key) of one head on the prompt."""
    cfg = demo.model.cfg
    if not 0 <= layer < cfg.n_layers or not 0 <= head < cfg.n_heads:
        raise ValueError(f"attention layer {layer}, head {head} is outside layers 0..{cfg.n_layers - 1} "
                         f"and heads 0..{cfg.n_heads - 1}")
    name = f"blocks.{layer}.attn.hook_pattern"
    _, cache = demo.model.run_with_cache(tokens.to(cfg.device), names_filter=name)
    labels = token_labels(demo, tokens)
    figure = go.Figure(go.Heatmap(z=cache[name][0, head].float().cpu().numpy(), x=labels, y=labels, zmin=0, zmax=1,
                                  colorscale="Blues", colorbar={"title": "attention"}))
    figure.update_layout(title=f"attention pattern, layer {layer} head {head}", xaxis_title="key",
                         yaxis={"autorange": "reversed", "title": "query"}, height=300 + 12 * len(labels))
    return figure


def probe_predictions(demo: LMDemoModel, tokens: Int[Tensor, "1 pos"]) -> pd.DataFrame:
    """The position probe's prediction at every residual site for every token of the prompt."""
    return probe_rows(demo.model, demo.probe, tokens, token_strings(demo, tokens))


@torch.no_grad()
def patch_effects(demo: LMDemoModel, clean: Int[Tensor, "1 pos"], corrupted: Int[Tensor, "1 pos"],
                  site: str = "resid_pre", method: str = "exact") -> tuple[pd.DataFrame, str]:
    """Patch each (layer, position) of `site` from the clean prompt into the corrupted one
    (`analyses.measures.patching.prompt_patch_table`, `method` `exact` or `attribution`, its gradient
    preview): the table and the name of its metric."""
    if site not in demo.sites:
        raise ValueError(f"unknown patching site {excerpt(site)} for {demo.name}; allowed: {demo.sites}")
    clean_labels, corrupted_labels = token_strings(demo, clean), token_strings(demo, corrupted)
    labels = [a if a == b else f"{a}→{b}" for a, b in zip(clean_labels, corrupted_labels)]
    return prompt_patch_table(demo.model, clean, corrupted, [site], labels=labels, method=method)
