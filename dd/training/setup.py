"""Settings every training job declares the same way."""

from __future__ import annotations

__all__ = ["PRECISIONS", "RESUMABLE"]

#: dd's precision names (``--dtype``/``--precision``) -> accelerate's ``mixed_precision``.
PRECISIONS: dict[str, str] = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}

#: Settings a resumed training run may change (they do not change its results); an engine
#: adds its own (train-detector: ``workers``).
RESUMABLE: frozenset[str] = frozenset({"resume", "overwrite", "stop_at", "report_to"})
