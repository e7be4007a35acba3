"""The detector API: images in [0, 1] -> per-pixel artifact probability maps.

A detector is a ``torch.nn.Module``. Its contract:

* ``logits(images)``: ``images`` is a float tensor ``B x 3 x H x W`` with values in
  ``[0, 1]`` (RGB). Returns raw artifact logits ``B x 1 x h x w`` at the detector's own
  working resolution. Differentiable end to end: the treat engine back-propagates
  through it.
* ``forward(images)``: the logits upsampled bilinearly (``align_corners=False``) to
  ``H x W`` and passed through a sigmoid: probabilities ``B x 1 x H x W``.
* ``predict(images, batch_size)``: the same under ``torch.inference_mode`` in chunks.
* ``working_size(h, w)``: the resolution ``logits`` resizes inputs to, so callers can
  resize in loader threads and batch images of different sizes.
* ``load(weights, device=, dtype=, **options)``: build the detector from a file, folder or
  hub id (``None``: the detector's default, which may be untrained and then says so).
"""

from __future__ import annotations

import abc
import json
import os
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from dd.errors import DDError


class Detector(torch.nn.Module, abc.ABC):
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""

    def __init__(self) -> None:
        super().__init__()
        #: True when the weights are random (no checkpoint given): outputs mean nothing.
        self.untrained: bool = False
        #: Where the weights came from (a path, hub id or "random init"), for reports.
        self.source: str = ""
        #: The image-level rule calibrated for these weights: an image is flagged when its
        #: max confidence is at least this (None: not calibrated, ``flag_threshold`` is 0.5).
        #: Saved with the weights by detectors that support it; reset when they are trained.
        self.image_threshold: float | None = None

    # -- to implement ------------------------------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def load(
        cls,
        weights: str | None = None,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        **options: Any,
    ) -> Detector:
        """Build the detector and load ``weights`` (a file, a folder or a hub id)."""

    @abc.abstractmethod
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """``B x 3 x H x W`` in [0, 1] -> ``B x 1 x h x w`` logits (differentiable)."""

    # -- provided ------------------------------------------------------------------------------
    def working_size(self, height: int, width: int) -> tuple[int, int]:
        """The size ``logits`` resizes an ``height x width`` input to (default: unchanged)."""
        return height, width

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images)
        return logits_to_probs(self.logits(images), images.shape[-2:])

    @torch.inference_mode()
    def predict(self, images: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        """No-grad batched inference; returns float32 probabilities on ``images.device``."""
        was_training = self.training
        self.eval()
        try:
            p = self._param()
            outs = [
                self(chunk.to(p.device, p.dtype)).float().to(images.device)
                for chunk in images.split(batch_size)
            ]
        finally:
            self.train(was_training)
        return torch.cat(outs)

    def _param(self) -> torch.Tensor:
        for p in self.parameters():
            return p
        return torch.empty(0)

    @property
    def flag_threshold(self) -> float:
        """Max confidence at which an image counts as having an artifact (default 0.5)."""
        return 0.5 if self.image_threshold is None else float(self.image_threshold)

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary for reports (name, weights source, untrained flag, the image
        threshold and whether it was calibrated for these weights)."""
        return {
            "detector": self.name,
            "weights": self.source,
            "untrained": self.untrained,
            "image_threshold": self.flag_threshold,
            "threshold_calibrated": self.image_threshold is not None,
        }


@runtime_checkable
class TrainableDetector(Protocol):
    """What ``dd train-detector --detector NAME`` needs beyond :class:`Detector`.

    * ``input_size``: ``(height, width)`` the detector works at; training crops default to it.
    * ``save_pretrained(folder)``: write weights (and whatever config) that ``load(folder)``
      reads back; the run's ``model/`` and every checkpoint are written with it.
    * ``load_pretrained_weights(folder)``: load weights ``save_pretrained`` wrote into this
      instance, strictly (``--resume``).
    * ``default_train_options``: ``load`` options for a detector trained from scratch
      (e.g. ``{"variant": "b0"}``); the ``--variant``/``--input-size`` flags and ``seed``
      are passed where ``load`` declares them.
    """

    input_size: tuple[int, int]
    default_train_options: dict[str, Any]

    def save_pretrained(self, out_dir: Any) -> Any: ...

    def load_pretrained_weights(self, folder: Any) -> None: ...


def logits_to_probs(logits: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Upsample low-resolution logits to ``size`` (bilinear, align_corners=False), sigmoid."""
    size = (int(size[0]), int(size[1]))
    if tuple(logits.shape[-2:]) != size:
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    return torch.sigmoid(logits)


def check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images)
        raise DDError(
            f"detector input must be a B x 3 x H x W tensor, got {shape}",
            hint="stack RGB images scaled to [0, 1] into one batch",
        )
    if not images.is_floating_point():
        raise DDError(
            f"detector input must be float in [0, 1], got dtype {images.dtype}",
            hint="convert uint8 images with images.float() / 255",
        )


def store_image_threshold(
    weights: str | os.PathLike, threshold: float
) -> tuple[Path, float | None]:
    """Write a calibrated image threshold into a weights folder's ``config.json``
    (``dd_image_threshold``, which the built-in SegFormer detector reads back), atomically.
    Returns the file and the threshold it replaced (None if it had none)."""
    from dd.runtime.io import atomic_write_json

    path = Path(weights) / "config.json"
    if not path.is_file():
        raise DDError(
            f"cannot store the threshold: {path} not found",
            hint="--save-threshold needs a weights folder with a config.json "
            "(e.g. a train-detector run's model/)",
        )
    try:
        cfg = json.loads(path.read_text())
    except ValueError as e:
        raise DDError(f"cannot read {path}: {e}") from None
    previous = cfg.get("dd_image_threshold")
    cfg["dd_image_threshold"] = round(float(threshold), 6)
    atomic_write_json(path, cfg)
    return path, None if previous is None else float(previous)
