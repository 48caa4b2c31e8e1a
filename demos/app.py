"""`poslens demo`: a local Dash app for activation patching on trained addition models.

Pick a model, type a clean prompt (`123+456=`), pick a corruption, and read: both answers and
the correct ones; the layer × position activation-patching heatmap (`resid_pre`, `resid_mid` or
`resid_post`; click a cell for the first-digit distribution before and after that patch), drawn
after its attribution-patching preview (a gradient estimate, one backward pass); the
residual-cut view; one head's attention pattern; the position probe's prediction at every
layer; and the answer when every position id is shifted by k ("positions told",
`hooks.positions`). Every number comes from `demos.panels`; this module only lays them out and wires the
callbacks. Bad input shows an inline message and leaves the last good panels in place.

`make_app(models)` builds the app, `demos.server.make_server(app, port)` binds it to 127.0.0.1
(port 0 picks a free one; requests addressed to another host than loopback or an allowed one
are refused), `demos.server.show_inline(app)` shows it in Jupyter and `serve(models, port=...)`
runs it until interrupted. The patching grid is computed in the background (`demos.server.Jobs`),
so the other panels answer while it runs.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import dash
import pandas as pd
import torch
from dash import Input, Output, dcc, html
from dash.exceptions import PreventUpdate
from torch import Tensor

from poslens.analyses.figures.patching import patching_heatmap
from poslens.analyses.measures.patching import SITES
from poslens.demos.panels import (
    CORRUPTIONS,
    PREVIEW_NOTE,
    DemoModel,
    ModelStore,
    answer_distribution,
    answers,
    attention_figure,
    corrupt_prompt,
    distribution_figure,
    max_position_shift,
    message_figure,
    parse_prompt,
    patch_effects,
    probe_figure,
    probe_predictions,
    prompt_text,
    residual_cut_answers,
    residual_cut_figure,
    shifted_answer,
)
from poslens.demos.server import (
    POLL_MS,
    Jobs,
    Pending,
    choice,
    inline_errors,
    integer,
    make_server,
    run_server,
    text,
)
from poslens.variants.tokens import excerpt

MAX_PROMPT_CHARS = 100  # a prompt is a few tokens; anything longer is refused before it is parsed
DEFAULT_PROMPT = "123+456="
CLICK_HINT = "click a heatmap cell to see the first answer digit before and after that patch"
COMPUTING = "computing the patching grid…"
ROW = {"display": "flex", "gap": "1.5em", "alignItems": "center", "flexWrap": "wrap", "margin": "0.5em 0"}


def _answers_view(table) -> list:
    """One line per run: prompt → the model's answer and the correct one."""
    lines = []
    for row in table.itertuples():
        mark = "✓" if row.is_correct else "✗"
        value = "?" if pd.isna(row.answer_value) else row.answer_value
        lines.append(html.Div(f"{row.run:9} {row.prompt} → model {row.answer} (= {value}) {mark}   "
                              f"correct {row.correct_answer} (= {row.correct_value})", id=f"answer-{row.run}"))
    return lines


def _model_options(demo: DemoModel) -> tuple[list[dict], list[int], list[int]]:
    """Choices that depend on the model: swappable positions (labelled with their roles), layers, heads."""
    swap = [{"label": f"{position}:{demo.task.roles[position]}", "value": position}
            for position in demo.task.operand_positions]
    return swap, list(range(demo.model.cfg.n_layers)), list(range(demo.model.cfg.n_heads))


def _layout(store: ModelStore, prompt: str) -> html.Div:
    swap, layers, heads = _model_options(store[store.names[0]])
    return html.Div([
        html.H2("poslens: where does a transformer keep token position?"),
        html.Div([
            html.Label(["model ", dcc.Dropdown(store.names, store.names[0], id="model", clearable=False,
                                               style={"width": "22em"})]),
            html.Label(["clean prompt ", dcc.Input(id="prompt", value=prompt, debounce=True, type="text")]),
        ], style=ROW),
        html.Div([
            html.Label(["corruption ", dcc.RadioItems([{"label": label, "value": kind} for kind, label
                                                       in CORRUPTIONS.items()], "swap", id="corruption", inline=True)]),
            html.Label(["swap ", dcc.Dropdown(swap, swap[0]["value"], id="swap-i", clearable=False,
                                              style={"width": "7em"})]),
            html.Label(["with ", dcc.Dropdown(swap, swap[2]["value"], id="swap-j", clearable=False,
                                              style={"width": "7em"})]),
            html.Label(["second prompt ", dcc.Input(id="second-prompt", value="", debounce=True, type="text",
                                                    placeholder="e.g. 124+456=")]),
        ], style=ROW),
        html.Div(id="message", role="alert", style={"color": "crimson", "fontWeight": "bold", "minHeight": "1.2em"}),
        html.Div(id="answers", style={"fontFamily": "monospace", "whiteSpace": "pre", "margin": "0.5em 0"}),
        dcc.Store(id="state"),
        html.H3("activation patching: clean → corrupted"),
        dcc.RadioItems(list(SITES), "resid_pre", id="site", inline=True),
        html.Div(PREVIEW_NOTE),
        dcc.Graph(id="preview"),
        html.Div([dcc.Graph(id="heatmap", style={"flex": "1"}), dcc.Graph(id="distribution", style={"flex": "1"})],
                 style={"display": "flex"}),
        dcc.Interval(id="heatmap-poll", interval=POLL_MS, disabled=True),
        html.H3("residual cuts"),
        dcc.Graph(id="cuts"),
        html.H3("attention"),
        html.Div([html.Label(["layer ", dcc.Dropdown(layers, 0, id="attn-layer", clearable=False,
                                                     style={"width": "6em"})]),
                  html.Label(["head ", dcc.Dropdown(heads, 0, id="attn-head", clearable=False,
                                                    style={"width": "6em"})])], style=ROW),
        dcc.Graph(id="attention"),
        html.H3("position probe"),
        dcc.Graph(id="probe"),
        html.H3("positions told"),
        html.Div([html.Label(["shift positions by k ", dcc.Dropdown(list(range(max_position_shift(
            store[store.names[0]]) + 1)), 0, id="shift", clearable=False, style={"width": "6em"})]),
                  html.Div(id="shifted", style={"fontFamily": "monospace", "whiteSpace": "pre"})], style=ROW),
    ], style={"fontFamily": "sans-serif", "margin": "1em"})


def make_app(models: Mapping[str, str | Path] | ModelStore, *, device: str = "cpu", prompt: str = DEFAULT_PROMPT,
             jobs: Jobs | None = None) -> dash.Dash:
    """The demo app over `models` (name → checkpoint folder, see `demos.discovery.discover_models`,
    or a `ModelStore` whose models are already loaded).

    Models are loaded on first use and kept; the cheap callbacks run one at a time (the models'
    hooks are shared state), so concurrent requests never see each other's patches. The
    patching grid runs in the background (`demos.server.Jobs`) on a copy of the model made on its
    first grid, so it never holds the other panels up; its attribution preview (one backward
    pass) is drawn at once, and the exact heatmap shows "computing" until it is there, and a grid
    whose page has gone is cancelled. Every callback value is checked
    (`demos.server`) before the lock is taken, and a bad one becomes the inline message. The
    client-side `state` holds only the model name and the two prompts as typed (at most
    `MAX_PROMPT_CHARS` each); every callback parses them again, so a forged state is refused
    like a typed prompt and can never make a request slower than a typed one.

    Args:
        models: name → checkpoint folder, or a `ModelStore`.
        device: where models are loaded (when `models` is not a store).
        prompt: the clean prompt shown first (it must suit the first model's task).
        jobs: where the patching grids run (default: a new `Jobs()`).

    Returns:
        The Dash app; serve it with `demos.server.make_server` or `demos.server.show_inline`.
    """
    store = models if isinstance(models, ModelStore) else ModelStore(models, device=device)
    lock = threading.Lock()
    jobs = jobs or Jobs()
    patchers: dict[str, DemoModel] = {}  # model name → the copy patching grids run on
    app = dash.Dash(__name__, title="poslens demo")
    app.layout = _layout(store, prompt)

    def restore(state: Any) -> tuple[DemoModel, Tensor, Tensor]:
        """The model and the clean and corrupted sequences a client `state` names, checked."""
        if not isinstance(state, dict) or sorted(state) != ["clean", "corrupted", "model"]:
            raise ValueError(f"state must be {{'model', 'clean', 'corrupted'}}, got {excerpt(state)}")
        demo = store[choice(state["model"], store.names, "model")]
        clean, corrupted = (parse_prompt(demo, text(state[key], key, MAX_PROMPT_CHARS))
                            for key in ("clean", "corrupted"))
        if torch.equal(clean, corrupted):
            raise ValueError("state names the same clean and corrupted prompt: there is nothing to patch")
        return demo, clean, corrupted

    @app.callback(Output("swap-i", "options"), Output("swap-j", "options"), Output("attn-layer", "options"),
                  Output("attn-head", "options"), Input("model", "value"), prevent_initial_call=True)
    def model_options(name):
        if not isinstance(name, str) or name not in store.names:
            raise PreventUpdate  # the update callback names the bad model
        with lock:
            swap, layers, heads = _model_options(store[name])
        return swap, swap, layers, heads

    @app.callback(Output("shift", "options"), Input("model", "value"), prevent_initial_call=True)
    def shift_options(name):
        if not isinstance(name, str) or name not in store.names:
            raise PreventUpdate  # the update callback names the bad model
        with lock:
            return list(range(max_position_shift(store[name]) + 1))

    @app.callback(Output("message", "children"), Output("answers", "children"), Output("state", "data"),
                  Output("cuts", "figure"), Output("probe", "figure"),
                  Input("model", "value"), Input("prompt", "value"), Input("corruption", "value"),
                  Input("swap-i", "value"), Input("swap-j", "value"), Input("second-prompt", "value"))
    @inline_errors(lambda message: (message, dash.no_update, dash.no_update, dash.no_update, dash.no_update))
    def update(name, prompt, kind, swap_i, swap_j, second_prompt):
        name = choice(name, store.names, "model")
        prompt = text(prompt, "prompt", MAX_PROMPT_CHARS)
        kind = choice(kind, list(CORRUPTIONS), "corruption")
        positions = (integer(swap_i, "swap position"), integer(swap_j, "swap position"))
        second_prompt = text(second_prompt, "second prompt", MAX_PROMPT_CHARS)
        with lock:
            demo = store[name]
            clean = parse_prompt(demo, prompt)
            corrupted = corrupt_prompt(demo, clean, kind, positions=positions, second_prompt=second_prompt)
            answer_table = answers(demo, clean, corrupted)
            cuts = residual_cut_figure(residual_cut_answers(demo, clean))
            probe = probe_figure(probe_predictions(demo, clean))
            state = {"model": name, "clean": prompt_text(demo, clean), "corrupted": prompt_text(demo, corrupted)}
        return "", _answers_view(answer_table), state, cuts, probe

    @app.callback(Output("heatmap", "figure"), Output("heatmap-poll", "disabled"), Input("state", "data"),
                  Input("site", "value"), Input("heatmap-poll", "n_intervals"))
    @inline_errors(lambda message: (message_figure(message), True))
    def heatmap(state, site, _ticks):
        if not state:
            return message_figure("type a prompt"), True
        site = choice(site, SITES, "patching site")
        with lock:
            demo, clean, corrupted = restore(state)
            if demo.name not in patchers:
                patchers[demo.name] = jobs.replica(demo)
        patcher = patchers[demo.name]

        def grid() -> tuple:
            return (*patch_effects(patcher, clean, corrupted, site),
                    f"patching {prompt_text(patcher, clean)} into {prompt_text(patcher, corrupted)}")

        key = (demo.name, tuple(clean[0].tolist()), tuple(corrupted[0].tolist()), site)
        try:
            table, metric, what = jobs.answer(key, grid, polled=dash.ctx.triggered_id == "heatmap-poll")
        except Pending:
            return message_figure(COMPUTING), False
        figure = patching_heatmap(table, site, title=f"{site}: {metric}, {what}")
        return figure.update_traces(colorbar_title=metric.replace(" ", "<br>", 1)), True

    @app.callback(Output("preview", "figure"), Input("state", "data"), Input("site", "value"))
    @inline_errors(message_figure)
    def preview(state, site):
        if not state:
            return message_figure("type a prompt")
        site = choice(site, SITES, "patching site")
        with lock:  # one clean, one corrupted forward and one backward: cheap enough to answer inline
            demo, clean, corrupted = restore(state)
            table, metric = patch_effects(demo, clean, corrupted, site, "attribution")
        title = f"preview (attribution) {site}: {metric}, patching {prompt_text(demo, clean)} into " \
                f"{prompt_text(demo, corrupted)}"
        return patching_heatmap(table, site, title=title).update_traces(colorbar_title=metric.replace(" ", "<br>", 1))

    @app.callback(Output("distribution", "figure"), Input("heatmap", "clickData"), Input("state", "data"),
                  Input("site", "value"))
    @inline_errors(message_figure)
    def distribution(click, state, site):
        if dash.ctx.triggered_id != "heatmap" or not click or not state:
            return message_figure(CLICK_HINT)
        layer, position = _clicked_cell(click)
        site = choice(site, SITES, "patching site")
        with lock:
            demo, clean, corrupted = restore(state)
            table = answer_distribution(demo, clean, corrupted, site, layer, position)
        return distribution_figure(table, title=f"first answer digit, {site} layer {layer} position {position} patched")

    @app.callback(Output("shifted", "children"), Input("state", "data"), Input("shift", "value"))
    @inline_errors(lambda message: message)
    def shifted_view(state, k):
        if not state:
            return "type a prompt"
        k = integer(k, "shift")
        with lock:
            demo, clean, _ = restore(state)
            row = shifted_answer(demo, clean, k).iloc[0]
        note = "  (the encoding cannot see a global shift: fixed by construction)" if row.fixed_by_construction else ""
        return (f"positions {k}..{k + demo.task.seq_len - 2}: {prompt_text(demo, clean)} → model {row.answer} "
                f"{'✓' if row.is_correct else '✗'}   correct {row.correct_answer}{note}")

    @app.callback(Output("attention", "figure"), Input("state", "data"), Input("attn-layer", "value"),
                  Input("attn-head", "value"))
    @inline_errors(message_figure)
    def attention(state, layer, head):
        if not state:
            return message_figure("type a prompt")
        layer, head = integer(layer, "layer"), integer(head, "head")
        with lock:
            demo, clean, corrupted = restore(state)
            return attention_figure(demo, clean, corrupted, layer, head)

    return app


def _clicked_cell(click: Any) -> tuple[int, int]:
    """(layer, position) of a heatmap click: plotly sends `{"points": [{"y": layer, "x": "position:token"}]}`."""
    try:
        point = click["points"][0]
        layer, label = point["y"], str(point["x"])
    except (TypeError, KeyError, IndexError):
        raise ValueError(f"a heatmap click must hold points[0] with x and y, got {excerpt(click)}") from None
    position = label.split(":")[0]
    if isinstance(layer, bool) or not isinstance(layer, int) or not position.isdecimal() or len(position) > 6:
        raise ValueError(f"a heatmap click must name a layer and a position, got {excerpt(point)}")
    return layer, int(position)


def serve(models: Mapping[str, str | Path], *, port: int = 8050, device: str = "cpu",
          allow_hosts: Sequence[str] = (), quiet: bool = False) -> None:
    """Run the demo on http://127.0.0.1:`port` until interrupted (Ctrl-C), also answering requests
    addressed to `allow_hosts` (a reverse proxy's names). The first model, its position probe and
    its residual-cut table are prepared before the server starts.

    Args:
        models: name → checkpoint folder.
        port: the port on 127.0.0.1 (0 = any free port).
        device: where the models run.
        allow_hosts: Host names answered besides the loopback ones (`--allow-host`).
        quiet: no request log or progress bars.
    """
    store, jobs = ModelStore(models, device=device), Jobs()
    server = make_server(make_app(store, jobs=jobs), port, allow_hosts=allow_hosts)
    if not quiet:
        print(f"preparing {store.names[0]} (position probe, residual cuts)…", flush=True)
    store[store.names[0]].prepare()
    try:
        run_server(server, quiet=quiet)
    finally:
        jobs.close()  # a grid still running stops at its next forward pass, so Ctrl-C exits at once
