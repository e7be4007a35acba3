"""dd.inference: the one batched-inference path (detect, pseudo-label, metrics, shrink-pad)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from dd.api.detectors import Detector
from dd.inference import detect_batches, prefetch


class Doubler(Detector):
    """logits = first channel (so the probability map is sigmoid of it); counts batches."""

    name = "doubler"

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.batches: list[int] = []

    @classmethod
    def load(cls, weights=None, **kw):
        return cls()

    def logits(self, images):
        assert not torch.is_grad_enabled()
        self.batches.append(images.shape[0])
        return images[:, :1] * self.w


@dataclass
class Item:
    tensor: torch.Tensor | None
    size: tuple[int, int]
    error: str | None = None
    tag: int = 0


def test_batches_by_shape_upsamples_and_passes_errors_through():
    det = Doubler().train()
    items = [
        Item(torch.zeros(3, 4, 4), (8, 8), tag=0),
        Item(None, (0, 0), error="unreadable", tag=1),
        Item(torch.zeros(3, 2, 2), (2, 2), tag=2),
        Item(torch.ones(3, 4, 4), (4, 4), tag=3),
    ]
    out = list(detect_batches(det, items, lambda it: it, batch_size=2, workers=2))
    assert [(o.tag, None if p is None else tuple(p.shape)) for o, p in out] == [
        (1, None),  # an error comes back at once
        (0, (8, 8)),  # the 4x4 batch is full: upsampled to each item's size
        (3, (4, 4)),
        (2, (2, 2)),  # the rest at the end
    ]
    assert det.batches == [2, 1]
    assert torch.allclose(out[1][1], torch.full((8, 8), 0.5))
    assert det.training  # the training flag is restored


def test_prefetch_bounds_the_lookahead_and_cancels_on_stop():
    started: list[int] = []
    lock = threading.Lock()

    def slow(i: int) -> int:
        with lock:
            started.append(i)
        time.sleep(0.01)
        return i

    with ThreadPoolExecutor(1) as pool:
        gen = prefetch(pool, range(100), slow, depth=3)
        assert [next(gen) for _ in range(2)] == [0, 1]
        gen.close()  # the consumer stops: what was queued is cancelled
    assert len(started) <= 6
