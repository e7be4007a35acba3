"""Settings every training job declares the same way."""

from __future__ import annotations

__all__ = ["PRECISIONS"]

#: dd's precision names (``--dtype``/``--precision``) -> accelerate's ``mixed_precision``.
PRECISIONS: dict[str, str] = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
