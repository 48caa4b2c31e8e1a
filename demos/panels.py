"""What the demo's panels show, computed for one addition model and one clean/corrupted prompt pair.

Plain functions on tensors, DataFrames and plotly figures, shared by the Dash app
(`demos.app`), the static page (`demos.static`) and notebooks, and tested without a browser.
Prompts are validated here, so every bad input becomes a `ValueError` whose message the app
shows inline. Token tensors stay on the CPU; each function moves what it runs to the model's
device.

Table schemas (one row per measurement):

- `answers`: run (`clean`/`corrupted`), prompt, answer (the model's greedy answer as written,
  least-significant digit first by default), answer_value (that answer as a number; `<NA>`
  when the model wrote a non-digit), correct_answer, correct_value, is_correct.
- `patch_effects`: site, layer, position, role, value (as `analyses.patching.activation_patching`).
- `answer_distribution`: run (`clean`, `corrupted`, `patched`), answer, token, probability.
- `residual_cut_answers`: block (−1 = no cut), sublayer, exact_match (on held-out sums),
  answer, is_correct.
- `probe_predictions`: site, position, token, predicted, probability, true_probability.
- `shifted_answer`: shift, answer, correct_answer, is_correct, fixed_by_construction.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Int
from plotly.subplots import make_subplots
from torch import Tensor
from transformer_lens.model_protocol import TransformerLensModel
from transformer_lens.utilities import get_act_name

from poslens.analyses.measures.cut_effects import residual_cut_effects
from poslens.analyses.measures.patching import corrupt, patch_cell_hook, patch_table
from poslens.analyses.measures.positions import edit_fixed, pe_kinds
from poslens.analyses.runs import load_task
from poslens.demos.discovery import unsupported_reason
from poslens.hooks import capture_residuals, cut_residual
from poslens.hooks.positions import shifted, with_positions
from poslens.probes import PositionProbe, flatten_tokens
from poslens.tasks import Addition
from poslens.tasks.addition import BOS
from poslens.variants import HookedTransformer, load

MAX_DEMO_SHIFT = 16  # the largest "shift positions by k" offered where the encoding is a formula (or absent)
CORRUPTIONS = {"swap": "swap two positions", "operands": "swap the operands", "prompt": "a second prompt"}

@dataclass
class DemoModel:
    """A trained addition model with what the demo computes once per model (lazily, then cached)."""

    name: str
    model: HookedTransformer
    task: Addition
    n_sequences: int = 300

    @cached_property
    def probe(self) -> PositionProbe:
        """Position probe at every residual site, fitted on a seeded sample of `n_sequences` held-out prompts."""
        prompts = self.task.sample_test(min(self.n_sequences, self.task.n_test), seed=0)[:, : self.task.prompt_len]
        return fit_position_probe(self.model, prompts)

    @cached_property
    def cut_effects(self) -> pd.DataFrame:
        """`analyses.measures.cut_effects.residual_cut_effects` on a seeded sample of `n_sequences` held-out sums."""
        return residual_cut_effects(self.model, self.task, n_sequences=self.n_sequences)

    def prepare(self) -> DemoModel:
        """Compute the probe and the cut table now rather than on first use."""
        _ = self.probe, self.cut_effects  # cached properties: computed here, once
        return self


def load_demo_model(directory: str | Path, *, name: str | None = None, device: str = "cpu",
                    n_sequences: int = 300) -> DemoModel:
    """The checkpoint in `directory` with its task, which must be fixed-format addition; the probe
    and the cut table will use `n_sequences` held-out sequences.

    Args:
        directory: the checkpoint folder.
        name: the model's name in the demo; default the folder's.
        device: where the model runs.
        n_sequences: held-out sequences for the probe and the cut table.

    Returns:
        The `DemoModel`.
    """
    reason = unsupported_reason(directory)
    if reason is not None:
        raise ValueError(f"{directory} {reason}")
    return DemoModel(name or Path(directory).name, load(directory, device=device), load_task(directory), n_sequences)


class ModelStore:
    """Demo models by name, loaded on first use and then kept (probes and cut tables with them)."""

    def __init__(self, paths: Mapping[str, str | Path], *, device: str = "cpu", n_sequences: int = 300):
        if not paths:
            raise ValueError("the demo needs at least one model folder")
        self.paths = {name: Path(path) for name, path in paths.items()}
        self.device, self.n_sequences = device, n_sequences
        self._loaded: dict[str, DemoModel] = {}

    @property
    def names(self) -> list[str]:
        return list(self.paths)

    def __getitem__(self, name: str) -> DemoModel:
        if name not in self.paths:
            raise ValueError(f"unknown model {name!r}; allowed: {self.names}")
        if name not in self._loaded:
            self._loaded[name] = load_demo_model(self.paths[name], name=name, device=self.device,
                                                 n_sequences=self.n_sequences)
        return self._loaded[name]


# prompts -------------------------------------------------------------------------------------------------------------

def parse_prompt(demo: DemoModel, text: str) -> Int[Tensor, "1 seq"]:
    """The full sequence (prompt and correct answer) of a typed prompt such as `123+456=`.

    Refuses, in this order, a character outside the model's vocabulary, a prompt longer than
    its context (both by `HookedTransformer.to_tokens`) and a prompt that is not two zero-padded
    `n_digits`-digit operands. A BOS token, if the task has one, is added here, not typed.
    """
    task, text = demo.task, text.strip()
    demo.model.to_tokens((BOS if task.bos else "") + text)
    n = task.n_digits
    match = re.fullmatch(r"(\d+)\+(\d+)=", text)
    if match is None or len(match[1]) != n or len(match[2]) != n:
        example = "1" * n + "+" + "2" * n + "="
        raise ValueError(f"prompt {text!r} is not two {n}-digit operands: type each operand with exactly {n} digits "
                         f"(zero-padded) and end with '=', e.g. {example!r}")
    return task.encode(torch.tensor([int(match[1])]), torch.tensor([int(match[2])]))


def corrupt_prompt(demo: DemoModel, clean: Int[Tensor, "1 seq"], kind: str, *, positions: tuple[int, int] = (0, 2),
                   second_prompt: str = "") -> Int[Tensor, "1 seq"]:
    """The corrupted sequence: `swap` exchanges the operand digits at `positions`
    (`analyses.patching.corrupt`), `operands` writes b+a for a+b, `prompt` parses `second_prompt`.
    A corruption that leaves the prompt as it is is refused: there would be nothing to patch."""
    if kind == "swap":
        corrupted = corrupt(demo.task, clean, "swap", positions=positions)
    elif kind == "operands":
        a, b = demo.task.decode_operands(clean)
        corrupted = demo.task.encode(b, a)
    elif kind == "prompt":
        corrupted = parse_prompt(demo, second_prompt)
    else:
        raise ValueError(f"unknown corruption {kind!r}; allowed: {list(CORRUPTIONS)}")
    if torch.equal(corrupted, clean):
        raise ValueError(f"the corruption {CORRUPTIONS[kind]!r} leaves {prompt_text(demo, clean)!r} unchanged; "
                         "pick one that changes the prompt (e.g. two positions holding different digits)")
    return corrupted


def prompt_text(demo: DemoModel, sequence: Int[Tensor, "1 seq"]) -> str:
    """The prompt of a sequence as the user types it (without BOS)."""
    return demo.model.to_string(sequence[0, int(demo.task.bos) : demo.task.prompt_len])


# answers -------------------------------------------------------------------------------------------------------------

def answer_value(task: Addition, answer: str) -> int | None:
    """The number an answer string writes (digits least-significant first if the task reverses
    answers), or None if the model wrote a non-digit."""
    if not answer.isdigit():
        return None
    return int(answer[::-1] if task.reverse_answer else answer)


@torch.no_grad()
def greedy_answer(demo: DemoModel, sequence: Int[Tensor, "1 seq"], hooks: list = ()) -> str:
    """The model's greedy answer to the prompt of `sequence`, under `hooks` if given."""
    n_answer = demo.task.seq_len - demo.task.prompt_len
    with demo.model.hooks(fwd_hooks=list(hooks)):
        tokens = demo.model.generate(sequence[:, : demo.task.prompt_len].to(demo.model.cfg.device), n_answer)
    return demo.model.to_string(tokens[0])


def max_position_shift(demo: DemoModel) -> int:
    """The largest global shift of the position ids the model can take: up to the end of a learned
    table (n_ctx rows for seq_len - 1 input tokens), `MAX_DEMO_SHIFT` otherwise."""
    if demo.model.cfg.positional_embedding_type == "standard":
        return demo.model.cfg.n_ctx - (demo.task.seq_len - 1)
    return MAX_DEMO_SHIFT


@torch.no_grad()
def shifted_answer(demo: DemoModel, clean: Int[Tensor, "1 seq"], k: int) -> pd.DataFrame:
    """The greedy answer to the clean prompt when every position id is shifted by `k` (tokens kept in
    place; `hooks.positions`), beside the correct one. `fixed_by_construction`: the encoding cannot
    see a global shift (NoPE, rotary), so the answer is the unshifted one whatever the weights."""
    top = max_position_shift(demo)
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= top:
        raise ValueError(f"shift must be an integer in 0..{top} for {demo.name}, got {k!r}")
    with with_positions(demo.model, shifted(demo.task.seq_len - 1, k)):
        answer = greedy_answer(demo, clean)
    correct = demo.model.to_string(clean[0, demo.task.prompt_len :])
    return pd.DataFrame([{"shift": k, "answer": answer, "correct_answer": correct, "is_correct": answer == correct,
                          "fixed_by_construction": bool(k) and edit_fixed(pe_kinds(demo.model), "shift")}])


def answers(demo: DemoModel, clean: Int[Tensor, "1 seq"], corrupted: Int[Tensor, "1 seq"]) -> pd.DataFrame:
    """The model's answer and the correct one for both prompts (schema in the module docstring)."""
    rows = []
    for run, sequence in (("clean", clean), ("corrupted", corrupted)):
        answer = greedy_answer(demo, sequence)
        correct = demo.model.to_string(sequence[0, demo.task.prompt_len :])
        rows.append({"run": run, "prompt": prompt_text(demo, sequence), "answer": answer,
                     "answer_value": answer_value(demo.task, answer), "correct_answer": correct,
                     "correct_value": answer_value(demo.task, correct), "is_correct": answer == correct})
    return pd.DataFrame(rows).astype({"answer_value": "Int64", "correct_value": "Int64"})


# activation patching -------------------------------------------------------------------------------------------------

PREVIEW_NOTE = ("preview: attribution patching, a gradient estimate of the grid below from one backward pass, "
                "drawn first; the exact grid (one batched patch per cell) follows")

@torch.no_grad()
def patch_effects(demo: DemoModel, clean: Int[Tensor, "1 seq"], corrupted: Int[Tensor, "1 seq"],
                  site: str = "resid_pre", method: str = "exact") -> tuple[pd.DataFrame, str]:
    """Patch each (layer, position) of `site` from the clean run into the corrupted one: the
    `analyses.measures.patching.patch_table` of this prompt pair (`method` `exact`, or `attribution`:
    its gradient preview) and the name of its metric."""
    try:
        return patch_table(demo.model, demo.task, clean, corrupted, [site], method=method)
    except ValueError as error:
        raise ValueError(f"{demo.name}, {prompt_text(demo, clean)!r} → {prompt_text(demo, corrupted)!r}: "
                         f"{error}") from error


@torch.no_grad()
def answer_distribution(demo: DemoModel, clean: Int[Tensor, "1 seq"], corrupted: Int[Tensor, "1 seq"], site: str,
                        layer: int, position: int) -> pd.DataFrame:
    """First-answer-digit distribution of the clean run, the corrupted run, and the corrupted run
    with (`site`, `layer`, `position`) patched from the clean one, with each run's greedy answer."""
    model, prompt_len = demo.model, demo.task.prompt_len
    patched_hooks = [patch_cell_hook(model, clean[:, :prompt_len], site, layer, position)]
    rows = []
    for run, sequence, hooks in (("clean", clean, []), ("corrupted", corrupted, []),
                                 ("patched", corrupted, patched_hooks)):
        with model.hooks(fwd_hooks=hooks):
            probabilities = model(sequence[:, :prompt_len].to(model.cfg.device))[0, -1].softmax(-1).cpu()
        answer = greedy_answer(demo, sequence, hooks)
        rows += [{"run": run, "answer": answer, "token": token, "probability": float(probability)}
                 for token, probability in zip(model.cfg.alphabet, probabilities)]
    return pd.DataFrame(rows)


def distribution_figure(table: pd.DataFrame, title: str = "first answer digit") -> go.Figure:
    """Grouped bars of an `answer_distribution` table: one colour per run, its answer in the legend."""
    figure = go.Figure()
    for run, rows in table.groupby("run", sort=False):
        figure.add_trace(go.Bar(x=list(rows["token"]), y=rows["probability"], name=f"{run}: {rows['answer'].iloc[0]}"))
    figure.update_layout(title=title, barmode="group", xaxis_title="first answer token", yaxis_title="probability",
                         yaxis_range=[0, 1])
    return figure


def message_figure(text: str) -> go.Figure:
    """An empty figure that says `text` (where a panel has nothing to show)."""
    figure = go.Figure()
    figure.add_annotation(text=text, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    figure.update_layout(xaxis_visible=False, yaxis_visible=False, height=250)
    return figure


# residual cuts, attention, probes ------------------------------------------------------------------------------------

def residual_cut_answers(demo: DemoModel, clean: Int[Tensor, "1 seq"]) -> pd.DataFrame:
    """For no cut and every block × sublayer cut: held-out exact match (`demo.cut_effects`) and
    the model's answer to this prompt with that residual connection removed."""
    correct = demo.model.to_string(clean[0, demo.task.prompt_len :])
    rows = []
    for cut in demo.cut_effects.itertuples():
        hooks = [] if cut.block < 0 else cut_residual(int(cut.block), cut.sublayer)
        answer = greedy_answer(demo, clean, hooks)
        rows.append({"block": int(cut.block), "sublayer": cut.sublayer, "exact_match": float(cut.exact_match),
                     "answer": answer, "is_correct": answer == correct})
    return pd.DataFrame(rows)


def residual_cut_figure(table: pd.DataFrame, title: str = "") -> go.Figure:
    """Held-out exact match per residual cut, each bar labelled with this prompt's answer
    (green when correct, red when not)."""
    labels = ["none" if row.block < 0 else f"block {row.block}: {row.sublayer}" for row in table.itertuples()]
    figure = go.Figure(go.Bar(x=labels, y=table["exact_match"], text=table["answer"], textposition="outside",
                              marker_color=["seagreen" if ok else "crimson" for ok in table["is_correct"]]))
    figure.update_layout(title=title or "residual cuts: held-out exact match; bar label = this prompt's answer",
                         xaxis_title="residual connection removed", yaxis_title="exact match", yaxis_range=[0, 1.15])
    return figure


def token_labels(demo: DemoModel, sequence: Int[Tensor, "1 seq"]) -> list[str]:
    """`position:character` for each prompt token (axis labels)."""
    prompt = demo.model.to_string(sequence[0, : demo.task.prompt_len])
    return [f"{position}:{char}" for position, char in enumerate(prompt)]


@torch.no_grad()
def attention_figure(demo: DemoModel, clean: Int[Tensor, "1 seq"], corrupted: Int[Tensor, "1 seq"], layer: int,
                     head: int) -> go.Figure:
    """Attention pattern (query × key) of one head on the clean and the corrupted prompt, side by side."""
    cfg = demo.model.cfg
    if not 0 <= layer < cfg.n_layers or not 0 <= head < cfg.n_heads:
        raise ValueError(f"attention layer {layer}, head {head} is outside layers 0..{cfg.n_layers - 1} "
                         f"and heads 0..{cfg.n_heads - 1}")
    name = get_act_name("pattern", layer)
    figure = make_subplots(rows=1, cols=2, subplot_titles=[f"clean {prompt_text(demo, clean)}",
                                                           f"corrupted {prompt_text(demo, corrupted)}"])
    for column, sequence in enumerate((clean, corrupted), start=1):
        _, cache = demo.model.run_with_cache(sequence[:, : demo.task.prompt_len].to(cfg.device), names_filter=name)
        labels = token_labels(demo, sequence)
        figure.add_trace(go.Heatmap(z=cache[name][0, head].cpu().numpy(), x=labels, y=labels, zmin=0, zmax=1,
                                    colorscale="Blues", showscale=column == 2), row=1, col=column)
        figure.update_yaxes(autorange="reversed", title_text="query" if column == 1 else None, row=1, col=column)
        figure.update_xaxes(title_text="key", row=1, col=column)
    figure.update_layout(title=f"attention pattern, layer {layer} head {head}")
    return figure


def fit_position_probe(model: TransformerLensModel, tokens: Int[Tensor, "sequence pos"]) -> PositionProbe:
    """A `PositionProbe` at every residual site, fitted on every token of `tokens` (activations in float32)."""
    activations = capture_residuals(model, tokens, dtype=torch.float32).activations
    return PositionProbe().fit(*flatten_tokens(activations, torch.arange(len(tokens))))


@torch.no_grad()
def probe_rows(model: TransformerLensModel, probe: PositionProbe, prompt: Int[Tensor, "1 pos"],
               tokens: Sequence[str]) -> pd.DataFrame:
    """A fitted position probe's prediction at every residual site for every token of `prompt`
    (`tokens` are their labels; schema `probe_predictions` in the module docstring)."""
    capture = capture_residuals(model, prompt, dtype=torch.float32)
    probabilities = probe.predict_proba(capture.activations[:, 0])  # [site, position, class]
    rows = [{"site": site, "position": position, "token": token,
             "predicted": int(probabilities[index, position].argmax()),
             "probability": float(probabilities[index, position].max()),
             "true_probability": float(probabilities[index, position, position])}
            for index, site in enumerate(capture.sites) for position, token in enumerate(tokens)]
    return pd.DataFrame(rows)


def probe_predictions(demo: DemoModel, clean: Int[Tensor, "1 seq"]) -> pd.DataFrame:
    """The fitted position probe's prediction at every residual site for every prompt token."""
    prompt = clean[:, : demo.task.prompt_len]
    return probe_rows(demo.model, demo.probe, prompt, list(demo.model.to_string(prompt[0])))


def probe_figure(table: pd.DataFrame, title: str = "") -> go.Figure:
    """Site × token heatmap of a `probe_predictions` table: colour = probability of the true
    position, text = the predicted position."""
    sites = list(dict.fromkeys(table["site"]))
    labels = [f"{row.position}:{row.token}" for row in table.drop_duplicates("position").itertuples()]
    shape = (len(sites), len(labels))
    figure = go.Figure(go.Heatmap(z=table["true_probability"].to_numpy().reshape(shape),
                                  text=table["predicted"].to_numpy().reshape(shape), texttemplate="%{text}",
                                  x=labels, y=sites, zmin=0, zmax=1, colorscale="Greens",
                                  colorbar={"title": "P(true<br>position)"}))
    figure.update_layout(title=title or "position probe: predicted position (text), P(true position) (colour)",
                         xaxis_title="position:token", yaxis={"autorange": "reversed"})
    return figure

