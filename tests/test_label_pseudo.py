"""`dd label pseudo`: sharded, resumable, data-parallel pseudo-labels with shrink-and-pad."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dd.api.plugins import get_host
from dd.data.augment import ShrinkSpec, parse_shrink_spec
from dd.data.datasets import read_dataset
from dd.engines.pseudo import PseudoConfig, run_pseudo
from dd.label.queue import write_queue
from tests.helpers import free_port, two_process_env


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    det = get_host().detectors.get("segformer").load(None, variant="tiny", input_size=64)
    return str(det.save_pretrained(tmp_path_factory.mktemp("w") / "tiny"))


def _detector(weights):
    return get_host().detectors.get("segformer").load(weights)


def _pool(folder: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(0)
    (folder / "sub").mkdir(parents=True)
    paths = []
    for i in range(n):
        p = folder / ("sub" if i % 4 == 0 else ".") / f"p{i:02d}.png"
        Image.fromarray(rng.integers(0, 255, (20 + i % 3, 28, 3), np.uint8)).save(p)
        paths.append(p.resolve())
    return paths


def _shard(out: Path, rank: int) -> list[dict]:
    path = out / "pseudo" / f"shard-r{rank:05d}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_processes_split_the_pool_completely_and_disjointly(tmp_path, weights):
    pool = _pool(tmp_path / "pool", 24)
    out = tmp_path / "out"
    port = free_port()
    env = two_process_env()
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc-per-node", "2", "--master-port", str(port), "-m", "dd"]
    cmd += ["label", "pseudo", str(tmp_path / "pool"), "--out", str(out), "--weights", weights]
    cmd += ["--batch-size", "4", "--workers", "1", "--json"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r0 = {r["image"] for r in _shard(out, 0)}
    r1 = {r["image"] for r in _shard(out, 1)}
    assert r0 and r1, "both ranks did work"
    assert not r0 & r1, "ranks overlap"
    assert r0 | r1 == {str(p) for p in pool}, "ranks missed images"
    samples = read_dataset(out)
    assert sorted(str(s.image) for s in samples) == sorted(str(p) for p in pool)
    assert {s.source for s in samples} == {"pseudo"}
    for s in samples:
        assert s.mask is not None and s.mask.is_file()
        w, h = Image.open(s.image).size
        assert Image.open(s.mask).size == (w, h) and Image.open(s.mask).mode == "L"
    done = [json.loads(p.read_text()) for p in sorted((out / "pseudo").glob("done-*.json"))]
    assert [d["processed"] for d in done] == [len(r0), len(r1)]
    assert all(d["images_per_second"] > 0 for d in done)


@pytest.mark.parametrize("slow_writer", [False, True])
def test_resume_after_a_kill_loses_and_duplicates_nothing(
    tmp_path, weights, monkeypatch, slow_writer
):
    if slow_writer:  # a busy machine: no write has finished when the next batch arrives
        import dd.engines.pseudo as pseudo

        real = pseudo._write

        def slow(*a, **k):
            time.sleep(0.2)
            return real(*a, **k)

        monkeypatch.setattr(pseudo, "_write", slow)
    pool = _pool(tmp_path / "pool", 14)
    out = tmp_path / "out"
    det = _detector(weights)
    cfg = PseudoConfig(out=out, batch_size=3, workers=2)
    with pytest.raises(KeyboardInterrupt):
        run_pseudo([str(tmp_path / "pool")], det, cfg, stop_after=5)
    first = _shard(out, 0)
    assert len(first) == 5 and not (out / "manifest.jsonl").exists()
    # a torn line from a kill in the middle of a write is cut off on resume
    with open(out / "pseudo" / "shard-r00000.jsonl", "ab") as f:
        f.write(b'{"image": "/torn')
    # the same folder without --resume is refused
    from dd.errors import DDError

    with pytest.raises(DDError, match="already holds pseudo-labels"):
        run_pseudo([str(tmp_path / "pool")], det, PseudoConfig(out=out))
    cfg.resume = True
    res = run_pseudo([str(tmp_path / "pool")], det, cfg)
    assert res.skipped_done == len(first) and res.processed == 14 - len(first)
    lines = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(r["image"] for r in lines) == sorted(str(p) for p in pool)
    assert len(_shard(out, 0)) == 14
    # resuming a finished run does nothing
    again = run_pseudo([str(tmp_path / "pool")], det, cfg)
    assert again.processed == 0 and again.skipped_done == 14


def test_shrink_pad_is_recorded_for_low_confidence_images(tmp_path, weights):
    _pool(tmp_path / "pool", 10)
    det = _detector(weights)
    probe = run_pseudo(
        [str(tmp_path / "pool")], det, PseudoConfig(out=tmp_path / "probe", batch_size=4)
    )
    maxes = sorted(json.loads(x)["max"] for x in probe.manifest.read_text().splitlines())
    thr = (maxes[4] + maxes[5]) / 2  # half the images fall below
    cfg = PseudoConfig(out=tmp_path / "out", shrink_threshold=thr, shrink_scale=(0.4, 0.6))
    res = run_pseudo([str(tmp_path / "pool")], det, cfg)
    assert res.shrink == 5
    samples = read_dataset(tmp_path / "out")
    for s in samples:
        want = s.meta["max"] < thr
        assert ("shrink_pad" in s.meta) == want
        if want:  # the training engine reads exactly this field
            assert parse_shrink_spec(s.meta["shrink_pad"]) == ShrinkSpec(0.4, 0.6)


def test_human_labelled_images_are_skipped(tmp_path, weights, cli):
    pool = _pool(tmp_path / "pool", 6)
    write_queue(tmp_path / "q", [{"id": "a", "image": str(pool[0])}], {})
    res = cli(
        "label", "pseudo", tmp_path / "pool", "--out", tmp_path / "out", "--weights", weights,
        "--exclude", tmp_path / "q", "--json",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    info = json.loads(res.output[res.output.index("{") :])
    assert info["processed"] == 5 and info["skipped_excluded"] == 1
    assert info["images_per_second"] > 0
    assert str(pool[0]) not in {str(s.image) for s in read_dataset(tmp_path / "out")}
    res = cli("label", "status", tmp_path / "out")
    assert res.exit_code == 0, res.output
    assert "pseudo" in res.output and "5 samples" in res.output


def test_pseudo_labels_get_their_category_from_the_prompt(tmp_path, weights):
    """A prompt (sidecar .txt or manifest field) gives the category, as in `dd label mine`;
    an image without one stays uncategorised."""
    _pool(tmp_path / "pool", 3)
    (tmp_path / "pool" / "p01.txt").write_text("a woman waving her hand")
    (tmp_path / "pool" / "p02.txt").write_text("a red teapot")
    res = run_pseudo([str(tmp_path / "pool")], _detector(weights), PseudoConfig(out=tmp_path / "o"))
    cats = {Path(s.image).name: s.category for s in read_dataset(res.manifest.parent)}
    assert cats == {"p00.png": None, "p01.png": "hand", "p02.png": "other"}
