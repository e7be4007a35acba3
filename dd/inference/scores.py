"""Per-image artifact scores computed from a probability map."""

from __future__ import annotations

from typing import Any

import numpy as np

#: The released DiffDoctor training code's default for the "weighted" reduction.
WEIGHTED_THRESHOLD = 0.1
#: A pixel counts as an artifact pixel at or above this probability.
ARTIFACT_THRESHOLD = 0.5


def map_scores(
    p: np.ndarray,
    *,
    weighted_threshold: float = WEIGHTED_THRESHOLD,
    artifact_threshold: float = ARTIFACT_THRESHOLD,
) -> dict[str, Any]:
    """Scores of one H x W probability map.

    ``mean``/``max``: of all pixels. ``weighted``: mean of p over pixels with
    p > ``weighted_threshold`` (0 when there are none). ``artifact_ratio``: share of pixels
    with p >= ``artifact_threshold``. ``peak``: [x, y] of the maximum. ``bbox``: [x0, y0,
    x1, y1] (inclusive-exclusive) around the artifact pixels, or None.
    """
    p = np.asarray(p, dtype=np.float32)
    h, w = p.shape
    flat_idx = int(np.argmax(p))
    above = p > weighted_threshold
    art = p >= artifact_threshold
    bbox = None
    if art.any():
        ys = np.flatnonzero(art.any(axis=1))
        xs = np.flatnonzero(art.any(axis=0))
        bbox = [int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1]
    return {
        "mean": float(p.mean(dtype=np.float64)),
        "max": float(p.max()),
        "weighted": float(p[above].mean(dtype=np.float64)) if above.any() else 0.0,
        "artifact_ratio": float(art.mean(dtype=np.float64)),
        "peak": [flat_idx % w, flat_idx // w],
        "bbox": bbox,
        "width": w,
        "height": h,
    }
