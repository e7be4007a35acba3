"""Built-in quality scorers: ``detail`` and ``drift`` (no weights), ``clip``, ``pickscore``
and ``imagereward`` (local weights through ``--quality-weights NAME=PATH``).

Both compare a treat evaluation's images with the untreated model's at the same prompts and
seeds (see :mod:`dd.api.scorers`). Collapse, as DiffDoctor (Sec. 4.2) describes it, is
over-smoothing: ``detail`` falls. ``drift`` catches the other failure, images that moved far
from what the model drew (a different picture rather than a repaired one).
"""

from __future__ import annotations

import abc
from typing import Any

import numpy as np
import torch

from dd.api.hookspecs import hookimpl
from dd.api.scorers import QualityScorer
from dd.errors import UsageError


def _luma(images: np.ndarray) -> np.ndarray:
    x = images.astype(np.float32) / 255.0
    return 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]


def laplacian_energy(images: np.ndarray) -> np.ndarray:
    """Per image: the mean squared 4-neighbour Laplacian of the luminance in [0, 1] (the
    high-frequency energy; 0 for a flat image)."""
    y = _luma(images)
    lap = (
        -4 * y[:, 1:-1, 1:-1] + y[:, :-2, 1:-1] + y[:, 2:, 1:-1] + y[:, 1:-1, :-2] + y[:, 1:-1, 2:]
    )
    return (lap**2).reshape(len(y), -1).mean(1)


class DetailScorer(QualityScorer):
    """High-frequency energy of the eval images (mean squared Laplacian of luminance),
    averaged over images; within tolerance while at least ``(1 - t)`` x the untreated
    model's."""

    name = "detail"
    description = (
        "High-frequency energy (Laplacian) of the eval images: falls when images over-smooth."
    )
    higher_is_better = True
    default_tolerance = 0.3
    tolerance_text = "at least (1 - t) x the untreated value"

    def score(self, images: np.ndarray, base: np.ndarray, prompts: list[str]) -> float:
        return float(laplacian_energy(images).mean())


class DriftScorer(QualityScorer):
    """Mean absolute pixel difference (in [0, 1]) between the eval images and the untreated
    model's at the same seeds; within tolerance while at most ``t`` (0 untreated)."""

    name = "drift"
    description = "Mean |pixel difference| from the untreated model's images at the same seeds."
    higher_is_better = False
    default_tolerance = 0.15
    tolerance_text = "at most t (mean |difference| of pixels in [0, 1])"

    def score(self, images: np.ndarray, base: np.ndarray, prompts: list[str]) -> float:
        diff = np.abs(images.astype(np.float32) - base.astype(np.float32)) / 255.0
        return float(diff.mean())

    def within(self, value: float, base_value: float, tolerance: float) -> bool:
        return value <= base_value + tolerance  # absolute: the untreated value is 0

    def limit(self, base_value: float, tolerance: float) -> float:
        return base_value + tolerance


# ------------------------------------------------------------------------------------------
# Scorers with local weights (the models of `dd eval gen`'s columns: dd.inference.image_scores)
# ------------------------------------------------------------------------------------------
class _ModelScorer(QualityScorer):
    """A scorer whose model loads from ``--quality-weights NAME=PATH`` (dd downloads
    nothing); relative tolerance: at most ``t`` x the untreated value worse."""

    higher_is_better = True
    default_tolerance = 0.1
    tolerance_text = "at least (1 - t) x the untreated value"

    def __init__(self, weights: str | None = None, device: str = "cpu"):
        super().__init__(weights, device)
        if not weights:
            raise UsageError(
                f"--quality {self.name} needs its model's local weights",
                hint=f"pass --quality-weights {self.name}=FOLDER",
            )
        self.model = self.load_model(str(weights))

    @abc.abstractmethod
    def load_model(self, weights: str) -> Any:
        """The scorer's model from the local ``weights`` path."""


class ClipScorer(_ModelScorer):
    """CLIP score of the eval images against their prompts (100 x max(cos, 0), as
    torchmetrics), averaged; a local transformers CLIPModel folder."""

    name = "clip"
    description = "CLIP score of the eval images against their prompts (local CLIPModel)."
    #: How the model is named in errors, and whether to score PickScore's scaled cosine.
    what, pick = "CLIP score", False

    def load_model(self, weights: str) -> Any:
        from dd.inference.image_scores import ClipModel

        return ClipModel(weights, torch.device(self.device), what=self.what)

    def score(self, images: np.ndarray, base: np.ndarray, prompts: list[str]) -> float:
        from dd.inference.image_scores import clip_scores, pick_scores

        scores = (pick_scores if self.pick else clip_scores)(self.model, images, prompts)
        return float(np.mean(scores))


class PickScoreScorer(ClipScorer):
    """PickScore (the PickScore CLIP model's scaled cosine), averaged over the eval images."""

    name = "pickscore"
    description = "PickScore of the eval images (a local PickScore CLIPModel folder)."
    what, pick = "PickScore", True


class ImageRewardScorer(_ModelScorer):
    """ImageReward (the image-reward package, local ImageReward.pt), averaged. Its scores
    are centred near 0, so the tolerance is absolute: at least untreated - t."""

    name = "imagereward"
    description = "ImageReward of the eval images (image-reward package, local weights)."
    default_tolerance = 0.2
    tolerance_text = "at least the untreated value - t"

    def load_model(self, weights: str) -> Any:
        from dd.inference.image_scores import ImageRewardModel

        return ImageRewardModel(weights, torch.device(self.device))

    def score(self, images: np.ndarray, base: np.ndarray, prompts: list[str]) -> float:
        return float(np.mean(self.model.scores(images, prompts)))

    def within(self, value: float, base_value: float, tolerance: float) -> bool:
        return value >= base_value - tolerance

    def limit(self, base_value: float, tolerance: float) -> float:
        return base_value - tolerance


@hookimpl
def dd_register_scorers(register) -> None:
    for cls in (DetailScorer, DriftScorer, ClipScorer, PickScoreScorer, ImageRewardScorer):
        register(cls)
