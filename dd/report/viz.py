"""Pictures people look at: heat maps and overlays of artifact maps."""

from __future__ import annotations

import numpy as np

from dd.data.datasets import to_uint8_map  # the map file format (re-exported)

__all__ = ["jet", "overlay", "to_uint8_map"]


def jet(p: np.ndarray) -> np.ndarray:
    """Map probabilities in [0, 1] (H x W) to an RGB uint8 jet colour map (H x W x 3)."""
    x = np.clip(p.astype(np.float32), 0.0, 1.0)
    r = np.clip(1.5 - np.abs(4.0 * x - 3.0), 0.0, 1.0)
    g = np.clip(1.5 - np.abs(4.0 * x - 2.0), 0.0, 1.0)
    b = np.clip(1.5 - np.abs(4.0 * x - 1.0), 0.0, 1.0)
    return (np.stack([r, g, b], axis=-1) * 255.0 + 0.5).astype(np.uint8)


def overlay(image: np.ndarray, p: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """Blend the jet heat map of ``p`` over an RGB uint8 image (alpha = heat-map weight).

    The released DiffDoctor demo uses the same 0.6 / 0.4 blend.
    """
    heat = jet(p).astype(np.float32)
    out = alpha * heat + (1.0 - alpha) * image.astype(np.float32)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)
