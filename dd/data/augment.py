"""Training-time augmentation of (image, artifact map) pairs: pure functions on tensors.

Conventions: ``image`` is a float tensor ``3 x H x W`` in [0, 1], ``target`` a float tensor
``1 x H x W`` in [0, 1] (the artifact map at the image's resolution). Every geometric
transform is applied to both with one and the same operation (the two are concatenated
along the channel axis and resampled together), so image pixels and map pixels stay in exact
correspondence. Photometric transforms touch the image only. Randomness comes only from an
explicit ``torch.Generator``: the same generator state gives the same result.

* :func:`resized_crop` + :func:`hflip`: the random resized crop and flip every training
  sample gets. Resizing is bilinear with ``align_corners=False`` and no antialiasing, the same
  resampling the SegFormer detector applies to its inputs at inference.
* :func:`shrink_pad`: DiffDoctor's dynamic shrink-and-pad augmentation (seed 000, Sec. 3.2):
  shrink the image and its map by ``scale`` (bilinear, antialiased) and pad both back to the
  original size. The map is padded with 0 (no artifact there). The image is padded with a
  constant (default 0, black) or by reflection. Reflection copies image content, possibly an
  artifact, into the padding while the map there stays 0, so the constant is the default.
* :func:`strong_augment`: the strong augmentation for pseudo-labelled samples: a random
  affine warp (rotation, scale, shift; map warped identically, both filled with 0 outside),
  colour jitter (brightness, contrast, saturation), Gaussian blur and Gaussian noise.
* :func:`train_pair` chains them for one sample.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dd.errors import DDError

__all__ = [
    "AugmentConfig",
    "ShrinkSpec",
    "StrongConfig",
    "color_jitter",
    "crop_box",
    "gaussian_blur",
    "gaussian_noise",
    "hflip",
    "parse_shrink_spec",
    "random_affine",
    "resized_crop",
    "shrink_pad",
    "strong_augment",
    "to_tensor",
    "train_pair",
]


# -- helpers ---------------------------------------------------------------------------------------
def _uniform(gen: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen, dtype=torch.float64))


def _check_pair(image: torch.Tensor, target: torch.Tensor) -> None:
    if image.ndim != 3 or image.shape[0] != 3:
        raise DDError(f"augment: image must be 3 x H x W, got {tuple(image.shape)}")
    if target.ndim != 3 or target.shape[0] != 1 or target.shape[1:] != image.shape[1:]:
        raise DDError(
            f"augment: target must be 1 x H x W matching the image {tuple(image.shape)}, "
            f"got {tuple(target.shape)}"
        )


def _resample(x: torch.Tensor, size: tuple[int, int], antialias: bool) -> torch.Tensor:
    """Bilinear resize of a ``C x H x W`` tensor (align_corners=False)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(
        x[None], size=size, mode="bilinear", align_corners=False, antialias=antialias
    )[0]


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """``H x W x 3`` uint8 (``dd.data.images.load_image``) -> ``3 x H x W`` float in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)


# -- geometric (image and map alike) -------------------------------------------------------------
def crop_box(
    gen: torch.Generator,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """A random crop ``(top, left, h, w)`` covering a ``scale`` fraction of the area with an
    aspect ratio in ``ratio`` (log-uniform), like torchvision's RandomResizedCrop: ten tries,
    then the largest centred crop within ``ratio``."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * _uniform(gen, scale[0], scale[1])
        aspect = math.exp(_uniform(gen, log_lo, log_hi))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=gen))
            left = int(torch.randint(0, width - w + 1, (), generator=gen))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def resized_crop(
    image: torch.Tensor,
    target: torch.Tensor,
    box: tuple[int, int, int, int],
    size: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop ``box`` = ``(top, left, h, w)`` from both and resize the crops to ``size``."""
    _check_pair(image, target)
    top, left, h, w = box
    H, W = image.shape[-2:]
    if h < 1 or w < 1 or top < 0 or left < 0 or top + h > H or left + w > W:
        raise DDError(f"augment: crop box {box} does not fit an image of {H}x{W}")
    both = torch.cat([image, target])[:, top : top + h, left : left + w]
    both = _resample(both, size, antialias=False)
    return both[:3], both[3:]


def hflip(image: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror both left to right."""
    _check_pair(image, target)
    return image.flip(-1), target.flip(-1)


def _reflect_index(n: int, before: int, after: int) -> torch.Tensor:
    """Indices into a length-``n`` axis padded by reflection (edge not repeated), for any
    padding width (torch's reflect padding needs the padding to be shorter than the axis)."""
    i = torch.arange(-before, n + after)
    if n == 1:
        return torch.zeros_like(i)
    period = 2 * (n - 1)
    i = i.remainder(period)
    return torch.where(i >= n, period - i, i)


def shrink_pad(
    image: torch.Tensor,
    target: torch.Tensor,
    scale: float,
    *,
    offset: tuple[int, int] | None = None,
    fill: float | str = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shrink both by ``scale`` (0 < scale <= 1) and pad them back to their size.

    The shrunk size is ``round(H * scale) x round(W * scale)`` (at least 1 pixel); resampling
    is bilinear with antialiasing, one operation for image and map. ``offset`` = ``(top,
    left)`` places the shrunk image (default: centred). The map is padded with 0; the image
    with the constant ``fill`` (in [0, 1]) or, for ``fill="reflect"``, by mirroring the shrunk
    image (whose artifacts would then appear in the padding unlabelled: see the module
    docstring).
    """
    _check_pair(image, target)
    if not 0.0 < scale <= 1.0:
        raise DDError(f"shrink-pad scale must be in (0, 1], got {scale}")
    H, W = image.shape[-2:]
    h, w = max(1, round(H * scale)), max(1, round(W * scale))
    if offset is None:
        offset = ((H - h) // 2, (W - w) // 2)
    top, left = offset
    if not (0 <= top <= H - h and 0 <= left <= W - w):
        raise DDError(f"shrink-pad offset {offset} does not fit {h}x{w} into {H}x{W}")
    both = _resample(torch.cat([image, target]), (h, w), antialias=True)
    small_img, small_map = both[:3], both[3:]
    out_map = target.new_zeros(target.shape)
    out_map[:, top : top + h, left : left + w] = small_map
    if fill == "reflect":
        rows = _reflect_index(h, top, H - h - top)
        cols = _reflect_index(w, left, W - w - left)
        out_img = small_img[:, rows][:, :, cols]
    else:
        try:
            value = float(fill)
        except (TypeError, ValueError):
            raise DDError(
                f"shrink-pad fill must be a number in [0, 1] or 'reflect', got {fill!r}"
            ) from None
        if not 0.0 <= value <= 1.0:
            raise DDError(f"shrink-pad fill must be in [0, 1], got {value}")
        out_img = image.new_full(image.shape, value)
        out_img[:, top : top + h, left : left + w] = small_img
    return out_img, out_map


def random_affine(
    image: torch.Tensor,
    target: torch.Tensor,
    gen: torch.Generator,
    *,
    degrees: float = 15.0,
    scale: tuple[float, float] = (0.9, 1.1),
    translate: float = 0.05,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random rotation (up to ``degrees``), zoom (``scale``) and shift (``translate`` of the
    size) of both, by one bilinear ``grid_sample``; pixels from outside become 0 in both."""
    _check_pair(image, target)
    angle = math.radians(_uniform(gen, -degrees, degrees))
    zoom = _uniform(gen, scale[0], scale[1])
    tx, ty = (_uniform(gen, -translate, translate) * 2 for _ in range(2))
    H, W = image.shape[-2:]
    cos, sin = math.cos(angle) / zoom, math.sin(angle) / zoom
    # Normalised coordinates are anisotropic for non-square images: rotate in pixel units.
    theta = torch.tensor(
        [[cos, -sin * H / W, tx], [sin * W / H, cos, ty]], dtype=image.dtype
    ).unsqueeze(0)
    grid = F.affine_grid(theta, [1, 4, H, W], align_corners=False)
    both = F.grid_sample(
        torch.cat([image, target])[None], grid, mode="bilinear", align_corners=False
    )[0]
    return both[:3].clamp_(0, 1), both[3:].clamp_(0, 1)


# -- photometric (image only) ---------------------------------------------------------------------
_LUMA = (0.299, 0.587, 0.114)


def color_jitter(
    image: torch.Tensor,
    gen: torch.Generator,
    *,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.4,
) -> torch.Tensor:
    """Random brightness, contrast and saturation factors in ``[1 - x, 1 + x]``."""
    b = _uniform(gen, 1 - brightness, 1 + brightness)
    c = _uniform(gen, 1 - contrast, 1 + contrast)
    s = _uniform(gen, 1 - saturation, 1 + saturation)
    luma = torch.tensor(_LUMA, dtype=image.dtype).view(3, 1, 1)
    x = image * b
    gray = (x * luma).sum(0, keepdim=True)
    x = (x - gray.mean()) * c + gray.mean()
    gray = (x * luma).sum(0, keepdim=True)
    x = (x - gray) * s + gray
    return x.clamp_(0, 1)


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur (radius ``ceil(3 sigma)``, reflected borders)."""
    if sigma <= 0:
        return image
    radius = max(1, math.ceil(3 * sigma))
    H, W = image.shape[-2:]
    radius = min(radius, H - 1, W - 1)
    if radius < 1:
        return image
    t = torch.arange(-radius, radius + 1, dtype=image.dtype)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    x = F.pad(image[None], (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
    x = F.conv2d(x, k.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)
    return x[0]


def gaussian_noise(image: torch.Tensor, gen: torch.Generator, std: float) -> torch.Tensor:
    """Add zero-mean Gaussian noise of standard deviation ``std``, clamped to [0, 1]."""
    noise = torch.randn(image.shape, generator=gen, dtype=image.dtype)
    return (image + noise * std).clamp_(0, 1)


@dataclass(frozen=True)
class StrongConfig:
    """The strong augmentation of pseudo-labelled samples (each part with probability
    ``p_*``)."""

    p_affine: float = 0.5
    degrees: float = 15.0
    p_jitter: float = 0.8
    jitter: float = 0.4
    p_blur: float = 0.3
    blur_sigma: tuple[float, float] = (0.1, 1.5)
    p_noise: float = 0.3
    noise_std: tuple[float, float] = (0.0, 0.05)


def strong_augment(
    image: torch.Tensor,
    target: torch.Tensor,
    gen: torch.Generator,
    cfg: StrongConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Affine warp (both), then colour jitter, blur and noise (image only)."""
    _check_pair(image, target)
    cfg = cfg or StrongConfig()
    if _uniform(gen, 0, 1) < cfg.p_affine:
        image, target = random_affine(image, target, gen, degrees=cfg.degrees)
    if _uniform(gen, 0, 1) < cfg.p_jitter:
        j = cfg.jitter
        image = color_jitter(image, gen, brightness=j, contrast=j, saturation=j)
    if _uniform(gen, 0, 1) < cfg.p_blur:
        image = gaussian_blur(image, _uniform(gen, *cfg.blur_sigma))
    if _uniform(gen, 0, 1) < cfg.p_noise:
        image = gaussian_noise(image, gen, _uniform(gen, *cfg.noise_std))
    return image, target


# -- per-sample pipeline ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ShrinkSpec:
    """Shrink-and-pad scale range (``lo == hi`` for a fixed scale)."""

    lo: float
    hi: float

    def draw(self, gen: torch.Generator) -> float:
        return self.lo if self.lo == self.hi else _uniform(gen, self.lo, self.hi)


def parse_shrink_spec(value: Any, default: ShrinkSpec | None = None) -> ShrinkSpec | None:
    """Read a manifest ``shrink_pad`` field: ``{"scale": s}`` (fixed), ``{"scale": [lo,
    hi]}`` (uniform), ``true`` (``default``) or null/false (none)."""
    if value is None or value is False:
        return None
    if value is True:
        return default
    scale = value.get("scale") if isinstance(value, Mapping) else None
    try:
        lo, hi = (float(scale), float(scale)) if not isinstance(scale, list) else map(float, scale)
        ok = 0.0 < lo <= hi <= 1.0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise DDError(
            f"bad shrink_pad value {value!r}",
            hint='write {"scale": 0.5} or {"scale": [0.3, 0.7]} with scales in (0, 1]',
        )
    return ShrinkSpec(lo, hi)


@dataclass(frozen=True)
class AugmentConfig:
    """The training transform of :func:`train_pair`."""

    size: tuple[int, int]
    crop_scale: tuple[float, float] = (0.5, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    shrink_prob: float = 0.5
    shrink_fill: float | str = 0.0
    strong: StrongConfig = StrongConfig()


def train_pair(
    image: torch.Tensor,
    target: torch.Tensor,
    gen: torch.Generator,
    cfg: AugmentConfig,
    *,
    strong: bool = False,
    shrink: ShrinkSpec | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random resized crop to ``cfg.size``, flip, then (with probability
    ``cfg.shrink_prob``, when ``shrink`` is given) shrink-and-pad at a random position, then
    the strong augmentation when ``strong``."""
    H, W = image.shape[-2:]
    box = crop_box(gen, H, W, cfg.crop_scale, cfg.crop_ratio)
    image, target = resized_crop(image, target, box, cfg.size)
    if cfg.hflip and _uniform(gen, 0, 1) < 0.5:
        image, target = hflip(image, target)
    if shrink is not None and _uniform(gen, 0, 1) < cfg.shrink_prob:
        scale = shrink.draw(gen)
        h, w = cfg.size
        sh, sw = max(1, round(h * scale)), max(1, round(w * scale))
        top = int(torch.randint(0, h - sh + 1, (), generator=gen))
        left = int(torch.randint(0, w - sw + 1, (), generator=gen))
        image, target = shrink_pad(image, target, scale, offset=(top, left), fill=cfg.shrink_fill)
    if strong:
        image, target = strong_augment(image, target, gen, cfg.strong)
    return image.contiguous(), target.contiguous()
