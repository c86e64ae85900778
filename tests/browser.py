"""Headless Chromium for the tests: open a local HTML file, read its console errors, run scripts in
it and take a full-page screenshot.

It drives Debian's `chromium` through Debian's `chromium-driver` with selenium. Both paths are
given to selenium explicitly, so Selenium Manager (which would otherwise look up and download a
driver) never runs and nothing touches the network. Override the paths with TUTELAGE_CHROMIUM and
TUTELAGE_CHROMEDRIVER.
"""

from __future__ import annotations

import base64
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

DEFAULT_CHROMIUM = "/usr/bin/chromium"
DEFAULT_CHROMEDRIVER = "/usr/bin/chromedriver"
# CI sets this so that a missing browser fails the browser tests instead of skipping them.
REQUIRE_ENV = "TUTELAGE_REQUIRE_BROWSER"

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",  # CI runs as root, where Chromium's sandbox refuses to start
    "--disable-gpu",
    "--disable-background-networking",
    "--no-first-run",
    # No update checks, sync or QUIC probes: a test browser talks to nothing but the page.
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
]


def chromium_path() -> str:
    return os.environ.get("TUTELAGE_CHROMIUM", DEFAULT_CHROMIUM)


def chromedriver_path() -> str:
    return os.environ.get("TUTELAGE_CHROMEDRIVER", DEFAULT_CHROMEDRIVER)


def chromium_available() -> str | None:
    """None when the browser tests can run, else why not (selenium, browser or driver missing)."""
    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed (pip install -e '.[dev]')"
    for what, path in (("chromium", chromium_path()), ("chromedriver", chromedriver_path())):
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            return f"{what} not found at {path} (apt-get install chromium chromium-driver)"
    return None


def require_chromium() -> None:
    """Skip the calling test when Chromium is unusable; fail it instead where CI requires it."""
    reason = chromium_available()
    if reason is None:
        return
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{REQUIRE_ENV}=1 but {reason}")
    pytest.skip(reason)


class Page:
    """One page open in headless Chromium."""

    def __init__(self, driver: Any):
        self.driver = driver
        self._log: list[dict] = []  # every browser log entry read so far (get_log drains)

    def js(self, script: str, *args: Any) -> Any:
        """Run `script` in the page (`arguments[i]` are `args`); its `return` value comes back."""
        return self.driver.execute_script(script, *args)

    def errors(self) -> list[dict]:
        """The console entries of level SEVERE so far: uncaught JavaScript errors, failed loads,
        console.error. Each is selenium's dict ({'level', 'message', 'source', 'timestamp'})."""
        self._log += self.driver.get_log("browser")
        return [entry for entry in self._log if entry["level"] == "SEVERE"]

    def screenshot(self, path: Path) -> Path:
        """A PNG of the whole page, beyond the viewport, written to `path`."""
        # Selenium's own screenshot stops at the viewport; CDP's captureBeyondViewport renders the
        # whole document (its width is the viewport's less a vertical scrollbar, if any).
        shot = self.driver.execute_cdp_cmd(
            "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}
        )
        path = Path(path)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path


@contextmanager
def open_page(path: Path, *, width: int = 1280, height: int = 900) -> Iterator[Page]:
    """Open the local file `path` in a fresh headless Chromium whose viewport is `width` x
    `height` CSS pixels. The browser and its temporary profile are always removed afterwards."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    # Belt and braces: were Selenium Manager ever invoked, it would stay offline.
    os.environ.setdefault("SE_OFFLINE", "true")
    profile = tempfile.mkdtemp(prefix="tutelage-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium_path()
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = None
    try:
        driver = webdriver.Chrome(
            options=options, service=Service(executable_path=chromedriver_path())
        )
        set_viewport(driver, width, height)
        driver.get(Path(path).resolve().as_uri())
        yield Page(driver)
    finally:
        if driver is not None:
            driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def set_viewport(driver: Any, width: int, height: int) -> None:
    """Give the page a `width` x `height` viewport. Emulated rather than a window size: headless
    Chromium counts window height for browser chrome it does not draw, and keeps windows at least
    500 pixels wide."""
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
    )
