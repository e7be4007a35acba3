"""Pseudo-labelling throughput from WebDataset shards vs from a folder of the same images
(docs/performance.md). Same images, same tiny detector, one process, in one run.

    python scripts/bench_shards.py [--images 400] [--size 256]

Then an epoch's access pattern (each sample once, random order) from both.
"""

from __future__ import annotations

import argparse
import io
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--per-shard", type=int, default=100)
    args = ap.parse_args()
    from typer.testing import CliRunner

    from dd.api.plugins import get_host
    from dd.cli import build_app

    tmp = Path(tempfile.mkdtemp(prefix="dd-bench-shards-"))
    rng = np.random.default_rng(0)
    folder, shards = tmp / "folder", tmp / "shards"
    folder.mkdir()
    shards.mkdir()
    tar = None
    for i in range(args.images):
        buf = io.BytesIO()
        arr = rng.integers(0, 255, (args.size, args.size, 3), np.uint8)
        Image.fromarray(arr).save(buf, format="JPEG", quality=90)
        data = buf.getvalue()
        (folder / f"{i:06d}.jpg").write_bytes(data)
        if i % args.per_shard == 0:
            if tar is not None:
                tar.close()
            tar = tarfile.open(shards / f"{i // args.per_shard:06d}.tar", "w")  # noqa: SIM115
        info = tarfile.TarInfo(f"{i:06d}.jpg")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))  # type: ignore[union-attr]
    tar.close()  # type: ignore[union-attr]
    det = get_host().detectors.get("segformer").load(None, variant="tiny", input_size=64)
    weights = str(det.save_pretrained(tmp / "det"))
    n_shards = (args.images + args.per_shard - 1) // args.per_shard
    spec = str(shards / f"{{000000..{n_shards - 1:06d}}}.tar")
    runner = CliRunner()
    rows = []
    for name, src in (("folder", str(folder)), ("shards", spec), ("folder again", str(folder))):
        t0 = time.perf_counter()
        out = str(tmp / ("out-" + name.replace(" ", "-")))
        argv = ["label", "pseudo", src, "--out", out, "--weights", weights, "--workers", "2",
                "--batch-size", "16"]  # fmt: skip
        res = runner.invoke(build_app(), argv)
        dt = time.perf_counter() - t0
        assert res.exit_code == 0, res.output
        rows.append((name, args.images / dt))
        print(f"{name:<13} {args.images / dt:7.1f} images/s ({dt:.1f} s)")
    base = (rows[0][1] + rows[2][1]) / 2
    print(f"shards / folder: {rows[1][1] / base:.2f}x")
    random_reads(folder, spec, args.images)


def random_reads(folder: Path, spec: str, n: int) -> None:
    """Training's access pattern: every sample once, in a random order (an epoch of
    train-detector), decoded, from the folder and from the shards (offset index)."""
    import resource

    from dd.data.datasets import read_dataset
    from dd.data.images import load_image

    t0 = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    samples = read_dataset(spec)
    index_s = time.perf_counter() - t0
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print(f"index {len(samples)} shard samples: {index_s:.2f} s (max RSS grew {grown} KiB)")
    order = np.random.default_rng(0).permutation(n)
    files = sorted(folder.glob("*.jpg"))
    for name, paths in (("folder", files), ("shards", [s.image for s in samples]),
                        ("folder again", files)):  # fmt: skip
        t0 = time.perf_counter()
        for i in order:
            load_image(paths[i])
        dt = time.perf_counter() - t0
        print(f"random order, {name:<13} {n / dt:7.1f} images/s")


if __name__ == "__main__":
    main()
