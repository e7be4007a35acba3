"""WebDataset shards as image pools (issue 34, first part): `dd detect`, `dd label mine`
and `dd label pseudo` read `shards/{000000..000001}.tar`; bad shards are named and skipped."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dd.api.plugins import get_host
from dd.data.images import collect_inputs, load_image


def _png(seed: int, size=(24, 20)) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (*size, 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_shards(folder: Path, n_shards: int = 2, per: int = 3) -> Path:
    """img2dataset-style shards: KEY.png (or .jpg), KEY.txt, KEY.json per sample."""
    folder.mkdir(parents=True)
    for s in range(n_shards):
        with tarfile.open(folder / f"{s:06d}.tar", "w") as tar:
            for i in range(per):
                key = f"{s:03d}{i:04d}"
                _add(tar, f"{key}.png", _png(10 * s + i))
                _add(tar, f"{key}.txt", f"a photo number {s}-{i}".encode())
                _add(tar, f"{key}.json", json.dumps({"key": key, "width": 20}).encode())
    return folder


def test_shards_expand_to_samples_with_prompts_and_metadata(tmp_path):
    folder = make_shards(tmp_path / "shards")
    items, failures = collect_inputs([str(folder / "{000000..000001}.tar")])
    assert failures == [] and len(items) == 6
    first = items[0]
    assert first.meta["prompt"] == "a photo number 0-0" and first.meta["width"] == 20
    assert first.meta["shard_key"] == "0000000"
    assert load_image(first.path).shape == (24, 20, 3)
    again, _ = collect_inputs([str(folder / "*.tar")])  # a glob of shards reads the same
    assert [i.path for i in again] == [i.path for i in items]
    assert len({i.key for i in items}) == 6  # every sample its own output name


def test_a_bad_shard_and_a_sample_without_image_are_named_and_skipped(tmp_path):
    folder = make_shards(tmp_path / "shards")
    with tarfile.open(folder / "000000.tar", "a") as tar:
        _add(tar, "lonely.txt", b"a caption without an image")
    good = (folder / "000001.tar").read_bytes()
    with tarfile.open(folder / "000001.tar") as tar:
        last = [m for m in tar.getmembers() if m.name.endswith(".png")][-1]
    cut = last.offset_data + last.size // 2  # inside the last image: a copy cut short
    (folder / "000002.tar").write_bytes(good[:cut])
    items, failures = collect_inputs([str(folder / "{000000..000003}.tar")])
    reasons = dict(failures)
    assert len(items) == 6
    assert "sample has no image" in reasons[f"{folder / '000000.tar'}:lonely"]
    assert "truncated or unreadable shard" in reasons[str(folder / "000002.tar")]
    assert reasons[str(folder / "000003.tar")] == "shard not found"


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    det = get_host().detectors.get("segformer").load(None, variant="tiny", input_size=64)
    return str(det.save_pretrained(tmp_path_factory.mktemp("w") / "tiny"))


def test_detect_and_label_read_shards(tmp_path, weights, cli):
    folder = make_shards(tmp_path / "shards")
    spec = str(folder / "{000000..000001}.tar")
    res = cli("detect", spec, "--out", tmp_path / "det", "--weights", weights)
    assert res.exit_code == 0, res.output
    report = [json.loads(x) for x in (tmp_path / "det" / "report.jsonl").read_text().splitlines()]
    assert len(report) == 6 and len(list((tmp_path / "det" / "maps").rglob("*.png"))) == 6
    res = cli("label", "pseudo", spec, "--out", tmp_path / "pseudo", "--weights", weights)
    assert res.exit_code == 0, res.output
    lines = (tmp_path / "pseudo" / "manifest.jsonl").read_text().splitlines()
    recs = [json.loads(x) for x in lines]
    assert len(recs) == 6 and all(r["prompt"].startswith("a photo number") for r in recs)
    res = cli("label", "mine", spec, "--out", tmp_path / "queue", "--weights", weights)
    assert res.exit_code == 0, res.output


def test_label_pseudo_refuses_a_truncated_shard_in_one_line(tmp_path, weights, cli):
    folder = make_shards(tmp_path / "shards", n_shards=1)
    data = (folder / "000000.tar").read_bytes()
    (folder / "000000.tar").write_bytes(data[:700])  # cut inside the first image
    res = cli("label", "pseudo", str(folder / "000000.tar"), "--out", tmp_path / "p",
              "--weights", weights)  # fmt: skip
    assert res.exit_code == 1 and "truncated or unreadable shard" in res.output
    assert "Traceback" not in res.output


def _add_masks(folder: Path) -> None:
    """KEY.mask.png beside every other sample's image, a json with source and category."""
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            keys = sorted({m.name.split(".")[0] for m in tar.getmembers()})
        with tarfile.open(shard, "a") as tar:
            for i, key in enumerate(keys):
                if i % 2 == 0:
                    mask = np.zeros((24, 20), np.uint8)
                    mask[4:12, 4:12] = 255
                    buf = io.BytesIO()
                    Image.fromarray(mask).save(buf, format="PNG")
                    _add(tar, f"{key}.mask.png", buf.getvalue())


def test_train_detector_and_reg_data_read_shards(tmp_path, cli):
    from dd.data.datasets import load_mask, read_dataset
    from dd.data.prompts import read_reg_data

    folder = make_shards(tmp_path / "shards")
    _add_masks(folder)
    spec = str(folder / "{000000..000001}.tar")
    samples = read_dataset(spec)
    assert len(samples) == 6
    with_mask = [s for s in samples if s.mask is not None]
    assert len(with_mask) == 4 and all(s.source == "pseudo" for s in with_mask)
    assert all(s.source == "real" for s in samples if s.mask is None)  # photos: negatives
    assert load_mask(with_mask[0].mask, (24, 20)).max() == 1.0
    pairs = read_reg_data(spec)
    assert len(pairs) == 6 and pairs[0][1] == "a photo number 0-0"
    res = cli("train-detector", spec, "--out", tmp_path / "run", "--variant", "tiny",
              "--input-size", "32", "--batch-size", "2", "--steps", "2", "--workers", "2",
              "--val-fraction", "0")  # fmt: skip
    assert res.exit_code == 0, res.output
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


def test_refine_train_reads_shards(tmp_path):
    from dd.engines.refine_train import read_train_data

    folder = make_shards(tmp_path / "shards")
    spec = str(folder / "{000000..000001}.tar")
    for need in (True, False):
        pairs = read_train_data(spec, need_prompts=need)
        assert len(pairs) == 6 and pairs[0][1] == "a photo number 0-0"


def test_pack_writes_shards_that_read_back_as_the_dataset(tmp_path, cli):
    from test_train_detector import make_dataset

    from dd.data.datasets import load_mask, read_dataset

    data = make_dataset(tmp_path / "ds", n=7)
    out = tmp_path / "packed"
    res = cli("dataset", "pack", data, "--out", out, "--shard-size", "3")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.glob("*.tar")) == ["000000.tar", "000001.tar", "000002.tar"]
    before, after = read_dataset(data), read_dataset(str(out / "{000000..000002}.tar"))
    assert len(after) == len(before) == 7
    for a, b in zip(before, after, strict=True):
        assert (a.source, a.category, a.weight) == (b.source, b.category, b.weight)
        assert (a.mask is None) == (b.mask is None)
        assert np.array_equal(load_image(a.image), load_image(b.image))
        if a.mask is not None:
            h, w = load_image(a.image).shape[:2]
            assert np.array_equal(load_mask(a.mask, (h, w)), load_mask(b.mask, (h, w)))
    # an existing pack is refused; a killed pack resumes by shard, byte-identical
    assert cli("dataset", "pack", data, "--out", out).exit_code == 1
    straight = (out / "000001.tar").read_bytes()
    (out / "000001.tar").unlink()
    (out / ".000002.tar.tmp").write_bytes(b"half a shard")  # a kill while writing
    res = cli("dataset", "pack", data, "--out", out, "--shard-size", "3", "--resume")
    assert res.exit_code == 0, res.output
    assert "1 shard(s) written, 2 kept" in " ".join(res.output.split())
    assert (out / "000001.tar").read_bytes() == straight
    assert not list(out.glob(".*.tmp"))


def test_pack_overwrite_replaces_and_a_corrupt_member_is_one_failed_input(tmp_path, weights, cli):
    from test_train_detector import make_dataset

    data = make_dataset(tmp_path / "ds", n=4)
    out = tmp_path / "packed"
    assert cli("dataset", "pack", data, "--out", out, "--shard-size", "2").exit_code == 0
    res = cli("dataset", "pack", data, "--out", out, "--shard-size", "4", "--overwrite")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.glob("*.tar")) == ["000000.tar"]
    res = cli("dataset", "pack", data, "--out", out, "--resume", "--overwrite")
    assert res.exit_code == 2
    # a shard member that is not an image: named, the rest processed, exit code 4
    folder = make_shards(tmp_path / "shards", n_shards=1)
    with tarfile.open(folder / "000000.tar", "a") as tar:
        _add(tar, "broken.png", b"not a png at all")
    res = cli("detect", str(folder / "000000.tar"), "--out", tmp_path / "det", "--weights", weights)
    assert res.exit_code == 4, res.output
    assert "broken.png" in res.output and "Traceback" not in res.output
    assert len((tmp_path / "det" / "report.jsonl").read_text().splitlines()) == 3
