"""`poslens positions`: the position-id edits of `analyses.measures.positions` on one model, written out.

A poslens run is measured on its own task (`position_task`, `position_readout`); any other model
(a bridged Hugging Face model) on token sequences (`position_lm`, `position_readout`). The
tables go to `OUT/tables/` (CSV, Markdown, LaTeX, JSON) and two figures to `OUT/figures/`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from torch import Tensor
from transformer_lens.model_protocol import TransformerLensModel

from poslens.analyses.figures import check_html_path, write_figure
from poslens.analyses.figures.positions import position_edit_figure, position_readout_figure
from poslens.analyses.measures.positions import default_edits, position_interventions
from poslens.analyses.tables import EXPORT_SUFFIXES, check_writable, export_tables
from poslens.hooks.positions import position_support
from poslens.tasks import Addition
from poslens.variants.locking import holds_lock

TASK_EDITS = {"swap": (0, 2), "repeat": (0, 2)}  # the first operand's outer digits
SEQUENCE_EDITS = {"swap": (1, 3), "repeat": (1, 3)}  # position 0 is BOS, an attention sink: left in place
FIGURES = ("position_edits", "position_readout")


@holds_lock("out_dir", clean=(".", "tables", "figures"))  # one writer; a killed one's temporaries removed
def position_study(model: TransformerLensModel, data: Addition | Tensor, out_dir: str | Path, *,
                   shifts: Sequence[int] = (1,), n_sequences: int = 500, seed: int = 0,
                   overwrite: bool = False) -> dict[str, pd.DataFrame]:
    """Measure `model` under shifted, swapped and repeated position ids and write the tables and figures.

    Args:
        model: a poslens model trained on `data`, or a bridged model (`variants.load_any`).
        data: an `Addition` task, or `[sequence, pos]` tokens (`analyses.measures.sequences`).
        out_dir: where `tables/` and `figures/` go.
        shifts: the global shifts measured.
        n_sequences: held-out sums for a task (token sequences are all used).
        seed: seeds the sample and the probes' split.
        overwrite: replace existing outputs (otherwise they are refused before any work).

    Returns:
        The tables by name.
    """
    reason = position_support(model)
    if reason is not None:
        raise ValueError(reason)
    if not isinstance(data, (Addition, Tensor)):
        raise ValueError(f"position edits are measured on addition or on token sequences, not on {data}; "
                         "give token sequences (--text FILE or --random-tokens)")
    out_dir = Path(out_dir)
    names = ["position_task" if isinstance(data, Addition) else "position_lm", "position_readout"]
    for name in names:
        for suffix in EXPORT_SUFFIXES:
            check_writable(out_dir / "tables" / f"{name}{suffix}", overwrite=overwrite)
    for name in FIGURES:
        check_html_path(out_dir / "figures" / f"{name}.html", overwrite=overwrite)
    n_pos, where = (data.seq_len - 1, TASK_EDITS) if isinstance(data, Addition) else (data.shape[1], SEQUENCE_EDITS)
    edits = default_edits(model, n_pos, shifts=shifts, **where)
    tables = position_interventions(model, data, n_sequences=n_sequences, edits=edits, seed=seed)
    for name, table in tables.items():
        export_tables(table, out_dir / "tables", name, overwrite=overwrite)
    outcome, value = (tables["position_task"], "exact_match") if "position_task" in tables else (
        tables["position_lm"], "agreement")
    figures = {"position_edits": position_edit_figure(outcome, value),
               "position_readout": position_readout_figure(tables["position_readout"])}
    for name, figure in figures.items():
        write_figure(figure, out_dir / "figures" / f"{name}.html", overwrite=overwrite, standalone=False)
    return tables
