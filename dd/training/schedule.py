"""The one learning-rate schedule of dd's training jobs."""

from __future__ import annotations

import math
from collections.abc import Callable

from dd.errors import DDError

__all__ = ["SCHEDULES", "lr_schedule"]

SCHEDULES = ("constant", "cosine")


def lr_schedule(
    kind: str, steps: int, warmup: int, min_ratio: float = 0.0
) -> Callable[[int], float]:
    """LR multiplier of optimizer step ``s`` (for ``torch.optim.lr_scheduler.LambdaLR``):
    linear warmup to 1 over ``warmup`` steps, then constant (``kind="constant"``) or a cosine
    decay to ``min_ratio`` at ``steps`` (``"cosine"``). With ``min_ratio=0`` the cosine is
    bit-equal to treat's and DreamBooth's former ``lr_factor``; with ``min_ratio`` to
    train-detector's former ``cosine_schedule``."""
    if kind not in SCHEDULES:
        raise DDError(f"unknown LR schedule {kind!r}", hint=f"use one of {', '.join(SCHEDULES)}")

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (s - warmup) / max(1, steps - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
