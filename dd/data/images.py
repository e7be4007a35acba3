"""Loading input images robustly, and turning user input specs into a list of images.

``load_image`` turns any supported file into an ``(H, W, 3)`` ``uint8`` RGB array, or refuses
it with an :class:`ImageLoadError` that names the file and the reason. Conventions:

* EXIF orientation is applied, so the array is the image as a viewer shows it.
* Transparent images (alpha channel, palette or grayscale/RGB ``tRNS`` transparency) are
  composited over a **white** background.
* 16-bit grayscale (``I;16``, ``I;16B``, ...) is scaled 0..65535 -> 0..255 with rounding;
  ``I`` (32-bit integer) is treated the same when its values fit in 0..65535, otherwise it is
  min-max normalised; ``F`` (float) in 0..1 is scaled by 255, otherwise clipped to 0..255
  (Pillow's own convention), with NaN -> 0.
* Animated GIF/WebP/APNG and multi-page TIFF: the first frame.
* The decompression-bomb guard reads the size from the header before any pixel is decoded.

``collect_inputs`` expands files, folders, globs and ``.txt``/``.jsonl`` manifests into
:class:`InputItem` records with stable, unique, filesystem-safe keys for output files.
"""

from __future__ import annotations

import glob
import json
import os
import re
import stat
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dd.errors import DDError
from dd.runtime.io import is_run_folder, not_inputs

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_SUFFIXES",
    "MANIFEST_SUFFIXES",
    "ImageLoadError",
    "InputItem",
    "collect_inputs",
    "load_image",
    "load_training_image",
]

#: Twice Pillow's default ``MAX_IMAGE_PIXELS``; override per call with ``max_pixels``.
DEFAULT_MAX_PIXELS = 178_956_970

#: Suffixes (lower case, with the dot) treated as images when expanding folders and globs.
IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
)

#: Suffixes treated as manifests when named explicitly.
MANIFEST_SUFFIXES: frozenset[str] = frozenset({".txt", ".jsonl"})

# The size check is ours, per call (see load_image): switch off Pillow's process-global guard so
# it neither warns nor raises on its own. Register all plugins now rather than lazily from
# several threads at once.
Image.MAX_IMAGE_PIXELS = None
Image.init()

# Formats Pillow may open (those this Pillow build has). Anything else (EPS, which runs
# Ghostscript, PSD, PDF, ...) is refused even when it hides behind an image suffix. Camera JPEGs
# that Pillow reads as MPO come through the JPEG opener.
_ALLOWED_FORMATS = tuple(
    f for f in ("PNG", "JPEG", "GIF", "WEBP", "BMP", "DIB", "TIFF") if f in Image.OPEN
)

_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


class ImageLoadError(DDError):
    """An image file that cannot be loaded; ``str()`` is one line naming the file and reason."""

    def __init__(self, path: str | os.PathLike[str], reason: str, hint: str | None = None):
        self.path = str(path)
        self.reason = " ".join(reason.split())  # always one line
        super().__init__(f"{self.path}: {self.reason}", hint)

    def __reduce__(self) -> tuple[Any, ...]:  # picklable despite the custom signature
        return (type(self), (self.path, self.reason, self.hint))


# --------------------------------------------------------------------------------------------
# load_image
# --------------------------------------------------------------------------------------------


def load_image(
    path: str | os.PathLike[str], *, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Load ``path`` as an ``(H, W, 3)`` ``uint8`` RGB array (see the module docstring).

    ``max_pixels`` (``None``: no limit) refuses images whose header declares more pixels,
    before decoding them. Raises :class:`ImageLoadError` for anything that cannot be loaded.
    Thread-safe: it touches no shared state and always closes the file.
    """
    p = Path(path)
    try:
        st = p.stat()
    except (FileNotFoundError, NotADirectoryError):  # or SHARD.tar/MEMBER
        from dd.data.shards import open_member

        try:
            member = open_member(p)  # SHARD.tar/MEMBER: a WebDataset sample's image
        except (OSError, tarfile.TarError, EOFError) as e:
            raise ImageLoadError(p, f"cannot read from its shard: {e}") from None
        if member is None:
            raise ImageLoadError(p, "not found", "check the path") from None
        return _decode(member, p, max_pixels)
    except OSError as e:
        raise ImageLoadError(p, f"cannot read: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageLoadError(p, "is a directory, not an image file")
    if not stat.S_ISREG(st.st_mode):
        raise ImageLoadError(p, "not a regular file")
    if st.st_size == 0:
        raise ImageLoadError(p, "empty file")
    return _decode(p, p, max_pixels)


def _decode(source: Any, p: Path, max_pixels: int | None) -> np.ndarray:
    """Decode ``source`` (a path or a file object) as :func:`load_image` describes."""
    try:
        with Image.open(source, formats=_ALLOWED_FORMATS) as im:
            width, height = im.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageLoadError(
                    p,
                    f"image is {width}x{height} = {width * height} pixels, above the limit "
                    f"of {max_pixels} (decompression-bomb guard)",
                    "raise it with --max-pixels",
                )
            im.load()  # the first frame; decoding errors surface here
            try:
                oriented = ImageOps.exif_transpose(im)
            except Exception:  # a broken EXIF block should not cost the image itself
                oriented = im
            return _to_rgb(oriented, p)
    except ImageLoadError:
        raise
    except UnidentifiedImageError:
        raise _unidentified(p) from None
    except Image.DecompressionBombError as e:  # someone re-enabled Pillow's global guard
        raise ImageLoadError(p, str(e), "raise it with --max-pixels") from None
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        raise ImageLoadError(p, f"cannot read: {e.strerror or e}") from None
    except MemoryError:
        raise ImageLoadError(p, "out of memory while decoding", "lower --max-pixels") from None
    except Exception as e:  # OSError, SyntaxError, ValueError, EOFError, struct.error, ...
        raise ImageLoadError(
            p,
            f"truncated or corrupt image: {e or type(e).__name__}",
            "re-export or re-download the file",
        ) from None


def load_training_image(
    path: str | os.PathLike[str],
    size: int,
    *,
    center_crop: bool = True,
    rng: np.random.Generator | None = None,
) -> torch.Tensor:
    """Resize the short side to ``size`` (bicubic), crop ``size x size`` at the centre (or at
    a random position from ``rng``); a ``3 x size x size`` float tensor in [0, 1]."""
    import torch

    im = Image.fromarray(load_image(path))
    w, h = im.size
    s = size / min(w, h)
    im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
    w, h = im.size
    if center_crop or rng is None:
        left, top = (w - size) // 2, (h - size) // 2
    else:
        left, top = int(rng.integers(0, w - size + 1)), int(rng.integers(0, h - size + 1))
    im = im.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255


def _unidentified(p: Path) -> ImageLoadError:
    """Explain why Pillow could not identify ``p``: a broken image, or not an image at all."""
    try:
        with open(p, "rb") as f:
            head = f.read(512)
    except OSError as e:
        return ImageLoadError(p, f"cannot read: {e.strerror or e}")
    kind = next((name for magic, name in _MAGIC if head.startswith(magic)), None)
    if kind is None and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        kind = "WEBP"
    if kind is not None:
        return ImageLoadError(
            p,
            f"truncated or corrupt image: starts like {kind} but its header cannot be parsed",
            "re-export or re-download the file",
        )
    if b"\x00" not in head:
        try:
            text = head.decode("utf-8").lstrip().lower()
        except UnicodeDecodeError:
            text = None
        if text is not None:
            what = "looks like HTML/XML" if text.startswith("<") else "looks like a text file"
            return ImageLoadError(p, f"not an image ({what})", "check what the file really is")
    supported = ", ".join(sorted(set(_ALLOWED_FORMATS) - {"DIB"}))
    return ImageLoadError(
        p,
        f"not an image (unrecognised or unsupported format; supported: {supported})",
        "check what the file really is",
    )


def _to_rgb(im: Image.Image, p: Path) -> np.ndarray:
    """Convert a loaded Pillow image of any mode to a fresh ``(H, W, 3)`` uint8 RGB array."""
    mode = im.mode
    if mode.startswith("I") or mode == "F":
        gray, alpha = _wide_gray_to_u8(im)
        rgb = np.repeat(gray[:, :, None], 3, axis=2)
        return rgb if alpha is None else _over_white(rgb, alpha)
    if mode == "La":  # premultiplied: Pillow converts it only to LA
        im, mode = im.convert("LA"), "LA"
    if _has_alpha(im):
        rgba = np.array(im.convert("RGBA"), dtype=np.uint8)
        return _over_white(rgba[:, :, :3], rgba[:, :, 3])
    try:
        rgb = im if mode == "RGB" else im.convert("RGB")
    except ValueError as e:
        raise ImageLoadError(p, f"unsupported image mode {mode}: {e}") from None
    return np.array(rgb, dtype=np.uint8).reshape(im.height, im.width, 3)


def _has_alpha(im: Image.Image) -> bool:
    """Whether ``im`` carries transparency (like Pillow 10.1's ``has_transparency_data``)."""
    if im.mode in ("RGBA", "LA", "PA", "RGBa") or "transparency" in im.info:
        return True
    return im.mode == "P" and im.palette is not None and im.palette.mode == "RGBA"


def _wide_gray_to_u8(im: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """Map 16/32-bit integer or float grayscale to uint8 (see the module docstring)."""
    raw = np.asarray(im)
    alpha = None
    trns = im.info.get("transparency")
    if isinstance(trns, int):  # 16-bit grayscale PNG with a tRNS colour
        alpha = np.where(raw == trns, 0, 255).astype(np.uint8)
    if im.mode == "F":
        x = np.nan_to_num(raw.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if x.size and x.min() >= 0.0 and x.max() <= 1.0:
            x = x * 255.0
        return np.clip(np.rint(x), 0, 255).astype(np.uint8), alpha
    x = raw.astype(np.int64)
    lo, hi = (int(x.min()), int(x.max())) if x.size else (0, 0)
    if lo >= 0 and hi <= 65535:
        return ((x + 128) // 257).astype(np.uint8), alpha  # round(x * 255 / 65535)
    span = max(hi - lo, 1)
    return ((x - lo) * 255 // span).astype(np.uint8), alpha


def _over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Composite straight-alpha ``rgb`` over white, rounding to the nearest integer."""
    a = alpha.astype(np.uint32)[:, :, None]
    out = (rgb.astype(np.uint32) * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


# --------------------------------------------------------------------------------------------
# collect_inputs
# --------------------------------------------------------------------------------------------


@dataclass
class InputItem:
    """One input image: its absolute ``path``, a unique output ``key`` and manifest ``meta``."""

    path: Path
    key: str
    meta: dict[str, Any] = field(default_factory=dict)


def collect_inputs(
    specs: list[str], *, exclude: Sequence[str | os.PathLike[str]] = ()
) -> tuple[list[InputItem], list[tuple[str, str]]]:
    """Expand input specs into images; return ``(items, failures)``.

    Folders and globs never reach into ``exclude`` (the command's own output folder) nor
    into another dd run folder below a named folder (one marked by
    :func:`dd.runtime.io.mark_run_folder`): a second ``dd detect SRC --out SRC/report`` must not
    score the first run's maps. Naming such a folder itself, or listing its files in a
    manifest, is explicit and reads it.

    A spec is an image file, a folder (recursive; image suffixes only; hidden files and
    folders skipped; symlinked folders not followed), a glob (``*``, ``?``, ``[``; ``**`` is
    recursive) or a manifest: ``.txt`` (one image or folder path per line; blank lines and
    ``#`` comments skipped) or ``.jsonl`` (one JSON object per line whose ``image`` field is
    the path and whose other fields become ``meta``). Relative paths in a manifest are
    resolved against the manifest's folder.

    ``failures`` holds ``(spec_or_path, reason)`` for every spec or manifest entry that gave
    nothing. Items are de-duplicated by resolved path (the first keeps its place and key;
    the metadata of every mention is merged) and keep their order.
    ``item.path`` is absolute but symlinks are kept (keys come from the names the user sees).
    """
    found: list[tuple[Path, dict[str, Any]]] = []
    failures: list[tuple[str, str]] = []
    skip = tuple(os.path.realpath(p) for p in exclude)
    for spec in specs:
        _expand_spec(spec, found, failures, skip)

    # One item per file (the first spec that named it wins the key); what any spec says of it
    # (a manifest's prompt, category, ...) is merged, so the order of specs does not matter.
    first: dict[str, int] = {}
    unique: list[tuple[Path, dict[str, Any]]] = []
    for path, meta in found:
        real = os.path.realpath(path)
        if real not in first:
            first[real] = len(unique)
            unique.append((path, dict(meta)))
        else:
            merged = unique[first[real]][1]
            for k, v in meta.items():
                if merged.get(k) is None:
                    merged[k] = v

    keys = _make_keys([path for path, _ in unique])
    items = [InputItem(path, key, meta) for (path, meta), key in zip(unique, keys, strict=True)]
    return items, failures


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def _abs(path: str | os.PathLike[str]) -> Path:
    """Absolute and lexically normalised (``..`` removed) without resolving symlinks."""
    return Path(os.path.abspath(os.path.expanduser(path)))


def _skipped(path: Path, skip: tuple[str, ...]) -> bool:
    """True if ``path`` lies in an excluded folder (a glob names files explicitly, so other
    dd run folders are read)."""
    real = os.path.realpath(path)
    return any(real == s or real.startswith(s + os.sep) for s in skip)


def _expand_spec(
    spec: str,
    found: list[tuple[Path, dict[str, Any]]],
    failures: list[tuple[str, str]],
    skip: tuple[str, ...] = (),
) -> None:
    """Expand one command-line spec into ``found`` (or a reason into ``failures``)."""
    from dd.data.shards import expand_shards, is_shard_spec

    if any(c in spec for c in "*?[") and not os.path.lexists(os.path.expanduser(spec)):
        matches = sorted(glob.glob(os.path.expanduser(spec), recursive=True))
        shards = [m for m in matches if is_shard_spec(m) and os.path.isfile(m)]
        if shards and len(shards) == len(matches):  # a glob of WebDataset shards
            for m in shards:
                expand_shards(m, found, failures)
            return
        images = [
            _abs(m)
            for m in matches
            if os.path.isfile(m) and _is_image(Path(m)) and not _skipped(_abs(m), skip)
        ]
        if not images:
            reason = "no files match" if not matches else "no image files match"
            failures.append((spec, reason))
        found.extend((m, {}) for m in images)
        return
    if is_shard_spec(spec):  # WebDataset shards: shards/{000000..000099}.tar
        expand_shards(spec, found, failures)
        return
    path = _abs(spec)
    if path.suffix.lower() in MANIFEST_SUFFIXES and path.is_file():
        _expand_manifest(spec, path, found, failures)
        return
    if path.is_dir() and skip and os.path.realpath(path) in skip:
        failures.append((spec, "is the output folder (--out); name another input"))
        return
    reason = _expand_path(path, found, skip=skip)
    if reason:
        failures.append((spec, reason))


def _expand_path(
    path: Path,
    found: list[tuple[Path, dict[str, Any]]],
    meta: dict[str, Any] | None = None,
    skip: tuple[str, ...] = (),
) -> str:
    """Add an image file or a folder's images to ``found``; return a failure reason or ``""``."""
    if path.is_dir():
        images = list(_walk_images(path, skip))
        if not images:
            return "no images in folder"
        found.extend((image, dict(meta or {})) for image in images)
        return ""
    if not path.exists():
        return "not found"
    if not path.is_file():
        return "not a regular file"
    if not _is_image(path):
        suffixes = " ".join(sorted(IMAGE_SUFFIXES))
        return f"unsupported file type {path.suffix or '(no suffix)'} (images: {suffixes})"
    found.append((path, dict(meta or {})))
    return ""


def _walk_images(folder: Path, skip: tuple[str, ...] = ()) -> Iterable[Path]:
    """Image files under ``folder``, recursively, skipping hidden names, excluded folders,
    dd run folders below ``folder`` and what a dd folder declares is not input (a run's
    grid, overlays and maps, a dataset's masks: :func:`dd.runtime.io.not_inputs`), in sorted
    tree order."""
    out: list[tuple[tuple[str, ...], Path]] = []
    for root, dirs, files in os.walk(folder):
        derived = not_inputs(root)
        dirs[:] = [
            d
            for d in dirs
            if not d.startswith(".")
            and d not in derived
            and not is_run_folder(Path(root, d))
            and os.path.realpath(Path(root, d)) not in skip
        ]
        rel = Path(root).relative_to(folder).parts
        for name in files:
            p = Path(root, name)
            if not name.startswith(".") and name not in derived and _is_image(p) and p.is_file():
                out.append(((*rel, name), p))
    out.sort(key=lambda t: t[0])
    return [p for _, p in out]


def _expand_manifest(
    spec: str,
    manifest: Path,
    found: list[tuple[Path, dict[str, Any]]],
    failures: list[tuple[str, str]],
) -> None:
    """Expand a ``.txt`` or ``.jsonl`` manifest; entries may be image files or folders."""
    try:
        lines = manifest.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        failures.append((spec, f"cannot read manifest: {e}"))
        return
    is_jsonl = manifest.suffix.lower() == ".jsonl"
    entries = 0
    for lineno, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        entries += 1
        where = f"{spec}:{lineno}"
        meta: dict[str, Any] = {}
        if is_jsonl:
            try:
                record = json.loads(text)
            except ValueError as e:
                failures.append((where, f"invalid JSON: {e}"))
                continue
            if not isinstance(record, dict) or not isinstance(record.get("image"), str):
                failures.append((where, 'expected a JSON object with an "image" string field'))
                continue
            meta = {k: v for k, v in record.items() if k != "image"}
            text = record["image"]
        path = Path(os.path.expanduser(text))
        path = _abs(path if path.is_absolute() else manifest.parent / path)
        reason = _expand_path(path, found, meta)
        if reason:
            failures.append((str(path), f"{reason} (listed in {where})"))
    if entries == 0:
        failures.append((spec, "manifest lists no images"))


# --------------------------------------------------------------------------------------------
# keys
# --------------------------------------------------------------------------------------------

_UNSAFE = re.compile(r'[\x00-\x1f\x7f<>:"\\|?*]')


def _safe_part(part: str) -> str:
    """Make one path component safe as a file name on common filesystems."""
    part = _UNSAFE.sub("_", part)
    part = re.sub(r"\.{2,}", lambda m: "_" * len(m.group()), part)
    part = part.rstrip(" ")
    if part.startswith("."):
        part = "_" + part[1:]
    return part or "_"


def _make_keys(paths: list[Path]) -> list[str]:
    """Unique, stable, filesystem-safe keys: the path below the common parent, no suffix.

    Keys that collide (compared case-insensitively, for case-insensitive filesystems) get the
    suffix appended (``a.png`` -> ``a_png``); a key still taken gets ``_2``, ``_3``, ... in input
    order. The result depends only on the list of paths, so re-running resumes cleanly.
    """
    if not paths:
        return []
    try:
        common = Path(os.path.commonpath([str(p.parent) for p in paths]))
    except ValueError:  # different drives (Windows): keep the path below the anchor
        common = None

    def base(p: Path) -> tuple[str, ...]:
        rel = p.relative_to(common) if common is not None else p.relative_to(p.anchor)
        parts = [*rel.parts[:-1], rel.stem if rel.suffix else rel.name]
        return tuple(_safe_part(x) for x in parts)

    bases = [base(p) for p in paths]
    counts: dict[str, int] = {}
    for b in bases:
        k = "/".join(b).casefold()
        counts[k] = counts.get(k, 0) + 1

    keys: list[str | None] = [None] * len(paths)
    taken: set[str] = set()
    for i, b in enumerate(bases):  # keys that are unique as they stand are kept first
        k = "/".join(b)
        if counts[k.casefold()] == 1:
            keys[i] = k
            taken.add(k.casefold())
    for i, (p, b) in enumerate(zip(paths, bases, strict=True)):
        if keys[i] is not None:
            continue
        suffix = _safe_part(p.suffix.lstrip(".").lower()) if p.suffix else "file"
        k = "/".join((*b[:-1], f"{b[-1]}_{suffix}"))
        candidate, n = k, 1
        while candidate.casefold() in taken:
            n += 1
            candidate = f"{k}_{n}"
        keys[i] = candidate
        taken.add(candidate.casefold())
    return [k or "" for k in keys]  # every slot is filled above


def image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` from the header (EXIF rotation applied like ``load_image``)."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            try:
                orient = im.getexif().get(0x0112, 1)
            except Exception:
                orient = 1
            return (h, w) if orient in (5, 6, 7, 8) else (w, h)
    except OSError as e:
        raise DDError(f"cannot read image {path}: {e}") from None
