"""Fixtures for tests that drive a real browser: Debian's chromium through Playwright for Python,
against pytest-django's live server (which serves the static files too, from the finders, so the
admin has its CSS without collectstatic).

A test module loads these fixtures with ``pytest_plugins = ["tests.browser"]``.
Playwright's own browser downloads (``playwright install``) fail here: the browser is whatever
chromium the machine has (``.ci/run`` installs Debian's), or the one GENAPI_CHROMIUM names; with
none, every browser test skips and says why.
"""

import os
import re
import shutil
from contextlib import contextmanager

import pytest
from django.conf import settings

from tests.worker import celery_worker

try:
    from playwright.sync_api import expect as playwright_expect
    from playwright.sync_api import sync_playwright
except ImportError:  # the browser fixture skips, saying why
    playwright_expect = sync_playwright = None

VIEWPORT = {"width": 1366, "height": 900}
# A name that is not "localhost", for pages tried as a deployment serves them: browser code may
# treat localhost apart (Swagger UI's StandaloneLayout skips its online validator there).
# Chromium resolves it to the live server; the public_origin fixture adds it to ALLOWED_HOSTS.
PUBLIC_HOST = "genapi.test"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Long enough for a page that waits on the tiny model, short enough that a missing element fails
# the test instead of hanging it.
TIMEOUT_MS = 15_000


def chromium_executable():
    """The chromium to drive: GENAPI_CHROMIUM, else the first on PATH; None when there is none."""
    explicit = os.environ.get("GENAPI_CHROMIUM")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


@contextmanager
def _async_unsafe_allowed():
    # Playwright's sync API runs an asyncio loop in the test's thread; Django then takes every ORM
    # call the test makes for one inside a coroutine and refuses it. The test is plain sync code.
    previous = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
        else:
            os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = previous


@pytest.fixture(scope="session")
def browser():
    executable = chromium_executable()
    if executable is None:
        pytest.skip(
            "browser tests skipped: no chromium found (.ci/run installs Debian's `chromium` package; "
            "or set GENAPI_CHROMIUM to a chromium binary)"
        )
    if sync_playwright is None:
        pytest.skip(
            "browser tests skipped: Playwright for Python is not installed (pip install -r requirements/dev.txt)"
        )
    with _async_unsafe_allowed(), sync_playwright() as playwright:
        instance = playwright.chromium.launch(
            executable_path=executable,
            # --no-sandbox: CI runs as root, where chromium's sandbox refuses to start.
            args=["--no-sandbox", f"--host-resolver-rules=MAP {PUBLIC_HOST} 127.0.0.1"],
        )
        yield instance
        instance.close()


@pytest.fixture
def page(browser, live_server):
    """A fresh tab (own cookies) at 1366x900 whose relative URLs go to the live server."""
    context = browser.new_context(viewport=VIEWPORT, base_url=live_server.url)
    context.set_default_timeout(TIMEOUT_MS)
    tab = context.new_page()
    # JavaScript errors a user would not see but that break a page: tests can assert there are none.
    tab.js_errors = []
    tab.on("pageerror", lambda error: tab.js_errors.append(str(error)))
    yield tab
    context.close()


def admin_login(page, *, username="admin", password="password"):
    """Sign in through the admin's login form, as a curator does (pytest-django's ``admin_user``)."""
    page.goto("/admin/login/?next=/admin/")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url("**/admin/")


@pytest.fixture
def expect(browser):
    """Playwright's assertions, which wait for the page (a click's navigation, a message appearing)
    instead of reading it once, too early. A fixture, so that test modules import nothing from
    here (pytest_plugins loads this module)."""
    return playwright_expect


@pytest.fixture
def public_origin(live_server, settings):
    """The live server under a real host name (PUBLIC_HOST), for pages that treat localhost apart."""
    settings.ALLOWED_HOSTS = [*settings.ALLOWED_HOSTS, PUBLIC_HOST]
    return f"http://{PUBLIC_HOST}:{live_server.thread.port}"


@pytest.fixture
def curator_page(page, admin_user):
    """``page``, signed in to the admin as a superuser."""
    admin_login(page)
    return page


class Screenshots:
    """Full-page screenshots of a test's steps, numbered in the order taken:
    var/screenshots/<test name>/<NN>-<step>.png."""

    def __init__(self, folder):
        self.folder = folder
        self.taken = []

    def __call__(self, page, step):
        slug = re.sub(r"[^a-z0-9]+", "-", step.lower()).strip("-")
        path = self.folder / f"{len(self.taken) + 1:02d}-{slug}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=path, full_page=True)
        self.taken.append(path)
        return path


@pytest.fixture
def screenshots(request):
    # A test's folder is emptied first, so that what is there is this run's and nothing older.
    folder = settings.VAR_DIR / "screenshots" / re.sub(r"[^\w.-]+", "_", request.node.name)
    shutil.rmtree(folder, ignore_errors=True)
    return Screenshots(folder)


@pytest.fixture
def job_worker(model_store, tmp_path):
    """A real Celery worker process for jobs and evaluations, on the test database and model
    store (the live server's data is committed, so the worker sees it). Its log is in tmp_path."""
    with celery_worker(tmp_path / "worker.log", queues="training,evaluation,celery") as process:
        yield process
