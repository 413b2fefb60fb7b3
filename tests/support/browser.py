"""The one way a test drives a real browser: headless Chromium through chromedriver, both from
the system's packages.

:func:`browser_paths` finds the two executables on PATH, skipping the test with one line naming
the packages to install when one is missing, except under CI (``CI`` set), where the tests must
run and fail instead. :func:`chrome` is a context manager giving a headless
``selenium.webdriver.Chrome`` with its own temporary profile, started from those paths: selenium
is given both, so its selenium-manager never runs and nothing is downloaded. :func:`screenshot`
saves one page as a PNG (how docs/dashboard.png is made).

Waiting for pages is selenium's explicit waits (``WebDriverWait``, bounded by :data:`WAIT`),
never sleeping.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

__all__ = ["INSTALL_HINT", "WAIT", "browser_paths", "chrome", "find_browser", "screenshot"]

#: Bound on one explicit wait for a page (or an element of it).
WAIT = 10.0

BROWSERS = ("chromium", "chromium-browser", "google-chrome")

INSTALL_HINT = (
    "install them with `sudo apt-get install chromium chromium-driver` (Debian/Ubuntu) or "
    "`brew install --cask chromium chromedriver` (macOS)"
)


def find_browser() -> tuple[str, str] | None:
    """(the Chromium executable, the chromedriver executable) on PATH, or None."""
    browser = next((p for p in map(shutil.which, BROWSERS) if p is not None), None)
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        return None
    return browser, driver


def browser_paths() -> tuple[str, str]:
    """Chromium and chromedriver: skips the test without them, fails it under CI."""
    found = find_browser()
    if found is not None:
        return found
    message = f"chromium or chromedriver not installed: {INSTALL_HINT}"
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI is set: the browser tests must run here)")
    pytest.skip(message)


@contextmanager
def chrome(
    width: int = 1200, height: int = 800, paths: tuple[str, str] | None = None
) -> Iterator[Any]:
    """A headless Chrome driver with a *width* x *height* window and a profile of its own in a
    temporary directory; quit (and the profile removed) on exit."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver_path = paths or browser_paths()
    with tempfile.TemporaryDirectory(prefix="eventbus-chromium-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = browser
        # Root (the tests in a container) needs --no-sandbox; /dev/shm may be tiny there.
        for argument in (
            "--headless=new",
            "--no-sandbox",
            "--disable-dev-shm-usage",
            "--disable-gpu",
            "--no-first-run",
            "--no-default-browser-check",
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
        ):
            options.add_argument(argument)
        service = Service(executable_path=driver_path, log_output=os.devnull)
        driver = webdriver.Chrome(options=options, service=service)
        try:
            driver.set_page_load_timeout(WAIT)
            yield driver
        finally:
            driver.quit()


def screenshot(url: str, path: Path, width: int = 1200, height: int = 800) -> None:
    """Save the page at *url* as a PNG at *path*, *width* x *height* pixels."""
    with chrome(width, height) as driver:
        # The window's frame takes part of its size: grow it by that much, for a full-size page.
        inner = driver.execute_script("return [window.innerWidth, window.innerHeight]")
        driver.set_window_size(2 * width - inner[0], 2 * height - inner[1])
        driver.get(url)
        driver.save_screenshot(str(path))
