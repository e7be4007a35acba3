"""`dd label pseudo --shards` (issue 34): labels written as WebDataset shards (image, mask
and manifest line per sample), each shard atomic, resumed by shard."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dd.api.plugins import get_host
from dd.data.datasets import load_mask, read_dataset
from dd.data.images import load_image
from dd.engines.pseudo import PseudoConfig, run_pseudo


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    det = get_host().detectors.get("segformer").load(None, variant="tiny", input_size=64)
    return str(det.save_pretrained(tmp_path_factory.mktemp("w") / "tiny"))


def _pool(folder: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True)
    paths = []
    for i in range(n):
        p = folder / f"p{i:02d}.{'jpg' if i % 3 == 0 else 'png'}"
        Image.fromarray(rng.integers(0, 255, (20 + i % 3, 28, 3), np.uint8)).save(p)
        paths.append(p.resolve())
    return paths


def _contents(out: Path) -> dict[str, tuple[bytes, bytes | None, dict]]:
    """{pool image: (image bytes, mask bytes, metadata)} of every written shard."""
    found = {}
    for shard in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, data in files.items():
            if name.endswith(".json"):
                key = name[: -len(".json")]
                meta = json.loads(data)
                image = next(
                    v
                    for k, v in files.items()
                    if k.startswith(key + ".")
                    and k.rsplit(".", 1)[-1] in ("png", "jpg")
                    and "mask" not in k
                )
                found[meta["source_image"]] = (image, files.get(key + ".mask.png"), meta)
    return found


def test_pseudo_writes_shards_that_train_reads(tmp_path, weights, cli):
    pool = _pool(tmp_path / "pool", 7)
    out = tmp_path / "out"
    r = cli(*["label", "pseudo", str(tmp_path / "pool"), "--out", str(out), "--weights",
             weights, "--shards", "--shard-size", "3", "--batch-size", "2"])  # fmt: skip
    assert r.exit_code == 0, r.output
    shards = sorted(p.name for p in (out / "shards").glob("*"))
    assert shards == ["r00000-000000.tar", "r00000-000001.tar", "r00000-000002.tar"]
    assert not (out / "masks").exists()
    found = _contents(out)
    assert sorted(found) == sorted(str(p) for p in pool)
    for src, (image, mask, meta) in found.items():
        assert image == Path(src).read_bytes()  # the pool image's own bytes
        assert meta["source"] == "pseudo" and "positive" in meta and "max" in meta
        # the map is stored exactly when it has a non-zero 8-bit pixel, and its peak is the
        # recorded max confidence
        assert (mask is not None) == (round(meta["max"] * 255) > 0), meta
        if mask is not None:
            import io

            peak = np.asarray(Image.open(io.BytesIO(mask))).max() / 255
            assert abs(peak - meta["max"]) <= 1 / 255
    assert any(mask is not None for _, mask, _ in found.values())
    # the folder is a dataset (its manifest names shard members) and so are the shards
    by_folder = {str(s.meta["source_image"]): s for s in read_dataset(out)}
    spec = str(out / "shards" / "r00000-{000000..000002}.tar")
    by_shards = {str(s.meta["source_image"]): s for s in read_dataset(spec)}
    assert sorted(by_folder) == sorted(by_shards) == sorted(found)
    for src, s in by_folder.items():
        t = by_shards[src]
        img = load_image(s.image)
        assert np.array_equal(np.asarray(img), np.asarray(load_image(t.image)))
        size = np.asarray(img).shape[:2]
        assert np.array_equal(load_mask(s.mask, size), load_mask(t.mask, size))
        assert s.source == t.source == "pseudo" and s.meta["max"] == t.meta["max"]
    # train-detector takes the written shards (two steps)
    run = tmp_path / "run"
    r = cli("train-detector", spec, "--out", run,
            "--variant", "tiny", "--input-size", "32", "--steps", "2", "--batch-size", "2",
            "--val-fraction", "0", "--workers", "2")  # fmt: skip
    assert r.exit_code == 0, r.output


def test_a_killed_shard_run_resumes_to_the_straight_runs_shards(tmp_path, weights):
    _pool(tmp_path / "pool", 8)
    det = get_host().detectors.get("segformer").load(weights)
    straight = tmp_path / "straight"
    settings = {"batch_size": 2, "workers": 2, "shards": True, "shard_size": 3}
    run_pseudo([str(tmp_path / "pool")], det, PseudoConfig(out=straight, **settings))
    out = tmp_path / "out"
    cfg = PseudoConfig(out=out, **settings)
    with pytest.raises(KeyboardInterrupt):  # after 5 records: one shard done, one half full
        run_pseudo([str(tmp_path / "pool")], det, cfg, stop_after=5)
    assert [p.name for p in (out / "shards").iterdir()] == ["r00000-000000.tar"]
    lines = (out / "pseudo" / "shard-r00000.jsonl").read_text().splitlines()
    assert len(lines) == 3  # the lines of the complete shard only
    # a kill after a shard's rename but before its lines: the shard is read back, not redone
    (out / "pseudo" / "shard-r00000.jsonl").write_text("")
    # a half-written shard of a killed run is dropped on resume
    (out / "shards" / ".r00000-000001.tar.tmp").write_bytes(b"partial")
    cfg.resume = True
    res = run_pseudo([str(tmp_path / "pool")], det, cfg)
    assert res.skipped_done == 3 and res.processed == 5
    assert sorted(p.name for p in (out / "shards").iterdir()) == [
        "r00000-000000.tar", "r00000-000001.tar", "r00000-000002.tar"]  # fmt: skip
    a, b = _contents(straight), _contents(out)
    assert sorted(a) == sorted(b)
    for src in a:
        assert a[src][:2] == b[src][:2]  # the same image and mask bytes
        assert {k: v for k, v in a[src][2].items() if k not in ("image", "mask")} == {
            k: v for k, v in b[src][2].items() if k not in ("image", "mask")}  # fmt: skip
    manifest = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(r["source_image"] for r in manifest) == sorted(a)
    # settings of the run are checked on resume: folder output over a shard run is refused
    from dd.errors import DDError

    with pytest.raises(DDError, match="other settings"):
        run_pseudo([str(tmp_path / "pool")], det, PseudoConfig(out=out, resume=True))


def test_shard_size_is_checked(tmp_path, weights, cli):
    r = cli(*["label", "pseudo", str(tmp_path), "--out", str(tmp_path / "o"), "--weights",
             weights, "--shards", "--shard-size", "0"])  # fmt: skip
    assert r.exit_code == 2 and "shard-size" in r.output


def test_a_damaged_written_shard_on_resume_is_one_line(tmp_path, weights, cli):
    _pool(tmp_path / "pool", 4)
    out = tmp_path / "out"
    args = ["label", "pseudo", tmp_path / "pool", "--out", out, "--weights", weights,
            "--shards", "--shard-size", "2"]  # fmt: skip
    assert cli(*args).exit_code == 0
    shard = out / "shards" / "r00000-000000.tar"
    shard.write_bytes(shard.read_bytes()[:700])  # cut inside its first member
    r = cli(*args, "--resume")
    assert r.exit_code == 1 and "cannot be read back" in r.output, r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) <= 2
