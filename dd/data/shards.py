"""WebDataset shards as image pools: ``shards/{000000..000099}.tar`` wherever a command reads
images (``dd detect``, ``dd label mine``, ``dd label pseudo``).

A shard is a tar file whose members are grouped into samples by key, the WebDataset
convention (img2dataset writes it): ``0001.jpg``, ``0001.txt``, ``0001.json`` are the image,
caption and metadata of sample ``0001`` (the key is the member's path up to the first dot of
its file name). A spec names shards by path, with brace ranges as ``webdataset`` expands
them (``{000000..000099}``, ``{a,b}``).

Each sample with an image becomes one input whose path is *virtual*:
``SHARD.tar/MEMBER`` (e.g. ``/data/shards/000003.tar/000317.jpg``); :func:`member_of` tells
such a path apart and :func:`read_member` reads its bytes (random access through the tar's
header index, kept per thread), so every reader that takes a path (``load_image``) reads
shards too, and output names follow the shard and the key. The ``.txt`` caption becomes the
input's ``prompt`` and the ``.json`` object's fields its metadata, as a manifest line's do.

A shard that cannot be read (truncated, not a tar) is named in one line and skipped, and so
is a sample without an image, as the commands' other bad inputs are.
"""

from __future__ import annotations

import collections
import io
import json
import os
import tarfile
import threading
from pathlib import Path
from typing import Any

__all__ = [
    "expand_shard_spec",
    "ShardWriter",
    "is_shard_spec",
    "member_bytes",
    "remove_unfinished",
    "member_of",
    "read_member",
    "shard_index",
    "shard_records",
    "shard_samples",
]

SHARD_SUFFIXES = (".tar",)
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")
_local = threading.local()


def is_shard_spec(spec: str) -> bool:
    """A shard path or a brace pattern of shard paths."""
    s = str(spec)
    return s.lower().endswith(SHARD_SUFFIXES) or ("{" in s and ".tar" in s.lower())


def expand_shard_spec(spec: str) -> list[Path]:
    """The shard paths of ``spec`` (braces expanded as webdataset does), in order."""
    from braceexpand import braceexpand

    return [Path(os.path.abspath(os.path.expanduser(p))) for p in braceexpand(str(spec))]


def _split(name: str) -> tuple[str, str]:
    """``dir/0001.seg.png`` -> ``("dir/0001", "seg.png")`` (WebDataset's key rule)."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def shard_samples(path: Path) -> list[tuple[str, dict[str, tarfile.TarInfo]]]:
    """``(key, {extension: member})`` of every sample of the shard ``path``, in tar order.
    Raises ``tarfile.TarError``/``OSError`` for a shard that cannot be read to its end."""
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    index: dict[str, tuple[int, int]] = {}
    size = path.stat().st_size
    with tarfile.open(path, mode="r:") as tar:
        for info in tar:
            if info.offset_data + info.size > size:  # tarfile stops quietly at a cut header
                raise tarfile.ReadError(f"{info.name} is cut off at byte {size}")
            if not info.isfile():
                continue
            index[info.name] = (info.offset_data, info.size)
            if Path(info.name).name.startswith("."):
                continue
            key, ext = _split(info.name)
            samples.setdefault(key, {})[ext] = info
    _remember_index(path, index)
    return list(samples.items())


def expand_shards(
    spec: str,
    found: list[tuple[Path, dict[str, Any]]],
    failures: list[tuple[str, str]],
) -> None:
    """Add every sample with an image of the shards of ``spec`` to ``found`` (virtual path,
    metadata); a missing or unreadable shard, or a sample without an image, to
    ``failures``."""
    shards = expand_shard_spec(spec)
    for shard in shards:
        if not shard.is_file():
            failures.append((str(shard), "shard not found"))
            continue
        try:
            samples = shard_samples(shard)
        except (tarfile.TarError, OSError, EOFError) as e:
            failures.append((str(shard), f"truncated or unreadable shard ({e}); skipped"))
            continue
        if not samples:
            failures.append((str(shard), "empty shard"))
            continue
        with tarfile.open(shard, mode="r:") as tar:
            for key, members in samples:
                image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
                if image is None:
                    failures.append((f"{shard}:{key}", "sample has no image; skipped"))
                    continue
                meta: dict[str, Any] = {"shard": str(shard), "shard_key": key}
                if "json" in members:
                    try:
                        extra = json.loads(_read(tar, members["json"]))
                        if isinstance(extra, dict):
                            meta.update({k: v for k, v in extra.items() if k != "image"})
                    except ValueError:
                        failures.append((f"{shard}:{key}.json", "not JSON; metadata ignored"))
                if "txt" in members and "prompt" not in meta:
                    meta["prompt"] = _read(tar, members["txt"]).decode("utf-8").strip()
                found.append((shard / image.name, meta))


def _read(tar: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
    f = tar.extractfile(info)
    if f is None:
        raise OSError(f"{info.name} is not a file")
    with f:
        return f.read()


def member_of(path: str | os.PathLike[str]) -> tuple[Path, str] | None:
    """``(shard, member)`` when ``path`` is a virtual ``SHARD.tar/MEMBER`` path of an
    existing shard file, else None."""
    p = Path(path)
    if os.path.lexists(p):
        return None
    for parent in p.parents:
        if parent.suffix.lower() in SHARD_SUFFIXES and parent.is_file():
            return parent, p.relative_to(parent).as_posix()
    return None


#: Shards whose member index this process keeps (name -> (data offset, size)); an index
#: costs ~100 bytes per member, so 256 shards of 10,000 samples are ~250 MB at most.
INDEX_CACHE_SHARDS = 256
_indexes: collections.OrderedDict[str, dict[str, tuple[int, int]]] = collections.OrderedDict()
_index_lock = threading.Lock()


def _remember_index(shard: Path, index: dict[str, tuple[int, int]]) -> None:
    with _index_lock:
        _indexes[str(shard)] = index
        _indexes.move_to_end(str(shard))
        while len(_indexes) > INDEX_CACHE_SHARDS:
            _indexes.popitem(last=False)


def shard_index(shard: Path) -> dict[str, tuple[int, int]]:
    """``{member name: (data offset, size)}`` of ``shard``: one pass over its tar headers,
    kept for the process (and inherited by forked loader workers), so reading a member in any
    order is one seek and one read."""
    key = str(shard)
    with _index_lock:
        if key in _indexes:
            _indexes.move_to_end(key)
            return _indexes[key]
    index: dict[str, tuple[int, int]] = {}
    with tarfile.open(shard, mode="r:") as tar:
        for info in tar:
            if info.isfile():
                index[info.name] = (info.offset_data, info.size)
    _remember_index(shard, index)
    return index


def read_member(shard: Path, member: str) -> bytes:
    """The bytes of ``member`` of ``shard``: a seek through the shard's cached index
    (:func:`shard_index`); each thread keeps its last few shards open."""
    index = shard_index(shard)
    if member not in index:
        raise FileNotFoundError(f"{member} is not in {shard}")
    offset, size = index[member]
    files: collections.OrderedDict[str, Any] | None = getattr(_local, "files", None)
    if files is None or getattr(_local, "pid", None) != os.getpid():  # a forked worker
        files = _local.files = collections.OrderedDict()
        _local.pid = os.getpid()
    key = str(shard)
    f = files.get(key)
    if f is None:
        f = files[key] = open(shard, "rb")  # noqa: SIM115 - kept open for the next reads
        while len(files) > 4:
            files.popitem(last=False)[1].close()
    files.move_to_end(key)
    f.seek(offset)
    data = f.read(size)
    if len(data) != size:
        raise OSError(f"{shard} is cut off inside {member}")
    return data


def open_member(path: str | os.PathLike[str]) -> io.BytesIO | None:
    """A file object of the shard member at the virtual ``path``, or None (a real path)."""
    found = member_of(path)
    if found is None:
        return None
    return io.BytesIO(read_member(*found))


def member_bytes(path: Path) -> bytes:
    """The bytes of a file or of a shard member (a virtual ``SHARD.tar/MEMBER`` path)."""
    member = open_member(path)
    return member.getvalue() if member is not None else Path(path).read_bytes()


#: The extension of a sample's mask inside a shard (``KEY.mask.png`` beside ``KEY.png``).
MASK_EXTENSION = "mask.png"


def shard_records(spec: str) -> list[tuple[Path, Path | None, dict[str, Any]]]:
    """``(image, mask or None, metadata)`` of every sample of the shards of ``spec``, for a
    dataset (``dd.data.datasets.read_dataset``): the mask is the member ``KEY.mask.png``.
    A bad shard is refused in one line (training data must be complete)."""
    from dd.errors import DDError

    found: list[tuple[Path, dict[str, Any]]] = []
    failures: list[tuple[str, str]] = []
    expand_shards(spec, found, failures)
    bad = [f for f in failures if "sample has no image" not in f[1]]
    if bad:
        raise DDError(f"{bad[0][0]}: {bad[0][1]}", hint="repair or drop the shard")
    if not found:
        raise DDError(f"no samples in {spec}", hint="shards of KEY.png (+ KEY.mask.png) samples")
    out = []
    for image, meta in found:
        shard = Path(meta["shard"])
        mask_name = f"{meta['shard_key']}.{MASK_EXTENSION}"
        has_mask = mask_name in shard_index(shard)
        out.append((image, shard / mask_name if has_mask else None, meta))
    return out


class ShardWriter:
    """One WebDataset shard written atomically: members go to a hidden ``.NAME.tmp`` beside
    ``path``; :meth:`close` fsyncs it and renames it to ``path``, so a reader (or a resumed
    run) sees whole shards only. Members get mtime 0: the same samples give the same bytes."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp")
        self._tar = tarfile.open(self.tmp, "w")  # noqa: SIM115 - closed in close()/abort()
        self.samples = 0

    def add(self, key: str, members: dict[str, bytes]) -> None:
        """Add the sample ``key`` with ``{extension: bytes}`` members (``KEY.EXT``)."""
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = 0
            self._tar.addfile(info, io.BytesIO(data))
        self.samples += 1

    def close(self) -> Path:
        self._tar.close()
        with open(self.tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        self._tar.close()
        self.tmp.unlink(missing_ok=True)


def remove_unfinished(folder: Path) -> None:
    """Delete the temporary shards a killed :class:`ShardWriter` left in ``folder``."""
    for stale in Path(folder).glob(".*.tar.tmp"):
        stale.unlink()
