"""Debian's Chromium driven by Playwright for Python, for the viewer's tests.

Playwright is given the system's browser (``executable_path``): ``playwright install`` downloads one,
which an offline CI cannot. Screenshots go to ``$TOKENTRAIL_SCREENSHOTS`` when set (to look at after
the run), else to the test's temporary folder.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

CHROMIUM_ARGS = [
    "--no-sandbox",  # CI runs as root
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
LAPTOP = {"width": 1366, "height": 768}


def chromium_path() -> str:
    found = (
        os.environ.get("TOKENTRAIL_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    )
    if found is None:
        pytest.fail(
            "no Chromium: `apt-get install chromium` (or set TOKENTRAIL_CHROMIUM), "
            "or deselect with -m 'not browser'"
        )
    return found


@contextmanager
def chromium() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def screenshot_dir(fallback: Path) -> Path:
    folder = Path(os.environ.get("TOKENTRAIL_SCREENSHOTS") or fallback)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def shoot(page: Page, folder: Path, name: str, *, full_page: bool = False) -> Path:
    path = folder / f"{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    return path
