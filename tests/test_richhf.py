"""TFRecord / tf.train.Example reading and writing, and the RichHF-18K importer."""

from __future__ import annotations

import io
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from PIL import Image

from dd.data.datasets import read_dataset
from dd.data.richhf import (
    _crc32c_py,
    crc32c,
    decode_example,
    encode_example,
    import_richhf,
    masked_crc32c,
    read_examples,
    read_tfrecord,
    write_tfrecord,
)
from dd.errors import DDError

# -- CRC-32C ----------------------------------------------------------------------------------

# RFC 3720 (iSCSI) B.4 test vectors, plus the classic "123456789" check value.
CRC_VECTORS = [
    (b"", 0x00000000),
    (b"123456789", 0xE3069283),
    (bytes(32), 0x8A9136AA),
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
]


@pytest.mark.parametrize(("data", "expected"), CRC_VECTORS)
def test_crc32c_vectors(data, expected):
    assert _crc32c_py(data) == expected
    assert crc32c(data) == expected


def test_crc32c_slicing_matches_bytewise_on_odd_lengths():
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, 1000, dtype=np.uint8).tobytes()
    crc = 0xFFFFFFFF
    for b in data[:997]:  # the plain one-byte-at-a-time definition
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    assert _crc32c_py(data[:997]) == crc ^ 0xFFFFFFFF


def _mask(c: int) -> int:
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# -- TFRecord framing -------------------------------------------------------------------------


def _hand_framed(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return (
        length
        + struct.pack("<I", _mask(crc32c(length)))
        + data
        + struct.pack("<I", _mask(crc32c(data)))
    )


def test_framing_built_by_hand_reads_and_writer_matches(tmp_path):
    records = [b"\x0a\x00", b"", b"x" * 300]
    raw = b"".join(_hand_framed(r) for r in records)
    (tmp_path / "hand.tfrecord").write_bytes(raw)
    assert list(read_tfrecord(tmp_path / "hand.tfrecord")) == records
    assert write_tfrecord(tmp_path / "w.tfrecord", records) == 3
    assert (tmp_path / "w.tfrecord").read_bytes() == raw
    assert masked_crc32c(b"123456789") == _mask(0xE3069283)
    (tmp_path / "empty.tfrecord").write_bytes(b"")
    assert list(read_tfrecord(tmp_path / "empty.tfrecord")) == []


def _three_records(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "c.tfrecord"
    write_tfrecord(path, [b"first", b"second record", b"third"])
    return path, path.read_bytes()


def test_flipped_data_byte_names_the_record(tmp_path):
    path, raw = _three_records(tmp_path)
    off = 16 + len(b"first") + 12 + 3  # record 1: header (12) then data
    bad = bytearray(raw)
    bad[off] ^= 0x01
    path.write_bytes(bytes(bad))
    it = read_tfrecord(path)
    assert next(it) == b"first"
    with pytest.raises(DDError, match=r"c\.tfrecord: record 1 .*data checksum") as ei:
        next(it)
    assert ei.value.hint


def test_flipped_length_byte_names_the_record(tmp_path):
    path, raw = _three_records(tmp_path)
    off = 16 + len(b"first") + 16 + len(b"second record")  # record 2's length field
    bad = bytearray(raw)
    bad[off] ^= 0x40
    path.write_bytes(bytes(bad))
    with pytest.raises(DDError, match=r"record 2 .*length checksum"):
        list(read_tfrecord(path))


@pytest.mark.parametrize(("cut", "what"), [(5, "truncated record header"), (20, "truncated")])
def test_truncated_file(tmp_path, cut, what):
    path, raw = _three_records(tmp_path)
    start2 = 16 + len(b"first") + 16 + len(b"second record")
    path.write_bytes(raw[: start2 + cut])
    with pytest.raises(DDError, match=rf"record 2 .*{what}"):
        list(read_tfrecord(path))


def test_missing_tfrecord_file(tmp_path):
    with pytest.raises(DDError, match="cannot read TFRecord"):
        list(read_tfrecord(tmp_path / "nope.tfrecord"))


# -- tf.train.Example, checked against the official protobuf runtime -----------------------------


def _official_classes(packed: bool):
    """tf.train.Example's schema (tensorflow/core/example/feature.proto, example.proto) built
    in a private descriptor pool, with packed or unpacked numeric lists."""
    fdp = descriptor_pb2.FieldDescriptorProto
    f = descriptor_pb2.FileDescriptorProto(
        name=f"dd_test_example_{packed}.proto", package="ddtest", syntax="proto3"
    )

    def add(msg, name, num, ftype, label=fdp.LABEL_OPTIONAL, type_name=None, **kw):
        fld = msg.field.add(name=name, number=num, type=ftype, label=label, **kw)
        if type_name:
            fld.type_name = type_name
        return fld

    rep = fdp.LABEL_REPEATED
    add(f.message_type.add(name="BytesList"), "value", 1, fdp.TYPE_BYTES, rep)
    add(
        f.message_type.add(name="FloatList"), "value", 1, fdp.TYPE_FLOAT, rep
    ).options.packed = packed
    add(
        f.message_type.add(name="Int64List"), "value", 1, fdp.TYPE_INT64, rep
    ).options.packed = packed
    feat = f.message_type.add(name="Feature")
    feat.oneof_decl.add(name="kind")
    for num, (name, typ) in enumerate(
        [("bytes_list", "BytesList"), ("float_list", "FloatList"), ("int64_list", "Int64List")], 1
    ):
        add(feat, name, num, fdp.TYPE_MESSAGE, type_name=f".ddtest.{typ}", oneof_index=0)
    feats = f.message_type.add(name="Features")
    entry = feats.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    add(entry, "key", 1, fdp.TYPE_STRING)
    add(entry, "value", 2, fdp.TYPE_MESSAGE, type_name=".ddtest.Feature")
    add(feats, "feature", 1, fdp.TYPE_MESSAGE, rep, type_name=".ddtest.Features.FeatureEntry")
    add(
        f.message_type.add(name="Example"),
        "features",
        1,
        fdp.TYPE_MESSAGE,
        type_name=".ddtest.Features",
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("ddtest.Example"))


def _fill(example) -> None:
    fm = example.features.feature
    fm["filename"].bytes_list.value.extend([b"abc123.png"])
    fm["two"].bytes_list.value.extend([b"", b"\x00\xff"])
    fm["scores"].float_list.value.extend([0.5, -2.25, 1e-3])
    fm["ids"].int64_list.value.extend([0, -1, 2**40, -(2**63), 2**63 - 1])
    fm["empty"].float_list.SetInParent()


EXPECTED = {
    "filename": [b"abc123.png"],
    "two": [b"", b"\x00\xff"],
    "scores": [0.5, -2.25, float(np.float32(1e-3))],
    "ids": [0, -1, 2**40, -(2**63), 2**63 - 1],
    "empty": [],
}


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "unpacked"])
def test_decode_official_serialization(packed):
    cls = _official_classes(packed)
    ex = cls()
    _fill(ex)
    data = ex.SerializeToString()
    # the unpacked variant really puts one tag per value (wire type 5 for floats)
    assert (data.count(b"\x0d") >= 3) == (not packed)
    assert decode_example(data) == EXPECTED


def test_encode_parses_with_official_runtime():
    data = encode_example(
        {
            "filename": ["abc123.png"],
            "two": [b"", b"\x00\xff"],
            "scores": [0.5, -2.25, 1e-3],
            "ids": [0, -1, 2**40, -(2**63), 2**63 - 1],
            "empty": [],
        }
    )
    ex = _official_classes(True)()
    ex.ParseFromString(data)
    fm = ex.features.feature
    assert list(fm["filename"].bytes_list.value) == [b"abc123.png"]
    assert list(fm["ids"].int64_list.value) == EXPECTED["ids"]
    assert list(fm["scores"].float_list.value) == EXPECTED["scores"]
    assert fm["empty"].WhichOneof("kind") is None
    assert decode_example(data) == EXPECTED


def test_hand_encoded_unpacked_lists_and_unknown_fields():
    # Feature{int64_list{value: 5, value: 300}} unpacked (tag 0x08 varints), an unknown
    # fixed64 field 7 in the Example, an unknown varint field 9 in the Feature.
    int64_list = b"\x08\x05" + b"\x08\xac\x02"  # 300 = 0xac 0x02
    feature = b"\x1a" + bytes([len(int64_list)]) + int64_list + b"\x48\x01"
    entry = b"\x0a\x01n" + b"\x12" + bytes([len(feature)]) + feature
    features = b"\x0a" + bytes([len(entry)]) + entry
    data = b"\x0a" + bytes([len(features)]) + features + b"\x39" + bytes(8)
    assert decode_example(data) == {"n": [5, 300]}


def test_bad_example_and_mixed_values(tmp_path):
    write_tfrecord(tmp_path / "bad.tfrecord", [encode_example({"a": [1]}), b"\x0a\x05\x0a"])
    it = read_examples(tmp_path / "bad.tfrecord")
    assert next(it) == {"a": [1]}
    with pytest.raises(DDError, match="record 1: not a valid tf.train.Example"):
        next(it)
    with pytest.raises(DDError, match="single kind"):
        encode_example({"x": [1.0, b"a"]})


# -- the importer ----------------------------------------------------------------------------------


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _record(filename: str, amap: np.ndarray, artifact_score: float = 0.25) -> bytes:
    """A RichHF-like record; an ``H x W x 3`` map is stored as an RGB PNG."""
    return encode_example(
        {
            "filename": [filename],
            "artifact_map": [_png(amap)],
            "misalignment_map": [_png(np.zeros_like(amap))],
            "aesthetics_score": [0.4],
            "artifact_score": [artifact_score],
            "misalignment_score": [1.0],
            "overall_score": [0.75],
            "prompt_misalignment_label": [b"1 0 1"],
        }
    )


@pytest.fixture
def richhf(tmp_path):
    """Pick-a-Pic folder with a.png, sub/b.jpg, sub/deeper/c.webp; train records a, b, d
    (d has no image); a dev record for c whose map is an RGB PNG (re-encoded as grayscale)."""
    pics = tmp_path / "pickapic"
    (pics / "sub" / "deeper").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(pics / "a.png")
    Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(pics / "sub/b.jpg")
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(
        pics / "sub/deeper/c.webp"
    )
    amap = np.zeros((512, 512), np.uint8)
    amap[100:140, 200:260] = rng.integers(1, 256, (40, 60), dtype=np.uint8)
    cmap = np.full((16, 16), 7, np.uint8)
    cmap[3:5, 2:9] = 250
    train = tmp_path / "train.tfrecord"
    write_tfrecord(
        train,
        [
            _record("a.png", amap),
            _record("b.png", np.zeros((512, 512), np.uint8), artifact_score=1.0),
            _record("d.png", amap),
        ],
    )
    dev = tmp_path / "dev.tfrecord"
    write_tfrecord(dev, [_record("c.png", np.repeat(cmap[..., None], 3, axis=2))])
    return {"pics": pics, "train": train, "dev": dev, "amap": amap, "cmap": cmap}


def _manifest(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]


def test_import_writes_images_masks_manifest_and_missing(tmp_path, richhf):
    out = tmp_path / "ds"
    report = import_richhf([richhf["train"]], richhf["pics"], out)
    assert (report.records, report.imported, report.positives, report.negatives) == (3, 2, 1, 1)
    assert report.missing == ["d.png"]
    assert (out / "missing.txt").read_text() == "d.png\n"
    # images keep their format and are hard links of the originals
    assert os.path.samefile(out / "images/a.png", richhf["pics"] / "a.png")
    assert os.path.samefile(out / "images/b.jpg", richhf["pics"] / "sub/b.jpg")
    # the positive's mask is the artifact map exactly; the all-zero map gives no mask
    with Image.open(out / "masks/a.png") as m:
        assert m.mode == "L"
        np.testing.assert_array_equal(np.asarray(m), richhf["amap"])
    assert (out / "masks/a.png").read_bytes() == _png(richhf["amap"])  # kept byte for byte
    assert not (out / "masks/b.png").exists()
    recs = {r["image"]: r for r in _manifest(out)}
    assert set(recs) == {"images/a.png", "images/b.jpg"}
    a, b = recs["images/a.png"], recs["images/b.jpg"]
    assert a["mask"] == "masks/a.png" and b["mask"] is None
    assert a["source"] == b["source"] == "human"
    assert a["category"] is None and a["weight"] == 1.0 and a["split"] == "train"
    assert a["aesthetics_score"] == 0.4 and a["overall_score"] == 0.75
    assert b["artifact_score"] == 1.0
    assert a["prompt_misalignment_label"] == "1 0 1"
    assert "artifact_map" not in a and "misalignment_map" not in a and "filename" not in a
    samples = {s.image.name: s for s in read_dataset(out)}
    assert samples["a.png"].positive and not samples["b.jpg"].positive
    assert samples["a.png"].meta["split"] == "train"


def test_import_is_idempotent_and_accumulates(tmp_path, richhf):
    out = tmp_path / "ds"
    import_richhf([richhf["train"]], richhf["pics"], out)
    first = (out / "manifest.jsonl").read_text()
    again = import_richhf([richhf["train"]], richhf["pics"], out)
    assert again.reused == 2 and again.imported == 2
    assert (out / "manifest.jsonl").read_text() == first
    import_richhf([richhf["dev"]], richhf["pics"], out, copy=True)
    recs = {r["image"]: r for r in _manifest(out)}
    assert set(recs) == {"images/a.png", "images/b.jpg", "images/c.webp"}
    assert recs["images/c.webp"]["split"] == "dev"
    assert not os.path.samefile(out / "images/c.webp", richhf["pics"] / "sub/deeper/c.webp")
    assert (out / "images/c.webp").read_bytes() == (
        richhf["pics"] / "sub/deeper/c.webp"
    ).read_bytes()
    with Image.open(out / "masks/c.png") as m:
        assert m.mode == "L"
        np.testing.assert_array_equal(np.asarray(m), richhf["cmap"])
    assert (out / "missing.txt").read_text() == ""  # this run's missing images
    assert not list(out.rglob("*.tmp"))


def test_import_refuses_bad_inputs(tmp_path, richhf):
    with pytest.raises(DDError, match="TFRecord file not found"):
        import_richhf([tmp_path / "no.tfrecord"], richhf["pics"], tmp_path / "o")
    with pytest.raises(DDError, match="images folder not found"):
        import_richhf([richhf["train"]], tmp_path / "nopics", tmp_path / "o")
    write_tfrecord(tmp_path / "x.tfrecord", [encode_example({"filename": ["a.png"]})])
    with pytest.raises(DDError, match=r"x\.tfrecord: record 0: no 'artifact_map'"):
        import_richhf([tmp_path / "x.tfrecord"], richhf["pics"], tmp_path / "o")


def test_cli_import_and_info(tmp_path, richhf, cli):
    out = tmp_path / "ds"
    res = cli(
        "dataset", "import-richhf", richhf["train"], richhf["dev"], "--images", richhf["pics"],
        "--out", out,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "4 records: 3 imported (2 with artifacts, 1 clean), 1 images missing" in res.output
    assert "d.png" in res.output
    res = cli("dataset", "info", out, "--json")
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert (info["samples"], info["positives"], info["negatives"]) == (3, 2, 1)
    assert info["by_source"] == {"human": {"positives": 2, "negatives": 1, "total": 3}}
    assert info["by_category"] == {"(none)": {"positives": 2, "negatives": 1, "total": 3}}
    assert info["missing_images"] == 0 and info["missing_masks"] == 0
    res = cli("dataset", "info", out)
    assert res.exit_code == 0 and "class balance" in res.output and "66.7%" in res.output
    res = cli("dataset", "info", tmp_path / "nowhere")
    assert res.exit_code == 1 and "dataset folder not found" in res.output


def test_a_failed_import_leaves_nothing_that_looks_valid(tmp_path, richhf, cli):
    """A truncated TFRecord: exit 1, and `dd dataset info` says the dataset is incomplete."""
    raw = richhf["train"].read_bytes()
    cut = tmp_path / "cut.tfrecord"
    cut.write_bytes(raw[: len(raw) - 10])  # the last record is truncated
    out = tmp_path / "ds"
    res = cli("dataset", "import-richhf", cut, "--images", richhf["pics"], "--out", out)
    assert res.exit_code == 1 and "truncated" in res.output
    assert (out / "images").is_dir()  # the first records' images were placed ...
    res = cli("dataset", "info", out)
    assert res.exit_code == 1 and "incomplete dataset" in res.output, res.output
    assert "dd dataset import-richhf" in res.output
    # ... and a complete import makes it a dataset again
    res = cli("dataset", "import-richhf", richhf["train"], "--images", richhf["pics"], "--out", out)
    assert res.exit_code == 0, res.output
    assert cli("dataset", "info", out).exit_code == 0
