"""``dd dataset pack``: a dataset written as WebDataset shards (see :mod:`dd.data.shards`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dd.data.datasets import read_dataset
from dd.data.shards import MASK_EXTENSION, ShardWriter, member_bytes, remove_unfinished
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
    remove_unfinished(out)  # a shard a killed run did not finish
    mark_run_folder(out, "dataset pack")
    written = kept = 0
    for index, start in enumerate(range(0, len(samples), shard_size)):
        final = out / f"{index:06d}.tar"
        if resume and final.is_file():
            kept += 1
            continue
        writer = ShardWriter(final)
        try:
            for n, sample in enumerate(samples[start : start + shard_size]):
                writer.add(f"{start + n:09d}", _members(sample))
        except BaseException:
            writer.abort()
            raise
        writer.close()
        written += 1
    return {"samples": len(samples), "shards_written": written, "shards_kept": kept}


def _members(sample: Any) -> dict[str, bytes]:
    ext = Path(sample.image).suffix.lower().lstrip(".") or "png"
    members = {ext: member_bytes(sample.image)}
    if sample.mask is not None:
        members[MASK_EXTENSION] = member_bytes(sample.mask)
    meta = {k: v for k, v in sample.meta.items() if k not in ("shard", "shard_key")}
    meta.update(source=sample.source, category=sample.category, weight=sample.weight)
    members["json"] = json.dumps(meta, sort_keys=True).encode()
    if isinstance(meta.get("prompt"), str):
        members["txt"] = meta["prompt"].encode()
    return members
