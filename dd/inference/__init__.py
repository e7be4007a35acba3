"""The one batched-inference path of a detector over many images, shared by ``dd detect``,
``dd label pseudo``, ``dd label mine`` (through detect) and ``dd eval-detector``'s metrics.

``load`` runs in ``workers`` threads, at most ``depth`` items ahead (decode and resize off
the model's critical path; pending loads are cancelled when the consumer stops). Loaded
items are batched by their working-size tensor shape (a detector may keep image sizes),
run through ``detector.logits`` under ``torch.inference_mode`` in eval mode (the training
flag is restored afterwards), and each item's logits are upsampled to its own size and
passed through a sigmoid, as ``Detector.forward`` does. Results come back as
``(loaded, probability map)`` in batch order; an item whose load failed comes back at once
as ``(loaded, None)``.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from dd.api.detectors import Detector, logits_to_probs


class Loaded(Protocol):
    """What ``load`` returns: the tensor for the model (``3 x h x w`` at the detector's
    working size, values in [0, 1]) and the ``(H, W)`` size the map is wanted at, or an
    error message."""

    tensor: torch.Tensor | None
    size: tuple[int, int]
    error: str | None


T = TypeVar("T")
L = TypeVar("L", bound=Loaded)


def resize_for(detector: Detector, image: np.ndarray) -> torch.Tensor:
    """uint8 H x W x 3 -> float 3 x h x w in [0, 1] at the detector's working size."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
    size = detector.working_size(image.shape[0], image.shape[1])
    if tuple(size) != tuple(image.shape[:2]):
        x = F.interpolate(x[None], size=tuple(size), mode="bilinear", align_corners=False)[0]
    return x


def prefetch(
    pool: ThreadPoolExecutor, items: Iterable[T], fn: Callable[[T], L], depth: int
) -> Iterator[L]:
    """``pool.map(fn, items)`` in order, with at most ``depth`` results computed ahead; the
    loads still pending when the consumer stops early are cancelled."""
    pending: collections.deque[Future[L]] = collections.deque()
    it = iter(items)
    for item in it:
        pending.append(pool.submit(fn, item))
        if len(pending) >= depth:
            break
    try:
        while pending:
            done = pending.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(fn, nxt))
            yield done
    finally:
        for f in pending:
            f.cancel()


def model_placement(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """The device and dtype of ``module``'s parameters (CPU float32 without any)."""
    param = next(module.parameters(), None)
    if param is None:
        return torch.device("cpu"), torch.float32
    return param.device, param.dtype


def detect_batches(
    detector: Detector,
    items: Iterable[T],
    load: Callable[[T], L],
    *,
    batch_size: int,
    workers: int,
) -> Iterator[tuple[L, torch.Tensor | None]]:
    """``(loaded, H x W float32 probabilities on the model's device)`` for every item (see
    the module docstring); ``None`` for an item whose ``load`` set ``error``."""
    device, dtype = model_placement(detector)
    depth = max(2 * batch_size, workers)
    was_training = detector.training
    detector.eval()

    def run(batch: list[L]) -> Iterator[tuple[L, torch.Tensor]]:
        with torch.inference_mode():
            x = torch.stack([b.tensor for b in batch]).to(device, dtype)  # type: ignore[misc]
            logits = detector.logits(x).float()
            probs = [logits_to_probs(logits[i : i + 1], b.size)[0, 0] for i, b in enumerate(batch)]
        yield from zip(batch, probs, strict=True)

    try:
        with ThreadPoolExecutor(max(1, workers), thread_name_prefix="dd-load") as pool:
            batches: dict[tuple[int, ...], list[L]] = {}
            for loaded in prefetch(pool, items, load, depth):
                if loaded.error is not None or loaded.tensor is None:
                    yield loaded, None
                    continue
                shape = tuple(loaded.tensor.shape)
                batches.setdefault(shape, []).append(loaded)
                if len(batches[shape]) >= batch_size:
                    yield from run(batches.pop(shape))
                elif sum(map(len, batches.values())) > 2 * batch_size:
                    # Many distinct sizes: run the fullest partial batch to bound memory.
                    yield from run(batches.pop(max(batches, key=lambda k: len(batches[k]))))
            for batch in batches.values():
                yield from run(batch)
    finally:
        detector.train(was_training)


def generate_batches(
    backbone: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    height: int,
    width: int,
    steps: int | None,
    guidance: float | None,
    batch_size: int,
    guide: Any | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """``(start, images)`` for consecutive chunks of (prompt, seed) pairs, no gradient (a
    ``guide``'s steps take their own, one step at a time)."""
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        with torch.no_grad():
            images = backbone.generate(
                list(prompts[chunk]),
                seeds=list(seeds[chunk]),
                height=height,
                width=width,
                steps=steps,
                guidance=guidance,
                guide=guide,
            )
        yield start, images
