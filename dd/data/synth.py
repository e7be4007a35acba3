"""Synthetic artifact datasets: clean images, the same images with artifacts, exact masks.

What the artifacts model
    ``watermark``  text (varied fonts, sizes, opacity, rotation, position, tiled repeats,
                   outlines, shadows) and generated logos (rings, stars, emblems), blended
                   semi-transparently: the watermark artifact of DiffDoctor's taxonomy.
    ``warp``       a local geometric distortion of one region (swirl, bulge/pinch or an
                   elastic displacement field) that fades to nothing at its border.
    ``patch``      a region copied elsewhere in the same image (duplicated or misplaced
                   content), with a hard or feathered edge, possibly mirrored.
    ``smear``      an irregular blob that is strongly blurred or smudged along a direction,
                   blended in with a soft edge.

Each mask marks exactly the pixels the artifact changed. A pixel counts as changed when one
channel moved by more than ``TOL`` levels; smaller changes are reverted to the clean value, so
the mask and the pixel differences agree exactly. Blended artifacts carry soft values (the
glyph coverage of a watermark, the blob's alpha of a smear, the feathered alpha of a patch);
a warp's mask is 1 where it changed the pixel. A warp, smear or patch that would change
(almost) nothing, e.g. on a flat sky, is retried elsewhere and dropped if it never takes.

What they do not model
    The semantic failures of text-to-image models: extra or fused fingers, malformed hands,
    distorted faces and eyes, broken anatomy, garbled text that belongs to the scene, wrong
    physics. A detector trained only on this data learns to find synthetic watermarks, local
    warps, duplicated patches and smears; it is no hand/face artifact detector (for those,
    load the released DiffDoctor checkpoint or train on human-labelled data).

Clean images come from (a) procedural generators seeded per sample (gradients, fractal
textures, layered and partly defocused shapes, landscapes, checkers and stripes, with
optional grain), so hard edges, blur and text-free structure occur in negatives too and a
detector cannot separate the classes by such trivial cues; (b) scikit-image's bundled sample
photos when scikit-image is installed (read from the package's own files, never downloaded);
(c) a user folder of photos. Photos are random crops, rescales and mirrors.

Sample ``i`` draws everything from its own generator seeded with ``(seed, i)``: its output
depends neither on ``workers`` nor on ``count``. Whether it is a negative depends only on
``i`` and ``negative_ratio`` (exactly ``floor(n * ratio)`` of the first ``n`` samples are).
Outputs are bit-identical for the same arguments on the same machine (the set of installed
fonts and photos is part of the arguments).
"""

from __future__ import annotations

import colorsys
import functools
import hashlib
import importlib.util
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from PIL.PngImagePlugin import PngInfo

from dd.data.datasets import MANIFEST, Sample, save_mask, write_manifest
from dd.data.images import collect_inputs, image_size, load_image
from dd.errors import DDError
from dd.runtime.io import save_image_atomic, undo_if_nothing_written

__all__ = [
    "KINDS",
    "TOL",
    "Artifact",
    "SynthReport",
    "apply_artifact",
    "make_sample",
    "procedural_image",
    "synthesize",
]

#: Artifact kinds, in the order ``make_sample`` applies them (overlays last).
KINDS: tuple[str, ...] = ("warp", "patch", "smear", "watermark")
#: A pixel changed when some channel moved by more than this many 8-bit levels.
TOL = 2
#: Report row of the negatives. Their manifest category is null, so that a class-balancing
#: sampler (dd.data.sampler) treats them as shared negatives that every category draws from.
CLEAN = "clean"

_TRIES = 8
_FORMAT = 1  # bump when the generator changes so that resumed folders are regenerated
_TEXT_KEY = "dd-synth"
_PROCEDURAL = ("gradient", "texture", "shapes", "landscape", "pattern")
# scikit-image sample photos shipped inside the package (text/logo images left out).
_SKIMAGE_FILES = (
    "astronaut.png",
    "brick.png",
    "camera.png",
    "chelsea.png",
    "clock_motion.png",
    "coffee.png",
    "coins.png",
    "grass.png",
    "gravel.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "moon.png",
    "motorcycle_left.png",
    "retina.jpg",
    "rocket.jpg",
)
_FONT_DIRS = (
    "/usr/share/fonts",
    "/usr/local/share/fonts",
    "~/.fonts",
    "~/.local/share/fonts",
    "/Library/Fonts",
    "/System/Library/Fonts",
    "C:/Windows/Fonts",
)
_SYLLABLES = ("ka", "lo", "mi", "ra", "ten", "vo", "zu", "pix", "an", "el", "or", "sta", "ne")
_WORDS = (
    "SAMPLE",
    "PREVIEW",
    "PROOF",
    "DRAFT",
    "COPYRIGHT",
    "DO NOT COPY",
    "CONFIDENTIAL",
    "watermark",
    "stock",
    "photo",
    "studio",
    "images",
    "licensed",
    "demo",
)

Rng = np.random.Generator


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------


def _u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _changed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``H x W`` bool: where some channel of ``a`` and ``b`` differs by more than ``TOL``."""
    return np.abs(a.astype(np.int16) - b.astype(np.int16)).max(axis=2) > TOL


def _commit(img: np.ndarray, new: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keep only the changes above ``TOL``; the mask is ``weight`` there (at least 1/255)."""
    new8 = _u8(new)
    ch = _changed(new8, img)
    out = np.where(ch[..., None], new8, img)
    mask = np.where(ch, np.maximum(weight, 1.0 / 255.0), 0.0).astype(np.float32)
    return out, mask


def _min_pixels(h: int, w: int) -> int:
    return max(8, int(0.0008 * h * w))


def _noise(rng: Rng, h: int, w: int, cells: float, octaves: int = 1, gain: float = 0.5):
    """Fractal value noise in [0, 1]: bicubically upsampled random grids, summed by octave."""
    total = np.zeros((h, w), np.float32)
    amp = 1.0
    for o in range(octaves):
        c = cells * 2**o
        gh = max(2, round(c * h / max(h, w)) + 1)
        gw = max(2, round(c * w / max(h, w)) + 1)
        grid = Image.fromarray(rng.random((gh, gw)).astype(np.float32), mode="F")
        total += amp * np.asarray(grid.resize((w, h), Image.BICUBIC), np.float32)
        amp *= gain
    lo, hi = float(total.min()), float(total.max())
    return (total - lo) / (hi - lo) if hi > lo else np.full((h, w), 0.5, np.float32)


def _color(rng: Rng, s: tuple[float, float] = (0.15, 0.9), v=(0.2, 1.0)) -> np.ndarray:
    r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(*s), rng.uniform(*v))
    return np.array([r, g, b], np.float32) * 255.0


def _palette(t: np.ndarray, colors: Sequence[np.ndarray]) -> np.ndarray:
    """Map ``t`` in [0, 1] through colour stops spread evenly over [0, 1]."""
    xs = np.linspace(0.0, 1.0, len(colors))
    cs = np.stack(colors)
    return np.stack([np.interp(t, xs, cs[:, c]) for c in range(3)], axis=-1).astype(np.float32)


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalised coordinates: ``y`` in [0, 1) over the height, ``x`` over the width."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return yy / max(h, w), xx / max(h, w)


def _bilinear(img: np.ndarray, sy: np.ndarray, sx: np.ndarray) -> np.ndarray:
    """Sample float ``img`` (H x W x 3) at fractional coordinates, clamped to the border."""
    h, w = img.shape[:2]
    sx = np.clip(sx, 0, w - 1)
    sy = np.clip(sy, 0, h - 1)
    x0 = np.floor(sx).astype(np.intp)
    y0 = np.floor(sy).astype(np.intp)
    x1 = np.minimum(x0 + 1, w - 1)
    y1 = np.minimum(y0 + 1, h - 1)
    fx = (sx - x0)[..., None]
    fy = (sy - y0)[..., None]
    top = img[y0, x0] * (1 - fx) + img[y0, x1] * fx
    bottom = img[y1, x0] * (1 - fx) + img[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


# --------------------------------------------------------------------------------------------
# clean images
# --------------------------------------------------------------------------------------------


def procedural_image(rng: Rng, size: int | tuple[int, int] = 256) -> tuple[np.ndarray, str]:
    """A clean ``H x W x 3`` uint8 image drawn from ``rng``, and the generator's name.

    ``size`` is an int (square) or ``(height, width)``.
    """
    h, w = _hw(size)
    kind = _PROCEDURAL[int(rng.integers(len(_PROCEDURAL)))]
    img = {
        "gradient": _gen_gradient,
        "texture": _gen_texture,
        "shapes": _gen_shapes,
        "landscape": _gen_landscape,
        "pattern": _gen_pattern,
    }[kind](rng, h, w)
    if rng.random() < 0.3:
        radius = float(rng.uniform(0.4, 1.2))
        img = np.asarray(Image.fromarray(_u8(img)).filter(ImageFilter.GaussianBlur(radius)))
        img = img.astype(np.float32)
    if rng.random() < 0.5:
        img = img + rng.normal(0.0, rng.uniform(1.0, 4.0), img.shape[:2])[..., None]
    return _u8(img), kind


def _gen_gradient(rng: Rng, h: int, w: int) -> np.ndarray:
    yy, xx = _grid(h, w)
    if rng.random() < 0.5:
        a = rng.uniform(0, 2 * math.pi)
        t = xx * math.cos(a) + yy * math.sin(a)
    else:
        t = np.hypot(xx - rng.uniform(0, w / max(h, w)), yy - rng.uniform(0, h / max(h, w)))
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    t = t ** rng.uniform(0.6, 1.6)
    return _palette(t, [_color(rng) for _ in range(int(rng.integers(2, 5)))])


def _gen_texture(rng: Rng, h: int, w: int) -> np.ndarray:
    yy, xx = _grid(h, w)
    n = _noise(rng, h, w, rng.uniform(2, 8), int(rng.integers(3, 7)), rng.uniform(0.4, 0.65))
    style = int(rng.integers(3))
    if style == 0:  # clouds
        t = n
    elif style == 1:  # marble
        a = rng.uniform(0, math.pi)
        f = rng.uniform(2, 8)
        u = xx * math.cos(a) + yy * math.sin(a)
        t = 0.5 + 0.5 * np.sin(2 * math.pi * (f * u + rng.uniform(1, 4) * n))
    else:  # wood rings
        d = np.hypot(xx - rng.uniform(-0.5, 1.5), yy - rng.uniform(-0.5, 1.5))
        t = np.mod(d * rng.uniform(4, 14) + rng.uniform(0.5, 2) * n, 1.0)
    return _palette(t, [_color(rng) for _ in range(int(rng.integers(2, 5)))])


def _gen_shapes(rng: Rng, h: int, w: int) -> np.ndarray:
    bg = _gen_gradient(rng, h, w) if rng.random() < 0.5 else _gen_texture(rng, h, w)
    ss = 2  # supersampling for anti-aliased edges
    canvas = Image.fromarray(_u8(bg)).resize((w * ss, h * ss), Image.BILINEAR).convert("RGBA")
    side = min(h, w) * ss
    for _ in range(int(rng.integers(6, 30))):
        layer = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
        d = ImageDraw.Draw(layer)
        fill = (*(int(c) for c in _color(rng)), int(rng.integers(120, 256)))
        cx, cy = rng.uniform(0, w * ss), rng.uniform(0, h * ss)
        r = rng.uniform(0.03, 0.3) * side
        shape = int(rng.integers(4))
        if shape == 0:
            d.ellipse([cx - r, cy - r * rng.uniform(0.4, 1), cx + r, cy + r], fill=fill)
        elif shape == 1:
            d.rectangle([cx - r, cy - r * rng.uniform(0.3, 1), cx + r, cy + r], fill=fill)
        elif shape == 2:
            angles = np.sort(rng.uniform(0, 2 * math.pi, int(rng.integers(3, 8))))
            radii = r * rng.uniform(0.4, 1.0, len(angles))
            pts = [
                (cx + q * math.cos(a), cy + q * math.sin(a))
                for a, q in zip(angles, radii, strict=True)
            ]
            d.polygon(pts, fill=fill)
        else:
            a = rng.uniform(0, math.pi)
            dx, dy = r * math.cos(a), r * math.sin(a)
            d.line([cx - dx, cy - dy, cx + dx, cy + dy], fill=fill, width=max(1, int(r / 6)))
        if rng.random() < 0.3:  # out-of-focus shapes: blur occurs in clean images too
            layer = layer.filter(ImageFilter.GaussianBlur(rng.uniform(1, 6) * ss))
        canvas.alpha_composite(layer)
    return np.asarray(canvas.convert("RGB").resize((w, h), Image.LANCZOS), np.float32)


def _gen_landscape(rng: Rng, h: int, w: int) -> np.ndarray:
    yy = np.mgrid[0:h, 0:w][0].astype(np.float32)
    horizon = rng.uniform(0.3, 0.6) * h
    zenith, glow = _color(rng, (0.3, 0.8), (0.5, 1.0)), _color(rng, (0.1, 0.6), (0.8, 1.0))
    t = np.clip(yy / max(horizon, 1.0), 0, 1) ** rng.uniform(0.7, 1.5)
    img = zenith * (1 - t[..., None]) + glow * t[..., None]
    if rng.random() < 0.6:  # sun with a glow
        sy, sx, sr = rng.uniform(0.05, 0.5) * horizon, rng.uniform(0, w), rng.uniform(0.03, 0.1)
        d = np.hypot(yy - sy, np.mgrid[0:h, 0:w][1] - sx) / (sr * min(h, w))
        a = np.clip(1.5 - d, 0, 1)[..., None] * rng.uniform(0.6, 1.0)
        img = img * (1 - a) + np.array([255, 245, 215], np.float32) * a
    if rng.random() < 0.6:  # clouds
        c = np.clip((_noise(rng, h, w, rng.uniform(2, 5), 4) - 0.55) * 3, 0, 1)
        c *= np.clip(1 - yy / max(horizon, 1.0), 0, 1)
        img = img * (1 - c[..., None]) + 245 * c[..., None]
    layers = int(rng.integers(2, 5))
    for j in range(layers):
        depth = (j + 1) / layers  # 1 is the nearest
        ridge = _noise(rng, 1, w, rng.uniform(2, 6), 4)[0]
        base = horizon + depth * (h - horizon) * rng.uniform(0.1, 0.4)
        top = base - ridge * rng.uniform(0.1, 0.35) * h * (1.2 - 0.5 * depth)
        a = np.clip(yy - top[None, :] + 0.5, 0, 1)[..., None]
        col = _color(rng, (0.2, 0.7), (0.15, 0.7))
        col = col * depth + glow * (1 - depth) * 0.8  # aerial perspective
        tex = _noise(rng, h, w, rng.uniform(4, 16), 3)[..., None]
        shade = 1.0 - 0.25 * np.clip((yy - top[None, :]) / h, 0, 1)[..., None]
        img = img * (1 - a) + (col * (0.8 + 0.4 * tex) * shade) * a
    if rng.random() < 0.3:  # water reflecting the sky
        wl = rng.uniform(0.7, 0.9) * h
        ripples = _noise(rng, h, w, rng.uniform(1, 3), 2)
        ripples = np.asarray(
            Image.fromarray(ripples, mode="F").resize((w, max(1, h // 8))).resize((w, h))
        )
        water = zenith * 0.6 + glow * 0.3 * ripples[..., None]
        m = np.clip(yy - wl, 0, 1)[..., None]
        img = img * (1 - m) + water * m
    return img


def _gen_pattern(rng: Rng, h: int, w: int) -> np.ndarray:
    ss = 3
    yy, xx = np.mgrid[0 : h * ss, 0 : w * ss].astype(np.float32) / ss
    a = rng.uniform(0, math.pi)
    u = xx * math.cos(a) + yy * math.sin(a)
    v = -xx * math.sin(a) + yy * math.cos(a)
    p = rng.uniform(0.03, 0.2) * min(h, w)
    style = int(rng.integers(4))
    if style == 0:  # checker
        t = (np.floor(u / p) + np.floor(v / p)) % 2
    elif style == 1:  # stripes
        t = (np.floor(u / p) % 2).astype(np.float32)
    elif style == 2:  # soft sinusoidal stripes
        t = 0.5 + 0.5 * np.sin(2 * math.pi * u / p)
    else:  # dots
        t = (np.hypot(u % p - p / 2, v % p - p / 2) < p * rng.uniform(0.2, 0.45)).astype(float)
    t = t.reshape(h, ss, w, ss).mean(axis=(1, 3))
    img = _palette(t, [_color(rng), _color(rng)])
    light = _gen_gradient(rng, h, w).mean(axis=2, keepdims=True) / 255.0
    return img * (0.7 + 0.3 * light)


@functools.lru_cache(maxsize=128)
def _photo(path: str) -> np.ndarray:
    """A decoded photo, cached per process (the same few photos are cropped many times)."""
    return load_image(path)


def _crop_photo(
    rng: Rng,
    photo: np.ndarray,
    h: int,
    w: int,
    scale: tuple[float, float] | None = None,
) -> np.ndarray:
    """A random crop, resized to ``h x w``, mirrored half the time.

    Its side is a fraction of the largest crop with the target aspect: drawn uniformly from
    45-100 % by default, log-uniformly from ``scale`` = (low, high) when given (so that small
    details are as frequent as whole views).
    """
    ph, pw = photo.shape[:2]
    if scale is None:
        frac = rng.uniform(0.45, 1.0)
    else:
        frac = scale[0] * (scale[1] / scale[0]) ** rng.random()
    cw = max(4.0, frac * min(pw, ph * w / h))
    ch = cw * h / w
    x0, y0 = rng.uniform(0, max(pw - cw, 0)), rng.uniform(0, max(ph - ch, 0))
    im = Image.fromarray(photo).resize((w, h), Image.LANCZOS, box=(x0, y0, x0 + cw, y0 + ch))
    out = np.asarray(im)
    return out[:, ::-1].copy() if rng.random() < 0.5 else out.copy()


# --------------------------------------------------------------------------------------------
# artifacts
# --------------------------------------------------------------------------------------------


@dataclass
class Artifact:
    """One applied artifact: the new ``image``, its ``mask`` (H x W float32) and parameters."""

    image: np.ndarray
    mask: np.ndarray
    info: dict[str, Any]


#: Default opacity range of watermarks (uniform); the low end is hard to see.
WATERMARK_OPACITY: tuple[float, float] = (0.25, 0.85)


def apply_artifact(
    rng: Rng,
    image: np.ndarray,
    kind: str,
    *,
    watermark_opacity: tuple[float, float] = WATERMARK_OPACITY,
    watermark_fonts: Sequence[str] | None = None,
    watermark_texts: Sequence[str] | None = None,
) -> Artifact | None:
    """Apply one artifact of ``kind`` to a uint8 ``H x W x 3`` image (not modified in place).

    Returns ``None`` when no placement in ``_TRIES`` attempts changed enough pixels (e.g. a
    warp on a flat image). ``watermark_opacity``: (low, high) opacity range of watermarks;
    ``watermark_fonts`` (font files) and ``watermark_texts`` replace the built-in choices
    (a held-out set uses fonts and texts that training never saw).
    """
    fn = _ARTIFACTS.get(kind)
    if fn is None:
        raise DDError(f"unknown artifact kind {kind!r}", hint=f"use one of {', '.join(KINDS)}")
    image = np.ascontiguousarray(image, np.uint8)
    extra: dict[str, Any] = {}
    if kind == "watermark":
        extra = {"opacity": watermark_opacity, "fonts": watermark_fonts, "texts": watermark_texts}
    for _ in range(_TRIES):
        result = fn(rng, image, **extra)
        if result is not None:
            return result
    return None


def make_sample(
    rng: Rng,
    clean: np.ndarray,
    kinds: Iterable[str] = KINDS,
    *,
    watermark_opacity: tuple[float, float] = WATERMARK_OPACITY,
    watermark_fonts: Sequence[str] | None = None,
    watermark_texts: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """One to three artifacts (the same kind at most twice) on ``clean``.

    Returns ``(image uint8 H x W x 3, mask float32 H x W, categories)``; the mask is the
    maximum of the artifacts' masks and ``categories`` lists the kinds applied, the one with
    the largest mask area first. If none of the chosen kinds takes (a flat image), the other
    kinds are tried; if none takes at all, the mask is empty and ``categories`` is ``[]``.
    """
    kinds = _check_kinds(kinds)
    n = min(len(kinds), 1 + int(rng.random() < 0.35) + int(rng.random() < 0.1))
    chosen = {kinds[int(k)] for k in rng.choice(len(kinds), n, replace=False)}
    image = np.ascontiguousarray(clean, np.uint8).copy()
    mask = np.zeros(image.shape[:2], np.float32)
    area: dict[str, int] = {}

    def apply(kind: str) -> bool:
        nonlocal image, mask
        art = apply_artifact(
            rng,
            image,
            kind,
            watermark_opacity=watermark_opacity,
            watermark_fonts=watermark_fonts,
            watermark_texts=watermark_texts,
        )
        if art is None:
            return False
        image, mask = art.image, np.maximum(mask, art.mask)
        area[kind] = area.get(kind, 0) + int((art.mask > 0).sum())
        return True

    for kind in KINDS:
        if kind in chosen:
            for _ in range(1 + int(rng.random() < 0.25)):
                apply(kind)
    if not area:
        rest = [k for k in kinds if k not in chosen]
        for k in rng.permutation(len(rest)):
            if apply(rest[int(k)]):
                break
    cats = sorted(area, key=lambda k: (-area[k], KINDS.index(k)))
    return image, mask, cats


def _check_kinds(kinds: Iterable[str]) -> list[str]:
    """The valid kinds of ``kinds`` (an iterable or a comma-separated string) in KINDS order."""
    given = {k.strip() for k in kinds.split(",")} - {""} if isinstance(kinds, str) else set(kinds)
    ks = [k for k in KINDS if k in given]
    unknown = sorted(given - set(KINDS))
    if unknown or not ks:
        raise DDError(
            f"unknown or no artifact kinds: {', '.join(unknown) or '(none)'}",
            hint=f"choose from {', '.join(KINDS)}",
        )
    return ks


def _warp(rng: Rng, img: np.ndarray) -> Artifact | None:
    h, w = img.shape[:2]
    radius = rng.uniform(0.07, 0.22) * min(h, w)
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    y0, y1 = max(0, int(cy - radius)), min(h, int(math.ceil(cy + radius)) + 1)
    x0, x1 = max(0, int(cx - radius)), min(w, int(math.ceil(cx + radius)) + 1)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    r = np.hypot(dx, dy) / radius
    mode = ("swirl", "bulge", "elastic")[int(rng.integers(3))]
    if mode == "swirl":
        theta = rng.choice([-1, 1]) * rng.uniform(1.5, 5.0) * np.clip(1 - r, 0, 1) ** 2
        c, s = np.cos(theta), np.sin(theta)
        sx, sy = cx + dx * c - dy * s, cy + dx * s + dy * c
        params = {"strength": float(np.abs(theta).max())}
    elif mode == "bulge":
        gamma = rng.uniform(1.4, 2.2) if rng.random() < 0.5 else rng.uniform(0.45, 0.7)
        f = np.where(r < 1, np.maximum(r, 1e-3) ** (gamma - 1), 1.0)
        sx, sy = cx + dx * f, cy + dy * f
        params = {"gamma": float(gamma)}
    else:
        amp = rng.uniform(0.12, 0.3) * radius
        win = np.clip(1 - r**2, 0, 1) ** 2
        cells = rng.uniform(2, 5)
        nx = (_noise(rng, y1 - y0, x1 - x0, cells) - 0.5) * 2
        ny = (_noise(rng, y1 - y0, x1 - x0, cells) - 0.5) * 2
        sx, sy = xx + amp * nx * win, yy + amp * ny * win
        params = {"amplitude": float(amp)}
    new = img.astype(np.float32)
    new[y0:y1, x0:x1] = _bilinear(img.astype(np.float32), sy, sx)
    out, mask = _commit(img, new, np.ones((h, w), np.float32))
    if (mask > 0).sum() < _min_pixels(h, w):
        return None
    info = {"kind": "warp", "mode": mode, "center": [float(cy), float(cx)]}
    return Artifact(out, mask, {**info, "radius": float(radius), **params})


def _shape_alpha(rng: Rng, ph: int, pw: int, feather: float) -> tuple[np.ndarray, str]:
    """Alpha of a rectangle, ellipse or irregular blob filling a ``ph x pw`` box."""
    yy, xx = np.mgrid[0:ph, 0:pw].astype(np.float32) + 0.5
    shape = ("rect", "ellipse", "blob")[int(rng.integers(3))]
    if shape == "rect":
        sd = np.minimum(np.minimum(xx, pw - xx), np.minimum(yy, ph - yy))
    else:
        rn = np.hypot((xx - pw / 2) / (pw / 2), (yy - ph / 2) / (ph / 2))
        if shape == "blob":
            rn = rn / 0.8 + 0.5 * (_noise(rng, ph, pw, 2.5) - 0.5)
        sd = (1 - rn) * min(ph, pw) / 2
    alpha = np.clip(sd / feather, 0, 1) if feather > 0 else (sd > 0).astype(np.float32)
    return alpha.astype(np.float32), shape


def _patch(rng: Rng, img: np.ndarray) -> Artifact | None:
    h, w = img.shape[:2]
    ph = max(4, int(rng.uniform(0.1, 0.3) * h))
    pw = max(4, int(rng.uniform(0.1, 0.3) * w))
    sy, sx = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
    dy, dx = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
    if max(abs(dy - sy) / ph, abs(dx - sx) / pw) < 0.5:
        return None  # too close to its source to read as a duplicate
    feather = float(rng.uniform(1, 4)) if rng.random() < 0.5 else 0.0
    alpha, shape = _shape_alpha(rng, ph, pw, feather)
    flip = ("none", "h", "v")[int(rng.integers(3))]
    src = img[sy : sy + ph, sx : sx + pw]
    src = src[:, ::-1] if flip == "h" else src[::-1] if flip == "v" else src
    dst = img[dy : dy + ph, dx : dx + pw].astype(np.float32)
    a = alpha[..., None]
    out = img.copy()
    out[dy : dy + ph, dx : dx + pw] = _u8(dst * (1 - a) + src.astype(np.float32) * a)
    core = alpha >= 0.5
    moved = _changed(out[dy : dy + ph, dx : dx + pw], img[dy : dy + ph, dx : dx + pw])[core]
    if moved.sum() < _min_pixels(h, w) or moved.mean() < 0.5:
        return None  # pasted onto content that looks the same
    mask = np.zeros((h, w), np.float32)
    mask[dy : dy + ph, dx : dx + pw] = alpha
    info = {"kind": "patch", "src": [sy, sx], "dst": [dy, dx], "size": [ph, pw]}
    return Artifact(out, mask, {**info, "shape": shape, "flip": flip, "feather": feather})


def _smear(rng: Rng, img: np.ndarray) -> Artifact | None:
    h, w = img.shape[:2]
    radius = rng.uniform(0.06, 0.18) * min(h, w)
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    y0, y1 = max(0, int(cy - radius * 1.3)), min(h, int(cy + radius * 1.3) + 2)
    x0, x1 = max(0, int(cx - radius * 1.3)), min(w, int(cx + radius * 1.3) + 2)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    rot = rng.uniform(0, math.pi)
    u = (xx - cx) * math.cos(rot) + (yy - cy) * math.sin(rot)
    v = (-(xx - cx) * math.sin(rot) + (yy - cy) * math.cos(rot)) / rng.uniform(0.5, 1.0)
    s = np.hypot(u, v) / radius + 0.4 * (_noise(rng, y1 - y0, x1 - x0, 3.0) - 0.5)
    alpha = _smoothstep((1 - s) / rng.uniform(0.15, 0.4))
    f = img.astype(np.float32)
    if rng.random() < 0.5:
        mode = "blur"
        blur = float(rng.uniform(0.25, 0.6) * radius + 2)
        m = int(3 * blur) + 1
        ya, yb, xa, xb = max(0, y0 - m), min(h, y1 + m), max(0, x0 - m), min(w, x1 + m)
        crop = Image.fromarray(img[ya:yb, xa:xb]).filter(ImageFilter.GaussianBlur(blur))
        content = np.asarray(crop, np.float32)[y0 - ya : y1 - ya, x0 - xa : x1 - xa]
    else:
        mode = "smudge"
        a = rng.uniform(0, 2 * math.pi)
        length = rng.uniform(0.5, 1.2) * radius
        ts = np.linspace(0, length, 12)
        wts = np.linspace(1.0, 0.2, 12)
        content = (
            sum(
                wt * _bilinear(f, yy + t * math.sin(a), xx + t * math.cos(a))
                for t, wt in zip(ts, wts, strict=True)
            )
            / wts.sum()
        )
    new = f.copy()
    a3 = alpha[..., None]
    new[y0:y1, x0:x1] = f[y0:y1, x0:x1] * (1 - a3) + content * a3
    weight = np.zeros((h, w), np.float32)
    weight[y0:y1, x0:x1] = alpha
    out, mask = _commit(img, new, weight)
    core = weight >= 0.5
    if (mask > 0).sum() < _min_pixels(h, w) or (mask[core] > 0).mean() < 0.3:
        return None  # a smear of something already smooth
    info = {"kind": "smear", "mode": mode, "center": [float(cy), float(cx)]}
    return Artifact(out, mask, {**info, "radius": float(radius)})


# ---- scene text (a hard negative: text that belongs to the picture) ----


def _scene_text(rng: Rng, img: np.ndarray) -> np.ndarray:
    """Draw opaque text on a plate (a sign, label or caption board) into a clean image.

    Scene text is part of the picture, not an artifact: it is opaque, sits on a surface of
    its own and takes the scene's light and focus. A watermark is blended into whatever lies
    under it. Drawn on clean images so that a detector learns the difference.
    """
    h, w = img.shape[:2]
    side = min(h, w)
    # Words of signs and labels, never a watermark's (no handles, URLs or copyright lines).
    lines = [_scene_words(rng) for _ in range(int(rng.integers(1, 4)))]
    px = max(7, int(rng.uniform(0.05, 0.14) * side))
    glyphs = [_text_image(rng, line, px, style="fill") for line in lines]
    gap = max(1, px // 4)
    tw = max(g.width for g in glyphs)
    th = sum(g.height for g in glyphs) + gap * (len(glyphs) - 1)
    pad = int(px * rng.uniform(0.3, 0.8))
    pw, ph = tw + 2 * pad, th + 2 * pad
    if pw > w * 0.95:  # shrink the sign to fit the image
        scale = w * 0.95 / pw
        glyphs = [
            g.resize((max(1, int(g.width * scale)), max(1, int(g.height * scale))), Image.BICUBIC)
            for g in glyphs
        ]
        pad = max(1, int(pad * scale))
        gap = max(1, int(gap * scale))
        tw = max(g.width for g in glyphs)
        th = sum(g.height for g in glyphs) + gap * (len(glyphs) - 1)
        pw, ph = tw + 2 * pad, th + 2 * pad
    plate = Image.new("L", (pw, ph), 0)
    pd = ImageDraw.Draw(plate)
    radius = int(rng.uniform(0, 0.3) * min(pw, ph))
    pd.rounded_rectangle([0, 0, pw - 1, ph - 1], radius=radius, fill=255)
    ink = Image.new("L", (pw, ph), 0)
    y = pad
    for g in glyphs:
        x = pad + int(rng.uniform(0, 1) * (tw - g.width)) if rng.random() < 0.5 else pad
        ink.paste(g, (x, y))
        y += g.height + gap
    angle = float(rng.uniform(-12, 12)) if rng.random() < 0.6 else 0.0
    plate = plate.rotate(angle, resample=Image.BICUBIC, expand=True)
    ink = ink.rotate(angle, resample=Image.BICUBIC, expand=True)
    y0 = int(rng.integers(-plate.height // 5, max(1, h - plate.height * 4 // 5)))
    x0 = int(rng.integers(-plate.width // 5, max(1, w - plate.width * 4 // 5)))
    a_plate = np.zeros((h, w), np.float32)
    a_ink = np.zeros((h, w), np.float32)
    _place(a_plate, plate, y0, x0)
    _place(a_ink, ink, y0, x0)
    base = img.astype(np.float32)
    # The plate takes the scene's light: its colour is scaled by the local brightness.
    light = base.mean(axis=2, keepdims=True) / 255.0
    light = 0.55 + 0.45 * light / max(float(light.max()), 1e-3)
    plate_rgb = _color(rng, (0.0, 0.8), (0.15, 1.0))
    ink_rgb = 255.0 - plate_rgb if rng.random() < 0.7 else _color(rng, (0.3, 1.0), (0.1, 1.0))
    out = base * (1 - a_plate[..., None]) + (plate_rgb * light) * a_plate[..., None]
    out = out * (1 - a_ink[..., None]) + (ink_rgb * light) * a_ink[..., None]
    if rng.random() < 0.4:  # out of focus with the rest of the scene
        radius = float(rng.uniform(0.3, 1.0))
        blurred = np.asarray(Image.fromarray(_u8(out)).filter(ImageFilter.GaussianBlur(radius)))
        keep = a_plate[..., None] > 0
        out = np.where(keep, blurred.astype(np.float32), out)
    return _u8(out)


_SCENE_WORDS = (
    "OPEN",
    "EXIT",
    "CAFE",
    "STOP",
    "Main St",
    "Platform 3",
    "SALE",
    "No Parking",
    "Bakery",
    "Hotel",
    "PUSH",
    "Welcome",
    "Museum",
    "Route 66",
    "Fresh Fruit",
    "Gate B",
)


def _scene_words(rng: Rng) -> str:
    if rng.random() < 0.3:
        return str(int(rng.integers(1, 9999)))
    return _SCENE_WORDS[int(rng.integers(len(_SCENE_WORDS)))]


# ---- watermarks ----


@functools.lru_cache(maxsize=1)
def _font_files() -> tuple[str, ...]:
    """TrueType/OpenType fonts in standard system places (possibly none), sorted."""
    found: set[str] = set()
    for d in _FONT_DIRS:
        root = Path(os.path.expanduser(d))
        if root.is_dir():
            for p in root.rglob("*"):
                if p.suffix.lower() in (".ttf", ".otf") and p.is_file():
                    found.add(str(p))
    return tuple(sorted(found))


def _font(
    rng: Rng, px: int, fonts: Sequence[str] | None = None
) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """A font from ``fonts`` (default: the system's fonts and, twice as often, Pillow's)."""
    if fonts:
        return ImageFont.truetype(
            fonts[int(rng.integers(len(fonts)))], px, layout_engine=ImageFont.Layout.BASIC
        )
    files = _font_files()
    k = int(rng.integers(len(files) + 2))  # Pillow's own font counts twice
    if k < len(files):
        try:
            return ImageFont.truetype(files[k], px, layout_engine=ImageFont.Layout.BASIC)
        except OSError:
            pass
    try:
        return ImageFont.load_default(size=px)
    except TypeError:  # Pillow < 10.1: a fixed-size bitmap font (scaled in _text_image)
        return ImageFont.load_default()


def _text(rng: Rng, texts: Sequence[str] | None = None) -> str:
    if texts:
        return texts[int(rng.integers(len(texts)))]
    name = "".join(_SYLLABLES[int(i)] for i in rng.integers(len(_SYLLABLES), size=3))
    style = int(rng.integers(6))
    if style == 0:
        return _WORDS[int(rng.integers(len(_WORDS)))]
    if style == 1:
        return f"\u00a9 {name.capitalize()} {int(rng.integers(1995, 2031))}"
    if style == 2:
        return f"@{name}{int(rng.integers(100))}"
    if style == 3:
        return f"www.{name}.{('com', 'net', 'io', 'photo')[int(rng.integers(4))]}"
    if style == 4:
        return f"{name.upper()} {_WORDS[int(rng.integers(len(_WORDS)))].upper()}"
    return "".join(chr(int(c)) for c in rng.integers(65, 91, size=int(rng.integers(3, 9))))


def _text_image(
    rng: Rng, text: str, px: int, fonts: Sequence[str] | None = None, style: str | None = None
) -> Image.Image:
    """White-on-black ``L`` image of ``text`` about ``px`` tall (fill, bold or outline)."""
    font = _font(rng, px, fonts)
    if style is None:
        style = ("fill", "bold", "outline")[int(rng.integers(3))]
    stroke = max(1, px // 14) if style != "fill" else 0
    left, top, right, bottom = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox(
        (0, 0), text, font=font, stroke_width=stroke
    )
    pad = 2
    im = Image.new("L", (right - left + 2 * pad, bottom - top + 2 * pad), 0)
    d = ImageDraw.Draw(im)
    d.text((pad - left, pad - top), text, font=font, fill=255, stroke_width=stroke, stroke_fill=255)
    if style == "outline":
        d.text((pad - left, pad - top), text, font=font, fill=0)
    if not isinstance(font, ImageFont.FreeTypeFont):
        scale = px / max(1, im.height)
        im = im.resize((max(1, round(im.width * scale)), max(1, round(px))), Image.BICUBIC)
    return im


def _logo_image(rng: Rng, px: int, fonts: Sequence[str] | None = None) -> Image.Image:
    """A generated emblem (ring, star, polygon, badge, ...) rendered at 4x and downsampled."""
    s = px * 4
    im = Image.new("L", (s, s), 0)
    d = ImageDraw.Draw(im)
    c, r = s / 2, s / 2 - 2
    shape = ("circle", "ring", "star", "polygon", "badge")[int(rng.integers(5))]

    def star(n: int, r_in: float, r_out: float, rot: float) -> list[tuple[float, float]]:
        return [
            (c + q * math.cos(rot + k * math.pi / n), c + q * math.sin(rot + k * math.pi / n))
            for k, q in zip(range(2 * n), [r_out, r_in] * n, strict=True)
        ]

    rot = rng.uniform(0, 2 * math.pi)
    if shape == "circle":
        d.ellipse([c - r, c - r, c + r, c + r], fill=255)
    elif shape == "ring":
        d.ellipse([c - r, c - r, c + r, c + r], outline=255, width=max(2, int(r * 0.15)))
    elif shape == "star":
        d.polygon(star(int(rng.integers(5, 9)), r * rng.uniform(0.35, 0.6), r, rot), fill=255)
    elif shape == "polygon":
        n = int(rng.integers(3, 9))
        d.polygon(
            [
                (
                    c + r * math.cos(rot + 2 * math.pi * k / n),
                    c + r * math.sin(rot + 2 * math.pi * k / n),
                )
                for k in range(n)
            ],
            fill=255,
        )
    else:
        d.rounded_rectangle([2, s * 0.2, s - 2, s * 0.8], radius=s * 0.15, fill=255)
    inner = int(rng.integers(3))
    ink = 0 if shape != "ring" else 255
    if inner == 0:  # initials
        letters = "".join(chr(int(k)) for k in rng.integers(65, 91, size=int(rng.integers(1, 3))))
        font = _font(rng, int(s * 0.4), fonts)
        d.text((c, c), letters, font=font, fill=ink, anchor="mm")
    elif inner == 1:  # inner ring
        q = r * rng.uniform(0.45, 0.7)
        d.ellipse([c - q, c - q, c + q, c + q], outline=ink, width=max(2, int(r * 0.08)))
    return im.resize((px, px), Image.LANCZOS)


def _place(canvas: np.ndarray, layer: Image.Image, y: int, x: int) -> None:
    """Max-composite ``layer`` (L, 0-255) into the float ``canvas`` at (y, x), clipped."""
    arr = np.asarray(layer, np.float32) / 255.0
    h, w = canvas.shape
    lh, lw = arr.shape
    ya, xa = max(0, y), max(0, x)
    yb, xb = min(h, y + lh), min(w, x + lw)
    if ya < yb and xa < xb:
        sub = canvas[ya:yb, xa:xb]
        np.maximum(sub, arr[ya - y : yb - y, xa - x : xb - x], out=sub)


def _tiled(rng: Rng, text_im: Image.Image, h: int, w: int) -> np.ndarray:
    """``text_im`` repeated on a staggered grid, rotated, cropped to ``h x w``."""
    tw, th = text_im.size
    gx, gy = int(tw * rng.uniform(0.2, 1.0)) + 4, int(th * rng.uniform(0.8, 3.0)) + 4
    big = int(math.hypot(h, w)) + 2 * (tw + th)
    sheet = Image.new("L", (big, big), 0)
    ox, oy = int(rng.integers(tw + gx)), int(rng.integers(th + gy))
    for row, y in enumerate(range(-oy, big, th + gy)):
        shift = (tw + gx) // 2 if row % 2 else 0
        for x in range(-ox - shift, big, tw + gx):
            sheet.paste(text_im, (x, y))
    sheet = sheet.rotate(rng.uniform(-50, 50), resample=Image.BICUBIC)
    left, top = (big - w) // 2, (big - h) // 2
    return np.asarray(sheet.crop((left, top, left + w, top + h)), np.float32) / 255.0


def _watermark_color(rng: Rng) -> np.ndarray:
    pick = rng.random()
    if pick < 0.35:
        return np.full(3, 255.0, np.float32)
    if pick < 0.55:
        return np.zeros(3, np.float32)
    if pick < 0.7:
        return np.full(3, rng.uniform(60, 200), np.float32)
    return _color(rng, (0.4, 1.0), (0.4, 1.0))


def _watermark(
    rng: Rng,
    img: np.ndarray,
    opacity: tuple[float, float] = WATERMARK_OPACITY,
    fonts: Sequence[str] | None = None,
    texts: Sequence[str] | None = None,
) -> Artifact | None:
    h, w = img.shape[:2]
    side = min(h, w)
    mode = ("text", "tiled", "logo", "logo+text")[int(rng.choice(4, p=[0.4, 0.25, 0.2, 0.15]))]
    cov = np.zeros((h, w), np.float32)

    def place_anywhere(layer: Image.Image) -> None:
        y = int(rng.integers(-layer.height // 4, max(1, h - layer.height * 3 // 4)))
        x = int(rng.integers(-layer.width // 4, max(1, w - layer.width * 3 // 4)))
        _place(cov, layer, y, x)

    if mode in ("text", "tiled", "logo+text"):
        px = max(8, int(rng.uniform(0.04, 0.16 if mode == "tiled" else 0.2) * side))
        text_im = _text_image(rng, _text(rng, texts), px, fonts)
        if text_im.width > w * 0.95:  # keep a single text line inside the image width
            scale = w * 0.95 / text_im.width
            text_im = text_im.resize(
                (max(1, int(text_im.width * scale)), max(1, int(text_im.height * scale))),
                Image.BICUBIC,
            )
        if mode == "tiled":
            cov = _tiled(rng, text_im, h, w)
        else:
            angle = rng.uniform(-45, 45) if rng.random() < 0.5 else 0.0
            place_anywhere(text_im.rotate(angle, resample=Image.BICUBIC, expand=True))
    if mode in ("logo", "logo+text"):
        logo = _logo_image(rng, max(10, int(rng.uniform(0.12, 0.35) * side)), fonts)
        place_anywhere(logo.rotate(rng.uniform(-30, 30), resample=Image.BICUBIC))
    color, alpha = _watermark_color(rng), rng.uniform(*opacity)
    new = img.astype(np.float32)
    weight = cov
    if rng.random() < 0.25:  # a drop shadow in the opposite tone
        oy, ox = (int(v) for v in rng.integers(1, 4, size=2))
        shadow = np.zeros_like(cov)
        shadow[oy:, ox:] = cov[: h - oy, : w - ox]
        shade = 255.0 - color.mean()
        a = (shadow * rng.uniform(0.3, 0.6))[..., None]
        new = new * (1 - a) + shade * a
        weight = np.maximum(cov, shadow)
    a = (cov * alpha)[..., None]
    new = new * (1 - a) + color * a
    out, mask = _commit(img, new, weight)
    if (mask > 0).sum() < _min_pixels(h, w):
        return None
    return Artifact(out, mask, {"kind": "watermark", "mode": mode, "opacity": float(alpha)})


_ARTIFACTS: dict[str, Callable[[Rng, np.ndarray], Artifact | None]] = {
    "warp": _warp,
    "patch": _patch,
    "smear": _smear,
    "watermark": _watermark,
}


# --------------------------------------------------------------------------------------------
# datasets on disk
# --------------------------------------------------------------------------------------------


@dataclass
class SynthReport:
    """What ``synthesize`` wrote.

    ``clean_sources``: pool -> size (``procedural``: generators; ``skimage``/``photos``:
    photos). ``categories``: manifest category (``clean`` for the negatives, which have
    none) -> ``samples``, ``procedural``, ``photo``
    (counts by origin) and ``coverage`` (mean fraction of mask pixels > 0).
    ``artifacts``: kind -> number of samples it was applied to (combined ones included).
    """

    out: Path
    manifest: Path
    samples: int
    generated: int
    resumed: int
    seconds: float
    clean_sources: dict[str, int]
    categories: dict[str, dict[str, float]] = field(default_factory=dict)
    artifacts: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class _Plan:
    out: str
    size: tuple[int, int]
    seed: int
    kinds: tuple[str, ...]
    negative_ratio: Fraction
    watermark_opacity: tuple[float, float]
    photos: tuple[tuple[str, str, str], ...]  # (pool: "skimage" | "photos", path, label)
    fingerprint: str
    photo_scale: tuple[float, float] | None = None
    scene_text: float = 0.0
    procedural_share: float | None = None


def _hw(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int | np.integer):
        return int(size), int(size)
    h, w = (int(v) for v in size)
    return h, w


def _skimage_photos() -> list[tuple[str, str, str]]:
    """scikit-image's bundled sample photos (skimage is not imported, nothing is downloaded)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        return []
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    return [("skimage", str(data / f), f) for f in _SKIMAGE_FILES if (data / f).is_file()]


def _user_photos(photos_dir: Path) -> list[tuple[str, str, str]]:
    if not photos_dir.is_dir():
        raise DDError(
            f"photos folder not found: {photos_dir}", hint="--photos takes a folder of images"
        )
    items, _ = collect_inputs([str(photos_dir)])
    if not items:
        raise DDError(f"no images in {photos_dir}", hint="--photos takes a folder of images")
    # Every photo is opened (its header) before --out is touched: a corrupt one is named
    # now, not after a partial dataset was written with settings that include it.
    for it in items:
        try:
            image_size(it.path)
        except DDError as e:
            raise DDError(e.message, hint=f"remove or replace it in {photos_dir}") from None
    return [("photos", str(it.path), it.path.relative_to(photos_dir).as_posix()) for it in items]


def _is_negative(i: int, ratio: Fraction) -> bool:
    return math.floor((i + 1) * ratio) > math.floor(i * ratio)


def _render(plan: _Plan, i: int) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """Sample ``i``: its image, its mask (``None`` for a negative) and its record."""
    rng = np.random.default_rng([plan.seed, i])
    h, w = plan.size
    negative = _is_negative(i, plan.negative_ratio)
    pools = ["procedural"] + sorted({pool for pool, _, _ in plan.photos})
    for _ in range(_TRIES):
        if plan.procedural_share is None:
            pool = pools[int(rng.integers(len(pools)))]
        elif not plan.photos or rng.random() < plan.procedural_share:
            pool = "procedural"
        else:  # every photo equally likely, whichever pool it is in
            pool, path, name = plan.photos[int(rng.integers(len(plan.photos)))]
        if pool == "procedural":
            clean, name = procedural_image(rng, (h, w))
            origin, label = "procedural", f"procedural:{name}"
        else:
            if plan.procedural_share is None:
                choices = [(p, name) for q, p, name in plan.photos if q == pool]
                path, name = choices[int(rng.integers(len(choices)))]
            clean = _crop_photo(rng, _photo(path), h, w, plan.photo_scale)
            origin, label = "photo", f"{pool}:{name}"
        rec: dict[str, Any] = {"index": i, "origin": origin, "clean": label}
        if plan.scene_text and rng.random() < plan.scene_text:
            clean = _scene_text(rng, clean)
            rec["scene_text"] = True
        if negative:
            rec.update(source="real", category=None, artifacts=[], coverage=0.0)
            return clean, None, rec
        image, mask, cats = make_sample(
            rng, clean, plan.kinds, watermark_opacity=plan.watermark_opacity
        )
        if cats:
            coverage = round(float((mask > 0).mean()), 5)
            rec.update(source="synthetic", category=cats[0], artifacts=cats, coverage=coverage)
            return image, mask, rec
    raise DDError(
        f"sample {i}: none of the kinds {', '.join(plan.kinds)} changed any clean image drawn",
        hint="the photos may be flat; add 'watermark' to --kinds or use other photos",
    )


def _paths(out: Path, i: int) -> tuple[Path, Path]:
    return out / "images" / f"{i:06d}.png", out / "masks" / f"{i:06d}.png"


def _produce(plan: _Plan, i: int) -> dict[str, Any]:
    """Render sample ``i`` and write its files atomically: the mask first, the image last."""
    out = Path(plan.out)
    image, mask, rec = _render(plan, i)
    img_path, mask_path = _paths(out, i)
    if mask is not None:
        save_mask(mask_path, mask)
    else:
        mask_path.unlink(missing_ok=True)
    rec = {**rec, "fingerprint": plan.fingerprint}
    info = PngInfo()
    info.add_text(_TEXT_KEY, json.dumps(rec, sort_keys=True))
    save_image_atomic(Image.fromarray(image), img_path, pnginfo=info)
    return rec


def _existing(plan: _Plan, i: int) -> dict[str, Any] | None:
    """The record of sample ``i`` if its files exist and were made with the same plan."""
    img_path, mask_path = _paths(Path(plan.out), i)
    if not img_path.is_file():
        return None
    try:
        with Image.open(img_path) as im:
            rec = json.loads(im.info.get(_TEXT_KEY, "null"))
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict) or rec.get("fingerprint") != plan.fingerprint:
        return None
    if rec.get("source") == "synthetic" and not mask_path.is_file():
        return None
    return rec


SYNTH_RECORD = ".dd/synth.json"


def _claim_out(plan: _Plan, count: int, overwrite: bool) -> None:
    """Refuse to write into a folder that holds other data (see :func:`synthesize`)."""
    from dd.runtime.io import atomic_write_json, output_dir

    out = Path(plan.out)
    output_dir(out)
    record_path = out / SYNTH_RECORD
    entries = [p for p in out.iterdir() if p.name != ".dd"]
    record: dict[str, Any] | None = None
    if record_path.is_file():
        try:
            record = json.loads(record_path.read_text())
        except ValueError:
            record = None
    elif entries:
        # A dataset synth wrote before it kept a record: adopt it when every row of its
        # manifest is a sample of this very plan.
        rows = _manifest_rows(out)
        if rows and all(_existing(plan, i) is not None for i in range(rows)):
            record = {"fingerprint": plan.fingerprint, "count": rows}
    if entries and record is None:
        raise DDError(
            f"{out} is not empty and was not written by dd synth",
            hint="choose a new or empty --out folder (nothing there was changed)",
        )
    if record is not None and entries:
        same = record.get("fingerprint") == plan.fingerprint
        if not same and not overwrite:
            raise DDError(
                f"{out} holds a dd synth dataset made with other settings",
                hint="rerun with its settings to resume, pass --overwrite to replace it, "
                "or choose a new --out",
            )
        if same and count < int(record.get("count", 0)) and not overwrite:
            raise DDError(
                f"{out} holds {record['count']} samples; --count {count} would drop some",
                hint=f"pass --count {record['count']} (or more), or --overwrite",
            )
        if not same or count < int(record.get("count", 0)):
            import shutil

            for sub in ("images", "masks"):
                shutil.rmtree(out / sub, ignore_errors=True)
            (out / MANIFEST).unlink(missing_ok=True)
    (out / "images").mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        record_path, {"command": "synth", "fingerprint": plan.fingerprint, "count": count}
    )


def _manifest_rows(out: Path) -> int:
    try:
        return sum(1 for line in (out / MANIFEST).read_text().splitlines() if line.strip())
    except OSError:
        return 0


def _fingerprint(plan_args: dict[str, Any]) -> str:
    blob = json.dumps({**plan_args, "format": _FORMAT, "fonts": _font_files()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def synthesize(
    out: Path,
    count: int,
    *,
    size: int | tuple[int, int] = 256,
    seed: int = 0,
    kinds: Iterable[str] = KINDS,
    negative_ratio: float = 0.3,
    photos_dir: Path | None = None,
    use_skimage: bool = True,
    workers: int = 1,
    progress: bool = True,
    watermark_opacity: tuple[float, float] = WATERMARK_OPACITY,
    photo_scale: tuple[float, float] | None = None,
    scene_text: float = 0.0,
    procedural_share: float | None = None,
    overwrite: bool = False,
) -> SynthReport:
    """Write ``count`` samples (``images/``, ``masks/``, ``manifest.jsonl``) to ``out``.

    ``size`` is an int or ``(height, width)``. Negatives (``floor(n * negative_ratio)`` of the
    first ``n``) are clean images with source ``real`` and no category; positives have
    source ``synthetic`` and the category of their largest artifact. Each manifest line also
    carries ``origin`` (``procedural`` | ``photo``), ``clean`` (the generator or photo),
    ``artifacts`` (every kind applied) and ``coverage`` (fraction of mask pixels > 0).

    Resumable: a sample whose files exist from a run with the same arguments is kept as it
    is; the manifest is rewritten atomically at the end, in sample order. ``out`` must be
    new, empty, or a synth dataset of the same settings (``count`` may grow); another synth
    dataset is replaced only with ``overwrite``, and a folder synth did not write never.
    ``workers > 1`` renders in that many processes, with bit-identical results.

    Hard negatives: ``photo_scale`` = (low, high) crops photos at sides drawn log-uniformly
    between those fractions of the largest crop (default: 45-100 %, uniformly), so that
    close-ups of texture are as frequent as whole views; ``scene_text`` is the probability
    that a clean image (negative or not) gets opaque text on a sign or label, which is part
    of the picture and never in a mask. ``procedural_share``: the probability that a clean
    image is procedural; the others are drawn from all photos alike (default: each pool,
    procedural included, equally often, then a photo of that pool).
    """
    start = time.perf_counter()
    out = Path(out)
    h, w = _hw(size)
    if count < 1:
        raise DDError(f"count must be at least 1, got {count}")
    if min(h, w) < 32:
        raise DDError(f"size must be at least 32 pixels, got {h}x{w}")
    if seed < 0:
        raise DDError(f"seed must be >= 0, got {seed}")
    if not 0.0 <= negative_ratio <= 1.0:
        raise DDError(f"negative ratio must be in [0, 1], got {negative_ratio}")
    if workers < 1:
        raise DDError(f"workers must be at least 1, got {workers}")
    ks = tuple(_check_kinds(kinds))
    lo, hi = (float(v) for v in watermark_opacity)
    if not 0.0 < lo <= hi <= 1.0:
        raise DDError(
            f"watermark opacity range must satisfy 0 < low <= high <= 1, got {lo}-{hi}",
            hint="e.g. --watermark-opacity 0.6-1.0",
        )
    if photo_scale is not None:
        plo, phi = (float(v) for v in photo_scale)
        if not 0.0 < plo <= phi <= 1.0:
            raise DDError(
                f"photo scale range must satisfy 0 < low <= high <= 1, got {plo}-{phi}",
                hint="e.g. --photo-scale 0.05-1.0",
            )
        photo_scale = (plo, phi)
    if procedural_share is not None and not 0.0 <= procedural_share <= 1.0:
        raise DDError(f"procedural share must be in [0, 1], got {procedural_share}")
    if not 0.0 <= scene_text <= 1.0:
        raise DDError(f"scene text probability must be in [0, 1], got {scene_text}")
    ratio = Fraction(negative_ratio).limit_denominator(10**6)
    photos = _skimage_photos() if use_skimage else []
    if photos_dir is not None:
        photos += _user_photos(Path(os.path.abspath(photos_dir)))
    photo_ids = [(q, name, os.path.getsize(p)) for q, p, name in photos]
    plan_args: dict[str, Any] = {
        "size": [h, w],
        "seed": seed,
        "kinds": ks,
        "ratio": str(ratio),
        "photos": photo_ids,
    }
    if (lo, hi) != WATERMARK_OPACITY:  # default datasets keep their fingerprints
        plan_args["watermark_opacity"] = [lo, hi]
    if photo_scale is not None:
        plan_args["photo_scale"] = list(photo_scale)
    if scene_text:
        plan_args["scene_text"] = scene_text
    if procedural_share is not None:
        plan_args["procedural_share"] = procedural_share
    fp = _fingerprint(plan_args)
    plan = _Plan(
        str(out),
        (h, w),
        seed,
        ks,
        ratio,
        (lo, hi),
        tuple(photos),
        fp,
        photo_scale,
        scene_text,
        procedural_share,
    )

    with undo_if_nothing_written(out):
        _claim_out(plan, count, overwrite)
        return _synthesize(plan, count, photos, start, progress, workers)


def _synthesize(
    plan: _Plan,
    count: int,
    photos: list[tuple[str, str, str]],
    start: float,
    progress: bool,
    workers: int,
) -> SynthReport:
    out = Path(plan.out)
    records: list[dict[str, Any] | None] = [_existing(plan, i) for i in range(count)]
    todo = [i for i, r in enumerate(records) if r is None]
    resumed = count - len(todo)

    from rich.console import Console

    from dd.runtime.progress import progress_or_quiet

    console = Console(stderr=True) if progress else None
    with progress_or_quiet("synth", console=console) as bar:
        task = bar.add_task("synth", total=count, completed=resumed)
        if workers == 1 or len(todo) < 2:
            for i in todo:
                records[i] = _produce(plan, i)
                bar.advance(task)
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor, as_completed

            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(min(workers, len(todo)), mp_context=ctx) as pool:
                futures = {pool.submit(_produce, plan, i): i for i in todo}
                for fut in as_completed(futures):
                    records[futures[fut]] = fut.result()
                    bar.advance(task)

    samples = []
    for i, rec in enumerate(records):
        assert rec is not None
        img_path, mask_path = _paths(out, i)
        meta = {k: rec[k] for k in ("index", "origin", "clean", "artifacts", "coverage")}
        if rec.get("scene_text"):
            meta["scene_text"] = True
        mask = mask_path if rec["source"] == "synthetic" else None
        samples.append(Sample(img_path, mask, rec["source"], rec["category"], 1.0, meta))
    manifest = write_manifest(out, samples)
    return _report(out, manifest, records, len(todo), resumed, time.perf_counter() - start, photos)


def _report(
    out: Path,
    manifest: Path,
    records: list[Any],
    generated: int,
    resumed: int,
    seconds: float,
    photos: list[tuple[str, str, str]],
) -> SynthReport:
    cats: dict[str, dict[str, float]] = {}
    arts: dict[str, int] = {}
    for rec in records:
        row = cats.setdefault(
            rec["category"] or CLEAN, {"samples": 0, "procedural": 0, "photo": 0, "coverage": 0.0}
        )
        row["samples"] += 1
        row[rec["origin"]] += 1
        row["coverage"] += rec["coverage"]
        for k in rec["artifacts"]:
            arts[k] = arts.get(k, 0) + 1
    for row in cats.values():
        row["coverage"] = row["coverage"] / row["samples"]
    sources = {"procedural": len(_PROCEDURAL)}
    for pool, _, _ in photos:
        sources[pool] = sources.get(pool, 0) + 1
    order = {k: n for n, k in enumerate((*KINDS, CLEAN))}
    return SynthReport(
        out=out,
        manifest=manifest,
        samples=len(records),
        generated=generated,
        resumed=resumed,
        seconds=seconds,
        clean_sources=sources,
        categories=dict(sorted(cats.items(), key=lambda kv: order.get(kv[0], len(order)))),
        artifacts=dict(sorted(arts.items(), key=lambda kv: order[kv[0]])),
    )
