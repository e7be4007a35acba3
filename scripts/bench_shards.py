"""Pseudo-labelling throughput from WebDataset shards vs from a folder of the same images
(docs/performance.md). Same images, same tiny detector, one process, in one run.

    python scripts/bench_shards.py [--images 400] [--size 256]
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

    from dd.cli import build_app
    from dd.plugins import get_host

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


if __name__ == "__main__":
    main()
