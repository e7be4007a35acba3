"""Run-length codecs of mask formats, written from the formats' definitions (no pycocotools).

COCO RLE (``{"size": [h, w], "counts": ...}``): run lengths of the binary mask read in
column-major (Fortran) order, starting with a run of zeros (possibly of length 0). ``counts``
is either a list of ints (uncompressed, used in ``iscrowd`` annotations) or a string
(compressed, pycocotools' ``rleToString``): every count after the second is stored as the
difference to the count two places earlier, and each value is written in 5-bit groups, least
significant first, as characters ``chr(48 + group)``, where bit 0x20 means "more groups
follow" and, in the last group, bit 0x10 is the sign.

Label Studio brush RLE (``value.rle`` of a ``brushlabels`` result, the ``thi.ng/rle-pack``
format): a bit stream, most significant bit of each byte first. Header: 32 bits element
count, 5 bits word size minus 1, four 4-bit run-length field widths minus 1. Then chunks: 1
bit ``repeat``, 2 bits choosing a width, that many bits of ``length - 1``; a repeat chunk
holds one word repeated ``length`` times, a literal chunk ``length`` words. The elements are
the RGBA bytes of the ``height x width`` mask, the mask being the alpha channel.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from dd.errors import DDError

__all__ = [
    "coco_counts_from_string",
    "coco_counts_to_string",
    "coco_decode",
    "coco_encode",
    "ls_decode",
    "ls_decode_mask",
    "ls_encode",
    "ls_encode_mask",
]


# -- COCO --------------------------------------------------------------------------------------
def coco_encode(mask: np.ndarray, *, compressed: bool = True) -> dict[str, Any]:
    """Binary ``H x W`` mask (nonzero = 1) -> COCO RLE dict (``counts`` str or list)."""
    m = np.asarray(mask)
    if m.ndim != 2:
        raise DDError(f"COCO RLE needs a 2-D mask, got shape {m.shape}")
    h, w = m.shape
    flat = (m != 0).ravel(order="F").astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        counts = [0, *counts]
    if not flat.size:
        counts = [0]
    return {
        "size": [int(h), int(w)],
        "counts": coco_counts_to_string(counts) if compressed else [int(c) for c in counts],
    }


def coco_decode(rle: dict[str, Any], *, where: str = "RLE") -> np.ndarray:
    """COCO RLE dict -> ``H x W`` uint8 mask of 0/1."""
    try:
        h, w = (int(v) for v in rle["size"])
        counts = rle["counts"]
    except (KeyError, TypeError, ValueError):
        raise DDError(f"{where}: an RLE needs 'size': [h, w] and 'counts'") from None
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    if isinstance(counts, str):
        counts = coco_counts_from_string(counts, where=where)
    try:
        counts = [int(c) for c in counts]
    except (TypeError, ValueError):
        raise DDError(f"{where}: RLE counts must be integers or a compressed string") from None
    if any(c < 0 for c in counts) or sum(counts) != h * w:
        raise DDError(
            f"{where}: RLE counts sum to {sum(counts)} but the mask is {h}x{w} = {h * w} pixels"
        )
    values = np.zeros(len(counts), np.uint8)
    values[1::2] = 1
    flat = np.repeat(values, counts)
    return flat.reshape((h, w), order="F")


def coco_counts_to_string(counts: Sequence[int]) -> str:
    """pycocotools' ``rleToString``: compressed COCO counts."""
    out = []
    cnts = [int(c) for c in counts]
    for i, c in enumerate(cnts):
        x = c - cnts[i - 2] if i > 2 else c
        more = True
        while more:
            g = x & 0x1F
            x >>= 5
            more = (x != -1) if (g & 0x10) else (x != 0)
            if more:
                g |= 0x20
            out.append(chr(g + 48))
    return "".join(out)


def coco_counts_from_string(s: str, *, where: str = "RLE") -> list[int]:
    """pycocotools' ``rleFrString``: compressed COCO counts -> list of ints."""
    cnts: list[int] = []
    p, n = 0, len(s)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n:
                raise DDError(f"{where}: truncated compressed RLE string")
            c = ord(s[p]) - 48
            if not 0 <= c < 64:
                raise DDError(f"{where}: invalid character {s[p]!r} in compressed RLE")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(cnts) > 2:
            x += cnts[-2]
        cnts.append(x)
    return cnts


# -- Label Studio ----------------------------------------------------------------------------
LS_RLE_SIZES = (3, 4, 8, 16)


def ls_encode(values: np.ndarray, *, wordsize: int = 8, rle_sizes=LS_RLE_SIZES) -> list[int]:
    """1-D array of ints < 2**wordsize -> Label Studio RLE bytes (as a list of ints).

    Every run becomes repeat chunks (literal chunks are never needed to be decodable)."""
    v = np.asarray(values).ravel().astype(np.int64)
    if v.size and (v.min() < 0 or v.max() >= 1 << wordsize):
        raise DDError(f"Label Studio RLE values must fit in {wordsize} bits")
    if len(rle_sizes) != 4 or not all(1 <= s <= 16 for s in rle_sizes):
        raise DDError("Label Studio RLE needs four run-length widths of 1..16 bits")
    bits = [f"{v.size:032b}", f"{wordsize - 1:05b}", *(f"{s - 1:04b}" for s in rle_sizes)]
    if v.size:
        starts = np.concatenate([[0], np.flatnonzero(np.diff(v)) + 1])
        lengths = np.diff(np.concatenate([starts, [v.size]]))
        widest = max(rle_sizes)
        order = sorted(range(4), key=lambda i: rle_sizes[i])
        for start, length in zip(starts.tolist(), lengths.tolist(), strict=True):
            word = f"{int(v[start]):0{wordsize}b}"
            while length > 0:
                n = min(length, 1 << widest)
                idx = next(i for i in order if n - 1 < 1 << rle_sizes[i])
                bits.append(f"1{idx:02b}{n - 1:0{rle_sizes[idx]}b}{word}")
                length -= n
    s = "".join(bits)
    s += "0" * (-len(s) % 8)
    return list(int(s, 2).to_bytes(len(s) // 8, "big")) if s else []


def ls_decode(rle: Sequence[int], *, where: str = "RLE") -> np.ndarray:
    """Label Studio RLE bytes -> 1-D uint8 array of the decoded elements."""
    try:
        data = bytes(int(b) for b in rle)
    except (TypeError, ValueError):
        raise DDError(f"{where}: Label Studio 'rle' must be a list of byte values") from None
    if len(data) < 7:
        raise DDError(f"{where}: Label Studio RLE is too short for its header")
    bits = bin(int.from_bytes(data, "big"))[2:].zfill(len(data) * 8)
    total = len(bits)
    pos = 0

    def read(n: int) -> int:
        nonlocal pos
        if pos + n > total:
            raise DDError(f"{where}: Label Studio RLE ends in the middle of a chunk")
        v = int(bits[pos : pos + n], 2) if n else 0
        pos += n
        return v

    num = read(32)
    word = read(5) + 1
    sizes = [read(4) + 1 for _ in range(4)]
    out = np.zeros(num, np.uint16 if word > 8 else np.uint8)
    i = 0
    while i < num:
        repeat = read(1)
        j = i + 1 + read(sizes[read(2)])
        if j > num:
            raise DDError(f"{where}: Label Studio RLE runs past its {num} elements")
        if repeat:
            out[i:j] = read(word)
            i = j
        else:
            while i < j:
                out[i] = read(word)
                i += 1
    return out.astype(np.uint8) if word <= 8 else out


def ls_encode_mask(mask: np.ndarray) -> list[int]:
    """``H x W`` uint8 mask -> Label Studio RLE of its RGBA image (all four channels = the
    mask value, so both the alpha channel and the colour read as the mask)."""
    m = np.asarray(mask, np.uint8)
    return ls_encode(np.repeat(m.ravel(), 4))


def ls_decode_mask(rle: Sequence[int], height: int, width: int, *, where: str = "RLE"):
    """Label Studio RLE of an RGBA image -> ``H x W`` uint8 mask (its alpha channel)."""
    flat = ls_decode(rle, where=where)
    if flat.size != height * width * 4:
        raise DDError(
            f"{where}: Label Studio RLE holds {flat.size} values, expected "
            f"{height}x{width}x4 = {height * width * 4} (original_height/original_width)"
        )
    return flat.reshape(height, width, 4)[:, :, 3].copy()
