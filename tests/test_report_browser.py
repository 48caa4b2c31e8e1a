"""`report.html` in a real browser: every section is there and every figure renders, offline.

`python tests/test_report_browser.py --report runs/reproduce/report.html --out docs/report.png`
writes the README's screenshot of a report's top.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from browser import chromium
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from poslens.analyses.experiments.reproduce import reproduce
from poslens.analyses.plan import REPRODUCE_PLAN

pytestmark = pytest.mark.browser

SECTIONS = ["Claims and verdicts", f"Analysis plan, version {REPRODUCE_PLAN.version}", "Symmetry", "Learning the task",
            "Residual connections", "Vertical slices: block structure", "Position probes", "Geometry of positions",
            "Activation patching", "Patching in both directions, every answer digit", "Position swap", "Positions told",
            "Evidence of use: removing and swapping the position subspace"]
RENDERED = ("return [...document.querySelectorAll('div.figure')].map(div => "
            "div.querySelector('.js-plotly-plot .main-svg') !== null)")


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "study"
    reproduce(out, preset_name="tiny", executor="serial", quiet=True)
    return out / "report.html"


def test_every_section_and_figure_renders_offline(report):
    driver = chromium(1280, 1600)
    try:
        driver.get(report.as_uri())
        headings = [element.text for element in driver.find_elements(By.TAG_NAME, "h2")]
        assert headings == SECTIONS
        n_figures = report.read_text().count('<div class="figure">')
        assert n_figures >= 14
        WebDriverWait(driver, 60).until(lambda d: all(d.execute_script(RENDERED)), message="a figure did not render")
        assert len(driver.execute_script(RENDERED)) == n_figures
        verdicts = driver.find_elements(By.CSS_SELECTOR, "td.supported, td.contradicted, td.inconclusive")
        decided = [claim for claim in REPRODUCE_PLAN.claims if claim.test == "exact" or claim.primary]
        assert len(verdicts) == len(decided)  # one coloured verdict per claim with a verdict (secondary rows have none)
        details = driver.find_elements(By.TAG_NAME, "details")
        assert details and not any(element.get_attribute("open") for element in details)  # long tables folded
        # plotly.js comes from the folder's one offline copy, by a relative path: no network, from file://
        assert [src for src in driver.execute_script("return [...document.scripts].map(s => s.src)") if src] == \
            [(report.parent / "figures" / "plotly.min.js").as_uri()]
        for page in ("probe_accuracy.html", "patching_nope.html"):  # figure pages share the same copy
            driver.get((report.parent / "figures" / page).as_uri())
            WebDriverWait(driver, 60).until(lambda d: d.execute_script(
                "return document.querySelector('.js-plotly-plot .main-svg') !== null"),
                message=f"{page} did not render")
    finally:
        driver.quit()


def screenshot(report: Path, out: Path) -> None:
    """The top of `report` (the verdict table) as a PNG."""
    driver = chromium(1280, 1500)
    try:
        driver.get(report.resolve().as_uri())
        driver.save_screenshot(str(out))
    finally:
        driver.quit()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Screenshot the top of a reproduce report.")
    parser.add_argument("--report", type=Path, default=Path("runs/reproduce/report.html"))
    parser.add_argument("--out", type=Path, default=Path("docs/report.png"))
    arguments = parser.parse_args()
    screenshot(arguments.report, arguments.out)
    print(f"wrote {arguments.out}")
