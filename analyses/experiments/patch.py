"""`poslens patch`: activation patching from the command line, on trained checkpoints (their task's
corruptions) or on any model with a file of clean/corrupted prompt pairs.

A pairs file holds one pair per line, the clean prompt and the corrupted prompt separated by a tab;
blank lines and lines starting with `#` are skipped. Each prompt is tokenised with the model's own
tokenizer (its BOS token first, where it has one). Patching compares position `i` of the clean run
with position `i` of the corrupted run, so every prompt needs the same token length. The `align` rule
says what happens when they differ:

- `equal` (default): prompts of different token lengths are refused, naming the lengths and this rule;
- `end`: positions are aligned from the end. Every prompt keeps its last `n` tokens, `n` the shortest
  prompt's length (BOS, where there is one, stays first and counts in `n`): a longer prompt loses its
  earliest tokens after BOS. The table's `from_end` column says which positions were compared
  (−1 = every prompt's last token), and `dropped` how many tokens of the longest prompt were cut.

All pairs form one batch: the restoration metric (`analyses.measures.patching.next_token_restoration`,
0 = corrupted run, 1 = clean run) is normalised over it, as in the demo.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch
from jaxtyping import Int
from torch import Tensor
from transformer_lens.model_protocol import TransformerLensModel

from poslens.analyses.figures import check_html_path, write_figure
from poslens.analyses.figures.patching import patching_heatmap
from poslens.analyses.measures.patching import (
    RESIDUAL_SITES,
    SITES,
    check_method,
    fixed_by_construction,
    patch_table,
    patching_sample,
    prompt_patch_table,
)
from poslens.analyses.tables import EXPORT_SUFFIXES, check_writable, export_tables
from poslens.tasks import Addition
from poslens.variants.hub import bos_token_id, encode_text, model_name

ALIGN_RULES = ("equal", "end")
TABLE_NAME = "patching"


def read_pairs(path: str | os.PathLike) -> list[tuple[str, str]]:
    """The (clean, corrupted) prompt pairs of a pairs file (see the module docstring).

    Args:
        path: a UTF-8 text file, one `clean<TAB>corrupted` pair per line.

    Returns:
        The pairs, in file order.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is not a file of prompt pairs")
    pairs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not all(part.strip() for part in parts):
            raise ValueError(f"{path} line {number}: expected a clean and a corrupted prompt separated by one tab, "
                             f"got {len(parts)} field(s)")
        pairs.append((parts[0].strip(), parts[1].strip()))
    if not pairs:
        raise ValueError(f"{path} holds no prompt pairs (one 'clean<TAB>corrupted' pair per line)")
    return pairs


def encode_pairs(model: TransformerLensModel, pairs: Sequence[tuple[str, str]], align: str = "equal"
                 ) -> tuple[Int[Tensor, "pair pos"], Int[Tensor, "pair pos"], int]:
    """The pairs as clean and corrupted token batches of one length, by the `align` rule.

    Args:
        model: the model whose tokenizer (or alphabet) reads the prompts.
        pairs: (clean, corrupted) prompts.
        align: `equal` (refuse different lengths) or `end` (keep every prompt's last n tokens).

    Returns:
        The clean batch, the corrupted batch, and how many tokens the longest prompt lost.
    """
    if align not in ALIGN_RULES:
        raise ValueError(f"unknown alignment rule {align!r}; allowed: {list(ALIGN_RULES)}")
    bos = bos_token_id(model)
    first = [] if bos is None else [bos]
    prompts = [torch.tensor(first + encode_text(model, text).tolist(), dtype=torch.long)
               for pair in pairs for text in pair]
    lengths = [len(tokens) for tokens in prompts]
    if min(lengths) <= len(first):
        raise ValueError("a prompt of the pairs file has no tokens")
    n = min(lengths)
    if max(lengths) != n and align == "equal":
        index = lengths.index(max(lengths))
        raise ValueError(f"prompts of different token lengths: pair {index // 2 + 1}'s "
                         f"{'clean' if index % 2 == 0 else 'corrupted'} prompt has {max(lengths)} tokens, another "
                         f"{n}; patching compares equal positions (rule 'equal'); pass --align end to compare "
                         "positions counted from the end")
    kept = [torch.cat([tokens[:len(first)], tokens[len(tokens) - n + len(first):]]) for tokens in prompts]
    batch = torch.stack(kept)
    return batch[0::2], batch[1::2], max(lengths) - n


def pairs_table(model: TransformerLensModel, pairs: Sequence[tuple[str, str]], *, sites: Sequence[str] = RESIDUAL_SITES,
                method: str = "exact", align: str = "equal", dtype: torch.dtype | None = None,
                quiet: bool = True) -> tuple[pd.DataFrame, str]:
    """Patch every (layer, position) of each site from the clean prompts into the corrupted ones.

    Args:
        model: any TransformerLens model.
        pairs: (clean, corrupted) prompts (`read_pairs`).
        sites: layer × position sites the model has.
        method: `exact` or `attribution`.
        align: `equal` or `end` (module docstring).
        dtype: the exact passes' precision (None: the model's; `torch.bfloat16`: autocast).
        quiet: no progress bar.

    Returns:
        The table (model, method, site, layer, position, from_end, role, value, dropped) and the metric's name.
    """
    clean, corrupted, dropped = encode_pairs(model, pairs, align)
    labels = [f"{a}→{b}" if a != b else a
              for a, b in zip(_token_strings(model, clean[0]), _token_strings(model, corrupted[0]))]
    table, metric = prompt_patch_table(model, clean, corrupted, sites, labels=labels, method=check_method(method),
                                       dtype=dtype, quiet=quiet)
    n_pos = clean.shape[1]
    table.insert(0, "method", method)
    table.insert(0, "model", model_name(model))
    table.insert(table.columns.get_loc("position") + 1, "from_end", table["position"] - n_pos)
    return table.assign(dropped=dropped), metric


def task_table(model, task: Addition, *, kind: str = "swap", positions: tuple[int, int] = (0, 2),
               n_sequences: int = 64, seed: int = 0, method: str = "exact", dtype: torch.dtype | None = None,
               quiet: bool = True) -> tuple[pd.DataFrame, str]:
    """`patch_table` of a trained checkpoint on its task's corruptions (`patching_sample`), every site,
    with the `fixed_by_construction` column; the table (model, method first) and the metric's name."""
    clean, corrupted = patching_sample(task, kind=kind, positions=positions, n_sequences=n_sequences, seed=seed)
    table, metric = patch_table(model, task, clean, corrupted, SITES, method=check_method(method), dtype=dtype,
                                quiet=quiet)
    table["fixed_by_construction"] = fixed_by_construction(model.cfg, table, clean, corrupted, task.prompt_len)
    table.insert(0, "method", method)
    table.insert(0, "model", model_name(model))
    return table, metric


def write_patching(table: pd.DataFrame, out: str | os.PathLike, *, title: str = "",
                   overwrite: bool = False) -> list[Path]:
    """The table in every export format (`out/patching.{csv,md,tex,json}`) and one heatmap per model and
    site (`out/patching.MODEL.SITE.html`, the mean over models of one name); the paths written.

    Refuses, before writing anything, when a file exists and not `overwrite`."""
    out = Path(out)
    figures = {(name, site): out / f"{TABLE_NAME}.{name}.{site}.html"
               for name in table["model"].unique() for site in table["site"].unique()}
    for suffix in EXPORT_SUFFIXES:
        check_writable(out / f"{TABLE_NAME}{suffix}", overwrite=overwrite)
    for path in figures.values():
        check_html_path(path, overwrite=overwrite)
    out.mkdir(parents=True, exist_ok=True)
    paths = export_tables(table, out, TABLE_NAME, overwrite=overwrite)
    for (name, site), path in figures.items():
        rows = table[table["model"] == name].groupby(["site", "layer", "position"], as_index=False).agg(
            value=("value", "mean"), role=("role", "first"))
        figure = patching_heatmap(rows, site, title=f"{name}, {site}: {title}")
        paths.append(write_figure(figure, path, overwrite=overwrite))
    return paths


def _token_strings(model: TransformerLensModel, tokens: Int[Tensor, " pos"]) -> list[str]:
    """Each token as the model writes it, newlines shown escaped."""
    return [str(token).replace("\n", "\\n") for token in model.to_str_tokens(tokens)]
