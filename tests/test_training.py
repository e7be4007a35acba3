"""dd/training: the one LR schedule and the seeded draws every training job shares."""

from __future__ import annotations

import math

import pytest

from dd.errors import DDError
from dd.training.draws import noise_seed
from dd.training.schedule import lr_schedule


def _former_lr_factor(schedule, steps, warmup, s):
    """treat's and DreamBooth's schedule before dd/training (kept here as the spec)."""
    if s < warmup:
        return (s + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (s - warmup) / max(1, steps - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _former_cosine_schedule(steps, warmup, min_ratio, s):
    """train-detector's schedule before dd/training (kept here as the spec)."""
    if s < warmup:
        return (s + 1) / warmup
    progress = min(1.0, (s - warmup) / max(1, steps - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@pytest.mark.parametrize("steps, warmup", [(1, 0), (10, 2), (37, 5), (1000, 50), (7, 7)])
def test_the_schedule_is_bit_equal_to_both_former_ones(steps, warmup):
    for kind in ("constant", "cosine"):
        f = lr_schedule(kind, steps, warmup)
        assert [f(s) for s in range(steps + 3)] == [
            _former_lr_factor(kind, steps, warmup, s) for s in range(steps + 3)
        ]
    for ratio in (0.0, 0.05, 0.1):
        f = lr_schedule("cosine", steps, warmup, ratio)
        assert [f(s) for s in range(steps + 3)] == [
            _former_cosine_schedule(steps, warmup, ratio, s) for s in range(steps + 3)
        ]


def test_the_schedule_refuses_an_unknown_kind():
    with pytest.raises(DDError, match="unknown LR schedule 'linear'"):
        lr_schedule("linear", 10, 1)


def test_draws_are_the_ones_runs_were_checkpointed_with():
    """Values of the former dd.engines.treat.noise_seed: a resumed run draws the same."""
    assert [noise_seed(7, s, i) for s, i in [(2, 0), (3, 5), (5, 11)]] == [
        1009178997,
        2226340077,
        2781136339,
    ]
    assert noise_seed(2**40 + 3, 1, 2) == 1620210449  # the run seed is taken mod 2**32


def test_epoch_orders_are_the_ones_runs_were_checkpointed_with():
    """EpochOrder replaced three engines' own per-epoch permutations: same items."""
    import numpy as np

    from dd.training.draws import EpochOrder

    order = EpochOrder(7)
    for stream, n in ((1, 5), (4, 3), (11, 8)):
        got = [order.at(i, n, stream) for i in range(3 * n + 2)]
        want = [
            int(np.random.default_rng([7, stream, i // n]).permutation(n)[i % n])
            for i in range(3 * n + 2)
        ]
        assert got == want
        assert sorted(got[:n]) == list(range(n))  # each epoch is a permutation
