"""Settings every training job declares the same way."""

from __future__ import annotations

from typing import Any

__all__ = ["PRECISIONS", "RESUMABLE", "training_accelerator"]

#: dd's precision names (``--dtype``/``--precision``) -> accelerate's ``mixed_precision``.
PRECISIONS: dict[str, str] = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}

#: Settings a resumed training run may change (they do not change its results); an engine
#: adds its own (train-detector: ``workers``).
RESUMABLE: frozenset[str] = frozenset({"resume", "overwrite", "stop_at", "report_to"})


def training_accelerator(device: str, mixed_precision: str, hint: str | None = None) -> Any:
    """The ``accelerate.Accelerator`` of a training job run by :func:`dd.training.loop.fit`
    (``device``: auto, cpu or cuda; ``mixed_precision``: accelerate's no, bf16 or fp16). The
    loop accumulates gradients itself, so accelerate's accumulation stays at one step."""
    from dd.runtime.device import make_accelerator

    return make_accelerator(device, mixed_precision, 1, hint=hint)
