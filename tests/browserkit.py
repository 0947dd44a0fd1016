"""Debian's Chromium driven by Playwright, for every browser test: never a downloaded browser.

A test module takes what it needs: ``from browserkit import BROWSER_MARKS, browser, sync_api`` (importing this
skips the module, with the reason, where Playwright is missing); ``pytestmark = BROWSER_MARKS``."""
import contextlib
import os

import pytest

CHROMIUM = "/usr/bin/chromium"
# As root, in a sandbox with no internet: no sandbox, no GPU, and none of Chromium's own calls home.
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync"]
BROWSER_MARKS = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is not installed (apt-get install chromium)"),
]

sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed (pip install playwright)")


@contextlib.contextmanager
def chromium(*extra_args: str):
    """Chromium launched with LAUNCH_ARGS and ``extra_args``, closed at the end."""
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=[*LAUNCH_ARGS, *extra_args])
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture(scope="module")
def browser():
    with chromium() as launched:
        yield launched
