"""``dd label pseudo``: pseudo-label a pool of images with the detector, built to scale.

Output (a dataset folder, ``docs/datasets.md``)::

    OUT/masks/<hh>/<stem>-<hash>.png   the detector's map, 8-bit (0-255 = confidence 0-1);
                                       <hh> = 2 hex digits of the hash: 256 sub-folders
    OUT/pseudo/shard-r<rank>.jsonl     manifest shards: one line per finished image
    OUT/pseudo/done-r<rank>-of-<world>.json   written by a rank when it has finished
    OUT/pseudo/run.json                settings and detector (checked on --resume)
    OUT/manifest.jsonl                 the merged manifest (written once every rank is done)

With ``shards`` (``dd label pseudo --shards``) the labels go into WebDataset shards instead
of ``masks/``::

    OUT/shards/r<rank>-<n>.tar         KEY.<ext> (the image's bytes), KEY.mask.png (the map,
                                       absent when it is all zero), KEY.json (the manifest
                                       line), KEY.txt (the prompt); KEY = the path's hash

and the manifest lines name the members (``image``: ``shards/r00000-000000.tar/KEY.jpg``,
relative to OUT) and keep the pool path as ``source_image``. Each shard is written under a
temporary name and renamed when it holds ``shard_size`` samples (or the rank's last ones);
its lines are appended to the rank's ``shard-r<rank>.jsonl`` after that, so ``resume``
redoes at most the images of one unfinished shard per rank (a shard that was renamed but
whose lines were not written is read back, not redone). ``OUT`` is then a dataset folder
(``--data OUT``), and ``OUT/shards/*.tar`` a dataset by itself.

Each manifest line: ``image`` (absolute path), ``mask``, ``source: "pseudo"``, ``category``,
``prompt``, ``max``, ``mean``, and ``shrink_pad: {"scale": [lo, hi]}`` when the image's max
confidence is below ``shrink_threshold`` (seed 000's dynamic augmentation: the training
engine applies shrink-and-pad to exactly these samples).

Scale: inputs are streamed (folders walked lazily, manifests read line by line), never
listed in full. Image ``i`` belongs to rank ``hash(path) % world``: ranks (``RANK`` /
``WORLD_SIZE`` as set by ``torchrun`` and ``accelerate launch``, or ``--rank`` /
``--world-size``) split the pool without talking to each other. A mask is written atomically
before its manifest line is appended, and lines are fsynced per batch; ``resume`` skips every
image already in any shard, so a killed run loses nothing and duplicates nothing.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dd.data.images import IMAGE_SUFFIXES, MANIFEST_SUFFIXES, InputItem
from dd.errors import DDError, UsageError
from dd.runtime.io import (
    atomic_open,
    atomic_write_json,
    mark_run_folder,
    not_inputs,
    save_image_atomic,
    undo_if_nothing_written,
)

SHARDS = "pseudo"
#: Where ``--shards`` writes its WebDataset shards (inside OUT).
TAR_DIR = "shards"
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class PseudoConfig:
    out: Path
    batch_size: int = 16
    workers: int = 4
    resume: bool = False
    #: Start this rank's shard afresh (and drop the merged manifest); with --resume: no.
    overwrite: bool = False
    shrink_threshold: float = 0.3
    shrink_scale: tuple[float, float] = (0.3, 0.7)
    #: A pseudo label is a positive (shows an artifact) when its map's max is at least this.
    positive_threshold: float = 0.5
    floor: float = 0.0
    rank: int = 0
    world_size: int = 1
    max_pixels: int = 178_956_970
    #: Keyword rules giving each image a category from its prompt (None: dd's defaults).
    rules: Any = None
    #: Write WebDataset shards (image, mask, metadata per sample) instead of masks/.
    shards: bool = False
    #: Samples per written shard.
    shard_size: int = 1000

    def check(self) -> None:
        lo, hi = self.shrink_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise UsageError(f"--shrink-scale must be LO,HI with 0 < LO <= HI <= 1, got {lo},{hi}")
        if not 0.0 <= self.shrink_threshold <= 1.0:
            raise UsageError(f"--shrink-threshold must be in [0, 1], got {self.shrink_threshold}")
        if not 0.0 < self.positive_threshold <= 1.0:
            raise UsageError(
                f"--positive-threshold must be in (0, 1], got {self.positive_threshold}"
            )
        if not 0.0 <= self.floor < 1.0:
            raise UsageError(f"--floor must be in [0, 1), got {self.floor}")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise DDError(f"bad rank {self.rank} of world size {self.world_size}")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.shard_size < 1:
            raise UsageError(f"--shard-size must be at least 1, got {self.shard_size}")


def dist_env() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun/accelerate variables (0, 1, 0)."""

    def get(name: str, default: int) -> int:
        try:
            return int(os.environ.get(name, default))
        except ValueError:
            raise DDError(f"environment variable {name} is not an integer") from None

    return get("RANK", 0), get("WORLD_SIZE", 1), get("LOCAL_RANK", 0)


# -- streaming inputs ------------------------------------------------------------------------
def _walk(folder: Path) -> Iterator[Path]:
    """Images under ``folder``, lazily, in sorted order within each directory."""
    stack = [folder]
    while stack:
        d = stack.pop()
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError:
            continue
        subdirs = []
        derived = not_inputs(d)  # a run's pictures, a dataset's masks
        for e in entries:
            if e.name.startswith(".") or e.name in derived:
                continue
            if e.is_dir(follow_symlinks=False):
                subdirs.append(Path(e.path))
            elif e.is_file() and Path(e.name).suffix.lower() in IMAGE_SUFFIXES:
                yield Path(e.path)
        stack.extend(reversed(subdirs))


def stream_inputs(specs: list[str]) -> Iterator[tuple[Path, dict[str, Any]]]:
    """``(absolute path, manifest fields)`` for files, folders and ``.txt``/``.jsonl``
    manifests, one at a time. Unreadable specs raise a one-line :class:`DDError`."""
    from dd.data.shards import expand_shards, is_shard_spec

    for spec in specs:
        if is_shard_spec(spec):  # WebDataset shards, one shard at a time
            for shard in _shard_paths(spec):
                found: list[tuple[Path, dict[str, Any]]] = []
                failures: list[tuple[str, str]] = []
                expand_shards(str(shard), found, failures)
                bad = [f for f in failures if "sample has no image" not in f[1]]
                if bad:
                    raise DDError(f"{bad[0][0]}: {bad[0][1]}", hint="repair or drop the shard")
                yield from found
            continue
        path = Path(os.path.abspath(os.path.expanduser(spec)))
        if path.is_dir():
            yield from ((p, {}) for p in _walk(path))
        elif path.suffix.lower() in MANIFEST_SUFFIXES and path.is_file():
            yield from _stream_manifest(path)
        elif path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            yield path, {}
        else:
            raise DDError(f"pool input not found or not an image/folder/manifest: {spec}")


def _shard_paths(spec: str) -> list[Path]:
    from dd.data.shards import expand_shard_spec

    return expand_shard_spec(spec)


def _stream_manifest(manifest: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    jsonl = manifest.suffix.lower() == ".jsonl"
    with open(manifest, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            meta: dict[str, Any] = {}
            if jsonl:
                try:
                    rec = json.loads(text)
                    text = rec["image"]
                    if not isinstance(text, str):
                        raise TypeError("'image' must be a string")
                except (ValueError, KeyError, TypeError) as e:
                    raise DDError(f"{manifest}:{n}: bad manifest line ({e})") from None
                meta = {k: v for k, v in rec.items() if k != "image"}
            p = Path(os.path.expanduser(text))
            p = Path(os.path.abspath(p if p.is_absolute() else manifest.parent / p))
            if p.is_dir():
                yield from ((q, dict(meta)) for q in _walk(p))
            else:
                yield p, meta


def path_hash(path: Path) -> str:
    return hashlib.sha1(str(path).encode("utf-8", "surrogateescape")).hexdigest()


def owner(h: str, world_size: int) -> int:
    """The rank that owns an image with hash ``h``."""
    return int(h[:12], 16) % world_size


def mask_rel(path: Path, h: str) -> str:
    stem = _SAFE.sub("_", path.stem)[:80] or "img"
    return f"masks/{h[:2]}/{stem}-{h[:12]}.png"


# -- shards ------------------------------------------------------------------------------------
def _repair(path: Path) -> None:
    """Cut a torn last line (a killed run's) off a shard."""
    with contextlib.suppress(FileNotFoundError), open(path, "rb+") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if size == 0:
            return
        f.seek(max(0, size - 1))
        if f.read(1) == b"\n":
            return
        chunk, pos = 1 << 16, size
        while pos > 0:
            start = max(0, pos - chunk)
            f.seek(start)
            buf = f.read(pos - start)
            i = buf.rfind(b"\n")
            if i >= 0:
                f.truncate(start + i + 1)
                return
            pos = start
        f.truncate(0)


def iter_shard_records(out: Path) -> Iterator[dict[str, Any]]:
    for shard in sorted((out / SHARDS).glob("shard-r*.jsonl")):
        with open(shard, "rb") as f:
            for line in f:
                if not line.endswith(b"\n"):
                    break  # torn tail
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if isinstance(rec, dict) and "image" in rec:
                    yield rec


def source_of(rec: dict[str, Any]) -> str:
    """The pool path a manifest line labels (``source_image`` when the image is a member of
    a written shard)."""
    return str(rec.get("source_image") or rec["image"])


def done_images(out: Path) -> set[str]:
    return {source_of(rec) for rec in iter_shard_records(out)}


def excluded_images(paths: list[Path]) -> set[str]:
    """Absolute image paths of human-labelled datasets and queues (not to pseudo-label)."""
    from dd.data.datasets import read_dataset
    from dd.label.queue import QUEUE_FILE, Queue

    out: set[str] = set()
    for p in paths:
        p = Path(p)
        if (p / QUEUE_FILE).is_file():
            q = Queue.open(p)
            imgs = [q.image_path(it) for it in q.items]
        else:
            imgs = [s.image for s in read_dataset(p)]
        for img in imgs:
            out.add(os.path.abspath(img))
            out.add(os.path.realpath(img))
    return out


def merge_shards(out: Path, world_size: int) -> Path | None:
    """Write ``OUT/manifest.jsonl`` from all shards (first record of an image wins) once
    every rank of ``world_size`` has finished; returns the path, or None if not yet."""
    from dd.data.datasets import MANIFEST

    d = out / SHARDS
    if not all((d / f"done-r{r:05d}-of-{world_size:05d}.json").exists() for r in range(world_size)):
        return None
    seen: set[str] = set()
    with atomic_open(out / MANIFEST, "w") as f:
        for rec in iter_shard_records(out):
            if source_of(rec) in seen:
                continue
            seen.add(source_of(rec))
            f.write(json.dumps(rec, sort_keys=True) + "\n")
    return out / MANIFEST


# -- the run -----------------------------------------------------------------------------------
@dataclass
class PseudoResult:
    processed: int = 0
    skipped_done: int = 0
    skipped_excluded: int = 0
    other_ranks: int = 0
    failed: int = 0
    shrink: int = 0
    seconds: float = 0.0
    manifest: Path | None = None
    failures: list[dict[str, str]] | None = None

    @property
    def images_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["manifest"] = str(self.manifest) if self.manifest else None
        d["images_per_second"] = round(self.images_per_second, 3)
        d.pop("failures")
        return d


def _write(cfg: PseudoConfig, item: InputItem, prob: np.ndarray) -> dict[str, Any]:
    from dd.engines.mine import item_category, load_rules
    from dd.report.viz import to_uint8_map

    if cfg.floor > 0:
        prob = np.where(prob >= cfg.floor, prob, 0.0)
    u8 = to_uint8_map(prob)
    mx, mean = float(prob.max()), float(prob.mean())
    rel: str | None = item.key
    members: dict[str, bytes] = {}
    if cfg.shards:  # the shard writer (the drain) names the members
        from dd.data.shards import MASK_EXTENSION, member_bytes

        ext = item.path.suffix.lower().lstrip(".") or "png"
        members[ext] = member_bytes(item.path)
        if u8.any():
            buf = io.BytesIO()
            Image.fromarray(u8, mode="L").save(buf, format="PNG", compress_level=1)
            members[MASK_EXTENSION] = buf.getvalue()
        rel = None
    elif u8.any():
        save_image_atomic(Image.fromarray(u8, mode="L"), cfg.out / str(rel), compress_level=1)
    else:
        rel = None
    meta = dict(item.meta)
    if cfg.rules is None:
        cfg.rules = load_rules(None)
    # The category as `dd label mine` gives it: the manifest's, else the prompt's keywords
    # ("other" when none match); None only without a prompt.
    category, prompt = item_category(item.path, meta, cfg.rules)
    rec: dict[str, Any] = {
        **{k: v for k, v in meta.items() if k not in ("image", "mask", "source", "weight")},
        "image": str(item.path),
        "mask": rel,
        "source": "pseudo",
        "category": category if (prompt or meta.get("category")) else None,
        "weight": 1.0,
        "max": round(mx, 6),
        "mean": round(mean, 6),
        "positive": mx >= cfg.positive_threshold,
        "positive_threshold": cfg.positive_threshold,
        "height": int(prob.shape[0]),
        "width": int(prob.shape[1]),
    }
    if prompt and "prompt" not in rec:
        rec["prompt"] = prompt
    if mx < cfg.shrink_threshold:
        lo, hi = cfg.shrink_scale
        rec["shrink_pad"] = {"scale": [lo, hi] if lo != hi else lo}
    if cfg.shards:
        rec["_members"] = members
    return rec


class _TarOutput:
    """``--shards``: this rank's records go into ``OUT/shards/r<rank>-<n>.tar``; their
    manifest lines are released (for the rank's JSONL) when their shard is complete."""

    def __init__(self, out: Path, rank: int, shard_size: int):
        self.dir = out / TAR_DIR
        self.prefix = f"r{rank:05d}-"
        self.shard_size = shard_size
        self.writer: Any = None
        self.lines: list[bytes] = []

    def own_shards(self) -> list[Path]:
        return sorted(self.dir.glob(f"{self.prefix}[0-9][0-9][0-9][0-9][0-9][0-9].tar"))

    def start(self, overwrite: bool) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in self.dir.glob(f".{self.prefix}*.tar.tmp"):  # a killed run's last shard
            stale.unlink()
        if overwrite:
            for old in self.own_shards():
                old.unlink()

    def recover(self, done: set[str]) -> list[bytes]:
        """Manifest lines of complete shards that the JSONL lacks (a kill between the
        shard's rename and its lines): read back from the shards' ``KEY.json``."""
        import tarfile

        from dd.data.shards import shard_index

        lines = []
        for shard in self.own_shards():
            try:
                index = shard_index(shard)
                with open(shard, "rb") as f:
                    recs = []
                    for name, (offset, size) in index.items():
                        if name.endswith(".json"):
                            f.seek(offset)
                            recs.append(json.loads(f.read(size)))
            except (tarfile.TarError, OSError, ValueError) as e:
                raise DDError(
                    f"{shard}: a written shard that cannot be read back ({e})",
                    hint="delete it and resume: its images are labelled again",
                ) from None
            for rec in recs:
                if isinstance(rec, dict) and "image" in rec and source_of(rec) not in done:
                    done.add(source_of(rec))
                    lines.append(json.dumps(rec, sort_keys=True).encode() + b"\n")
        return lines

    def add(self, rec: dict[str, Any]) -> list[bytes]:
        """Add a record; returns the lines of a shard this completed (else [])."""
        from dd.data.shards import MASK_EXTENSION, ShardWriter

        members = rec.pop("_members")
        if self.writer is None:
            shards = self.own_shards()
            n = int(shards[-1].stem[len(self.prefix) :]) + 1 if shards else 0
            self.writer = ShardWriter(self.dir / f"{self.prefix}{n:06d}.tar")
        key = path_hash(Path(rec["image"]))[:16]
        rel = f"{TAR_DIR}/{self.writer.path.name}"
        ext = next(e for e in members if e not in (MASK_EXTENSION,))
        rec["source_image"] = rec["image"]
        rec["image"] = f"{rel}/{key}.{ext}"
        rec["mask"] = f"{rel}/{key}.{MASK_EXTENSION}" if MASK_EXTENSION in members else None
        members["json"] = json.dumps(rec, sort_keys=True).encode()
        if isinstance(rec.get("prompt"), str):
            members["txt"] = rec["prompt"].encode()
        self.writer.add(key, members)
        self.lines.append(json.dumps(rec, sort_keys=True).encode() + b"\n")
        return self.finish() if self.writer.samples >= self.shard_size else []

    def finish(self) -> list[bytes]:
        """Close the current shard (renamed into place); its lines."""
        if self.writer is None:
            return []
        self.writer.close()
        self.writer, lines, self.lines = None, self.lines, []
        return lines

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()
            self.writer = None


def _check_some_labelled(res: PseudoResult, specs: list[str]) -> None:
    """An error (exit code 4, like ``dd label mine``) when the pool had no image for any
    rank, or when every image of this rank failed to load: success means labels."""
    from dd.errors import EXIT_SOME_INPUTS_FAILED

    seen = res.processed + res.skipped_done + res.skipped_excluded + res.other_ranks
    if seen:
        return
    if res.failed:
        first = "; ".join(f["reason"] for f in (res.failures or [])[:3])
        raise DDError(
            f"every image of the pool failed to load ({res.failed}: {first})",
            hint="check the images; nothing was labelled",
            exit_code=EXIT_SOME_INPUTS_FAILED,
        )
    raise DDError(
        f"no images in the pool ({', '.join(specs)})",
        hint="pass folders, images or .txt/.jsonl manifests of images",
        exit_code=EXIT_SOME_INPUTS_FAILED,
    )


def run_pseudo(
    specs: list[str],
    detector: Any,
    cfg: PseudoConfig,
    *,
    exclude: list[Path] | None = None,
    on_progress: Callable[[PseudoResult], None] | None = None,
    stop_after: int | None = None,
    reporter: Any = None,
) -> PseudoResult:
    """Pseudo-label this rank's share of the pool; see the module docstring. ``detector``:
    a :class:`dd.api.plugins.DetectorRef` (loaded once the output folder is checked) or a
    loaded detector; ``reporter`` shows its warning and a progress line (unless
    ``on_progress`` is given).

    ``stop_after`` (tests) raises ``KeyboardInterrupt`` once exactly that many records are
    in the shard, like a kill between two writes (deterministic: it does not depend on how
    the writer threads were scheduled).
    """
    from dd.api.plugins import as_detector
    from dd.data.datasets import MANIFEST
    from dd.engines.detect import load_input
    from dd.inference import detect_batches
    from dd.runtime.io import check_output_folder
    from dd.runtime.progress import as_reporter

    cfg.check()
    out = Path(cfg.out)
    shard_dir = out / SHARDS
    shard = shard_dir / f"shard-r{cfg.rank:05d}.jsonl"
    info_path = shard_dir / "run.json"
    if cfg.resume and cfg.overwrite:
        raise UsageError("--resume and --overwrite exclude each other", hint="pick one")
    # Each rank checks only its own shard: other ranks of this run may have created theirs
    # (shards, masks) at any moment.
    own = (SHARDS, "masks", TAR_DIR, MANIFEST)
    check_output_folder(out, "label pseudo", overwrite=cfg.overwrite, allowed=own)
    if not (cfg.resume or cfg.overwrite) and (shard.exists() or (out / MANIFEST).exists()):
        raise DDError(
            f"{out} already holds pseudo-labels",
            hint="add --resume to continue that run, --overwrite to label afresh, or pick a "
            "new --out",
        )
    rep = as_reporter(reporter)
    detector = as_detector(detector, rep, meaning="its confidences")
    run_info = {
        "detector": detector.describe(),
        "shrink_threshold": cfg.shrink_threshold,
        "shrink_scale": list(cfg.shrink_scale),
        "positive_threshold": cfg.positive_threshold,
        "floor": cfg.floor,
        "shards": cfg.shards,
    }
    if cfg.overwrite:  # this rank's labels only: other ranks of the run handle their own
        shard.unlink(missing_ok=True)
        (out / MANIFEST).unlink(missing_ok=True)
        if cfg.rank == 0:
            info_path.unlink(missing_ok=True)
    if cfg.resume and info_path.exists():
        try:
            prev = json.loads(info_path.read_text())
        except ValueError:
            prev = None
        if prev is not None:  # a run of an older dd recorded no positive threshold
            prev = {"positive_threshold": PseudoConfig.positive_threshold, "shards": False, **prev}
        if prev is not None and prev != run_info:
            diff = ", ".join(
                f"{k}: {prev.get(k)!r} there, {run_info.get(k)!r} now"
                for k in sorted(set(prev) | set(run_info))
                if prev.get(k) != run_info.get(k)
            )
            raise DDError(
                f"{out} was labelled with other settings or another detector ({diff})",
                hint="resume with the same --weights and options, or pick a new --out",
            )
    with undo_if_nothing_written(out, bookkeeping=(f"{SHARDS}/run.json",)):
        shard_dir.mkdir(parents=True, exist_ok=True)
        mark_run_folder(out, "label pseudo", not_inputs=("masks", TAR_DIR))
        if cfg.rank == 0 and not (cfg.resume and info_path.exists()):
            atomic_write_json(info_path, run_info)
        with contextlib.suppress(FileNotFoundError):
            (shard_dir / f"done-r{cfg.rank:05d}-of-{cfg.world_size:05d}.json").unlink()
        _repair(shard)
        done = done_images(out) if cfg.resume else set()
        tars = _TarOutput(out, cfg.rank, cfg.shard_size) if cfg.shards else None
        recovered: list[bytes] = []
        if tars is not None:
            tars.start(overwrite=cfg.overwrite)
            if cfg.resume:
                recovered = tars.recover(done)
        skip = excluded_images(exclude or [])
        res = PseudoResult(failures=[])
        tag = f"pseudo r{cfg.rank}/{cfg.world_size}" if cfg.world_size > 1 else "pseudo"
        bar = rep.progress(tag, "{task.fields[msg]}", unit="open")
        if on_progress is None:
            task = bar.add_task(tag, total=None, msg="starting")

            def on_progress(r: PseudoResult) -> None:
                bar.update(task, msg=f"{r.processed} images, {r.images_per_second:.1f} img/s")

        def mine() -> Iterator[InputItem]:
            for path, meta in stream_inputs(specs):
                h = path_hash(path)
                if owner(h, cfg.world_size) != cfg.rank:
                    res.other_ranks += 1
                    continue
                s = str(path)
                if s in done:
                    res.skipped_done += 1
                    continue
                if s in skip or os.path.realpath(s) in skip:
                    res.skipped_excluded += 1
                    continue
                yield InputItem(path, mask_rel(path, h), meta)

        t0 = time.perf_counter()
        f = open(shard, "ab")  # noqa: SIM115 - closed below
        try:
            with (
                bar,
                ThreadPoolExecutor(max(1, cfg.workers), thread_name_prefix="dd-write") as writer,
            ):
                pending: collections.deque[Future[dict[str, Any]]] = collections.deque()

                def drain(block: bool, last: bool = False) -> None:
                    lines, recovered[:] = recovered[:], []
                    stop = False
                    while pending and (block or pending[0].done()):
                        rec = pending.popleft().result()
                        if tars is None:
                            lines.append(json.dumps(rec, sort_keys=True).encode() + b"\n")
                        else:  # lines follow their shard once it is complete
                            lines.extend(tars.add(rec))
                        res.processed += 1
                        res.shrink += "shrink_pad" in rec
                        # The test hook stops at exactly ``stop_after`` records, however the
                        # writer threads were scheduled.
                        if stop_after is not None and res.processed >= stop_after:
                            stop = True
                            break
                    if last and tars is not None and not stop:
                        lines.extend(tars.finish())
                    if lines:
                        f.write(b"".join(lines))
                        f.flush()
                        os.fsync(f.fileno())
                        res.seconds = time.perf_counter() - t0
                        if on_progress:
                            on_progress(res)
                    if stop:
                        raise KeyboardInterrupt

                results = detect_batches(
                    detector,
                    mine(),
                    lambda it: load_input(it, detector, cfg.max_pixels),
                    batch_size=cfg.batch_size,
                    workers=cfg.workers,
                )
                for loaded, prob in results:
                    if prob is None:
                        res.failed += 1
                        res.failures.append({"path": str(loaded.item.path), "reason": loaded.error})
                        continue
                    pending.append(writer.submit(_write, cfg, loaded.item, prob.cpu().numpy()))
                    drain(block=False)
                drain(block=True, last=True)
        finally:
            f.close()
            if tars is not None:
                tars.abort()  # an unfinished shard (an error or an interrupt): not kept
        res.seconds = time.perf_counter() - t0
        _check_some_labelled(res, specs)
        if res.failures:
            from dd.runtime.io import atomic_write_text

            atomic_write_text(
                shard_dir / f"failed-r{cfg.rank:05d}.jsonl",
                "".join(json.dumps(x, sort_keys=True) + "\n" for x in res.failures),
            )
        atomic_write_json(
            shard_dir / f"done-r{cfg.rank:05d}-of-{cfg.world_size:05d}.json", res.to_json()
        )
    res.manifest = merge_shards(out, cfg.world_size)
    return res
