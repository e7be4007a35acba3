"""Seeded draws: every random draw of a run is a function of (run seed, stream, index), so a
resumed run draws exactly what the straight run would have."""

from __future__ import annotations

import numpy as np

__all__ = ["EpochOrder", "noise_seed"]


def noise_seed(run_seed: int, stream: int, index: int) -> int:
    """A 32-bit seed for draw ``index`` of random stream ``stream`` of a run."""
    return int(np.random.SeedSequence([run_seed & 0xFFFFFFFF, stream, index]).generate_state(1)[0])


class EpochOrder:
    """Seeded per-epoch orders: draw ``index`` of random stream ``stream`` over ``n`` items
    is item ``permutation(seed, stream, epoch)[index % n]`` with ``epoch = index // n`` (a few
    recent permutations are cached)."""

    def __init__(self, seed: int, cache: int = 8):
        self.seed = seed & 0xFFFFFFFF
        self._cache: dict[tuple[int, int, int], np.ndarray] = {}
        self._size = cache

    def at(self, index: int, n: int, stream: int) -> int:
        epoch, j = divmod(index, n)
        key = (stream, n, epoch)
        if key not in self._cache:
            if len(self._cache) > self._size:
                self._cache.clear()
            rng = np.random.default_rng([self.seed, stream, epoch])
            self._cache[key] = rng.permutation(n)
        return int(self._cache[key][j])
