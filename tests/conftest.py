"""Shared fixtures. Nothing in the tests may reach a model hub."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Spinning OpenMP threads make a loaded 2-core machine crawl; sleep instead of spinning.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Prompt embeddings of the test runs go to a folder of this session, never ~/.cache/dd.
os.environ["DD_CACHE_DIR"] = tempfile.mkdtemp(prefix="dd-test-cache-")
atexit.register(shutil.rmtree, os.environ["DD_CACHE_DIR"], True)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _fresh_plugins(monkeypatch):
    """Each test starts with freshly loaded plugins and no DD_* overrides."""
    from dd.api.plugins import reset_host

    for var in ("DD_LOAD_PLUGINS", "DD_DEBUG"):
        monkeypatch.delenv(var, raising=False)
    reset_host()
    yield
    reset_host()


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test (tiny models on a shared CPU run faster so)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_ldm(tmp_path_factory):
    """A tiny LDM pipeline folder of the real diffusers classes (built once per session)."""
    from dd.testing.tiny import tiny_pipeline_path

    return tiny_pipeline_path("ldm", tmp_path_factory)


@pytest.fixture
def cli():
    """Invoke the real root app (with plugins) like a user would, via Typer's CliRunner."""
    from typer.testing import CliRunner

    from dd.cli import build_app

    runner = CliRunner()

    def invoke(*args: str, **kw):
        return runner.invoke(build_app(), [str(a) for a in args], **kw)

    return invoke


def find_chromium() -> str | None:
    """The browser the page tests drive: ``$DD_CHROMIUM`` (a path or a name on PATH, or
    ``playwright`` for a browser that ``playwright install chromium`` downloaded), else the
    first Chromium/Chrome on PATH. ``scripts/test-browser.sh`` (run by ``make test``)
    provisions one."""
    import shutil

    for name in (
        os.environ.get("DD_CHROMIUM"),
        "chromium",
        "chromium-browser",
        "google-chrome",
        "google-chrome-stable",
    ):
        if name == "playwright":
            return name
        if name and (shutil.which(name) or (os.path.isfile(name) and os.access(name, os.X_OK))):
            return shutil.which(name) or name
    return None


CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="session")
def browser():
    """A real headless Chromium driven by Playwright (no browser download).

    Fails, not skips, when no browser is found: `make test` provisions one
    (scripts/test-browser.sh).
    """
    chromium = find_chromium()
    if chromium is None:
        pytest.fail(
            "no Chromium/Chrome found: run scripts/test-browser.sh (make test does), or set "
            "DD_CHROMIUM to a browser (README: Two commands)"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        where = {} if chromium == "playwright" else {"executable_path": chromium}
        b = pw.chromium.launch(args=CHROMIUM_ARGS, **where)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser):
    """A fresh browser page (own context) per test."""
    ctx = browser.new_context()
    pg = ctx.new_page()
    try:
        yield pg
    finally:
        ctx.close()
