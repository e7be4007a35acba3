"""Which native / Triton kernels can run here, for ``dd env``."""

from __future__ import annotations

import importlib.util
from typing import Any


def kernel_status() -> list[dict[str, Any]]:
    """One row per kernel backend: name, available, and the reason when it is not.

    The op kernels come from the dispatch registry of :mod:`dd.ops` (nothing is compiled to
    answer; a C++ op that would compile on first use says so in ``reason``), and each row
    names the devices where the automatic choice uses it (``default_on``).
    """
    from dd.ops import kernel_rows

    rows: list[dict[str, Any]] = list(kernel_rows())
    xformers = importlib.util.find_spec("xformers") is not None
    rows.append(
        {
            "name": "xformers attention",
            "available": xformers,
            "reason": None if xformers else "xformers is not installed (optional, GPU)",
        }
    )
    return rows
