"""Every hook is documented under its exact signature and has a test named after it."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from dd.api import hookspecs

ROOT = Path(__file__).resolve().parents[1]


def _hooks():
    return [
        (n, f) for n, f in vars(hookspecs).items() if n.startswith("dd_") and inspect.isfunction(f)
    ]


def test_hooks_are_prefixed_and_found():
    hooks = _hooks()
    assert len(hooks) >= 3
    assert {"dd_register_detectors", "dd_register_backbones", "dd_register_commands"} <= {
        n for n, _ in hooks
    }


def test_every_hook_is_documented_with_its_exact_signature():
    doc = (ROOT / "docs" / "plugins.md").read_text()
    for name, fn in _hooks():
        params = ", ".join(inspect.signature(fn).parameters)
        heading = f"### `{name}({params})`"
        assert heading in doc, f"docs/plugins.md lacks the heading {heading}"


def test_every_hook_has_a_test():
    tests = "\n".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py"))
    for name, _ in _hooks():
        assert re.search(rf"^def test_hook_{name}\b", tests, re.M), f"no test_hook_{name}"
