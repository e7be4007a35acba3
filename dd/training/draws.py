"""Seeded draws: every random draw of a run is a function of (run seed, stream, index), so a
resumed run draws exactly what the straight run would have."""

from __future__ import annotations

import numpy as np

__all__ = ["noise_seed"]


def noise_seed(run_seed: int, stream: int, index: int) -> int:
    """A 32-bit seed for draw ``index`` of random stream ``stream`` of a run."""
    return int(np.random.SeedSequence([run_seed & 0xFFFFFFFF, stream, index]).generate_state(1)[0])
