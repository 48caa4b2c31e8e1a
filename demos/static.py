"""`poslens demo --static OUT.html`: one self-contained page of precomputed patching heatmaps.

For every model × prompt × site it holds the activation-patching heatmap of `demos.panels`
(each prompt corrupted by swapping the first operand's outer digits, x2 ↔ x0) as plotly JSON,
next to plotly.js itself, so the file opens offline with no server. Three `<select>`s pick the
model, the prompt and the site, and a few lines of JavaScript hand the chosen figure to
`Plotly.react`.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import plotly.offline
from tqdm.auto import tqdm

from poslens.analyses.figures import check_html_path
from poslens.analyses.figures.patching import patching_heatmap
from poslens.analyses.measures.patching import SITES
from poslens.demos.panels import (
    ModelStore,
    answers,
    corrupt_prompt,
    message_figure,
    parse_prompt,
    patch_effects,
    prompt_text,
)
from poslens.variants.storage import atomic_write

# Fixed example prompts, not a sample: each has distinct hundreds and units digits in the first operand (so the
# x2 <-> x0 swap changes the prompt and its first answer digit), and they carry 0, 1 and 2 times. Like almost any typed
# prompt (1,000 of the 10^6 pairs are held out), all three are training pairs; held-out statistics come from samples.
STATIC_PROMPTS = ("123+456=", "905+381=", "274+639=")

_SCRIPT = """
const FIGURES = %s;
const chosen = id => document.getElementById(id).value;
function show() {
  const entry = FIGURES[chosen("model")][chosen("prompt")][chosen("site")];
  document.getElementById("answers").textContent = entry.answers;
  Plotly.react("heatmap", entry.figure.data, entry.figure.layout);
}
for (const id of ["model", "prompt", "site"]) document.getElementById(id).addEventListener("change", show);
show();
"""


def static_figures(store: ModelStore, prompts: Sequence[str] = STATIC_PROMPTS, *,
                   quiet: bool = False) -> dict[str, dict[str, dict[str, dict]]]:
    """model → prompt → site → {`figure`: plotly JSON, `answers`: one line of both runs' answers}."""
    figures: dict[str, dict[str, dict[str, dict]]] = {}
    for name, prompt in tqdm([(name, prompt) for name in store.names for prompt in prompts], desc="static page",
                             disable=quiet):
        demo = store[name]
        swap = demo.task.operand_positions
        clean = parse_prompt(demo, prompt)
        corrupted = corrupt_prompt(demo, clean, "swap", positions=(swap[0], swap[2]))
        line = "   ".join(f"{row.run} {row.prompt} → model {row.answer}, correct {row.correct_answer}"
                          for row in answers(demo, clean, corrupted).itertuples())
        for site in SITES:
            try:
                table, metric = patch_effects(demo, clean, corrupted, site)
                title = f"{name}, {site}: {metric}, patching {prompt} into {prompt_text(demo, corrupted)}"
                figure = patching_heatmap(table, site, title=title).update_traces(
                    colorbar_title=metric.replace(" ", "<br>", 1))
            except ValueError as error:
                figure = message_figure(str(error))
            figures.setdefault(name, {}).setdefault(prompt, {})[site] = {"figure": json.loads(figure.to_json()),
                                                                         "answers": line}
    return figures


def _select(name: str, options: Sequence[str]) -> str:
    items = "".join(f'<option value="{html.escape(option)}">{html.escape(option)}</option>' for option in options)
    return f'<label>{name} <select id="{name}">{items}</select></label>'


def static_page(figures: dict[str, dict[str, dict[str, dict]]], skipped: Mapping[str, str] | None = None) -> str:
    """The HTML of the page: plotly.js inline, the figures as JSON, the selects and the script, and
    a line naming the runs left out (`skipped`: name → reason, see `demos.discovery.demo_models`)."""
    models = list(figures)
    left_out = "".join(f"<li>{html.escape(name)}: it {html.escape(reason)}</li>"
                       for name, reason in (skipped or {}).items())
    left_out = f"<p>Not shown:</p><ul>{left_out}</ul>" if left_out else ""
    prompts = list(figures[models[0]])
    data = json.dumps(figures).replace("</", "<\\/")  # nothing in the JSON may close the <script>
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>poslens: activation patching</title>
<script>{plotly.offline.get_plotlyjs()}</script></head>
<body style="font-family: sans-serif; margin: 1em">
<h2>poslens: activation patching on addition prompts</h2>
<p>Each heatmap patches one residual-stream activation (layer × position) of the clean prompt into the run on
the corrupted prompt (the first operand's hundreds and units digits swapped) and shows how much of the clean
first answer digit comes back: 1 = the clean run, 0 = the corrupted run.</p>
<p>{_select("model", models)} {_select("prompt", prompts)} {_select("site", list(SITES))}</p>
<div id="answers" style="font-family: monospace"></div>
<div id="heatmap" style="height: 520px"></div>
{left_out}
<script>{_SCRIPT % data}</script>
</body></html>
"""


def write_static_page(models: Mapping[str, str | Path] | ModelStore, out: str | Path, *,
                      prompts: Sequence[str] = STATIC_PROMPTS, overwrite: bool = False, device: str = "cpu",
                      quiet: bool = False, skipped: Mapping[str, str] | None = None) -> Path:
    """Compute every heatmap and write the self-contained page to `out` (atomically; an existing
    file only with `overwrite`).

    Args:
        models: name → checkpoint folder (fixed-format addition runs: `demos.discovery.demo_models`
            picks them from a `reproduce` output), or a `ModelStore`.
        out: the page's path, ending in `.html`.
        prompts: the clean prompts (each corrupted by swapping the first operand's outer digits).
        overwrite: replace an existing file.
        device: where the models run.
        quiet: no progress bar.
        skipped: name → reason of runs left out, listed on the page.

    Returns:
        The path written.
    """
    out = check_html_path(out, overwrite=overwrite)
    if not prompts:
        raise ValueError("the static page needs at least one prompt")
    store = models if isinstance(models, ModelStore) else ModelStore(models, device=device)
    return atomic_write(out, static_page(static_figures(store, prompts, quiet=quiet), skipped), overwrite=overwrite)
