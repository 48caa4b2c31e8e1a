"""Serving a poslens Dash app on this machine only, and checking what its callbacks receive.

Every poslens app (the addition demo in `demos.app`, and any later one) is served by
`make_server`: bound to 127.0.0.1 only, request bodies capped (`MAX_BODY_BYTES`, else 413), a
request Dash cannot parse answered 400 (not 500), and wrapped in `LoopbackHostOnly`, which answers 403 to any request whose `Host` header is not
`127.0.0.1:PORT` or `localhost:PORT`, so that a web page on another site cannot reach the app
through DNS rebinding. Callback values come from the browser and can be anything a client
sends: `text`, `choice` and `integer` check one value's type and size and raise a `ValueError`
quoting at most a short prefix of it; `inline_errors` turns any exception of a callback into
its inline-message output, so a bad request never gets an HTTP 500.
"""

from __future__ import annotations

import functools
import gc
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import dash
from dash.exceptions import PreventUpdate
from werkzeug.exceptions import HTTPException
from werkzeug.serving import BaseWSGIServer
from werkzeug.serving import make_server as make_wsgi_server

from poslens.variants.tokens import excerpt

HOST = "127.0.0.1"
MAX_BODY_BYTES = 4 * 2**20
MAX_MESSAGE_CHARS = 400
log = logging.getLogger(__name__)


class LoopbackHostOnly:
    """WSGI middleware: pass on requests addressed to this machine's app by its loopback names
    (`Host: 127.0.0.1:PORT` or `localhost:PORT`), answer every other one 403."""

    def __init__(self, app: Callable, port: int):
        self.app = app
        self.allowed = {f"{name}:{port}" for name in (HOST, "localhost")}
        if port == 80:  # a browser leaves the default port out
            self.allowed |= {HOST, "localhost"}

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        if environ.get("HTTP_HOST", "").lower() in self.allowed:
            return self.app(environ, start_response)
        body = f"refused: this server answers only requests addressed to {sorted(self.allowed)}\n".encode()
        start_response("403 Forbidden", [("Content-Type", "text/plain; charset=utf-8"),
                                         ("Content-Length", str(len(body)))])
        return [body]


def check_port(port: int) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port must be an integer in 0..65535 (0 = any free port), got {port!r}")
    return port


def make_server(app: dash.Dash, port: int = 8050) -> BaseWSGIServer:
    """A threaded WSGI server for `app` on 127.0.0.1:`port` (port 0 binds a free one: `.server_port`),
    refusing foreign Host headers and bodies over `MAX_BODY_BYTES`."""
    check_port(port)
    app.server.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.server.register_error_handler(Exception, _bad_request)
    try:
        server = make_wsgi_server(HOST, port, app.server, threaded=True)
    except OSError as error:
        raise ValueError(f"cannot listen on {HOST}:{port} ({error}); choose another port") from error
    server.app = LoopbackHostOnly(server.app, server.server_port)
    # What is loaded by now (libraries, the app) lives as long as the server: exempt it from the cyclic
    # garbage collector, whose full passes over it otherwise pause every request thread for ~0.5 s.
    gc.freeze()
    return server


def _bad_request(error: Exception):
    """Flask's answer to an exception no callback caught: Dash failing to parse a malformed request
    (an unknown output, a missing field). HTTP errors (404, 413...) keep their own answer."""
    if isinstance(error, HTTPException):
        return error
    log.warning("refused a malformed request: %s", excerpt(error, 200))
    return f"bad request: {type(error).__name__}\n", 400, {"Content-Type": "text/plain; charset=utf-8"}


def text(value: Any, name: str, max_chars: int) -> str:
    """A text input's value: a string of at most `max_chars` characters (`None`, an empty input, is '')."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{name} must be text, got {type(value).__name__} {excerpt(value)}")
    if len(value) > max_chars:
        raise ValueError(f"{name} {excerpt(value)} is too long: at most {max_chars} characters")
    return value


def choice(value: Any, allowed: Sequence, name: str) -> Any:
    """A value that must be one of `allowed` (strings or integers, compared by type and value)."""
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value not in allowed:
        raise ValueError(f"unknown {name} {excerpt(value)}; allowed: {list(allowed)}")
    return value


def integer(value: Any, name: str) -> int:
    """A value that must be an integer (not a bool, a float or a string of digits)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {excerpt(value)}")
    return value


def inline_errors(on_error: Callable[[str], Any]) -> Callable:
    """Decorate a callback so that a `ValueError` (a bad input) returns `on_error(its message)` and any
    other exception (a bug) is logged with its traceback and returns `on_error` of a short note;
    messages are cut to `MAX_MESSAGE_CHARS`. `PreventUpdate` passes through (Dash answers 204)."""

    def decorate(callback: Callable) -> Callable:
        @functools.wraps(callback)
        def guarded(*args):
            try:
                return callback(*args)
            except PreventUpdate:
                raise
            except ValueError as error:
                message = str(error)
            except Exception:
                log.exception("callback %s failed", callback.__name__)
                message = f"internal error in {callback.__name__} (details in the server log)"
            return on_error(message if len(message) <= MAX_MESSAGE_CHARS else message[: MAX_MESSAGE_CHARS - 1] + "…")

        return guarded

    return decorate
