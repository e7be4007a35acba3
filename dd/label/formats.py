"""Import masks from labelling tools into the dataset format, and export for them.

Imports (all write ``OUT/images/``, ``OUT/masks/`` and ``OUT/manifest.jsonl``; images are
hard-linked, or copied across filesystems or with ``copy=True``; an all-zero mask makes the
sample a negative, as in ``dd.data.datasets``; samples already in OUT are kept, and re-importing
replaces a sample's earlier entry instead of duplicating it):

* ``png``: a folder of mask PNGs and the images they belong to (same relative path or stem).
* ``coco``: COCO JSON with RLE segmentations (list or compressed counts; polygons too).
* ``label-studio``: a Label Studio JSON export of ``brushlabels`` results (their RGBA RLE).
* ``cvat``: a CVAT "Segmentation mask 1.1" zip (``labelmap.txt`` + ``SegmentationClass/``).
* ``richhf``: RichHF-18K TFRecords (:func:`dd.data.richhf.import_richhf`).
* ``queue``: the decisions of a ``dd label serve`` queue.

Exports: a queue with its predictions as Label Studio tasks (plus the labelling config), and
a dataset's or queue's masks as COCO RLE JSON.
"""

from __future__ import annotations

import io
import json
import os
import re
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from dd.data.images import IMAGE_SUFFIXES, image_size
from dd.errors import DDError, UsageError
from dd.label.rle import coco_decode, coco_encode, ls_decode_mask, ls_encode_mask
from dd.runtime.io import atomic_write_bytes, atomic_write_json, atomic_write_text

FORMATS = ("png", "coco", "label-studio", "cvat", "richhf", "queue")


# -- mask helpers ------------------------------------------------------------------------------
def mask_to_u8(im: Image.Image) -> np.ndarray:
    """A mask image of any mode -> ``H x W`` uint8. Grayscale keeps its values (16-bit is
    scaled); colour, palette and 1-bit masks become 255 wherever a pixel is non-black (and,
    with alpha, not transparent)."""
    if im.mode == "L":
        return np.asarray(im, np.uint8).copy()
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, np.float64) / 65535.0 * 255.0
        return np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    if im.mode == "1":
        return np.asarray(im, np.uint8) * 255
    if im.mode == "P":
        idx = np.asarray(im)
        rgba = np.asarray(im.convert("RGBA"))
        return ((idx != 0) & (rgba[..., 3] > 0)).astype(np.uint8) * 255
    rgba = np.asarray(im.convert("RGBA"))
    return ((rgba[..., :3].max(-1) > 0) & (rgba[..., 3] > 0)).astype(np.uint8) * 255


def read_mask_png(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im.load()
            return mask_to_u8(im)
    except OSError as e:
        raise DDError(f"cannot read mask {path}: {e}") from None


def png_bytes(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(mask, np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


# -- dataset writer ------------------------------------------------------------------------------
@dataclass
class ImportReport:
    out: Path
    imported: int = 0
    positives: int = 0
    negatives: int = 0
    missing: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "imported": self.imported,
            "positives": self.positives,
            "negatives": self.negatives,
            "missing": len(self.missing),
            "skipped": len(self.skipped),
        }


class DatasetWriter:
    """Adds samples to a dataset folder; :meth:`close` writes the manifest atomically."""

    def __init__(self, out: Path, *, copy: bool = False, source: str = "human"):
        from dd.data.datasets import SOURCES
        from dd.data.richhf import _existing_samples

        if source not in SOURCES:
            raise DDError(f"unknown source {source!r}", hint=f"use one of {', '.join(SOURCES)}")
        self.out = Path(out)
        self.copy = copy
        self.source = source
        self.entries: dict[str, dict[str, Any]] = {
            rec["image"]: rec for rec in _existing_samples(self.out)
        }
        self.report = ImportReport(self.out)

    def add(
        self,
        image: Path,
        mask: np.ndarray | None,
        *,
        rel: str | None = None,
        category: str | None = None,
        meta: dict[str, Any] | None = None,
        source: str | None = None,
    ) -> None:
        """Place ``image`` at ``images/<rel>`` and its mask (None or all zero: a negative) at
        ``masks/<rel stem>.png``."""
        from dd.data.richhf import _place_image

        image = Path(image)
        rel = PurePosixPath(rel or image.name).as_posix()
        if not _safe_rel(rel):
            raise DDError(f"unsafe image name {rel!r}", hint="names must stay inside the dataset")
        if mask is not None:
            w, h = image_size(image)
            if mask.shape != (h, w):
                raise DDError(
                    f"mask for {image} is {mask.shape[1]}x{mask.shape[0]}, image is {w}x{h}"
                )
        rel_img = f"images/{rel}"
        _place_image(image, self.out / rel_img, self.copy)
        rel_mask: str | None = f"masks/{PurePosixPath(rel).with_suffix('.png').as_posix()}"
        if mask is not None and np.any(mask):
            atomic_write_bytes(self.out / rel_mask, png_bytes(mask))
            self.report.positives += 1
        else:
            if (self.out / rel_mask).exists():
                (self.out / rel_mask).unlink()
            rel_mask = None
            self.report.negatives += 1
        self.report.imported += 1
        self.entries[rel_img] = {
            **(meta or {}),
            "image": rel_img,
            "mask": rel_mask,
            "source": source or self.source,
            "category": category,
            "weight": 1.0,
        }

    def close(self) -> ImportReport:
        from dd.data.datasets import MANIFEST

        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(
            self.out / MANIFEST,
            "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.entries.values()),
        )
        return self.report


def _safe_rel(rel: str) -> bool:
    parts = rel.split("/")
    return bool(rel) and not rel.startswith("/") and not any(p in ("", ".", "..") for p in parts)


class ImageIndex:
    """Finds images under a folder by relative path, file name or stem."""

    def __init__(self, root: Path | None):
        self.root = Path(root) if root is not None else None
        self.by_rel: dict[str, Path] = {}
        self.by_name: dict[str, Path] = {}
        self.by_stem: dict[str, Path] = {}
        if self.root is None:
            return
        if not self.root.is_dir():
            raise DDError(f"images folder not found: {self.root}")
        for dirpath, dirs, files in os.walk(self.root):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                p = Path(dirpath, name)
                if name.startswith(".") or p.suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                rel = p.relative_to(self.root).as_posix()
                self.by_rel[rel] = p
                self.by_name.setdefault(name, p)
                self.by_stem.setdefault(p.stem, p)
                self.by_rel.setdefault(str(PurePosixPath(rel).with_suffix("")), p)

    def find(self, ref: str) -> tuple[Path, str] | None:
        """The image a tool refers to as ``ref`` (a path, URL or name) and its relative path."""
        if self.root is None:
            p = Path(ref)
            return (p, p.name) if p.is_file() else None
        ref = ref.replace("\\", "/")
        if "?d=" in ref:  # Label Studio local files: /data/local-files/?d=<path>
            from urllib.parse import unquote

            ref = unquote(ref.split("?d=", 1)[1])
        ref = ref.split("?", 1)[0]
        for cand in (ref.lstrip("/"), str(PurePosixPath(ref.lstrip("/")).with_suffix(""))):
            if cand in self.by_rel:
                p = self.by_rel[cand]
                return p, p.relative_to(self.root).as_posix()
        name = PurePosixPath(ref).name
        # Label Studio uploads prefix names with 8 hex digits and a dash.
        names = [name, re.sub(r"^[0-9a-f]{8}-", "", name)]
        for n in names:
            if n in self.by_name:
                p = self.by_name[n]
                return p, p.relative_to(self.root).as_posix()
        for n in names:
            stem = PurePosixPath(n).stem
            if stem in self.by_stem:
                p = self.by_stem[stem]
                return p, p.relative_to(self.root).as_posix()
        return None


# -- importers ---------------------------------------------------------------------------------
def import_png(
    masks_dir: Path, images_dir: Path, out: Path, *, copy: bool = False, source: str = "human"
) -> ImportReport:
    """A folder of mask PNGs (any sub-folders) matched to images by relative path or stem."""
    masks_dir = Path(masks_dir)
    if not masks_dir.is_dir():
        raise DDError(f"mask folder not found: {masks_dir}")
    index = ImageIndex(images_dir)
    writer = DatasetWriter(out, copy=copy, source=source)
    masks = sorted(p for p in masks_dir.rglob("*.png") if not p.name.startswith("."))
    if not masks:
        raise DDError(f"no .png masks under {masks_dir}")
    for m in masks:
        rel = m.relative_to(masks_dir).as_posix()
        found = index.find(rel)
        if found is None:
            writer.report.missing.append(rel)
            continue
        img, img_rel = found
        writer.add(img, read_mask_png(m), rel=img_rel)
    return writer.close()


def _load_json(path: Path, what: str) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DDError(f"{what} file not found: {path}") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DDError(f"{path}: not a readable JSON file ({e})") from None


def _polygon_mask(polys: list[list[float]], h: int, w: int) -> np.ndarray:
    im = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(im)
    for poly in polys:
        if len(poly) >= 6:
            draw.polygon([(poly[i], poly[i + 1]) for i in range(0, len(poly) - 1, 2)], fill=1)
    return np.asarray(im, np.uint8)


def import_coco(
    json_path: Path,
    images_dir: Path,
    out: Path,
    *,
    copy: bool = False,
    source: str = "human",
    categories: Iterable[str] | None = None,
) -> ImportReport:
    """COCO JSON: every image's annotations (optionally only ``categories``) are united into
    one mask (255 inside). Images without annotations become negatives."""
    data = _load_json(json_path, "COCO")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DDError(f"{json_path}: not COCO JSON (no 'images' list)")
    names = {c.get("id"): c.get("name") for c in data.get("categories") or []}
    keep = set(categories) if categories else None
    anns: dict[Any, list[dict[str, Any]]] = {}
    for a in data.get("annotations") or []:
        if keep is not None and names.get(a.get("category_id")) not in keep:
            continue
        anns.setdefault(a.get("image_id"), []).append(a)
    index = ImageIndex(images_dir)
    writer = DatasetWriter(out, copy=copy, source=source)
    for img in data["images"]:
        fname = str(img.get("file_name", ""))
        found = index.find(fname)
        if found is None:
            writer.report.missing.append(fname)
            continue
        path, rel = found
        w, h = image_size(path)
        mask = np.zeros((h, w), np.uint8)
        for a in anns.get(img.get("id"), []):
            seg = a.get("segmentation")
            where = f"{json_path}: annotation {a.get('id')}"
            if isinstance(seg, dict):
                m = coco_decode(seg, where=where)
            elif isinstance(seg, list):
                m = _polygon_mask(seg, h, w)
            else:
                raise DDError(f"{where}: no segmentation")
            if m.shape != (h, w):
                raise DDError(f"{where}: mask is {m.shape[1]}x{m.shape[0]}, image {w}x{h}")
            mask |= m
        meta = {k: v for k, v in img.items() if k.startswith("dd_")}
        cat = meta.pop("dd_category", None)
        writer.add(path, mask * 255, rel=rel, category=cat, meta=meta or None)
    return writer.close()


def import_label_studio(
    json_path: Path,
    images_dir: Path | None,
    out: Path,
    *,
    copy: bool = False,
    source: str = "human",
    labels: Iterable[str] | None = None,
) -> ImportReport:
    """A Label Studio JSON export: per task, the newest annotation that was not cancelled; its
    ``brushlabels`` results (optionally only ``labels``) united into one mask."""
    data = _load_json(json_path, "Label Studio")
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise DDError(f"{json_path}: not a Label Studio JSON export (expected a list of tasks)")
    keep = set(labels) if labels else None
    index = ImageIndex(images_dir)
    writer = DatasetWriter(out, copy=copy, source=source)
    for n, task in enumerate(data):
        where = f"{json_path}: task {task.get('id', n) if isinstance(task, dict) else n}"
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            raise DDError(f"{where}: a task needs a 'data' object")
        tdata = task["data"]
        ref = str(tdata.get("dd_image") or tdata.get("image") or "")
        found = index.find(ref) if ref else None
        if found is None and tdata.get("image"):
            found = index.find(str(tdata["image"]))
        if found is None:
            writer.report.missing.append(ref or where)
            continue
        done = [
            a
            for a in task.get("annotations") or []
            if isinstance(a, dict) and not a.get("was_cancelled")
        ]
        if not done:
            writer.report.skipped.append(ref)
            continue
        ann = max(done, key=lambda a: (str(a.get("updated_at") or ""), a.get("id") or 0))
        path, rel = found
        w, h = image_size(path)
        mask = np.zeros((h, w), np.uint8)
        for r in ann.get("result") or []:
            value = r.get("value") or {}
            if r.get("type") != "brushlabels" and "rle" not in value:
                continue
            if keep is not None and not keep.intersection(value.get("brushlabels") or []):
                continue
            if value.get("format", "rle") != "rle":
                raise DDError(f"{where}: brush format {value.get('format')!r} is not 'rle'")
            rh, rw = int(r.get("original_height", h)), int(r.get("original_width", w))
            m = ls_decode_mask(value.get("rle") or [], rh, rw, where=where)
            if (rh, rw) != (h, w):
                m = np.asarray(Image.fromarray(m).resize((w, h), Image.NEAREST))
            mask = np.maximum(mask, m)
        meta = {k: v for k, v in tdata.items() if k.startswith("dd_") and k != "dd_image"}
        cat = meta.pop("dd_category", None)
        writer.add(path, mask, rel=rel, category=cat, meta=meta or None)
    return writer.close()


CVAT_BACKGROUND = "background"


def _parse_labelmap(text: str, where: str) -> dict[str, tuple[int, int, int]]:
    labels: dict[str, tuple[int, int, int]] = {}
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split(":")
        try:
            rgb = tuple(int(c) for c in parts[1].split(","))
            if len(rgb) != 3:
                raise ValueError
        except (IndexError, ValueError):
            raise DDError(f"{where}: bad labelmap line {line!r}") from None
        labels[parts[0].strip()] = rgb  # type: ignore[assignment]
    return labels


def import_cvat(
    zip_path: Path,
    images_dir: Path,
    out: Path,
    *,
    copy: bool = False,
    source: str = "human",
    labels: Iterable[str] | None = None,
) -> ImportReport:
    """A CVAT "Segmentation mask 1.1" zip: pixels of any non-background label colour (or only
    of ``labels``) in ``SegmentationClass/<name>.png`` are the artifact mask."""
    zip_path = Path(zip_path)
    try:
        zf = zipfile.ZipFile(zip_path)
    except FileNotFoundError:
        raise DDError(f"CVAT zip not found: {zip_path}") from None
    except (OSError, zipfile.BadZipFile) as e:
        raise DDError(f"{zip_path}: not a zip file ({e})") from None
    index = ImageIndex(images_dir)
    writer = DatasetWriter(out, copy=copy, source=source)
    with zf:
        names = zf.namelist()
        if "labelmap.txt" not in names:
            raise DDError(
                f"{zip_path}: no labelmap.txt",
                hint='export from CVAT as "Segmentation mask 1.1"',
            )
        where = f"{zip_path}: labelmap.txt"
        labelmap = _parse_labelmap(zf.read("labelmap.txt").decode("utf-8"), where)
        keep = set(labels) if labels else set(labelmap) - {CVAT_BACKGROUND}
        unknown = keep - set(labelmap)
        if unknown:
            raise DDError(f"{where}: no label(s) {', '.join(sorted(unknown))}")
        colors = np.array([labelmap[k] for k in sorted(keep)], np.int32).reshape(-1, 3)
        prefix = "SegmentationClass/"
        masks = sorted(n for n in names if n.startswith(prefix) and n.endswith(".png"))
        if not masks:
            raise DDError(f"{zip_path}: no SegmentationClass/*.png masks")
        for name in masks:
            rel = name[len(prefix) :]
            found = index.find(rel)
            if found is None:
                writer.report.missing.append(rel)
                continue
            with Image.open(io.BytesIO(zf.read(name))) as im:
                rgb = np.asarray(im.convert("RGB"), np.int32)
            hit = (rgb[:, :, None, :] == colors[None, None]).all(-1).any(-1)
            path, img_rel = found
            writer.add(path, hit.astype(np.uint8) * 255, rel=img_rel)
    return writer.close()


def write_cvat_zip(
    path: Path,
    masks: dict[str, np.ndarray],
    *,
    label: str = "artifact",
    color: tuple[int, int, int] = (250, 50, 83),
) -> Path:
    """Write masks (name without suffix -> ``H x W`` array, nonzero = label) as a CVAT
    "Segmentation mask 1.1" zip (what CVAT exports and imports)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(
            "labelmap.txt",
            f"# label:color_rgb:parts:actions\n{CVAT_BACKGROUND}:0,0,0::\n"
            f"{label}:{color[0]},{color[1]},{color[2]}::\n",
        )
        zf.writestr("ImageSets/Segmentation/default.txt", "".join(f"{n}\n" for n in masks))
        for name, m in masks.items():
            rgb = np.zeros((*m.shape, 3), np.uint8)
            rgb[np.asarray(m) != 0] = color
            b = io.BytesIO()
            Image.fromarray(rgb, "RGB").save(b, format="PNG")
            zf.writestr(f"SegmentationClass/{name}.png", b.getvalue())
            zf.writestr(f"SegmentationObject/{name}.png", b.getvalue())
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def import_queue(queue: Path, out: Path, *, copy: bool = False) -> ImportReport:
    """The latest decision per item of a labelling queue: ``artifact`` (its mask) and
    ``no_artifact`` (a negative) become human samples; ``skip`` and ``uncertain`` do not."""
    from dd.label.queue import Queue

    q = Queue.open(queue)
    writer = DatasetWriter(out, copy=copy, source="human")
    for item_id, dec in q.latest_decisions().items():
        item = q.by_id[item_id]
        if dec["label"] not in ("artifact", "no_artifact"):
            writer.report.skipped.append(item_id)
            continue
        mask = None
        if dec["label"] == "artifact":
            mask = read_mask_png(q.mask_path(item))
        meta = {"queue_item": item_id, "annotator": dec.get("annotator")}
        if item.get("prompt"):
            meta["prompt"] = item["prompt"]
        writer.add(
            q.image_path(item),
            mask,
            rel=f"{item_id}{Path(item['image']).suffix.lower()}",
            category=item.get("category"),
            meta=meta,
        )
    return writer.close()


def import_any(
    fmt: str,
    sources: list[Path],
    out: Path,
    *,
    images: Path | None = None,
    copy: bool = False,
    source: str = "human",
    labels: list[str] | None = None,
) -> Any:
    """Dispatch to the importer of ``fmt`` (``auto``: guessed from the first source)."""
    if not sources:
        raise DDError("nothing to import", hint="name the file or folder to import")
    if fmt == "auto":
        fmt = guess_format(sources[0])
    if fmt == "richhf":
        from dd.data.richhf import import_richhf

        if images is None:
            raise UsageError("--images is needed for RichHF (the Pick-a-Pic images folder)")
        return import_richhf(sources, images, out, copy=copy)
    if len(sources) != 1:
        raise DDError(f"the {fmt} importer takes one source, got {len(sources)}")
    src = sources[0]
    if fmt == "queue":
        return import_queue(src, out, copy=copy)
    if fmt in ("png", "coco", "cvat") and images is None:
        raise UsageError(
            f"--images is needed for the {fmt} format (the images the masks belong to)"
        )
    if fmt == "png":
        return import_png(src, images, out, copy=copy, source=source)
    if fmt == "coco":
        return import_coco(src, images, out, copy=copy, source=source, categories=labels)
    if fmt == "label-studio":
        return import_label_studio(src, images, out, copy=copy, source=source, labels=labels)
    if fmt == "cvat":
        return import_cvat(src, images, out, copy=copy, source=source, labels=labels)
    raise DDError(f"unknown import format {fmt!r}", hint=f"use one of {', '.join(FORMATS)}")


def guess_format(src: Path) -> str:
    src = Path(src)
    if src.is_dir():
        from dd.label.queue import QUEUE_FILE

        return "queue" if (src / QUEUE_FILE).exists() else "png"
    suffix = src.suffix.lower()
    if suffix == ".zip":
        return "cvat"
    if suffix == ".tfrecord" or ".tfrecord" in src.name:
        return "richhf"
    if suffix == ".json":
        data = _load_json(src, "annotation")
        if isinstance(data, dict) and "images" in data and "annotations" in data:
            return "coco"
        if isinstance(data, list) or (isinstance(data, dict) and "data" in data):
            return "label-studio"
    raise DDError(f"cannot tell the format of {src}", hint=f"pass --format ({', '.join(FORMATS)})")


# -- exporters ---------------------------------------------------------------------------------
LS_CONFIG = """<View>
  <Image name="image" value="$image" zoom="true"/>
  <BrushLabels name="tag" toName="image">
    <Label value="{label}" background="#ff3355"/>
  </BrushLabels>
</View>
"""


def export_label_studio(
    queue: Path,
    out: Path,
    *,
    threshold: float = 0.5,
    image_prefix: str = "/data/local-files/?d=",
    image_root: Path | None = None,
    label: str = "artifact",
) -> dict[str, Any]:
    """Queue items as Label Studio tasks whose predictions are the detector's maps (pixels at
    or above ``threshold`` painted). ``data.image`` is ``image_prefix`` + the image path
    relative to ``image_root`` (Label Studio's local-files root; default: the path as is).
    Also writes ``<out stem>.label_config.xml``, the labelling interface to paste in."""
    from dd.label.queue import Queue

    q = Queue.open(queue)
    tasks = []
    cut = int(np.ceil(threshold * 255))
    for item in q.items:
        path = q.image_path(item)
        ref = path.resolve()
        if image_root is not None:
            try:
                ref = ref.relative_to(Path(image_root).resolve())
            except ValueError:
                raise DDError(f"{path} is not under --image-root {image_root}") from None
        data = {
            "image": image_prefix + ref.as_posix().lstrip("/" if image_root is None else ""),
            "dd_image": str(path.resolve()),
            "dd_item": item["id"],
            "dd_category": item.get("category"),
        }
        if item.get("prompt"):
            data["dd_prompt"] = item["prompt"]
        task: dict[str, Any] = {"data": data, "predictions": []}
        pred = q.prediction_path(item)
        if pred is not None and pred.exists():
            m = read_mask_png(pred)
            m = np.where(m >= cut, 255, 0).astype(np.uint8)
            h, w = m.shape
            task["predictions"].append(
                {
                    "model_version": str(q.info.get("detector", {}).get("weights", "dd")),
                    "score": float(item.get("max", 0.0)),
                    "result": [
                        {
                            "id": f"dd-{item['id']}".replace("/", "_"),
                            "type": "brushlabels",
                            "from_name": "tag",
                            "to_name": "image",
                            "original_width": w,
                            "original_height": h,
                            "image_rotation": 0,
                            "value": {
                                "format": "rle",
                                "rle": ls_encode_mask(m),
                                "brushlabels": [label],
                            },
                        }
                    ],
                }
            )
        tasks.append(task)
    out = Path(out)
    atomic_write_text(out, json.dumps(tasks) + "\n")
    config = out.with_name(out.stem + ".label_config.xml")
    atomic_write_text(config, LS_CONFIG.format(label=label))
    return {"tasks": len(tasks), "out": str(out), "config": str(config)}


def export_coco(
    src: Path,
    out: Path,
    *,
    threshold: float = 0.5,
    compressed: bool = True,
    label: str = "artifact",
) -> dict[str, Any]:
    """Masks of a dataset folder (or the human decisions of a queue) as COCO JSON with one
    RLE annotation per positive image (pixels at or above ``threshold``)."""
    from dd.data.datasets import read_dataset
    from dd.label.queue import QUEUE_FILE, Queue

    src = Path(src)
    rows: list[tuple[Path, Path | None, str | None, str]] = []
    if (src / QUEUE_FILE).exists():
        q = Queue.open(src)
        for item_id, dec in q.latest_decisions().items():
            item = q.by_id[item_id]
            if dec["label"] in ("artifact", "no_artifact"):
                mask = q.mask_path(item) if dec["label"] == "artifact" else None
                rows.append((q.image_path(item), mask, item.get("category"), item_id))
        root = src
    else:
        for s in read_dataset(src):
            rows.append((s.image, s.mask, s.category, s.image.stem))
        root = src
    cut = int(np.ceil(threshold * 255))
    images, anns = [], []
    for i, (img, mask, cat, _key) in enumerate(rows, 1):
        w, h = image_size(img)
        try:
            fname = img.resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            fname = str(img)
        entry: dict[str, Any] = {"id": i, "file_name": fname, "width": w, "height": h}
        if cat is not None:
            entry["dd_category"] = cat
        images.append(entry)
        if mask is None:
            continue
        m = read_mask_png(mask)
        if m.shape != (h, w):
            m = np.asarray(Image.fromarray(m).resize((w, h), Image.BILINEAR))
        binary = m >= cut
        if not binary.any():
            continue
        ys, xs = np.nonzero(binary)
        x0, y0 = int(xs.min()), int(ys.min())
        anns.append(
            {
                "id": len(anns) + 1,
                "image_id": i,
                "category_id": 1,
                "segmentation": coco_encode(binary, compressed=compressed),
                "area": int(binary.sum()),
                "bbox": [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1],
                "iscrowd": 1,
            }
        )
    coco = {
        "info": {"description": f"dd artifact masks from {src}"},
        "images": images,
        "annotations": anns,
        "categories": [{"id": 1, "name": label, "supercategory": "artifact"}],
    }
    atomic_write_json(out, coco)
    return {"images": len(images), "annotations": len(anns), "out": str(out)}
