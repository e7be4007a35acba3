"""Which native / Triton kernels can run here (filled in by the kernels issue)."""

from __future__ import annotations

import importlib.util
from typing import Any


def kernel_status() -> list[dict[str, Any]]:
    """One row per kernel backend: name, available, and the reason when it is not."""
    import torch

    rows: list[dict[str, Any]] = [{"name": "reference (PyTorch)", "available": True}]
    rows.append(
        {
            "name": "cpp (csrc, CPU)",
            "available": False,
            "reason": "no native ops are built in this version",
        }
    )
    if torch.cuda.is_available():
        rows.append(
            {
                "name": "cuda (csrc)",
                "available": False,
                "reason": "no native ops are built in this version",
            }
        )
    else:
        rows.append(
            {"name": "cuda (csrc)", "available": False, "reason": "torch has no CUDA device here"}
        )
    if importlib.util.find_spec("triton") is None:
        rows.append(
            {
                "name": "triton",
                "available": False,
                "reason": "triton is not installed (pip install 'dd-doctor[gpu]')",
            }
        )
    else:
        rows.append(
            {"name": "triton", "available": False, "reason": "no Triton kernels in this version"}
        )
    xformers = importlib.util.find_spec("xformers") is not None
    rows.append(
        {
            "name": "xformers attention",
            "available": xformers,
            "reason": None if xformers else "xformers is not installed (optional, GPU)",
        }
    )
    return rows
