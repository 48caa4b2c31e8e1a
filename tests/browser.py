"""Headless Chromium for the browser tests: Debian's chromium and chromium-driver, driven by Selenium.

Tests fail (never skip) when either is missing: `.ci/run` installs both. Selenium Manager never
downloads a browser: the system driver is passed explicitly.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


def chromium(width: int = 1400, height: int = 1000) -> webdriver.Chrome:
    """A headless Chromium window of `width` × `height` pixels."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if missing:
        pytest.fail(f"browser tests need Debian's chromium and chromium-driver ({missing} missing): "
                    "apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     f"--window-size={width},{height}"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
