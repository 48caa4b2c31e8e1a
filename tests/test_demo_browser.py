"""The demo app and its static page in a real browser: Debian's headless Chromium driven by Selenium.

The app runs in a background thread on a free 127.0.0.1 port; every wait is explicit. These
tests fail (never skip) when Chromium or its driver is missing: `.ci/run` installs both.

`python tests/test_demo_browser.py [--models DIR] [--out demos/screenshot.png]` drives the same
steps on real models (default: the built-in demo model) and writes the README screenshot.
"""

from __future__ import annotations

import argparse
from contextlib import contextmanager

import pytest
from browser import WAIT_S, address, chromium, serving
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

from poslens.demos.app import make_app
from poslens.demos.discovery import default_model, discover_models
from poslens.demos.panels import ModelStore
from poslens.demos.static import write_static_page

pytestmark = pytest.mark.browser

GRAPH = "document.querySelector('#{id}.js-plotly-plot, #{id} .js-plotly-plot')"  # Dash wraps it, the static page not


@contextmanager
def running(store: ModelStore):
    """The demo app over `store` served on a free loopback port in a background thread; yields its URL."""
    with serving(make_app(store)) as server:
        yield address(server)


def wait(driver, condition, message: str):
    return WebDriverWait(driver, WAIT_S).until(condition, message=message)


def graph(driver, id: str) -> dict:
    """Title, trace types and first trace's z of a Dash graph as plotly.js holds them."""
    return driver.execute_script(
        f"const g = {GRAPH.format(id=id)}; if (!g || !g.data || !g.layout) return null;"
        "return {title: (g.layout.title && g.layout.title.text) || '', types: g.data.map(t => t.type),"
        " z: g.data.length ? JSON.stringify(g.data[0].z) : null,"
        " names: g.data.map(t => t.name || '')};")


def wait_graph(driver, id: str, predicate, message: str) -> dict:
    return wait(driver, lambda d: (state := graph(d, id)) and predicate(state) and state, message)


def enter(driver, id: str, text: str) -> None:
    """Replace an input's text and press Enter (the app's inputs update on Enter or blur)."""
    field = driver.find_element(By.ID, id)
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(Keys.DELETE)
    field.send_keys(text, Keys.ENTER)


def text_of(driver, id: str) -> str:
    return driver.find_element(By.ID, id).text


def click_cell(driver, id: str, layer: int, position: int) -> None:
    """A real mouse click at the centre of heatmap cell (layer, position), on plotly's drag layer."""
    drag = driver.find_element(By.CSS_SELECTOR, f"#{id} .nsewdrag")
    x, y = driver.execute_script(
        f"const a = {GRAPH.format(id=id)}._fullLayout; return [a.xaxis.l2p({position}), a.yaxis.l2p({layer})];")
    size = drag.size
    ActionChains(driver).move_to_element_with_offset(drag, round(x - size["width"] / 2),
                                                     round(y - size["height"] / 2)).click().perform()


def load_page(driver, url: str) -> dict:
    """Open the app and wait for the first answers and heatmap; the heatmap's state."""
    driver.get(url)
    wait(driver, lambda d: "123+456=" in text_of(d, "answers"), "the answers panel never showed the default prompt")
    return wait_graph(driver, "heatmap", lambda g: g["types"] == ["heatmap"] and "123+456=" in g["title"],
                      "the patching heatmap never appeared")


def explore(driver, url: str, prompt: str, layer: int, position: int) -> tuple[dict, str, dict, str, dict]:
    """Load the app, type `prompt`, click a heatmap cell: (heatmap before, answers before, heatmap
    after, answers after, distribution after the click)."""
    before = load_page(driver, url)
    answers_before = text_of(driver, "answers")
    enter(driver, "prompt", prompt)
    wait(driver, lambda d: prompt in text_of(d, "answers"), f"the answers panel never showed {prompt}")
    after = wait_graph(driver, "heatmap", lambda g: prompt in g["title"], f"the heatmap never showed {prompt}")
    click_cell(driver, "heatmap", layer, position)
    distribution = wait_graph(driver, "distribution", lambda g: f"layer {layer} position {position}" in g["title"],
                              "clicking a heatmap cell did not show the answer distribution")
    return before, answers_before, after, text_of(driver, "answers"), distribution


# fixtures -------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models(trained_runs):
    return {"nope-causal": trained_runs[("nope-causal", 2)], "learned-causal": trained_runs[("learned-causal", 2)]}


@pytest.fixture(scope="module")
def store(models):
    """The server's models (the static page test loads its own: the server may still be computing)."""
    return ModelStore(models, n_sequences=64)


@pytest.fixture(scope="module")
def driver():
    browser = chromium()
    yield browser
    browser.quit()


@pytest.fixture(scope="module")
def url(store):
    with running(store) as address:
        yield address


# tests ----------------------------------------------------------------------------------------------------------------

def test_typing_a_prompt_and_clicking_a_cell_updates_the_panels(driver, url, tmp_path):
    before, answers_before, after, answers_after, distribution = explore(driver, url, "250+749=", 1, 2)
    assert "250+749=" not in answers_before and "123+456=" in answers_before
    assert "clean     250+749=" in answers_after and "corrupted 052+749=" in answers_after  # x2 <-> x0 by default
    assert "correct 9990 (= 999)" in answers_after
    assert after["z"] != before["z"] and after["title"] != before["title"]
    assert distribution["types"] == ["bar"] * 3
    assert [name.split(":")[0] for name in distribution["names"]] == ["clean", "corrupted", "patched"]
    # the site selector switches the heatmap to another hook
    driver.find_element(By.CSS_SELECTOR, "#site input[value='resid_mid']").click()
    wait_graph(driver, "heatmap", lambda g: g["title"].startswith("resid_mid") and "250+749=" in g["title"],
               "the site selector did not switch the heatmap")
    for panel in ("cuts", "attention", "probe"):
        assert graph(driver, panel)["types"], panel
    shot = tmp_path / "demo.png"
    assert driver.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


def test_bad_input_shows_an_inline_message_and_the_next_request_works(driver, url):
    load_page(driver, url)
    answers_before = text_of(driver, "answers")
    for bad, expected in (("12a+456=", "is not in the vocabulary"),
                          ("123+456=123+456=", "longer than the model's n_ctx"),
                          ("1234+56=", "is not two 3-digit operands")):
        enter(driver, "prompt", bad)
        wait(driver, lambda d: expected in text_of(d, "message"), f"no inline message for {bad!r}")  # noqa: B023
        assert text_of(driver, "answers") == answers_before  # the last good panels stay
    enter(driver, "prompt", "120+222=")
    wait(driver, lambda d: "120+222=" in text_of(d, "answers"), "the app stopped answering after bad input")
    assert text_of(driver, "message") == ""
    wait_graph(driver, "heatmap", lambda g: "120+222=" in g["title"], "the heatmap stopped updating after bad input")


def test_static_page_dropdowns_switch_the_figure(driver, models, tmp_path):
    page = write_static_page(models, tmp_path / "demo.html", prompts=["123+456=", "250+749="], quiet=True)
    driver.get(page.as_uri())
    first = wait_graph(driver, "heatmap", lambda g: g["types"] == ["heatmap"], "the static page drew no heatmap")
    assert first["title"].startswith("nope-causal, resid_pre") and "123+456=" in first["title"]
    seen = [first]
    for select, index, expected in (("prompt", 1, "250+749="), ("model", 1, "learned-causal,"),
                                    ("site", 2, "resid_post")):
        Select(driver.find_element(By.ID, select)).select_by_index(index)
        seen.append(wait_graph(driver, "heatmap", lambda g: expected in g["title"],  # noqa: B023
                               f"choosing {select} #{index} did not switch the figure"))
        assert seen[-1]["z"] != seen[-2]["z"], select
    assert "250+749=" in text_of(driver, "answers")


# the README screenshot ------------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description="write the README screenshot of the demo app")
    parser.add_argument("--models", help="checkpoint or reproduce folder (default: the built-in demo model)")
    parser.add_argument("--out", default="demos/screenshot.png")
    args = parser.parse_args()

    store = ModelStore(discover_models(args.models or default_model()))
    browser = chromium(1280, 1700)
    try:
        with running(store) as address:
            explore(browser, address, "274+639=", 2, 3)
            browser.save_screenshot(args.out)
    finally:
        browser.quit()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
