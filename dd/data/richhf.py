"""RichHF-18K import without TensorFlow: TFRecord files, ``tf.train.Example``, and the importer.

RichHF-18K (Liang et al., CVPR 2024) ships ``train``/``dev``/``test`` TFRecord files. Each
record is a serialized ``tf.train.Example`` with the features ``filename`` (bytes: the
Pick-a-Pic image's file name), ``artifact_map`` and ``misalignment_map`` (bytes: encoded
512 x 512 one-channel PNGs, 0-255), the float scores ``aesthetics_score``,
``artifact_score``, ``misalignment_score``, ``overall_score``, and
``prompt_misalignment_label`` (bytes). The images themselves are not included: they come from
the user's copy of Pick-a-Pic and are matched here by the stem of ``filename``.

This module reads and writes both layers in pure Python:

* TFRecord framing: per record ``uint64 length``, ``uint32 masked_crc32c(length bytes)``,
  ``data``, ``uint32 masked_crc32c(data)``, little-endian. Both checksums are verified;
  a mismatch or a truncated file raises :class:`DDError` naming the file and the record
  (0-based index). CRC-32C uses ``google_crc32c`` or ``crc32c`` when one is installed (C
  speed), else a table-driven pure-Python version (about 9 MB/s).
* ``tf.train.Example`` protobuf: ``Features`` (``map<string, Feature>``), ``Feature`` with
  ``bytes_list``, ``float_list`` or ``int64_list``; packed and unpacked repeated scalars are
  both read; unknown fields are skipped.

A decoded example is a ``dict`` from feature name to a list of ``bytes``, ``float`` or
``int`` (a feature with no value set decodes as ``[]``).
"""

from __future__ import annotations

import contextlib
import filecmp
import io
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

import numpy as np
from PIL import Image

from dd.data.images import IMAGE_SUFFIXES
from dd.errors import DDError
from dd.runtime.io import (
    atomic_open,
    atomic_write_bytes,
    atomic_write_text,
    mark_complete,
    mark_incomplete,
    output_dir,
)

__all__ = [
    "MAP_FEATURES",
    "RichHFReport",
    "crc32c",
    "decode_example",
    "encode_example",
    "import_richhf",
    "masked_crc32c",
    "read_examples",
    "read_tfrecord",
    "write_tfrecord",
]

Feature = list[bytes] | list[float] | list[int]

# ------------------------------------------------------------------------------------------------
# CRC-32C (Castagnoli)
# ------------------------------------------------------------------------------------------------


def _make_tables() -> list[list[int]]:
    """Slicing-by-8 tables of the reflected CRC-32C polynomial 0x82F63B78."""
    t0 = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        t0.append(c)
    tables = [t0]
    for _ in range(7):
        prev = tables[-1]
        tables.append([(prev[i] >> 8) ^ t0[prev[i] & 0xFF] for i in range(256)])
    return tables


_TABLES = _make_tables()


def _crc32c_py(data: bytes | bytearray | memoryview) -> int:
    """CRC-32C of ``data`` in pure Python (slicing-by-8)."""
    t0, t1, t2, t3, t4, t5, t6, t7 = _TABLES
    mv = memoryview(data).cast("B")
    n = len(mv) - len(mv) % 8
    crc = 0xFFFFFFFF
    for a, b in struct.iter_unpack("<II", mv[:n]):
        a ^= crc
        crc = (
            t7[a & 0xFF]
            ^ t6[(a >> 8) & 0xFF]
            ^ t5[(a >> 16) & 0xFF]
            ^ t4[a >> 24]
            ^ t3[b & 0xFF]
            ^ t2[(b >> 8) & 0xFF]
            ^ t1[(b >> 16) & 0xFF]
            ^ t0[b >> 24]
        )
    for byte in mv[n:]:
        crc = t0[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _fast_crc32c() -> Callable[[bytes], int] | None:
    """A C implementation from an optional package, if one is installed."""
    try:
        import google_crc32c

        if google_crc32c.implementation == "c":
            return lambda data: int(google_crc32c.value(bytes(data)))
    except ImportError:
        pass
    try:
        import crc32c as crc32c_pkg

        return lambda data: int(crc32c_pkg.crc32c(bytes(data)))
    except ImportError:
        return None


_FAST = _fast_crc32c()


def crc32c(data: bytes | bytearray | memoryview) -> int:
    """CRC-32C (Castagnoli) of ``data``, as TFRecord uses it."""
    return _FAST(data) if _FAST is not None else _crc32c_py(data)


def masked_crc32c(data: bytes | bytearray | memoryview) -> int:
    """TFRecord's masked CRC: rotate right by 15 bits, add 0xA282EAD8 (mod 2^32)."""
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# ------------------------------------------------------------------------------------------------
# TFRecord framing
# ------------------------------------------------------------------------------------------------


def _frame(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return b"".join(
        (
            length,
            struct.pack("<I", masked_crc32c(length)),
            data,
            struct.pack("<I", masked_crc32c(data)),
        )
    )


def write_tfrecord(path: str | os.PathLike, records: Iterable[bytes]) -> int:
    """Write ``records`` (serialized bytes) as one uncompressed TFRecord file, atomically.

    Returns the number of records written.
    """
    n = 0
    with atomic_open(path, "wb") as f:
        for data in records:
            f.write(_frame(bytes(data)))
            n += 1
    return n


def _iter_records(path: Path) -> Iterator[tuple[int, int, bytes]]:
    """``(index, end offset, data)`` per record; DDError on corruption or truncation."""
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below, also when the generator is dropped
    except OSError as e:
        raise DDError(f"cannot read TFRecord file {path}: {e.strerror or e}") from None
    hint = "the file is damaged or incomplete: download it again"
    with f:
        index, offset = 0, 0
        while True:
            header = f.read(12)
            if not header:
                return
            where = f"{path}: record {index} (byte {offset})"
            if len(header) < 12:
                raise DDError(f"{where}: truncated record header", hint=hint)
            length_bytes, length_crc = header[:8], struct.unpack("<I", header[8:])[0]
            if masked_crc32c(length_bytes) != length_crc:
                raise DDError(f"{where}: length checksum mismatch (corrupt record)", hint=hint)
            (length,) = struct.unpack("<Q", length_bytes)
            data = f.read(length)
            footer = f.read(4)
            if len(data) < length or len(footer) < 4:
                raise DDError(
                    f"{where}: truncated record ({length} data bytes expected)", hint=hint
                )
            if masked_crc32c(data) != struct.unpack("<I", footer)[0]:
                raise DDError(f"{where}: data checksum mismatch (corrupt record)", hint=hint)
            offset += 16 + length
            yield index, offset, data
            index += 1


def read_tfrecord(path: str | os.PathLike) -> Iterator[bytes]:
    """The records of an uncompressed TFRecord file, checksums verified (DDError naming the
    file and record index on a mismatch or truncation)."""
    for _, _, data in _iter_records(Path(path)):
        yield data


# ------------------------------------------------------------------------------------------------
# tf.train.Example protobuf
# ------------------------------------------------------------------------------------------------
# Example  { Features features = 1; }
# Features { map<string, Feature> feature = 1; }  (entries: string key = 1; Feature value = 2)
# Feature  { oneof kind { BytesList bytes_list = 1; FloatList float_list = 2;
#                         Int64List int64_list = 3; } }
# BytesList { repeated bytes value = 1; }  FloatList { repeated float value = 1 [packed]; }
# Int64List { repeated int64 value = 1 [packed]; }


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result, shift = 0, 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise ValueError("varint too long")


def _fields(buf: memoryview) -> Iterator[tuple[int, int, Any]]:
    """``(field number, wire type, value)``: an int for varint/fixed, a memoryview for
    length-delimited."""
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        num, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos)
        elif wire == 1:
            if pos + 8 > len(buf):
                raise ValueError("truncated fixed64")
            value, pos = bytes(buf[pos : pos + 8]), pos + 8
        elif wire == 2:
            n, pos = _read_varint(buf, pos)
            if pos + n > len(buf):
                raise ValueError("truncated length-delimited field")
            value, pos = buf[pos : pos + n], pos + n
        elif wire == 5:
            if pos + 4 > len(buf):
                raise ValueError("truncated fixed32")
            value, pos = bytes(buf[pos : pos + 4]), pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield num, wire, value


def _int64(v: int) -> int:
    v &= 0xFFFFFFFFFFFFFFFF
    return v - (1 << 64) if v >= 1 << 63 else v


def _decode_feature(buf: memoryview) -> Feature:
    out: list[Any] = []
    for num, wire, value in _fields(buf):
        if wire != 2 or num not in (1, 2, 3):
            continue
        out = []  # oneof: the last kind present wins, as in protobuf
        for vnum, vwire, v in _fields(value):
            if vnum != 1:
                continue
            if num == 1 and vwire == 2:
                out.append(bytes(v))
            elif num == 2 and vwire == 5:
                out.append(struct.unpack("<f", v)[0])
            elif num == 2 and vwire == 2:
                if len(v) % 4:
                    raise ValueError("packed float list length is not a multiple of 4")
                out.extend(struct.unpack(f"<{len(v) // 4}f", v))
            elif num == 3 and vwire == 0:
                out.append(_int64(v))
            elif num == 3 and vwire == 2:
                pos = 0
                while pos < len(v):
                    x, pos = _read_varint(v, pos)
                    out.append(_int64(x))
            else:
                raise ValueError(f"wire type {vwire} in {('bytes', 'float', 'int64')[num - 1]}")
    return out


def decode_example(data: bytes) -> dict[str, Feature]:
    """Parse a serialized ``tf.train.Example`` into ``{name: [values]}``.

    Raises ``ValueError`` on malformed input (``read_examples`` turns it into a DDError).
    """
    features: dict[str, Feature] = {}
    for num, wire, feats in _fields(memoryview(data)):
        if num != 1 or wire != 2:
            continue
        for enum, ewire, entry in _fields(feats):
            if enum != 1 or ewire != 2:
                continue
            key, value = "", memoryview(b"")
            for fnum, fwire, v in _fields(entry):
                if fnum == 1 and fwire == 2:
                    key = bytes(v).decode("utf-8")
                elif fnum == 2 and fwire == 2:
                    value = v
            features[key] = _decode_feature(value)
    return features


def _varint(n: int) -> bytes:
    n &= 0xFFFFFFFFFFFFFFFF
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _ld(num: int, payload: bytes) -> bytes:
    """A length-delimited field."""
    return _varint(num << 3 | 2) + _varint(len(payload)) + payload


def _encode_feature(name: str, values: Any) -> bytes:
    vals = list(values)
    if not vals:
        return b""
    if all(isinstance(v, (bytes, bytearray, str)) for v in vals):
        items = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in vals]
        return _ld(1, b"".join(_ld(1, v) for v in items))
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in vals):
        return _ld(3, _ld(1, b"".join(_varint(int(v)) for v in vals)))
    if all(isinstance(v, (float, int, np.floating, np.integer)) for v in vals):
        return _ld(2, _ld(1, struct.pack(f"<{len(vals)}f", *map(float, vals))))
    raise DDError(
        f"feature {name!r}: values must all be bytes/str, all ints or all floats",
        hint="one tf.train.Feature holds a single kind of list",
    )


def encode_example(features: Mapping[str, Iterable[Any]]) -> bytes:
    """Serialize ``{name: [values]}`` as a ``tf.train.Example`` (packed numeric lists).

    ``bytes``/``str`` lists become ``bytes_list``, ``int`` lists ``int64_list``, ``float``
    lists (ints mixed in allowed) ``float_list`` (float32); an empty list an empty Feature.
    Keys are written in sorted order, so the output is deterministic.
    """
    entries = b"".join(
        _ld(1, _ld(1, name.encode("utf-8")) + _ld(2, _encode_feature(name, features[name])))
        for name in sorted(features)
    )
    return _ld(1, entries)


def read_examples(path: str | os.PathLike) -> Iterator[dict[str, Feature]]:
    """Decoded ``tf.train.Example`` records of a TFRecord file (DDError names the record)."""
    for index, _, data in _iter_records(Path(path)):
        yield _decode(path, index, data)


def _decode(path: str | os.PathLike, index: int, data: bytes) -> dict[str, Feature]:
    try:
        return decode_example(data)
    except (ValueError, UnicodeDecodeError, struct.error) as e:
        raise DDError(
            f"{path}: record {index}: not a valid tf.train.Example ({e})",
            hint="is this a RichHF-18K TFRecord file?",
        ) from None


# ------------------------------------------------------------------------------------------------
# The RichHF-18K importer
# ------------------------------------------------------------------------------------------------

#: Features holding encoded heat maps (not copied into the manifest).
MAP_FEATURES = ("artifact_map", "misalignment_map")
_NOT_META = {"filename", *MAP_FEATURES, "image", "mask", "source", "category", "weight", "split"}


@dataclass
class RichHFReport:
    """What ``import_richhf`` did."""

    out: Path
    records: int = 0
    imported: int = 0
    positives: int = 0
    negatives: int = 0
    #: ``filename`` of every record whose image was not found under ``images_dir``.
    missing: list[str] = field(default_factory=list)
    #: Records whose stem an earlier record already had (the later record wins).
    duplicates: int = 0
    #: Stems with several images under ``images_dir`` (the first in sorted order is used).
    ambiguous: list[str] = field(default_factory=list)
    #: Images already in place from an earlier run (not copied again).
    reused: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "records": self.records,
            "imported": self.imported,
            "positives": self.positives,
            "negatives": self.negatives,
            "missing": len(self.missing),
            "duplicates": self.duplicates,
            "ambiguous": len(self.ambiguous),
            "reused": self.reused,
        }


def _index_images(images_dir: Path) -> tuple[dict[str, Path], list[str]]:
    """Stem -> image path under ``images_dir`` (recursive, hidden names skipped)."""
    found: dict[str, list[Path]] = {}
    for root, dirs, files in os.walk(images_dir):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            p = Path(root, name)
            if not name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES:
                found.setdefault(p.stem, []).append(p)
    ambiguous = sorted(s for s, ps in found.items() if len(ps) > 1)
    return {s: sorted(ps)[0] for s, ps in found.items()}, ambiguous


def _place_image(src: Path, dest: Path, copy: bool) -> bool:
    """Hard-link (or copy) ``src`` to ``dest`` atomically; False when it is already there."""
    if dest.exists() and filecmp.cmp(src, dest, shallow=True):
        return False
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    try:
        os.unlink(tmp)
        linked = False
        if not copy:
            try:
                os.link(src, tmp)
                linked = True
            except OSError:  # another filesystem, or links not allowed: copy instead
                pass
        if not linked:
            shutil.copy2(src, tmp)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return True


def _mask_png(data: bytes, where: str) -> bytes | None:
    """The artifact map as an 8-bit grayscale PNG file, or None when it is all zero.

    An 8-bit grayscale PNG (RichHF's own encoding) is kept byte for byte; anything else is
    decoded and re-encoded (16-bit scaled to 0-255, colour converted to luminance).
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            keep = im.format == "PNG" and im.mode == "L"
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, np.float64) / 65535.0 * 255.0
                arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
            else:
                arr = np.asarray(im.convert("L"), np.uint8)
    except Exception as e:
        raise DDError(
            f"{where}: artifact_map is not a readable image ({type(e).__name__}: {e})",
            hint="is this a RichHF-18K TFRecord file?",
        ) from None
    if not arr.any():
        return None
    if keep:
        return bytes(data)
    buf = io.BytesIO()
    Image.fromarray(arr, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _write_if_changed(path: Path, data: bytes) -> None:
    """Write ``data`` atomically unless ``path`` already holds exactly these bytes."""
    with contextlib.suppress(OSError):
        if path.stat().st_size == len(data) and path.read_bytes() == data:
            return
    atomic_write_bytes(path, data)


def _scalar_meta(feats: Mapping[str, Feature]) -> dict[str, Any]:
    """Score and label features for the manifest: numbers (one value: a scalar) and UTF-8
    text; binary values are left out. float32 values are written as the shortest decimal
    that reads back as the same float32 (0.4, not 0.4000000059604645)."""
    meta: dict[str, Any] = {}
    for name in sorted(feats):
        vals = feats[name]
        if name in _NOT_META or not vals:
            continue
        if isinstance(vals[0], bytes):
            try:
                conv: list[Any] = [v.decode("utf-8") for v in vals]
            except UnicodeDecodeError:
                continue
        elif isinstance(vals[0], float):
            conv = [float(str(np.float32(v))) for v in vals]
        else:
            conv = list(vals)
        meta[name] = conv[0] if len(conv) == 1 else conv
    return meta


def _existing_samples(out: Path) -> list[dict[str, Any]]:
    """Manifest records of a dataset already at ``out`` (none if there is none yet)."""
    from dd.data.datasets import MANIFEST, read_dataset
    from dd.runtime.io import INCOMPLETE

    if (out / INCOMPLETE).is_file():
        # An import that did not finish: its manifest (if any) is the last complete state;
        # images it placed after that are not samples (they are placed again).
        if not (out / MANIFEST).exists():
            return []
        return [s.to_json(out) for s in read_dataset(out, allow_incomplete=True)]
    has_images = (out / "images").is_dir() and any(
        p.suffix.lower() in IMAGE_SUFFIXES for p in (out / "images").rglob("*")
    )
    if not (out / MANIFEST).exists() and not has_images:
        return []
    return [s.to_json(out) for s in read_dataset(out)]


def import_richhf(
    tfrecords: list[Path],
    images_dir: Path,
    out: Path,
    *,
    copy: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
) -> RichHFReport:
    """Turn RichHF-18K TFRecords plus the user's Pick-a-Pic images into a dd dataset.

    For each record, the image under ``images_dir`` (searched recursively once) whose stem
    equals the stem of ``filename`` is hard-linked (or, across filesystems or with
    ``copy=True``, copied) to ``out/images/<name>`` in its original format. A non-zero
    ``artifact_map`` is written as ``out/masks/<stem>.png`` (8-bit grayscale, values as
    stored); an all-zero map makes the sample a negative (no mask). ``manifest.jsonl`` gets
    ``source: "human"``, ``category: null``, ``split`` (the TFRecord file's stem, e.g.
    ``train``) and the record's scores and labels. Records without an image are listed in
    ``out/missing.txt`` (this run's) and in the report, and skipped.

    Idempotent: samples already in ``out`` (from an earlier run or another source) are kept,
    a record's sample replaces its earlier entry, images already in place are not copied
    again. Every file is written atomically. ``on_progress(bytes_done, bytes_total)``.
    """
    from dd.data.datasets import MANIFEST

    paths = [Path(p) for p in tfrecords]
    for p in paths:
        if not p.is_file():
            raise DDError(f"TFRecord file not found: {p}", hint="pass RichHF's *.tfrecord files")
    if not Path(images_dir).is_dir():
        raise DDError(
            f"images folder not found: {images_dir}",
            hint="pass the folder holding your Pick-a-Pic images (searched recursively)",
        )
    out = Path(out)
    index, ambiguous = _index_images(Path(images_dir))
    entries = {rec["image"]: rec for rec in _existing_samples(out)}
    output_dir(out)
    mark_incomplete(out, "dd dataset import-richhf")  # until the manifest is in place
    report = RichHFReport(out=out, ambiguous=ambiguous)
    total = sum(p.stat().st_size for p in paths)
    base, seen = 0, set()
    for path in paths:
        for i, end, data in _iter_records(path):
            feats = _decode(path, i, data)
            where = f"{path}: record {i}"
            report.records += 1
            names = feats.get("filename") or []
            amap = feats.get("artifact_map") or []
            if not names or not isinstance(names[0], bytes):
                raise DDError(f"{where}: no 'filename' feature", hint="not a RichHF record?")
            if not amap or not isinstance(amap[0], bytes):
                raise DDError(f"{where}: no 'artifact_map' feature", hint="not a RichHF record?")
            filename = names[0].decode("utf-8", errors="replace")
            stem = PurePath(filename.replace("\\", "/")).stem
            src = index.get(stem)
            if src is None:
                report.missing.append(filename)
            else:
                if stem in seen:
                    report.duplicates += 1
                seen.add(stem)
                rel_img = f"images/{src.name}"
                if not _place_image(src, out / rel_img, copy):
                    report.reused += 1
                rel_mask = f"masks/{stem}.png"
                mask_png = _mask_png(amap[0], where)
                if mask_png is not None:
                    _write_if_changed(out / rel_mask, mask_png)
                    report.positives += 1
                else:
                    with contextlib.suppress(FileNotFoundError):
                        (out / rel_mask).unlink()  # a stale mask from an older import
                    rel_mask = None
                    report.negatives += 1
                report.imported += 1
                entries[rel_img] = {
                    **_scalar_meta(feats),
                    "image": rel_img,
                    "mask": rel_mask,
                    "source": "human",
                    "category": None,
                    "weight": 1.0,
                    "split": path.stem,
                }
            if on_progress:
                on_progress(base + end, total)
        base += path.stat().st_size
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        out / MANIFEST,
        "".join(json.dumps(rec, sort_keys=True) + "\n" for rec in entries.values()),
    )
    atomic_write_text(out / "missing.txt", "".join(f"{m}\n" for m in report.missing))
    mark_complete(out)
    return report
