"""Shared fixtures. Nothing in the tests may reach a model hub."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Spinning OpenMP threads make a loaded 2-core machine crawl; sleep instead of spinning.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _fresh_plugins(monkeypatch):
    """Each test starts with freshly loaded plugins and no DD_* overrides."""
    from dd.plugins import reset_host

    for var in ("DD_LOAD_PLUGINS", "DD_DEBUG"):
        monkeypatch.delenv(var, raising=False)
    reset_host()
    yield
    reset_host()


@pytest.fixture
def cli():
    """Invoke the real root app (with plugins) like a user would, via Typer's CliRunner."""
    from typer.testing import CliRunner

    from dd.cli import build_app

    runner = CliRunner()

    def invoke(*args: str, **kw):
        return runner.invoke(build_app(), [str(a) for a in args], **kw)

    return invoke
