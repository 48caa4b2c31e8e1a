"""A demo that never freezes (`demos.server.Jobs`): a patching grid runs in the background on the app's
copy of the model, so a cheap callback answers while it computes, and work nobody waits for any more is
cancelled, before it starts or in its next forward pass. The models are tiny; a forward pre-hook that
sleeps in proportion to the batch makes their forward passes cost what a larger model's would, so the
timings below are about scheduling, not about machine speed."""

from __future__ import annotations

import json
import time

import pytest
import torch
from browser import serving
from test_demo_server import POLL, callback, post, settled

from poslens.demos.lm_app import make_app
from poslens.demos.lm_panels import load_lm_demo
from poslens.demos.server import Cancelled, Jobs, Pending
from poslens.variants import build

ROW_S = 0.1  # seconds a slowed forward pass takes per sequence in its batch
PROMPT, CORRUPTED = "w1 w2 w3 w4 w5 w6 w7 w8", "w1 w2 w40 w4 w5 w6 w7 w8"
HEATMAP = "..patch-message.children...heatmap.figure...heatmap-poll.disabled.."
STATE = {"prompt": PROMPT, "corrupted": CORRUPTED}


def slow_down(model, rows: list[int]) -> None:
    """Make every forward pass of `model` (and of its deep copies) sleep `ROW_S` per sequence of its batch,
    counting the sequences in `rows`. The final LayerNorm is where every pass ends, also the batched
    patching engine's, which starts each cell's pass at its own layer."""

    def cost(_module, inputs):
        rows.append(inputs[0].shape[0])
        time.sleep(ROW_S * inputs[0].shape[0])

    model.hook_dict["ln_final.hook_normalized"].register_forward_pre_hook(cost)


def test_a_cheap_callback_answers_while_a_patching_grid_runs_and_an_abandoned_grid_is_cancelled(
        tiny_hf, word_tokenizer):
    demo = load_lm_demo(tiny_hf("gpt2"), tokenizer=word_tokenizer(), n_sequences=16, max_len=16).prepare()
    rows: list[int] = []
    slow_down(demo.model, rows)
    jobs = Jobs(first_wait_s=0.0, abandon_s=1.0)
    with serving(make_app(demo, prompt=PROMPT, corrupted=CORRUPTED, jobs=jobs)) as server:
        grid = {"state.data": STATE, "site.value": "resid_pre", **POLL}
        started = time.perf_counter()
        status, body, _ = post(server, callback(HEATMAP, grid, "state.data"))
        response = json.loads(body)["response"]
        assert status == 200 and response["heatmap-poll"] == {"disabled": False}  # the page starts polling
        assert "computing the patching grid" in response["heatmap"]["figure"]["layout"]["annotations"][0]["text"]

        attention = callback("attention.figure", {"state.data": STATE, "attn-layer.value": 1, "attn-head.value": 0},
                             "state.data")
        status, body, cheap_s = post(server, attention)
        assert status == 200 and json.loads(body)["response"]["attention"]["figure"]["data"]
        assert post(server, callback(HEATMAP, grid, "heatmap-poll.n_intervals"))[0] == 204  # still computing

        status, body, _ = settled(server, HEATMAP, grid, "heatmap-poll.n_intervals")
        grid_s, grid_rows = time.perf_counter() - started, sum(rows) - 1
        figure = json.loads(body)["response"]["heatmap"]["figure"]
        assert figure["data"][0]["type"] == "heatmap" and "resid_pre: " in figure["layout"]["title"]["text"]
        assert json.loads(body)["response"]["heatmap-poll"] == {"disabled": True}  # and stops polling
        assert grid_s > 10 * ROW_S and cheap_s < grid_s / 4, (cheap_s, grid_s)  # before: cheap_s > grid_s

        # A grid whose page is gone (nobody polls) stops within abandon_s and a forward pass.
        rows.clear()
        post(server, callback(HEATMAP, {**grid, "site.value": "resid_post"}, "site.value"))
        deadline = time.monotonic() + 30
        while jobs.cancelled == 0:
            assert time.monotonic() < deadline, "the abandoned grid was never cancelled"
            time.sleep(0.05)
        abandoned_rows = sum(rows)
        # Asked again, it is computed afresh, and the model's hooks were left clean by the cancelled one.
        rows.clear()
        status, body, _ = settled(server, HEATMAP, {**grid, "site.value": "resid_post"}, "site.value")
        assert "resid_post: " in json.loads(body)["response"]["heatmap"]["figure"]["layout"]["title"]["text"]
        # the cancelled grid stopped early: fewer rows than the same grid run to the end (cells whose patch is
        # a no-op are skipped, so grids of different sites run different numbers of rows)
        assert abandoned_rows < sum(rows), (abandoned_rows, sum(rows), grid_rows)
    jobs.close()


def test_jobs_cancel_what_nobody_asks_for_and_share_what_they_do(tiny):
    model = build(tiny("nope-causal")).eval()
    rows: list[int] = []
    slow_down(model, rows)
    jobs = Jobs(abandon_s=0.3)
    jobs.watch(model)
    tokens = torch.zeros(1, 8, dtype=torch.long)
    calls: list[str] = []

    def work(name: str, passes: int):
        def run():
            calls.append(name)
            with torch.no_grad():
                return [model(tokens) for _ in range(passes)][-1].shape
        return run

    assert jobs.result("quick", work("quick", 2), wait_s=10) == (1, 8, model.cfg.d_vocab)
    assert jobs.result("quick", work("quick again", 2)) == (1, 8, model.cfg.d_vocab)  # shared, not recomputed
    with pytest.raises(Pending):
        jobs.result("long", work("long", 100))  # asked once, then never again
    with pytest.raises(Pending):
        jobs.result("queued", work("queued", 2))  # waits behind "long", and nobody asks again either
    started = time.monotonic()
    while jobs.cancelled < 2:
        assert time.monotonic() - started < 20, "abandoned jobs were never cancelled"
        time.sleep(0.02)
    assert calls == ["quick", "long"]  # the queued job never started
    assert len(rows) < 4 + 50  # the long one stopped after ~0.3 s of its 10 s
    with pytest.raises(Cancelled):
        jobs._jobs["long"].future.result()
    assert not any(hook_point.fwd_hooks for hook_point in model.hook_dict.values())
    jobs.close()
