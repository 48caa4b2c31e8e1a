"""Headless Chromium for the browser tests: Debian's chromium and chromium-driver, driven by Selenium;
and `serving`, a Dash app on a free loopback port in a background thread.

Tests fail (never skip) when either is missing: `.ci/run` installs both. Selenium Manager never
downloads a browser: the system driver is passed explicitly.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("selenium", reason="browser tests need selenium: pip install -e '.[test]'")
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
WAIT_S = 60


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


def address(server) -> str:
    """The address of a server `serving` runs."""
    return f"http://127.0.0.1:{server.server_port}/"


@contextmanager
def serving(app) -> Iterator:
    """A Dash app served by `demos.server.make_server` on a free loopback port in a background
    thread; yields the server once it answers (at `address(server)`)."""
    from poslens.demos.server import make_server

    server = make_server(app, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + WAIT_S
        while True:
            try:
                with urllib.request.urlopen(address(server), timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield server
    finally:
        server.shutdown()
        thread.join(timeout=10)
        server.server_close()
