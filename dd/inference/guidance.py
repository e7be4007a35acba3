"""Detector guidance: steer sampling away from artifacts without training (DIAMOND-style).

At each guided denoising step the backbone takes the ordinary step, estimates the clean
latent from the same prediction (flow: ``x0 = x_t - sigma * v``; epsilon / v-prediction: the
DDIM formulas), decodes it, runs the artifact detector, and moves the stepped latent down the
gradient of the artifact confidence with respect to ``x_t`` (:func:`dd.ops.
artifact_confidence_loss`, the loss ``dd treat`` trains with). As DIAMOND does, the model's
prediction is held fixed for the gradient (it flows through the VAE decode and the detector
only, not back through the denoiser), the gradient is L2-normalised, and the step size
``lambda`` follows a power schedule from ``scale`` down to ``scale / 12`` (DIAMOND's FLUX
default is 12 -> 1, power 2). dd normalises per image (DIAMOND: over the whole batch), so
an image's result does not depend on what it was batched with. Nothing is kept across
steps, so memory is one step's. With ``scale`` 0 sampling is unguided, bit for bit.

``dd refine --guide`` runs the same step inside the late steps it redoes, with the repaint
mask as the confidence's per-pixel weight (:attr:`Guide.weight`): the push comes from the
masked region only, and what lies outside the mask is reset to the original after every
step as in plain masked refining.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dd.errors import UsageError

GUIDE_LOSSES = ("mean", "max", "weighted")


@dataclass
class Guide:
    """What guided sampling needs: the detector and the schedule of its pushes."""

    detector: Any
    scale: float = 12.0
    #: Guided sampling steps, ``(first, last)`` 0-based inclusive; None: every step.
    steps: tuple[int, int] | None = None
    loss: str = "mean"
    every: int = 1
    threshold: float = 0.1
    #: Per-pixel weights of the confidence (``B x 1 x H x W`` at the image size), e.g. the
    #: repaint mask of ``dd refine --guide``: only what lies inside it pushes the latents.
    weight: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.loss not in GUIDE_LOSSES:
            raise UsageError(
                f"unknown --guide-loss {self.loss!r}", hint=f"one of {', '.join(GUIDE_LOSSES)}"
            )
        if self.scale < 0:
            raise UsageError(f"--guide-scale must be 0 or more, got {self.scale}")
        if self.every < 1:
            raise UsageError(f"--guide-every must be at least 1, got {self.every}")

    def active(self, index: int, n_steps: int) -> bool:
        """Whether sampling step ``index`` (of ``n_steps``) is guided."""
        if self.scale == 0:
            return False
        first, last = self.steps if self.steps is not None else (0, n_steps - 1)
        return first <= index <= min(last, n_steps - 1) and (index - first) % self.every == 0

    def lam(self, index: int, n_steps: int) -> float:
        """The step size at sampling step ``index``: ``scale / 12 + (scale - scale / 12) *
        (1 - index / (n - 1))^2`` (DIAMOND's power schedule, 12 -> 1 at scale 12)."""
        end = self.scale / 12.0
        frac = index / (n_steps - 1) if n_steps > 1 else 0.0
        return end + (self.scale - end) * (1.0 - frac) ** 2

    def shift(self, grad: torch.Tensor, index: int, n_steps: int) -> torch.Tensor:
        """``lambda * grad / ||grad||`` per image."""
        dims = tuple(range(1, grad.ndim))
        norm = grad.pow(2).sum(dim=dims, keepdim=True).sqrt().clamp_min(1e-6)
        return self.lam(index, n_steps) * grad / norm

    def loss_of(self, images: torch.Tensor) -> torch.Tensor:
        """Per-image artifact confidence of ``images`` (``B x 3 x H x W`` in [0, 1])."""
        from dd.ops import artifact_confidence_loss

        logits = self.detector.logits(images)
        weight = None if self.weight is None else self.weight.to(logits.device, logits.dtype)
        return artifact_confidence_loss(
            logits, tuple(images.shape[-2:]), self.loss, threshold=self.threshold, weight=weight
        )


def parse_guide_steps(spec: str | None) -> tuple[int, int] | None:
    """``"A-B"`` (0-based sampling steps, inclusive) or ``"A"``; None: every step."""
    if not spec:
        return None
    a, sep, b = spec.partition("-")
    try:
        first, last = int(a), int(b) if sep else int(a)
    except ValueError:
        raise UsageError(
            f"bad --guide-steps {spec!r}", hint="A-B: first and last guided step, e.g. 0-9"
        ) from None
    if first < 0 or last < first:
        raise UsageError(f"bad --guide-steps {spec!r}", hint="0 <= A <= B")
    return first, last
