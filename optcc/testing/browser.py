"""Open optcc's HTML report pages in a real browser: headless Chromium driven by Playwright.

The page is a file on disk with no server behind it, so the browser opens ``file://`` and
nothing else: every flag below that turns off a background service is there so that a test
run makes no network request and does not depend on a browser profile.

Playwright normally downloads its own browser build; optcc uses the system's Chromium
(Debian's ``chromium`` package, ``apt-get install chromium``) instead, found on ``PATH`` or
named by ``OPTCC_CHROMIUM``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

#: quiet, profile-free, network-free headless Chromium; --no-sandbox because CI runs as root
CHROMIUM_ARGS = ("--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-default-apps", "--disable-extensions", "--disable-quic")


_AFTER_TWO_FRAMES = ("() => new Promise(done => requestAnimationFrame(() => requestAnimationFrame("
                     "() => done(performance.now()))))")


class BrowserUnavailable(RuntimeError):
    """Playwright or Chromium is missing; the message says how to install it."""


class PageNotReady(RuntimeError):
    """The page's script never marked it ready; the message lists the errors it raised."""


def find_chromium() -> str | None:
    """The Chromium executable to drive: ``$OPTCC_CHROMIUM``, else the first on ``PATH``."""
    named = os.environ.get("OPTCC_CHROMIUM")
    if named:
        return named if Path(named).exists() else None
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@dataclass
class OpenedPage:
    """A page loaded to the point where its script marked ``body[data-ready=yes]``."""

    page: "object"              # playwright.sync_api.Page
    errors: list[str] = field(default_factory=list)   # console errors and uncaught exceptions
    #: navigation start to the second animation frame after ready: parsed, scripted, first
    #: drawing laid out and painted (the browser's own clock, ``performance.now()``)
    load_seconds: float = 0.0


@contextlib.contextmanager
def open_page(path: str | os.PathLike, width: int = 1400, height: int = 900,
              timeout_s: float = 60.0) -> Iterator[OpenedPage]:
    """Load ``path`` in headless Chromium and wait for its script to finish.

    Raises :class:`BrowserUnavailable` (saying how to install what is missing) when Playwright
    or Chromium is not there.
    """
    try:
        from playwright.sync_api import TimeoutError as PlaywrightTimeout
        from playwright.sync_api import sync_playwright
    except ImportError as e:
        raise BrowserUnavailable("Playwright is not installed: `pip install -e '.[dev]'` (or `make install`)") from e
    executable = find_chromium()
    if executable is None:
        raise BrowserUnavailable("no Chromium found: `apt-get install chromium` (Debian), or set OPTCC_CHROMIUM "
                                 "to a Chromium executable")
    url = Path(path).resolve().as_uri()
    with tempfile.TemporaryDirectory(prefix="optcc-chromium-") as profile, sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=executable, headless=True, args=list(CHROMIUM_ARGS),
            viewport={"width": width, "height": height}, offline=True)
        try:
            page = context.pages[0] if context.pages else context.new_page()
            page.set_default_timeout(timeout_s * 1000)
            opened = OpenedPage(page)
            page.on("console", lambda m: opened.errors.append(f"console.{m.type}: {m.text}")
                    if m.type in ("error", "assert") else None)
            page.on("pageerror", lambda e: opened.errors.append(f"uncaught: {e}"))
            page.goto(url)
            try:
                page.wait_for_selector("body[data-ready=yes]", state="attached")
            except PlaywrightTimeout as e:
                raise PageNotReady(f"{url} did not finish its script in {timeout_s:g} s; "
                                   f"errors: {opened.errors or 'none reported'}") from e
            opened.load_seconds = page.evaluate(_AFTER_TWO_FRAMES) / 1000.0
            yield opened
        finally:
            context.close()
