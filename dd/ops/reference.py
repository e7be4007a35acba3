"""The PyTorch reference of the artifact-confidence loss: the spec every kernel must match.

Plain eager ops (``F.interpolate`` + ``torch.sigmoid`` + a reduction); their autograd gives
the reference gradients. It materialises the full-resolution map and its sigmoid (and keeps
them for backward), which is what the fused kernels avoid.

Definition, per image b, with p = sigmoid(bilinear_upsample(logits)[b]) over the H x W
output pixels (``F.interpolate(..., mode="bilinear", align_corners=False)``):

- per-pixel value f = p, or f = (p - target)^2 when a target map is given, times the
  per-pixel ``weight`` when one is given;
- ``mean``: mean of f over the H * W pixels (with a target: the MSE of detector training);
- ``sum``: sum of f;
- ``max``: max of f; the gradient goes to the first maximal pixel in row-major order
  (``torch.max(dim=...)``'s choice);
- ``weighted``: mean of f over the pixels with p > threshold, 0 if there are none; the mask is
  a constant for the gradient (d/df_i = mask_i / count), so pixels at the threshold boundary
  do not produce a gradient through the count.

The result is one value per image, shape (B,); callers mean over the batch. ``target`` and
``weight`` are constants (labels and loss weights): the fused op gives them no gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from dd.errors import DDError

REDUCTIONS = ("mean", "max", "sum", "weighted")


def check_args(
    logits: torch.Tensor,
    out_size: Sequence[int],
    reduction: str,
    target: torch.Tensor | None,
    weight: torch.Tensor | None,
) -> tuple[int, int]:
    """Validate the arguments of the op; returns the output size (H, W)."""
    if reduction not in REDUCTIONS:
        raise DDError(
            f"unknown reduction {reduction!r}", hint=f"use one of {', '.join(REDUCTIONS)}"
        )
    if logits.dim() != 4 or logits.shape[1] != 1:
        raise DDError(
            f"logits must be B x 1 x h x w, got shape {tuple(logits.shape)}",
            hint="pass the detector's single-channel logits map",
        )
    if not logits.is_floating_point():
        raise DDError(f"logits must be a floating-point tensor, got {logits.dtype}")
    if logits.shape[2] == 0 or logits.shape[3] == 0:
        raise DDError(f"logits must not be empty, got shape {tuple(logits.shape)}")
    if len(out_size) != 2 or any(int(s) <= 0 for s in out_size):
        raise DDError(f"out_size must be two positive sizes (H, W), got {tuple(out_size)}")
    size = (int(out_size[0]), int(out_size[1]))
    want = (logits.shape[0], 1, *size)
    for name, t in (("target", target), ("weight", weight)):
        if t is None:
            continue
        if tuple(t.shape) != want:
            raise DDError(
                f"{name} must be B x 1 x H x W = {want}, got shape {tuple(t.shape)}",
                hint=f"give the {name} at the output size, one map per image",
            )
        if t.device != logits.device:
            raise DDError(f"{name} is on {t.device} but logits are on {logits.device}")
    return size


# Deliberate copy: the signature of dd.ops.artifact_confidence_loss: the reference is the spec.
def artifact_confidence_loss_reference(
    logits: torch.Tensor,
    out_size: Sequence[int],
    reduction: str = "mean",
    target: torch.Tensor | None = None,
    threshold: float = 0.1,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-image artifact-confidence loss, shape (B,), in eager PyTorch (see module doc)."""
    size = check_args(logits, out_size, reduction, target, weight)
    p = torch.sigmoid(F.interpolate(logits, size=size, mode="bilinear", align_corners=False))
    f = p if target is None else (p - target).square()
    if weight is not None:
        f = f * weight
    f = f.flatten(1)
    if reduction == "mean":
        return f.mean(dim=1)
    if reduction == "sum":
        return f.sum(dim=1)
    if reduction == "max":
        return f.max(dim=1).values
    mask = (p.flatten(1) > threshold).to(f.dtype)
    return (f * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1)
