"""Serving a poslens Dash app on this machine, keeping it responsive, and checking what its callbacks receive.

Every poslens app (the addition demo in `demos.app`, the language-model demo in `demos.lm_app`) is
hardened by `harden`, through Flask's own settings: `TRUSTED_HOSTS` answers 403 to a request whose
`Host` names neither this machine's loopback (`127.0.0.1`, `localhost`) nor a name the user allowed
(`--allow-host NAME`, for a reverse proxy), so that a web page on another site cannot reach the app
through DNS rebinding; `MAX_CONTENT_LENGTH` caps request bodies (`MAX_BODY_BYTES`, else 413); a
request Dash cannot parse is answered 400 (not 500). The port is not part of the check (Werkzeug
compares names only), so `ssh -L 9000:localhost:PORT` works as is. `make_server` serves a hardened
app on 127.0.0.1 only; `show_inline` shows it in a Jupyter output cell (Dash's `jupyter_mode`).

`Jobs` runs the expensive callbacks (a patching grid) on a background thread, on the app's own copy
of the model, so the cheap ones (attention, tokens) never wait behind them: the callback answers
at once with a "computing" figure and a `dcc.Interval` polls until the result is there. Work whose
client stopped polling (a closed tab, a changed prompt) is cancelled within `ABANDON_S`.

Callback values come from the browser and can be anything a client sends: `text`, `choice` and
`integer` check one value's type and size and raise a `ValueError` quoting at most a short prefix of
it; `inline_errors` turns any exception of a callback into its inline-message output, so a bad
request never gets an HTTP 500.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import gc
import logging
import re
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import dash
from dash.exceptions import PreventUpdate
from werkzeug.exceptions import HTTPException, SecurityError
from werkzeug.serving import BaseWSGIServer
from werkzeug.serving import make_server as make_wsgi_server

from poslens.variants.tokens import excerpt

HOST = "127.0.0.1"
LOOPBACK_NAMES = (HOST, "localhost")
MAX_BODY_BYTES = 4 * 2**20
MAX_MESSAGE_CHARS = 400
POLL_MS = 400  # how often a page asks for a result that is being computed
ABANDON_S = 5.0  # a job nobody asked about for this long is cancelled (a hidden tab polls at least once a second)
KEEP_JOBS = 16  # finished results kept for clients that ask again
FIRST_WAIT_S = 0.5  # a job that finishes this soon is answered at once, with no "computing" state
_HOST_NAME = re.compile(r"\.?(?=.{1,253}$)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
                        r"(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*")
log = logging.getLogger(__name__)


def check_hosts(names: Iterable[str]) -> list[str]:
    """The host names a user allows besides loopback, checked: a DNS name or an IPv4 address, no port or
    scheme (`demo.example.org`; `.example.org` allows its subdomains too); lower-cased, in order."""
    checked = []
    for name in names:
        if not isinstance(name, str) or _HOST_NAME.fullmatch(name.lower()) is None:
            raise ValueError(f"--allow-host {excerpt(name)} is not a host name: give a name such as "
                             "'demo.example.org' or '.example.org' (its subdomains), without port or scheme")
        checked.append(name.lower())
    return checked


def harden(app: dash.Dash, allow_hosts: Iterable[str] = ()) -> dash.Dash:
    """Make `app` answer only requests addressed to loopback or to one of `allow_hosts` (403 otherwise),
    cap request bodies at `MAX_BODY_BYTES` (413) and answer a request Dash cannot parse 400; through
    Flask's `TRUSTED_HOSTS` and `MAX_CONTENT_LENGTH`, so whichever server runs the app (ours, Dash's
    Jupyter one) applies them. Returns `app`.

    Args:
        app: the Dash app.
        allow_hosts: names a reverse proxy or a tunnel addresses the app by (see `check_hosts`).

    Returns:
        The same app, hardened.
    """
    app.server.config["TRUSTED_HOSTS"] = [*LOOPBACK_NAMES, *check_hosts(allow_hosts)]
    app.server.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.server.register_error_handler(Exception, functools.partial(_refusal, app.server.config["TRUSTED_HOSTS"]))
    return app


def check_port(port: int) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port must be an integer in 0..65535 (0 = any free port), got {port!r}")
    return port


def make_server(app: dash.Dash, port: int = 8050, *, allow_hosts: Iterable[str] = ()) -> BaseWSGIServer:
    """A threaded WSGI server for `app`, hardened (`harden`), listening on 127.0.0.1:`port` only (port 0
    binds a free one: `.server_port`).

    Args:
        app: the Dash app.
        port: the loopback port, 0 for any free one.
        allow_hosts: host names accepted besides loopback (`--allow-host`), for a reverse proxy.

    Returns:
        The server; run it with `serve_forever()`.
    """
    check_port(port)
    harden(app, allow_hosts)
    try:
        server = make_wsgi_server(HOST, port, app.server, threaded=True)
    except OSError as error:
        raise ValueError(f"cannot listen on {HOST}:{port} ({error}); choose another port") from error
    # What is loaded by now (libraries, the app) lives as long as the server: exempt it from the cyclic
    # garbage collector, whose full passes over it otherwise pause every request thread for ~0.5 s.
    gc.freeze()
    return server


def run_server(server: BaseWSGIServer, *, quiet: bool = False) -> None:
    """Announce where `server` answers and serve until interrupted (Ctrl-C); the request log unless `quiet`."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING if quiet else logging.INFO)
    allowed = server.app.config["TRUSTED_HOSTS"][len(LOOPBACK_NAMES):]
    also = f" (also answering requests addressed to {', '.join(allowed)})" if allowed else ""
    print(f"poslens demo on http://{HOST}:{server.server_port}/{also} (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def _refusal(allowed: list[str], error: Exception):
    """Flask's answer to an exception no callback caught: a foreign Host header (403, naming the
    allowed ones), Dash failing to parse a malformed request (400). Other HTTP errors (404, 413...)
    keep their own answer."""
    if isinstance(error, SecurityError):
        return (f"refused: this server answers only requests addressed to {allowed}; serve it with "
                "--allow-host NAME to add a name\n", 403, {"Content-Type": "text/plain; charset=utf-8"})
    if isinstance(error, HTTPException):
        return error
    log.warning("refused a malformed request: %s", excerpt(error, 200))
    return f"bad request: {type(error).__name__}\n", 400, {"Content-Type": "text/plain; charset=utf-8"}


def show_inline(app: dash.Dash, *, port: int | None = None, allow_hosts: Iterable[str] = (),
                height: int = 900) -> str:
    """Show `app` in the output cell of a Jupyter notebook (Dash's `jupyter_mode="inline"`), served
    hardened (`harden`) on 127.0.0.1 in a background thread of the kernel; returns its address.

    Args:
        app: the Dash app, e.g. `demos.app.make_app(...)`.
        port: the loopback port; None picks a free one.
        allow_hosts: names the notebook's browser reaches the kernel's machine by, if not loopback.
        height: the output cell's height in pixels.

    Returns:
        The app's address on this machine, `http://127.0.0.1:PORT/`.
    """
    try:
        from IPython import get_ipython
    except ImportError:
        get_ipython = type(None)
    if get_ipython() is None:
        raise ValueError("show_inline shows an app in a Jupyter notebook; outside one, serve it with "
                         "make_server(app).serve_forever() or `poslens demo`")
    if port is None:
        with socket.socket() as probe:
            probe.bind((HOST, 0))
            port = probe.getsockname()[1]
    harden(app, allow_hosts)
    app.run(jupyter_mode="inline", host=HOST, port=check_port(port), debug=False, jupyter_height=height)
    return f"http://{HOST}:{port}/"


class Cancelled(RuntimeError):
    """Raised inside a job's forward passes once no client has asked for its result for `ABANDON_S`."""


class Pending(Exception):
    """The result asked for is still being computed."""


class _Job:
    def __init__(self, compute: Callable[[], Any]):
        self.compute, self.future, self.asked = compute, Future(), time.monotonic()


class Jobs:
    """Expensive callback work, one job at a time on a background thread, polled by its clients.

    A job is keyed by what it computes (e.g. the prompts and the site of a patching grid): clients
    asking for the same key share it, and the last `KEEP_JOBS` results are kept. A job nobody asked
    about for `abandon_s` is cancelled: before it starts, or during it, by a check that `watch`
    installs at every hook point of the model the jobs run on (it raises `Cancelled` inside the next
    forward pass; the model's hooks are reset after it). The model jobs run on must be used by no
    other thread (the apps give them their own copy), so the cheap callbacks never wait for them.
    """

    def __init__(self, *, abandon_s: float = ABANDON_S, keep: int = KEEP_JOBS, first_wait_s: float = FIRST_WAIT_S):
        self.abandon_s, self.keep, self.first_wait_s = abandon_s, keep, first_wait_s
        self.cancelled = 0  # jobs cancelled so far (abandoned by their clients)
        self._jobs: OrderedDict[Hashable, _Job] = OrderedDict()
        self._lock = threading.Lock()
        self._running: _Job | None = None
        self._models: list = []
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="poslens-job")

    def watch(self, model: Any) -> Any:
        """Install the cancellation check at every hook point of `model` (a TransformerLens model or
        bridge); returns `model`."""
        for hook_point in model.hook_dict.values():
            hook_point.register_forward_pre_hook(self._check)
        self._models.append(model)
        return model

    def replica(self, demo: Any) -> Any:
        """A copy of `demo` (a dataclass with a `model` field) whose model is a deep copy of its own,
        watched (`watch`): what jobs run on. Call it while no other thread runs `demo.model` (a
        forward pass in progress may hold temporary hooks that would be copied too)."""
        return dataclasses.replace(demo, model=self.watch(copy.deepcopy(demo.model)))

    def answer(self, key: Hashable, compute: Callable[[], Any], *, polled: bool) -> Any:
        """`result` for a callback: the first request waits up to `first_wait_s` and raises `Pending`
        (the callback shows a "computing" state and starts polling); a poll that finds the job still
        running raises `PreventUpdate` (nothing changes on the page)."""
        try:
            return self.result(key, compute, wait_s=0.0 if polled else self.first_wait_s)
        except Pending:
            if polled:
                raise PreventUpdate from None
            raise

    def result(self, key: Hashable, compute: Callable[[], Any], *, wait_s: float = 0.0) -> Any:
        """The result of `compute()` for `key`, waiting at most `wait_s`: started (queued) if no job has
        this key or its last one was cancelled; its exception re-raised; `Pending` if not done yet.
        Each call counts as the client asking, which keeps the job from being abandoned."""
        with self._lock:
            job = self._jobs.get(key)
            if job is None or (job.future.done() and isinstance(job.future.exception(), Cancelled)):
                job = self._jobs[key] = _Job(compute)
                self._executor.submit(self._run, job)
                self._forget_old()
            job.asked = time.monotonic()
            self._jobs.move_to_end(key)
        try:
            return job.future.result(timeout=wait_s)
        except FutureTimeout:
            raise Pending(key) from None

    def close(self) -> None:
        """Cancel every job and stop the thread (what runs stops at its next forward pass)."""
        with self._lock:
            for job in self._jobs.values():
                job.asked = -float("inf")
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _forget_old(self) -> None:
        finished = [key for key, job in self._jobs.items() if job.future.done()]
        for key in finished[: max(0, len(self._jobs) - self.keep)]:
            del self._jobs[key]

    def _abandoned(self, job: _Job) -> bool:
        return time.monotonic() - job.asked > self.abandon_s

    def _check(self, *_) -> None:
        """Forward pre-hook: stop the running job if its clients are gone."""
        job = self._running
        if job is not None and threading.current_thread().name.startswith("poslens-job") and self._abandoned(job):
            raise Cancelled("nobody is waiting for this result any more")

    def _run(self, job: _Job) -> None:
        try:
            if self._abandoned(job):
                raise Cancelled("nobody is waiting for this result any more")
            self._running = job
            job.future.set_result(job.compute())
        except Cancelled as error:
            self.cancelled += 1
            for model in self._models:
                model.reset_hooks()  # a forward pass stopped half-way may have left its hooks in place
            job.future.set_exception(error)
        except BaseException as error:  # handed to the callback that asks for the result
            job.future.set_exception(error)
        finally:
            self._running = None


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
