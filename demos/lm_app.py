"""`poslens demo --model SPEC`: a local Dash app for a language model and free-text prompts.

The page shows the model (sizes, residual sites and the positional encoding detected in each
block), then for a typed prompt: its tokens and the most likely next tokens, one head's attention
pattern, the position probe's prediction for every token at every residual site, and activation
patching from the prompt into a corrupted prompt of the same token length (`resid_pre`,
`resid_mid` where the model has it, `resid_post`; metric `next_token_restoration`), its
attribution-patching preview (a gradient estimate) drawn first, the exact grid after. Every number
comes from `demos.lm_panels`; this module lays them out and wires the callbacks, on the hardened
server of `demos.server`. A bad prompt shows an inline message and leaves the last good panels in
place; a corrupted prompt of another token length is refused in the patching panel, naming both
lengths, while the other panels follow the prompt.

`make_app(demo)` builds the app and `serve(demo, port=...)` runs it until interrupted
(`demos.server.show_inline(app)` in Jupyter). The patching grid is computed in the background on a
copy of the model (`demos.server.Jobs`), so the other panels answer while it runs.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from html import escape as html_escape
from typing import Any

import dash
import pandas as pd
from dash import Input, Output, dcc, html
from torch import Tensor

from poslens.analyses.figures.patching import patching_heatmap
from poslens.demos.lm_panels import (
    LMDemoModel,
    attention_figure,
    encode_prompt,
    patch_effects,
    probe_predictions,
    prompt_tokens,
    summary,
    top_next_tokens,
    top_tokens_figure,
)
from poslens.demos.panels import PREVIEW_NOTE, message_figure, probe_figure
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

MAX_PROMPT_CHARS = 2000  # longer text is refused before it is tokenised
DEFAULT_PROMPT = "When Mary and John went to the store, John gave a drink to"
DEFAULT_CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"
ROW = {"display": "flex", "gap": "1.5em", "alignItems": "center", "flexWrap": "wrap", "margin": "0.5em 0"}
ALERT = {"color": "crimson", "fontWeight": "bold", "minHeight": "1.2em"}
COMPUTING = "computing the patching grid… (the other panels keep answering)"


def plotly_text(text: str) -> str:
    """`text` for a plotly title: `<` and `&` escaped, so that typed text such as `<b>` is shown, not
    read as plotly's markup."""
    return html_escape(text, quote=False)


def _table(frame: pd.DataFrame, id: str) -> html.Table:
    """A DataFrame as a plain HTML table (its cells are text, never markup)."""
    cell = {"border": "1px solid #ccc", "padding": "2px 8px", "textAlign": "left"}
    return html.Table([html.Tr([html.Th(column, style=cell) for column in frame.columns])]
                      + [html.Tr([html.Td(str(value), style=cell) for value in row])
                         for row in frame.itertuples(False)],
                      id=id, style={"borderCollapse": "collapse", "margin": "0.5em 0"})


def _tokens_view(table: pd.DataFrame) -> str:
    """`position:token` of every token, on one line."""
    return "  ".join(f"{row.position}:{row.token!r}" for row in table.itertuples())


def _layout(demo: LMDemoModel, prompt: str, corrupted: str) -> html.Div:
    cfg = demo.model.cfg
    wide = {"width": "48em"}
    return html.Div([
        html.H2(f"poslens: where does {demo.name} keep token position?"),
        html.H3("the model"),
        _table(summary(demo), "summary"),
        _table(demo.info.drop(columns=["variant", "seed"]), "encodings"),
        html.Div([html.Label(["prompt ", dcc.Input(id="prompt", value=prompt, debounce=True, type="text",
                                                   style=wide)])], style=ROW),
        html.Div([html.Label(["corrupted prompt ", dcc.Input(id="corrupted", value=corrupted, debounce=True,
                                                             type="text", placeholder="same number of tokens",
                                                             style=wide)])],
                 style=ROW),
        html.Div(id="message", role="alert", style=ALERT),
        dcc.Store(id="state"),
        html.H3("tokens and next token"),
        html.Div(id="tokens", style={"fontFamily": "monospace", "whiteSpace": "pre-wrap", "margin": "0.5em 0"}),
        dcc.Graph(id="next-tokens"),
        html.H3("attention"),
        html.Div([html.Label(["layer ", dcc.Dropdown(list(range(cfg.n_layers)), 0, id="attn-layer", clearable=False,
                                                     style={"width": "6em"})]),
                  html.Label(["head ", dcc.Dropdown(list(range(cfg.n_heads)), 0, id="attn-head", clearable=False,
                                                    style={"width": "6em"})])], style=ROW),
        dcc.Graph(id="attention"),
        html.H3("position probe"),
        html.Div(f"a linear probe per residual site, fitted once on {demo.probe_data}"),
        dcc.Graph(id="probe"),
        html.H3("activation patching: prompt → corrupted prompt"),
        dcc.RadioItems(demo.sites, demo.sites[0], id="site", inline=True),
        html.Div(id="patch-message", role="alert", style=ALERT),
        html.Div(PREVIEW_NOTE),
        dcc.Graph(id="preview"),
        dcc.Graph(id="heatmap"),
        dcc.Interval(id="heatmap-poll", interval=POLL_MS, disabled=True),
    ], style={"fontFamily": "sans-serif", "margin": "1em"})


def make_app(demo: LMDemoModel, *, prompt: str = DEFAULT_PROMPT, corrupted: str = DEFAULT_CORRUPTED,
             jobs: Jobs | None = None) -> dash.Dash:
    """The demo app for `demo`, starting with `prompt` and `corrupted` in the inputs.

    The cheap callbacks run one at a time on `demo.model` (its hooks are shared state); the
    patching grid runs in the background (`demos.server.Jobs`) on a copy of the model, so it never
    holds them up: the heatmap shows "computing" until the grid is there, and a grid whose page
    has gone is cancelled. The copy doubles the weights' memory. Every callback value is checked
    (`demos.server`) before the lock is taken, and a bad one becomes an inline message. The
    client-side `state` holds only the two prompts as typed (at most `MAX_PROMPT_CHARS` each);
    every callback tokenises them again, so a forged state is refused like a typed prompt.

    Args:
        demo: the model and its position probe.
        prompt: the prompt shown first.
        corrupted: the corrupted prompt shown first.
        jobs: where the patching grids run (default: a new `Jobs()`).

    Returns:
        The Dash app; serve it with `demos.server.make_server` or `demos.server.show_inline`.
    """
    lock = threading.Lock()
    jobs = jobs or Jobs()
    patcher = jobs.replica(demo)
    app = dash.Dash(__name__, title=f"poslens demo: {demo.name}")
    app.layout = _layout(demo, prompt, corrupted)

    def restore(state: Any) -> tuple[Tensor, str]:
        """The prompt's tokens and the corrupted prompt's text of a client `state`, checked."""
        if not isinstance(state, dict) or sorted(state) != ["corrupted", "prompt"]:
            raise ValueError(f"state must be {{'prompt', 'corrupted'}}, got {excerpt(state)}")
        clean = encode_prompt(demo, text(state["prompt"], "prompt", MAX_PROMPT_CHARS))
        return clean, text(state["corrupted"], "corrupted prompt", MAX_PROMPT_CHARS)

    @app.callback(Output("message", "children"), Output("tokens", "children"), Output("next-tokens", "figure"),
                  Output("probe", "figure"), Output("state", "data"), Input("prompt", "value"),
                  Input("corrupted", "value"))
    @inline_errors(lambda message: (message, *[dash.no_update] * 4))
    def update(prompt, corrupted):
        prompt = text(prompt, "prompt", MAX_PROMPT_CHARS)
        corrupted = text(corrupted, "corrupted prompt", MAX_PROMPT_CHARS)
        with lock:
            tokens = encode_prompt(demo, prompt)
            view = _tokens_view(prompt_tokens(demo, tokens))
            top = top_tokens_figure(top_next_tokens(demo, tokens), title=f"most likely next tokens after "
                                                                        f"{plotly_text(excerpt(prompt, 60))}")
            probe = probe_figure(probe_predictions(demo, tokens))
        return "", view, top, probe, {"prompt": prompt, "corrupted": corrupted}

    @app.callback(Output("attention", "figure"), Input("state", "data"), Input("attn-layer", "value"),
                  Input("attn-head", "value"))
    @inline_errors(message_figure)
    def attention(state, layer, head):
        if not state:
            return message_figure("type a prompt")
        layer, head = integer(layer, "layer"), integer(head, "head")
        with lock:
            return attention_figure(demo, restore(state)[0], layer, head)

    @app.callback(Output("patch-message", "children"), Output("heatmap", "figure"), Output("heatmap-poll", "disabled"),
                  Input("state", "data"), Input("site", "value"), Input("heatmap-poll", "n_intervals"))
    @inline_errors(lambda message: (message, dash.no_update, True))
    def heatmap(state, site, _ticks):
        if not state:
            return "", message_figure("type a prompt"), True
        site = choice(site, demo.sites, "patching site")
        with lock:
            clean, typed = restore(state)
            if not typed.strip():
                return "", message_figure(f"type a corrupted prompt of {clean.shape[1]} tokens to patch"), True
            corrupted = encode_prompt(demo, typed, "corrupted prompt")

        def grid() -> tuple:
            table, metric = patch_effects(patcher, clean, corrupted, site)
            return table, metric, [top_next_tokens(patcher, run, 1)["token"][0] for run in (clean, corrupted)]

        key = (tuple(clean[0].tolist()), tuple(corrupted[0].tolist()), site)
        try:
            table, metric, tops = jobs.answer(key, grid, polled=dash.ctx.triggered_id == "heatmap-poll")
        except Pending:
            return "", message_figure(COMPUTING), False
        title = plotly_text(f"{site}: {metric}; next token {tops[0]!r} (prompt) vs {tops[1]!r} (corrupted)")
        figure = patching_heatmap(table, site, title=title).update_layout(xaxis_title="position:token", yaxis_dtick=1)
        return "", figure.update_traces(colorbar_title=metric.replace(" ", "<br>", 1)), True

    @app.callback(Output("preview", "figure"), Input("state", "data"), Input("site", "value"))
    @inline_errors(message_figure)
    def preview(state, site):
        if not state:
            return message_figure("type a prompt")
        site = choice(site, demo.sites, "patching site")
        with lock:  # one clean, one corrupted forward and one backward: cheap enough to answer inline
            clean, typed = restore(state)
            if not typed.strip():
                return message_figure(f"type a corrupted prompt of {clean.shape[1]} tokens to patch")
            corrupted = encode_prompt(demo, typed, "corrupted prompt")
            table, metric = patch_effects(demo, clean, corrupted, site, "attribution")
        title = plotly_text(f"preview (attribution) {site}: {metric}")
        figure = patching_heatmap(table, site, title=title).update_layout(xaxis_title="position:token", yaxis_dtick=1)
        return figure.update_traces(colorbar_title=metric.replace(" ", "<br>", 1))

    return app


def serve(demo: LMDemoModel, *, port: int = 8050, allow_hosts: Sequence[str] = (), quiet: bool = False) -> None:
    """Run the demo on http://127.0.0.1:`port` until interrupted (Ctrl-C), also answering requests
    addressed to `allow_hosts` (a reverse proxy's names). The port is bound first (a busy one is
    refused at once); the position probe is fitted before the server answers."""
    jobs = Jobs()
    server = make_server(make_app(demo, jobs=jobs), port, allow_hosts=allow_hosts)
    if not quiet:
        print(f"preparing {demo.name} (position probe on {demo.n_sequences} sequences)…", flush=True)
    demo.prepare()
    try:
        run_server(server, quiet=quiet)
    finally:
        jobs.close()  # a grid still running stops at its next forward pass, so Ctrl-C exits at once
