"""RLE codecs on hand-computed examples, and import/export round trips per format."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dd.data.datasets import read_dataset
from dd.errors import DDError
from dd.label.formats import (
    export_coco,
    export_label_studio,
    import_any,
    import_coco,
    import_cvat,
    import_label_studio,
    import_png,
    write_cvat_zip,
)
from dd.label.queue import write_queue
from dd.label.rle import (
    coco_counts_from_string,
    coco_counts_to_string,
    coco_decode,
    coco_encode,
    ls_decode,
    ls_decode_mask,
    ls_encode,
    ls_encode_mask,
)


# -- COCO RLE ----------------------------------------------------------------------------------
def test_coco_rle_hand_computed():
    # 3 x 2 mask; column-major order reads 0,1,1 | 1,0,0 -> runs 1 zero, 3 ones, 2 zeros.
    m = np.array([[0, 1], [1, 0], [1, 0]], np.uint8)
    assert coco_encode(m, compressed=False) == {"size": [3, 2], "counts": [1, 3, 2]}
    # a mask starting with a one has a leading zero-length run
    m2 = np.array([[1, 1], [0, 0]], np.uint8)  # column-major: 1,0,1,0
    assert coco_encode(m2, compressed=False)["counts"] == [0, 1, 1, 1, 1]
    # compressed (pycocotools: counts from the 4th on are stored minus the count two before):
    # [3, 2, 4, 1] -> '3', '2', '4', then 1 - 2 = -1 -> 5-bit group 31 -> chr(48 + 31) = 'O'
    assert coco_counts_to_string([3, 2, 4, 1]) == "324O"
    assert coco_counts_from_string("324O") == [3, 2, 4, 1]
    # [5, 4, 2, 1]: 1 - 4 = -3 -> group 29 (sign bit 0x10 set, no continuation) -> 'M'
    assert coco_counts_to_string([5, 4, 2, 1]) == "542M"
    assert coco_counts_from_string("542M") == [5, 4, 2, 1]
    # a value needing two groups: 40 = 0b01000 + (1 << 5): groups 8 | 0x20 -> 'X', then 1 -> '1'
    assert coco_counts_to_string([40]) == "X1"
    assert coco_counts_from_string("X1") == [40]
    assert coco_decode({"size": [3, 2], "counts": "132"}).tolist() == m.tolist()


def test_coco_rle_random_round_trip():
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (7, 5), (33, 64)]:
        for p in (0.0, 0.1, 0.5, 1.0):
            m = (rng.random(shape) < p).astype(np.uint8)
            for compressed in (True, False):
                rle = coco_encode(m, compressed=compressed)
                assert coco_decode(rle).tolist() == m.tolist()


def test_coco_rle_bad_counts_is_one_error():
    with pytest.raises(DDError, match="sum to 5"):
        coco_decode({"size": [2, 2], "counts": [1, 4]}, where="x.json")


# -- Label Studio RLE ----------------------------------------------------------------------------
def _bits_to_bytes(bits: str) -> list[int]:
    bits += "0" * (-len(bits) % 8)
    return [int(bits[i : i + 8], 2) for i in range(0, len(bits), 8)]


def test_label_studio_rle_hand_computed():
    header = f"{3:032b}" + "00111" + "0010" + "0011" + "0111" + "1111"  # 3 values, 8 bits
    # one repeat chunk: 1, width index 00 (3 bits), length-1 = 2, value 7
    rle = _bits_to_bytes(header + "1" + "00" + "010" + "00000111")
    assert ls_decode(rle).tolist() == [7, 7, 7]
    assert ls_encode(np.array([7, 7, 7])) == rle
    # a literal chunk: 0, width index 00, length-1 = 1, then the words 5 and 9
    lit = _bits_to_bytes(
        f"{2:032b}" + "00111" + "0010001101111111" + "0" + "00" + "001" + "00000101" + "00001001"
    )
    assert ls_decode(lit).tolist() == [5, 9]


def test_label_studio_rle_long_runs_and_masks():
    rng = np.random.default_rng(1)
    vals = np.concatenate([np.zeros(70000, np.uint8), np.full(5, 255, np.uint8), [1, 2, 3]])
    assert ls_decode(ls_encode(vals)).tolist() == vals.tolist()
    m = (rng.random((17, 23)) < 0.3).astype(np.uint8) * 255
    assert ls_decode_mask(ls_encode_mask(m), 17, 23).tolist() == m.tolist()
    with pytest.raises(DDError, match="expected 16x23x4"):
        ls_decode_mask(ls_encode_mask(m), 16, 23)


# -- round trips -------------------------------------------------------------------------------
def _make(tmp_path: Path, n: int = 3) -> tuple[Path, dict[str, np.ndarray]]:
    """Images of different sizes and masks (one of them empty: a negative)."""
    rng = np.random.default_rng(2)
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    masks = {}
    for i in range(n):
        h, w = 20 + 3 * i, 30 - 2 * i
        Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8)).save(img_dir / f"im{i}.png")
        m = np.zeros((h, w), np.uint8)
        if i != 1:
            m[2 + i : 9 + i, 4 : 12 + i] = 255
            m[15, 3] = 255
        masks[f"im{i}"] = m
    return img_dir, masks


def _dataset_masks(out: Path) -> dict[str, np.ndarray | None]:
    got = {}
    for s in read_dataset(out):
        assert s.source == "human" and s.image.is_file()
        got[s.image.stem] = None if s.mask is None else np.asarray(Image.open(s.mask))
    return got


def _check(got: dict, masks: dict) -> None:
    assert set(got) == set(masks)
    for k, m in masks.items():
        if m.any():
            assert got[k] is not None and got[k].tolist() == m.tolist(), k
        else:
            assert got[k] is None, f"{k}: an empty mask is a negative"


def test_png_folder_import(tmp_path):
    img_dir, masks = _make(tmp_path)
    mdir = tmp_path / "masks"
    mdir.mkdir()
    for k, m in masks.items():
        if k == "im2":  # a palette mask, as many tools write them
            p = Image.fromarray((m > 0).astype(np.uint8), "P")
            p.putpalette([0, 0, 0, 255, 0, 0])
            p.save(mdir / f"{k}.png")
        else:
            Image.fromarray(m).save(mdir / f"{k}.png")
    rep = import_png(mdir, img_dir, tmp_path / "ds")
    assert (rep.imported, rep.positives, rep.negatives) == (3, 2, 1)
    _check(_dataset_masks(tmp_path / "ds"), masks)
    # re-importing replaces, never duplicates
    import_png(mdir, img_dir, tmp_path / "ds")
    assert len(read_dataset(tmp_path / "ds")) == 3


@pytest.mark.parametrize("compressed", [True, False])
def test_coco_export_import_round_trip(tmp_path, compressed):
    img_dir, masks = _make(tmp_path)
    mdir = tmp_path / "masks"
    mdir.mkdir()
    for k, m in masks.items():
        Image.fromarray(m).save(mdir / f"{k}.png")
    import_png(mdir, img_dir, tmp_path / "ds")
    info = export_coco(tmp_path / "ds", tmp_path / "coco.json", compressed=compressed)
    assert info["annotations"] == 2
    coco = json.loads((tmp_path / "coco.json").read_text())
    counts = coco["annotations"][0]["segmentation"]["counts"]
    assert isinstance(counts, str) if compressed else isinstance(counts, list)
    rep = import_coco(tmp_path / "coco.json", tmp_path / "ds" / "images", tmp_path / "ds2")
    assert rep.imported == 3 and not rep.missing
    _check(_dataset_masks(tmp_path / "ds2"), masks)


def test_coco_import_unites_annotations_and_polygons(tmp_path):
    img_dir, _ = _make(tmp_path, 1)
    a = np.zeros((20, 30), np.uint8)
    a[0:3, 0:2] = 1
    coco = {
        "images": [{"id": 7, "file_name": "im0.png", "width": 30, "height": 20}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 1, "segmentation": coco_encode(a)},
            {
                "id": 2,
                "image_id": 7,
                "category_id": 2,
                "segmentation": [[10, 10, 14, 10, 14, 14, 10, 14]],
            },
        ],
        "categories": [{"id": 1, "name": "artifact"}, {"id": 2, "name": "hand"}],
    }
    (tmp_path / "c.json").write_text(json.dumps(coco))
    import_coco(tmp_path / "c.json", img_dir, tmp_path / "ds")
    m = np.asarray(Image.open(read_dataset(tmp_path / "ds")[0].mask))
    assert m[0:3, 0:2].min() == 255 and m[12, 12] == 255 and m[5, 5] == 0
    import_coco(tmp_path / "c.json", img_dir, tmp_path / "ds3", categories=["artifact"])
    m = np.asarray(Image.open(read_dataset(tmp_path / "ds3")[0].mask))
    assert m[0:3, 0:2].min() == 255 and m[12, 12] == 0


def test_label_studio_export_import_round_trip(tmp_path):
    img_dir, masks = _make(tmp_path)
    q = tmp_path / "queue"
    (q / "pred").mkdir(parents=True)
    items = []
    for k, m in masks.items():
        soft = np.where(m > 0, 200, 60).astype(np.uint8)  # above and below 0.5
        Image.fromarray(soft).save(q / "pred" / f"{k}.png")
        items.append(
            {"id": k, "image": str(img_dir / f"{k}.png"), "prediction": f"pred/{k}.png",
             "category": "hand", "max": 0.8}
        )  # fmt: skip
    write_queue(q, items, {"detector": {"weights": "tiny"}})
    out = tmp_path / "tasks.json"
    info = export_label_studio(q, out, image_root=img_dir)
    assert info["tasks"] == 3 and Path(info["config"]).read_text().startswith("<View>")
    tasks = json.loads(out.read_text())
    assert tasks[0]["data"]["image"] == "/data/local-files/?d=im0.png"
    res = tasks[0]["predictions"][0]["result"][0]
    assert res["type"] == "brushlabels" and res["value"]["brushlabels"] == ["artifact"]
    # What Label Studio exports after a person accepts the predictions as annotations.
    for t in tasks:
        t["annotations"] = [{"id": 1, "result": t.pop("predictions")[0]["result"]}]
    (tmp_path / "export.json").write_text(json.dumps(tasks))
    rep = import_label_studio(tmp_path / "export.json", img_dir, tmp_path / "ds")
    assert rep.imported == 3
    _check(_dataset_masks(tmp_path / "ds"), masks)
    assert {s.category for s in read_dataset(tmp_path / "ds")} == {"hand"}
    # format detection picks the same importer
    rep = import_any("auto", [tmp_path / "export.json"], tmp_path / "ds4", images=img_dir)
    assert rep.imported == 3


def test_cvat_zip_round_trip(tmp_path):
    img_dir, masks = _make(tmp_path)
    write_cvat_zip(tmp_path / "cvat.zip", masks)
    rep = import_cvat(tmp_path / "cvat.zip", img_dir, tmp_path / "ds")
    assert rep.imported == 3 and not rep.missing
    _check(_dataset_masks(tmp_path / "ds"), masks)
    with pytest.raises(DDError, match="no label"):
        import_cvat(tmp_path / "cvat.zip", img_dir, tmp_path / "x", labels=["hand"])


def test_import_cli_and_bad_input(tmp_path, cli):
    img_dir, masks = _make(tmp_path)
    write_cvat_zip(tmp_path / "cvat.zip", masks)
    res = cli(
        "label", "import", tmp_path / "cvat.zip", "--images", img_dir, "--out", tmp_path / "ds"
    )
    assert res.exit_code == 0, res.output
    assert "imported 3 samples (2 with artifacts, 1 clean)" in res.output
    (tmp_path / "bad.zip").write_text("not a zip")
    res = cli("label", "import", tmp_path / "bad.zip", "--images", img_dir, "--out", tmp_path / "x")
    assert res.exit_code == 1 and "bad.zip: not a zip file" in res.output
    res = cli("label", "status", tmp_path / "ds", "--json")
    assert res.exit_code == 0, res.output
    st = json.loads(res.output)
    assert st["kind"] == "dataset" and st["positives"] == 2 and st["negatives"] == 1
    assert st["by_category_source"]["(none)"]["human"] == {"positives": 2, "negatives": 1}


def test_queue_decisions_import_and_export_cli(tmp_path, cli):
    img_dir, masks = _make(tmp_path)
    q = tmp_path / "q"
    items = [{"id": k, "image": str(img_dir / f"{k}.png"), "category": "face"} for k in masks]
    write_queue(q, items, {})
    from dd.label.queue import Queue

    queue = Queue.open(q)
    (q / "masks").mkdir()
    Image.fromarray(masks["im0"]).save(q / "masks" / "im0.png")
    queue.log.append({"item": "im0", "label": "uncertain", "annotator": "a"})
    queue.log.append({"item": "im0", "label": "artifact", "annotator": "a"})  # latest wins
    queue.log.append({"item": "im1", "label": "no_artifact", "annotator": "b"})
    queue.log.append({"item": "im2", "label": "skip", "annotator": "b"})
    res = cli("label", "import", q, "--out", tmp_path / "ds", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["skipped"] == 1
    got = {s.image.stem: s for s in read_dataset(tmp_path / "ds")}
    assert set(got) == {"im0", "im1"} and got["im1"].mask is None
    assert np.asarray(Image.open(got["im0"].mask)).tolist() == masks["im0"].tolist()
    assert got["im0"].category == "face" and got["im0"].meta["annotator"] == "a"
    res = cli(
        "label", "export", q, "--format", "coco", "--rle", "list", "--out", tmp_path / "c.json"
    )
    assert res.exit_code == 0, res.output
    coco = json.loads((tmp_path / "c.json").read_text())
    assert len(coco["images"]) == 2 and len(coco["annotations"]) == 1
    seg = coco["annotations"][0]["segmentation"]
    assert coco_decode(seg).tolist() == (masks["im0"] > 0).astype(np.uint8).tolist()
    res = cli("label", "export", q, "--out", tmp_path / "t.json")
    assert res.exit_code == 0, res.output
    assert len(json.loads((tmp_path / "t.json").read_text())) == 3
    res = cli("label", "export", q, "--format", "yaml", "--out", tmp_path / "t.json")
    assert res.exit_code != 0 and "unknown export format 'yaml'" in res.output
