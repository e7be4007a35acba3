"""Option parsing shared by commands."""

from __future__ import annotations

import json
from typing import Any

from dd.errors import DDError


def parse_options(pairs: list[str] | None) -> dict[str, Any]:
    """``["variant=b5", "input_size=512"]`` -> ``{"variant": "b5", "input_size": 512}``.

    Values are read as JSON when they parse (numbers, true/false, lists), else as strings.
    """
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise DDError(f"bad option {pair!r}", hint="write options as KEY=VALUE")
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw
    return out
