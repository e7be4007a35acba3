"""Artifact datasets: images with per-pixel artifact maps (see ``docs/datasets.md``).

Layout of a dataset folder::

    DATASET/
      images/   any image format dd reads (sub-folders allowed)
      masks/    8-bit grayscale PNGs with the same relative stem: 0-255 = confidence 0-1
      manifest.jsonl   optional, one JSON object per sample

An image without a mask is a negative (artifact-free, e.g. a real photo). Manifest fields:
``image`` and ``mask`` (paths relative to the dataset folder; ``mask`` may be null),
``source`` (``human`` | ``pseudo`` | ``real`` | ``synthetic``), ``category`` (free text:
hand, face, text, animal, watermark, ...), ``weight`` (float, default 1), and anything else
(kept in ``meta``, e.g. ``prompt``, ``shrink_pad``). When a manifest exists it lists the
samples; otherwise every image under ``images/`` is a sample.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dd.data.images import IMAGE_SUFFIXES
from dd.errors import DDError
from dd.runtime.io import atomic_write_text, check_complete

SOURCES = ("human", "pseudo", "real", "synthetic")
MANIFEST = "manifest.jsonl"
_CORE = {"image", "mask", "source", "category", "weight"}


@dataclass
class Sample:
    image: Path
    mask: Path | None = None
    source: str = "human"
    category: str | None = None
    weight: float = 1.0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def positive(self) -> bool:
        """Shows an artifact: the manifest's ``positive`` field when it has one (``dd label
        pseudo`` decides it from the map's maximum, ``positive_threshold``), else whether
        it has a mask file (a human label's mask marks an artifact)."""
        if "positive" in self.meta:
            return bool(self.meta["positive"])
        return self.mask is not None

    def to_json(self, root: Path) -> dict[str, Any]:
        d = asdict(self)
        d["image"] = _rel(self.image, root)
        d["mask"] = _rel(self.mask, root) if self.mask is not None else None
        meta = d.pop("meta")
        return {**meta, **d}


def _rel(p: Path, root: Path) -> str:
    try:
        return p.relative_to(root).as_posix()
    except ValueError:
        return str(p)


def read_dataset(root: str | Path, *, allow_incomplete: bool = False) -> list[Sample]:
    """Samples of a dataset folder, from its manifest or by scanning ``images/``; a folder
    that a dd command did not finish writing is refused (unless ``allow_incomplete``)."""
    from dd.data.shards import is_shard_spec

    if is_shard_spec(str(root)):  # WebDataset shards: masks beside their images
        return _read_shards(str(root))
    root = Path(root)
    if not root.is_dir():
        raise DDError(
            f"dataset folder not found: {root}",
            hint="a dataset is a folder with images/ and masks/ (docs/datasets.md)",
        )
    if not allow_incomplete:
        check_complete(root)
    manifest = root / MANIFEST
    if manifest.exists():
        return _read_manifest(root, manifest)
    images_dir = root / "images"
    if not images_dir.is_dir():
        raise DDError(
            f"{root} has no images/ folder and no {MANIFEST}",
            hint="see docs/datasets.md for the dataset layout",
        )
    masks_dir = root / "masks"
    samples = []
    for img in sorted(p for p in images_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        rel = img.relative_to(images_dir).with_suffix(".png")
        mask = masks_dir / rel
        samples.append(
            Sample(
                image=img,
                mask=mask if mask.exists() else None,
                source="human" if mask.exists() else "real",
            )
        )
    if not samples:
        raise DDError(f"no images found under {images_dir}")
    return samples


def _read_shards(spec: str) -> list[Sample]:
    """The samples of shards: the ``.json`` fields as a manifest line's; a sample without a
    mask and without a ``source`` is a real photo (a negative), as img2dataset's are."""
    from dd.data.shards import shard_records

    samples = []
    for image, mask, meta in shard_records(spec):
        fields = {k: v for k, v in meta.items() if k not in ("mask", "image")}
        source = str(fields.pop("source", "pseudo" if mask is not None else "real"))
        category = fields.pop("category", None)
        weight = float(fields.pop("weight", 1.0))
        samples.append(Sample(image, mask, source, category, weight, fields))
    return samples


def _read_manifest(root: Path, manifest: Path) -> list[Sample]:
    samples = []
    for n, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            rec = json.loads(line)
            image = root / rec["image"]
        except (ValueError, KeyError, TypeError) as e:
            raise DDError(
                f"{manifest}:{n}: bad manifest line ({type(e).__name__}: {e})",
                hint="each line is a JSON object with at least an 'image' field",
            ) from None
        mask = root / rec["mask"] if rec.get("mask") else None
        source = rec.get("source") or ("human" if mask else "real")
        if source not in SOURCES:
            raise DDError(
                f"{manifest}:{n}: unknown source {source!r}",
                hint=f"use one of {', '.join(SOURCES)}",
            )
        try:
            weight = float(rec.get("weight", 1.0))
        except (TypeError, ValueError):
            raise DDError(f"{manifest}:{n}: weight must be a number") from None
        meta = {k: v for k, v in rec.items() if k not in _CORE}
        samples.append(Sample(image, mask, source, rec.get("category"), weight, meta))
    if not samples:
        raise DDError(f"{manifest} lists no samples")
    return samples


def write_manifest(root: str | Path, samples: Iterable[Sample]) -> Path:
    """Write ``manifest.jsonl`` atomically (paths relative to ``root`` where possible)."""
    root = Path(root)
    text = "".join(json.dumps(s.to_json(root), sort_keys=True) + "\n" for s in samples)
    atomic_write_text(root / MANIFEST, text)
    return root / MANIFEST


def load_mask(path: str | Path | None, size: tuple[int, int]) -> np.ndarray:
    """An ``H x W`` float32 map in [0, 1]; ``None`` gives zeros. ``size`` is (H, W).

    A mask of another size than its image is resized bilinearly (a warning-free
    convenience for datasets such as RichHF whose maps are 512 x 512).
    """
    h, w = size
    if path is None:
        return np.zeros((h, w), np.float32)
    from dd.data.shards import open_member

    try:
        with Image.open(open_member(path) or path) as im:
            im = im.convert("L") if im.mode not in ("L", "I;16", "I") else im
            if im.mode != "L":
                arr = np.asarray(im, np.float32) / 65535.0
                im = Image.fromarray((arr * 255).round().astype(np.uint8), mode="L")
            if im.size != (w, h):
                im = im.resize((w, h), Image.BILINEAR)
            return np.asarray(im, np.float32) / 255.0
    except FileNotFoundError:
        raise DDError(f"mask not found: {path}") from None
    except OSError as e:
        raise DDError(f"cannot read mask {path}: {e}") from None


def save_mask(path: str | Path, mask: np.ndarray) -> None:
    """Save an ``H x W`` map in [0, 1] as an 8-bit grayscale PNG, atomically."""
    from dd.runtime.io import save_image_atomic

    save_image_atomic(Image.fromarray(to_uint8_map(mask), mode="L"), path)


#: How summaries name samples without a category.
NO_CATEGORY = "(none)"


def dataset_summary(root: Path) -> dict[str, Any]:
    """Counts of a dataset: positives/negatives overall, per source and per category."""
    samples = read_dataset(root)

    def tally(groups: dict[str, dict[str, int]], key: str, positive: bool) -> None:
        g = groups.setdefault(key, {"positives": 0, "negatives": 0, "total": 0})
        g["positives" if positive else "negatives"] += 1
        g["total"] += 1

    by_source: dict[str, dict[str, int]] = {}
    by_category: dict[str, dict[str, int]] = {}
    for s in samples:
        tally(by_source, s.source, s.positive)
        tally(by_category, s.category if s.category is not None else NO_CATEGORY, s.positive)
    positives = sum(s.positive for s in samples)
    cats = sorted(k for k in by_category if k != NO_CATEGORY) + (
        [NO_CATEGORY] if NO_CATEGORY in by_category else []
    )
    return {
        "dataset": str(root),
        "samples": len(samples),
        "positives": positives,
        "negatives": len(samples) - positives,
        "by_source": {k: by_source[k] for k in sorted(by_source)},
        "by_category": {k: by_category[k] for k in cats},
        "missing_images": sum(not s.image.is_file() for s in samples),
        "missing_masks": sum(s.mask is not None and not s.mask.is_file() for s in samples),
    }


def to_uint8_map(p: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] -> 8-bit grayscale (0-255 maps to confidence 0-1): how dd
    stores artifact maps and masks."""
    return np.clip(np.rint(p.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
