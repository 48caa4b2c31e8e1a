"""The demo server under hostile requests on loopback: wrong types, oversized prompts and state, forged
clicks, malformed requests and foreign Host headers get an inline message or a 4xx, never a 500, a
long echo or a stall. Bounded: about 60 requests, all to 127.0.0.1, a few seconds in all."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

pytest.importorskip("dash", reason="the demo server needs the demo extra: pip install -e '.[demo]'")
from poslens.demos.app import MAX_PROMPT_CHARS, make_app
from poslens.demos.panels import ModelStore
from poslens.demos.server import MAX_BODY_BYTES, check_hosts, make_server

UPDATE = "..message.children...answers.children...state.data...cuts.figure...probe.figure.."
OPTIONS = "..swap-i.options...swap-j.options...attn-layer.options...attn-head.options.."
HEATMAP = "..heatmap.figure...heatmap-poll.disabled.."
POLL = {"heatmap-poll.n_intervals": None}
GOOD = {"model.value": "nope", "prompt.value": "123+456=", "corruption.value": "swap", "swap-i.value": 0,
        "swap-j.value": 2, "second-prompt.value": ""}
FAST_S = 1.0


@pytest.fixture(scope="module")
def server(trained_runs):
    store = ModelStore({"nope": trained_runs[("nope-causal", 2)]}, n_sequences=48)
    store["nope"].prepare()  # the probe and cut table, so that no request below pays for them
    server = make_server(make_app(store), port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    thread.join(timeout=10)
    server.server_close()


def post(server, body: bytes, host: str | None = None) -> tuple[int, bytes, float]:
    """POST a callback request to the demo; (status, body, seconds)."""
    headers = {"Content-Type": "application/json", "Host": host or f"127.0.0.1:{server.server_port}"}
    request = urllib.request.Request(f"http://127.0.0.1:{server.server_port}/_dash-update-component", data=body,
                                     headers=headers)
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read(), time.perf_counter() - started
    except urllib.error.HTTPError as error:
        return error.code, error.read(), time.perf_counter() - started


def callback(output: str, inputs: dict, changed: str) -> bytes:
    """The JSON body Dash's front end sends to run the callback of `output` with `inputs`."""
    outputs = [dict(zip(("id", "property"), name.split("."))) for name in output.strip(".").split("...")]
    return json.dumps({"output": output, "outputs": outputs if len(outputs) > 1 else outputs[0],
                       "inputs": [{"id": key.split(".")[0], "property": key.split(".")[1], "value": value}
                                  for key, value in inputs.items()],
                       "changedPropIds": [changed], "state": []}).encode()


def settled(server, output: str, inputs: dict, changed: str, host: str | None = None) -> tuple[int, bytes, float]:
    """POST a patching-grid request, then poll it as the page's `heatmap-poll` interval does (204 while
    it computes) until the answer is there; (status, body, seconds of the first answer)."""
    status, body, seconds = post(server, callback(output, inputs, changed), host)
    deadline = time.monotonic() + 60
    while status == 204 or (status == 200 and json.loads(body)["response"].get("heatmap-poll") == {"disabled": False}):
        assert time.monotonic() < deadline, "the patching grid never finished"
        time.sleep(0.05)
        status, body = post(server, callback(output, inputs, "heatmap-poll.n_intervals"), host)[:2]
    return status, body, seconds


def inline_message(body: bytes) -> str:
    """The text a callback answered with: the message div, or the annotation of a message figure."""
    response = json.loads(body)["response"]
    if "message" in response:
        return response["message"]["children"]
    figure = next(iter(response.values()))["figure"]
    return figure["layout"]["annotations"][0]["text"]


@pytest.fixture(scope="module")
def state(server):
    status, body, _ = post(server, callback(UPDATE, GOOD, "prompt.value"))
    assert status == 200
    state = json.loads(body)["response"]["state"]["data"]
    assert state == {"model": "nope", "clean": "123+456=", "corrupted": "321+456="}
    return state


def test_good_requests_work(server, state):
    for output, inputs in ((HEATMAP, {"state.data": state, "site.value": "resid_mid", **POLL}),
                           ("attention.figure", {"state.data": state, "attn-layer.value": 1, "attn-head.value": 2}),
                           ("distribution.figure", {"heatmap.clickData": {"points": [{"x": "4:y2", "y": 1}]},
                                                    "state.data": state, "site.value": "resid_pre"})):
        status, body, _ = settled(server, output, inputs, next(iter(inputs)))
        figure = json.loads(body)["response"][output.strip(".").split(".")[0]]["figure"]
        assert status == 200 and figure["data"], output  # a message figure has no data
    assert "layer 1 position 4 patched" in json.dumps(figure["layout"]["title"])


HUGE = "1" * 2**20


def hostile_requests(state: dict) -> list[tuple[str, str, dict, str]]:
    """(what, output, inputs, expected inline message) for every wrongly typed or oversized value."""
    forged = {"model": "nope", "clean": [[1] * 12] * 20_000, "corrupted": "321+456="}
    return [
        ("prompt as int", UPDATE, {**GOOD, "prompt.value": 5}, "prompt must be text, got int 5"),
        ("prompt as list", UPDATE, {**GOOD, "prompt.value": ["1"]}, "prompt must be text, got list ['1']"),
        ("prompt as dict", UPDATE, {**GOOD, "prompt.value": {"a": 1}}, "prompt must be text, got dict {'a': 1}"),
        ("1 MB prompt", UPDATE, {**GOOD, "prompt.value": HUGE}, f"(1048576 characters) is too long: at most "
                                                                f"{MAX_PROMPT_CHARS} characters"),
        ("1 MB second prompt", UPDATE, {**GOOD, "corruption.value": "prompt", "second-prompt.value": HUGE},
         "second prompt '1111"),
        ("model as list", UPDATE, {**GOOD, "model.value": ["nope"]}, "unknown model ['nope']; allowed: ['nope']"),
        ("unknown model", UPDATE, {**GOOD, "model.value": "gpt"}, "unknown model 'gpt'; allowed: ['nope']"),
        ("corruption as list", UPDATE, {**GOOD, "corruption.value": ["swap"]}, "unknown corruption ['swap']"),
        ("swap position null", UPDATE, {**GOOD, "swap-i.value": None}, "swap position must be an integer, got None"),
        ("bad character", UPDATE, {**GOOD, "prompt.value": "<script>1</script>"}, "is not in the vocabulary"),
        ("forged 20,000-row state", HEATMAP, {"state.data": forged, "site.value": "resid_pre", **POLL},
         "clean must be text, got list [[1, 1, 1"),
        ("state of an unknown model", HEATMAP, {"state.data": {**state, "model": "gpt"}, "site.value": "resid_pre",
                                                 **POLL}, "unknown model 'gpt'"),
        ("state of another shape", "attention.figure", {"state.data": [1, 2], "attn-layer.value": 0,
                                                         "attn-head.value": 0}, "state must be {'model'"),
        ("state with an unparsable prompt", "attention.figure", {"state.data": {**state, "clean": "1+1="},
                                                                  "attn-layer.value": 0, "attn-head.value": 0},
         "prompt '1+1=' is not two 3-digit operands"),
        ("site as list", HEATMAP, {"state.data": state, "site.value": ["resid_pre"], **POLL},
         "unknown patching site ['resid_pre']"),
        ("clickData a string", "distribution.figure", {"heatmap.clickData": "x", "state.data": state,
                                                       "site.value": "resid_pre"}, "a heatmap click must hold"),
        ("clickData with no points", "distribution.figure", {"heatmap.clickData": {"points": []},
                                                             "state.data": state, "site.value": "resid_pre"},
         "a heatmap click must hold"),
        ("clickData layer null", "distribution.figure", {"heatmap.clickData": {"points": [{"x": "4:y2", "y": None}]},
                                                         "state.data": state, "site.value": "resid_pre"},
         "a heatmap click must name a layer and a position"),
        ("clickData out of range", "distribution.figure", {"heatmap.clickData": {"points": [{"x": "40:a", "y": 0}]},
                                                           "state.data": state, "site.value": "resid_pre"},
         "outside layers 0..1 and prompt positions 0..7"),
        ("layer null", "attention.figure", {"state.data": state, "attn-layer.value": None, "attn-head.value": 0},
         "layer must be an integer, got None"),
        ("head as text", "attention.figure", {"state.data": state, "attn-layer.value": 0, "attn-head.value": "0"},
         "head must be an integer, got '0'"),
    ]


def test_hostile_values_get_a_short_inline_message_fast(server, state):
    for what, output, inputs, expected in hostile_requests(state):
        status, body, seconds = post(server, callback(output, inputs, next(iter(inputs))))
        assert status == 200, (what, status, body[:300])
        message = inline_message(body)
        assert expected in message and len(message) <= 400, (what, message[:300])
        assert seconds < FAST_S, (what, seconds)
        if output == UPDATE:  # a bad value leaves the last good panels in place
            assert set(json.loads(body)["response"]) == {"message"}, what
    assert "&lt;" not in inline_message(post(server, callback(UPDATE, {**GOOD, "prompt.value": "<b>x"},
                                                              "prompt.value"))[1])  # text, not HTML


def test_malformed_requests_oversized_bodies_and_foreign_hosts_are_refused(server, state):
    port = server.server_port
    good = callback("attention.figure", {"state.data": state, "attn-layer.value": 0, "attn-head.value": 0},
                    "state.data")
    # Names are checked, not ports: `ssh -L 9000:localhost:PORT` arrives as localhost:9000.
    for host in (f"localhost:{port}", "localhost", f"127.0.0.1:{port + 1}"):
        assert post(server, good, host=host)[0] == 200, host
    for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1.evil.example:{port}", "localhost.evil.example",
                 "demo.example.org"):
        status, body, _ = post(server, good, host=host)
        assert status == 403 and b"refused: this server answers only requests addressed to" in body, host
        assert b"--allow-host NAME" in body and len(body) < 300
    assert post(server, callback(OPTIONS, {"model.value": ["nope"]}, "model.value"))[0] == 204
    for body in (b"not json", b'{"output": "nowhere.figure"}', json.dumps({"output": UPDATE}).encode()):
        status, answer, _ = post(server, body)
        assert status == 400 and len(answer) < 200, (body, status)
    status, _, _ = post(server, callback(UPDATE, {**GOOD, "prompt.value": "1" * MAX_BODY_BYTES}, "prompt.value"))
    assert status == 413


def test_no_request_stalls_another(server, state):
    """Oversized and forged requests sent back to back from another thread for a bounded time
    never hold up a good request for as long as a second."""
    hostile = [callback(output, inputs, next(iter(inputs))) for what, output, inputs, _ in hostile_requests(state)
               if "1 MB" in what or "20,000" in what]
    stop, slowest = threading.Event(), []

    def flood():
        for _ in range(30):
            for body in hostile:
                if stop.is_set():
                    return
                slowest.append(post(server, body)[2])

    thread = threading.Thread(target=flood)
    thread.start()
    good = callback("attention.figure", {"state.data": state, "attn-layer.value": 1, "attn-head.value": 0},
                    "state.data")
    seconds = [post(server, good)[2] for _ in range(20)]
    stop.set()
    thread.join(timeout=30)
    assert len(slowest) >= 3 and max(seconds) < FAST_S and max(slowest) < FAST_S, (max(seconds), max(slowest))


def test_the_state_the_app_keeps_parses_back_to_the_same_sequences(server, trained_runs, tiny):
    """The client `state` holds prompts as typed; parsing them again gives exactly the sequences
    the update callback computed, for every corruption and with a BOS token."""
    from poslens.demos.panels import DemoModel, corrupt_prompt, parse_prompt, prompt_text
    from poslens.tasks import Addition
    from poslens.variants import build

    store = ModelStore({"nope": trained_runs[("nope-causal", 2)]})
    task = Addition(bos=True)
    for demo in (store["nope"], DemoModel("bos", build(tiny("nope-causal", alphabet=task.alphabet,
                                                             n_ctx=task.seq_len)), task)):
        clean = parse_prompt(demo, "123+456=")
        for kind in ("swap", "operands", "prompt"):
            positions = tuple(demo.task.operand_positions[i] for i in (3, 5))
            corrupted = corrupt_prompt(demo, clean, kind, positions=positions, second_prompt="124+456=")
            assert torch.equal(parse_prompt(demo, prompt_text(demo, corrupted)), corrupted), (demo.name, kind)


def test_allowed_proxy_hosts_are_answered_and_others_refused(trained_runs, state):
    """`--allow-host demo.example.org` (a reverse proxy) and `.lab.example` (its subdomains): requests
    addressed to them are answered, page and callbacks alike; any other name is still refused."""
    store = ModelStore({"nope": trained_runs[("nope-causal", 2)]}, n_sequences=48)
    server = make_server(make_app(store), port=0, allow_hosts=["demo.example.org", ".Lab.example"])
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        good = callback("attention.figure", {"state.data": state, "attn-layer.value": 0, "attn-head.value": 0},
                        "state.data")
        for host in ("demo.example.org", "demo.example.org:443", "a.lab.example:8080", "lab.example", "localhost"):
            assert post(server, good, host=host)[0] == 200, host
            page = urllib.request.Request(f"http://127.0.0.1:{server.server_port}/", headers={"Host": host})
            with urllib.request.urlopen(page, timeout=30) as response:
                assert response.status == 200 and b"_dash-config" in response.read(), host
        for host in ("evil.example", "demo.example.org.evil.example", "x.demo.example.org", "lab.example.evil"):
            status, body, _ = post(server, good, host=host)
            assert status == 403 and b"'demo.example.org', '.lab.example'" in body, host
    finally:
        server.shutdown()
        thread.join(timeout=10)
        server.server_close()


@pytest.mark.parametrize("name", ["http://demo.example.org", "demo.example.org:8080", "*", "", "a b", "-x.org", 5])
def test_a_bad_allowed_host_is_refused_by_name(name):
    with pytest.raises(ValueError, match=r"--allow-host .* is not a host name: give a name such as"):
        check_hosts([name])


def test_demo_command_checks_allowed_hosts_before_loading(run_cli, tmp_path):
    code, _, err = run_cli("demo", "--models", str(tmp_path / "missing"), "--allow-host", "https://x.org")
    assert code == 2 and "--allow-host 'https://x.org' is not a host name" in err and "Traceback" not in err


def test_show_inline_needs_a_notebook(trained_runs):
    """Outside a Jupyter kernel Dash's inline mode would block serving; `show_inline` says so instead
    (inside one it is run by the patching notebook, tests/test_notebooks.py)."""
    from poslens.demos.server import show_inline

    with pytest.raises(ValueError, match="show_inline shows an app in a Jupyter notebook; outside one"):
        show_inline(make_app({"nope": trained_runs[("nope-causal", 2)]}))
