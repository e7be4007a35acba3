"""``dd dataset pack``: a dataset written as WebDataset shards (see :mod:`dd.data.shards`)."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

from dd.data.datasets import read_dataset
from dd.data.shards import MASK_EXTENSION, open_member
from dd.errors import DDError, UsageError

__all__ = ["pack_dataset"]


def pack_dataset(
    dataset: str,
    out: Path,
    *,
    shard_size: int = 1000,
    resume: bool = False,
    overwrite: bool = False,
) -> dict[str, int]:
    """Write the dataset ``dataset`` (a folder, or shards) as WebDataset shards
    ``out/NNNNNN.tar`` of ``shard_size`` samples: ``KEY.<image ext>``, ``KEY.mask.png`` (when
    the sample has a mask) and ``KEY.json`` (source, category, weight and the manifest's other
    fields; ``KEY.txt`` too when it has a prompt). Each shard is written under a temporary
    name and renamed when complete, so a killed run leaves whole shards only; ``resume``
    keeps the complete shards and writes the rest (samples are assigned to shards by their
    order, so a resumed run writes what a straight run would). Returns counts."""
    from dd.runtime.io import check_output_folder, mark_run_folder

    if shard_size < 1:
        raise UsageError(f"--shard-size must be at least 1, got {shard_size}")
    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other", hint="pick one")
    samples = read_dataset(dataset)
    existing = sorted(out.glob("[0-9]" * 6 + ".tar")) if out.is_dir() else []
    if existing and not (resume or overwrite):
        raise DDError(
            f"{out} already holds shards",
            hint="pass --resume to finish them, --overwrite to replace them, or a new --out",
        )
    check_output_folder(out, "dataset pack", overwrite=overwrite, allowed=tuple(
        p.name for p in existing))  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for p in existing:
            p.unlink()
    for stale in out.glob(".*.tar.tmp"):  # a shard a killed run did not finish
        stale.unlink()
    mark_run_folder(out, "dataset pack")
    written = kept = 0
    for index, start in enumerate(range(0, len(samples), shard_size)):
        final = out / f"{index:06d}.tar"
        if resume and final.is_file():
            kept += 1
            continue
        tmp = out / f".{index:06d}.tar.tmp"
        with tarfile.open(tmp, "w") as tar:
            for n, sample in enumerate(samples[start : start + shard_size]):
                _add_sample(tar, f"{start + n:09d}", sample)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        written += 1
    return {"samples": len(samples), "shards_written": written, "shards_kept": kept}


def _add_sample(tar: tarfile.TarFile, key: str, sample: Any) -> None:
    def add(name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0  # the same bytes for the same data
        tar.addfile(info, io.BytesIO(data))

    def raw(path: Path) -> bytes:
        member = open_member(path)
        return member.getvalue() if member is not None else Path(path).read_bytes()

    ext = Path(sample.image).suffix.lower().lstrip(".") or "png"
    add(f"{key}.{ext}", raw(sample.image))
    if sample.mask is not None:
        add(f"{key}.{MASK_EXTENSION}", raw(sample.mask))
    meta = {k: v for k, v in sample.meta.items() if k not in ("shard", "shard_key")}
    meta.update(source=sample.source, category=sample.category, weight=sample.weight)
    add(f"{key}.json", json.dumps(meta, sort_keys=True).encode())
    if isinstance(meta.get("prompt"), str):
        add(f"{key}.txt", meta["prompt"].encode())
