"""Pages in a real browser: Debian's Chromium, driven by Playwright.

The browser is the one `make test` installs (scripts/ensure_browser.sh), or
the binary CHROMIUM names; Playwright's own browser download is not used. The
pages are served by the app under gunicorn, as production serves them
(tests/conftest.py `app_server`), so what the browser loads (static files,
the API docs' scripts) is what an operator's users would get.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from playwright.sync_api import Browser, Page, Response, sync_playwright

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
# NOTES.md: the flags Debian's Chromium needs headless in a container.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    # Playwright's sync API runs an event loop in this thread, and Django then
    # refuses the ORM here ("async context"). The loop only drives the browser;
    # the test's own database calls are synchronous, as everywhere else.
    saved = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            yield chromium
        finally:
            chromium.close()
    if saved is None:
        os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
    else:
        os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = saved


@dataclass
class Visit:
    """A page, and every request of it that failed or was answered 4xx/5xx."""

    page: Page
    failures: list[str] = field(default_factory=list)

    def _response(self, response: Response) -> None:
        if response.status >= 400:
            self.failures.append(f"{response.status} {response.url}")


@pytest.fixture
def visit(browser: Browser) -> Iterator[Visit]:
    context = browser.new_context()
    context.set_default_timeout(15_000)
    page = context.new_page()
    seen = Visit(page)
    page.on("response", seen._response)
    page.on("requestfailed", lambda request: seen.failures.append(f"failed {request.url}"))
    page.on("pageerror", lambda error: seen.failures.append(f"script error {error}"))
    try:
        yield seen
    finally:
        context.close()
