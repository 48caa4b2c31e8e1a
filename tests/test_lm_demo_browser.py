"""The language-model demo in a real browser (Debian's headless Chromium, Selenium): typing a prompt
redraws every panel, a corrupted prompt of another token length is refused inline naming both
lengths, and one of equal length redraws the patching heatmap. On a tiny random GPT-2 bridge."""

from __future__ import annotations

import pytest
from browser import address, chromium, serving
from selenium.webdriver.common.by import By
from test_demo_browser import enter, graph, text_of, wait, wait_graph

from poslens.demos.lm_app import make_app
from poslens.demos.lm_panels import load_lm_demo

pytestmark = pytest.mark.browser

PANELS = {"next-tokens": "bar", "attention": "heatmap", "probe": "heatmap", "heatmap": "heatmap"}


@pytest.fixture(scope="module")
def url(tiny_hf, word_tokenizer):
    demo = load_lm_demo(tiny_hf("gpt2"), tokenizer=word_tokenizer(), n_sequences=32, max_len=16)
    with serving(make_app(demo, prompt="w1 w2 w3 w4 w5 w6", corrupted="w1 w2 w40 w4 w5 w6")) as server:
        yield address(server)


@pytest.fixture(scope="module")
def driver():
    browser = chromium()
    yield browser
    browser.quit()


def test_typing_prompts_redraws_the_panels_and_unequal_lengths_are_refused_inline(driver, url):
    driver.get(url)
    wait(driver, lambda d: "6:'w6'" in text_of(d, "tokens"), "the tokens panel never showed the first prompt")
    first = {panel: wait_graph(driver, panel, lambda g, kind=kind: g["types"] == [kind], f"{panel} never drawn")
             for panel, kind in PANELS.items()}
    assert "w3→w40" in driver.execute_script("return document.querySelector('#heatmap .js-plotly-plot')"
                                             ".data[0].x.join(' ')")
    assert "learned" in text_of(driver, "encodings") and "residual_sites" in text_of(driver, "summary")

    enter(driver, "prompt", "w7 w8 w9")
    wait(driver, lambda d: "3:'w9'" in text_of(d, "tokens"), "the tokens panel did not follow the new prompt")
    wait(driver, lambda d: "the clean prompt has 4 tokens, the corrupted one 7" in text_of(d, "patch-message"),
         "a corrupted prompt of another length was not refused inline")
    wait_graph(driver, "next-tokens", lambda g: "'w7 w8 w9'" in g["title"], "next tokens did not follow the prompt")
    for panel in ("attention", "probe"):
        wait_graph(driver, panel, lambda g, before=first[panel]: g["z"] != before["z"],
                   f"{panel} did not follow the new prompt")
    assert text_of(driver, "message") == ""

    enter(driver, "corrupted", "w7 w50 w9")
    after = wait_graph(driver, "heatmap", lambda g: g["types"] == ["heatmap"] and g["z"] != first["heatmap"]["z"],
                       "the patching heatmap did not follow the prompts")  # past the "computing" figure
    assert after["title"].startswith("resid_pre: ") and text_of(driver, "patch-message") == ""
    driver.find_element(By.CSS_SELECTOR, "#site input[value='resid_post']").click()
    wait_graph(driver, "heatmap", lambda g: g["title"].startswith("resid_post: "), "the site selector did nothing")

    enter(driver, "prompt", "w1 " * 20)
    wait(driver, lambda d: "has 21 tokens with BOS; the demo takes at most 16" in text_of(d, "message"),
         "a prompt too long was not refused inline")
    assert "3:'w9'" in text_of(driver, "tokens")  # the last good panels stay
    assert graph(driver, "probe")["types"] == ["heatmap"]
