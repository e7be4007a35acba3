"""Tests for dd.data.images: robust image loading and input collection.

Every fixture is generated here, in ``tmp_path``, with Pillow and numpy.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dd.data.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_SUFFIXES,
    ImageLoadError,
    InputItem,
    collect_inputs,
    load_image,
)
from dd.errors import DDError

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _noise(h: int = 24, w: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save(tmp_path: Path, name: str, img: Image.Image, **kw: object) -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    return path


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def _png16(arr: np.ndarray, color_type: int) -> bytes:
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit RGB): 0 gray, 2 RGB, 4 LA."""
    h, w = arr.shape[:2]
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(raw))
        + _png_chunk(b"IEND", b"")
    )


def _mode(path: Path) -> str:
    with Image.open(path) as img:
        return img.mode


def _load_error(path: Path, **kw: object) -> ImageLoadError:
    with pytest.raises(ImageLoadError) as info:
        load_image(path, **kw)
    err = info.value
    assert str(path) in str(err) and str(path) in err.message
    assert "\n" not in str(err)
    return err


def _px(arr: np.ndarray, y: int, x: int) -> tuple[int, ...]:
    return tuple(int(v) for v in arr[y, x])


def _check_rgb(arr: np.ndarray, h: int, w: int) -> None:
    assert arr.shape == (h, w, 3)
    assert arr.dtype == np.uint8
    assert arr.flags.c_contiguous and arr.flags.writeable


# --------------------------------------------------------------------------------------------
# load_image: the plain cases
# --------------------------------------------------------------------------------------------


def test_module_switches_off_pillows_global_guard() -> None:
    assert Image.MAX_IMAGE_PIXELS is None
    assert DEFAULT_MAX_PIXELS == 178_956_970


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tif", ".webp"])
def test_lossless_rgb_round_trip(tmp_path: Path, suffix: str) -> None:
    data = _noise()
    kw = {"lossless": True} if suffix == ".webp" else {}
    path = _save(tmp_path, f"rgb{suffix}", Image.fromarray(data), **kw)
    arr = load_image(path)
    _check_rgb(arr, 24, 32)
    np.testing.assert_array_equal(arr, data)


def test_accepts_str_paths_and_jpeg(tmp_path: Path) -> None:
    path = _save(tmp_path, "flat.jpg", Image.new("RGB", (16, 8), (200, 100, 50)), quality=95)
    arr = load_image(str(path))
    _check_rgb(arr, 8, 16)
    assert np.abs(arr.astype(int) - [200, 100, 50]).max() <= 3


# --------------------------------------------------------------------------------------------
# load_image: refusals
# --------------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    err = _load_error(tmp_path / "nope.png")
    assert err.reason == "not found"
    assert isinstance(err, DDError)


def test_directory(tmp_path: Path) -> None:
    d = tmp_path / "folder.png"
    d.mkdir()
    assert "is a directory" in _load_error(d).reason


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    assert _load_error(path).reason == "empty file"


def test_truncated_png(tmp_path: Path) -> None:
    good = _save(tmp_path, "good.png", Image.fromarray(_noise(64, 64)))
    data = good.read_bytes()
    bad = tmp_path / "cut.png"
    bad.write_bytes(data[: len(data) // 2])
    err = _load_error(bad)
    assert err.reason.startswith("truncated or corrupt image: ")


def test_png_truncated_inside_its_header(tmp_path: Path) -> None:
    good = _save(tmp_path, "good.png", Image.fromarray(_noise()))
    bad = tmp_path / "stub.png"
    bad.write_bytes(good.read_bytes()[:12])
    err = _load_error(bad)
    assert err.reason.startswith("truncated or corrupt image: starts like PNG")


def test_truncated_jpeg(tmp_path: Path) -> None:
    good = _save(tmp_path, "good.jpg", Image.fromarray(_noise(64, 64)), quality=90)
    data = good.read_bytes()
    bad = tmp_path / "cut.jpg"
    bad.write_bytes(data[: len(data) // 2])
    assert _load_error(bad).reason.startswith("truncated or corrupt image: ")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"hello, I am a text file\n", "not an image (looks like a text file)"),
        (b"<!DOCTYPE html><html>403 Forbidden</html>", "not an image (looks like HTML/XML)"),
        # EPS would make Pillow run Ghostscript; it must be refused, not opened.
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n", "not an image (looks like"),
        (bytes(range(256)) * 4, "not an image (unrecognised or unsupported format"),
    ],
)
def test_not_an_image(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "fake.png"
    path.write_bytes(content)
    assert _load_error(path).reason.startswith(expected)


def test_unsupported_format_behind_an_image_suffix(tmp_path: Path) -> None:
    path = _save(tmp_path, "real.ppm", Image.new("RGB", (4, 4), RED))
    disguised = tmp_path / "disguised.png"
    disguised.write_bytes(path.read_bytes())
    assert _load_error(disguised).reason.startswith("not an image")


def test_error_pickles_and_keeps_fields(tmp_path: Path) -> None:
    err = _load_error(tmp_path / "gone.png")
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.path, copy.reason, copy.hint, str(copy)) == (
        err.path,
        err.reason,
        err.hint,
        str(err),
    )


# --------------------------------------------------------------------------------------------
# load_image: decompression-bomb guard
# --------------------------------------------------------------------------------------------


def test_bomb_guard(tmp_path: Path) -> None:
    path = _save(tmp_path, "big.png", Image.new("RGB", (10, 8), RED))
    err = _load_error(path, max_pixels=79)
    assert err.reason == (
        "image is 10x8 = 80 pixels, above the limit of 79 (decompression-bomb guard)"
    )
    assert err.hint == "raise it with --max-pixels"
    _check_rgb(load_image(path, max_pixels=80), 8, 10)
    _check_rgb(load_image(path, max_pixels=None), 8, 10)


def test_bomb_guard_runs_before_decoding(tmp_path: Path) -> None:
    """A truncated file is refused for its size, so the pixels were never decoded."""
    good = _save(tmp_path, "good.png", Image.fromarray(_noise(64, 64)))
    bad = tmp_path / "cut.png"
    bad.write_bytes(good.read_bytes()[:200])
    assert "decompression-bomb guard" in _load_error(bad, max_pixels=100).reason


def test_pillows_own_guard_if_someone_re_enables_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _save(tmp_path, "big.png", Image.new("RGB", (10, 10), RED))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    err = _load_error(path, max_pixels=None)
    assert "decompression bomb" in err.reason.lower()
    assert err.hint == "raise it with --max-pixels"


def test_bomb_guard_does_not_touch_pillows_global(tmp_path: Path) -> None:
    path = _save(tmp_path, "big.png", Image.new("RGB", (10, 8), RED))
    _load_error(path, max_pixels=10)
    assert Image.MAX_IMAGE_PIXELS is None


# --------------------------------------------------------------------------------------------
# load_image: modes
# --------------------------------------------------------------------------------------------


def test_mode_L(tmp_path: Path) -> None:
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    arr = load_image(_save(tmp_path, "l.png", Image.fromarray(gray)))
    _check_rgb(arr, 3, 4)
    for c in range(3):
        np.testing.assert_array_equal(arr[:, :, c], gray)


def test_mode_1(tmp_path: Path) -> None:
    img = Image.new("1", (4, 2), 0)
    img.putpixel((1, 0), 1)
    path = _save(tmp_path, "bw.png", img)
    assert _mode(path) == "1"
    arr = load_image(path)
    _check_rgb(arr, 2, 4)
    assert _px(arr, 0, 1) == WHITE and _px(arr, 0, 0) == (0, 0, 0)


def test_mode_LA_over_white(tmp_path: Path) -> None:
    img = Image.new("LA", (2, 1))
    img.putpixel((0, 0), (0, 255))  # opaque black
    img.putpixel((1, 0), (0, 0))  # fully transparent
    path = _save(tmp_path, "la.png", img)
    assert _mode(path) == "LA"
    arr = load_image(path)
    assert _px(arr, 0, 0) == (0, 0, 0) and _px(arr, 0, 1) == WHITE


def test_mode_RGBA_over_white(tmp_path: Path) -> None:
    img = Image.new("RGBA", (3, 1))
    img.putpixel((0, 0), (255, 0, 0, 255))
    img.putpixel((1, 0), (255, 0, 0, 0))
    img.putpixel((2, 0), (0, 0, 0, 128))
    arr = load_image(_save(tmp_path, "rgba.png", img))
    _check_rgb(arr, 1, 3)
    assert _px(arr, 0, 0) == RED
    assert _px(arr, 0, 1) == WHITE
    assert _px(arr, 0, 2) == (127, 127, 127)  # 255 * (1 - 128/255), rounded


def test_mode_P_without_transparency(tmp_path: Path) -> None:
    img = Image.new("P", (2, 1))
    img.putpalette([*RED, *BLUE] + [0] * 762)
    img.putpixel((1, 0), 1)
    path = _save(tmp_path, "p.png", img)
    with Image.open(path) as check:
        assert check.mode == "P" and "transparency" not in check.info
    arr = load_image(path)
    assert _px(arr, 0, 0) == RED and _px(arr, 0, 1) == BLUE


def test_mode_P_with_transparency(tmp_path: Path) -> None:
    img = Image.new("P", (2, 1))
    img.putpalette([*RED, *BLUE] + [0] * 762)
    img.putpixel((1, 0), 1)
    path = _save(tmp_path, "pt.png", img, transparency=0)
    with Image.open(path) as check:
        assert check.mode == "P" and "transparency" in check.info
    arr = load_image(path)
    assert _px(arr, 0, 0) == WHITE and _px(arr, 0, 1) == BLUE


def test_mode_CMYK_jpeg(tmp_path: Path) -> None:
    path = _save(tmp_path, "cmyk.jpg", Image.new("CMYK", (8, 8), (0, 255, 255, 0)), quality=95)
    assert _mode(path) == "CMYK"
    arr = load_image(path)
    _check_rgb(arr, 8, 8)
    assert np.abs(arr.astype(int) - RED).max() <= 3


def test_mode_YCbCr_tiff(tmp_path: Path) -> None:
    path = _save(tmp_path, "ycc.tif", Image.new("YCbCr", (4, 4), (128, 128, 128)))
    assert _mode(path) == "YCbCr"
    arr = load_image(path)
    _check_rgb(arr, 4, 4)
    assert np.abs(arr.astype(int) - 128).max() <= 1


def test_16bit_gray_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    path = _save(tmp_path, "g16.png", Image.fromarray(values))
    assert _mode(path).startswith("I")
    arr = load_image(path)
    _check_rgb(arr, 1, 4)
    assert arr[0, :, 0].tolist() == [0, 1, 128, 255]
    assert (arr == arr[:, :, :1]).all()  # gray


def test_16bit_big_endian_tiff(tmp_path: Path) -> None:
    values = np.array([[0, 32768, 65535]], dtype=np.uint16)
    img = Image.frombytes("I;16B", (3, 1), values.astype(">u2").tobytes())
    path = _save(tmp_path, "g16b.tif", img)
    assert _mode(path) == "I;16B"
    assert load_image(path)[0, :, 0].tolist() == [0, 128, 255]


def test_16bit_gray_hand_written_png(tmp_path: Path) -> None:
    path = tmp_path / "g16h.png"
    path.write_bytes(_png16(np.array([[65535, 32768, 0]], dtype=np.uint16), 0))
    assert load_image(path)[0, :, 0].tolist() == [255, 128, 0]


def test_mode_I_32bit(tmp_path: Path) -> None:
    in_range = _save(tmp_path, "i.tif", Image.fromarray(np.array([[0, 65535]], np.int32)))
    assert _mode(in_range) == "I"
    assert load_image(in_range)[0, :, 0].tolist() == [0, 255]
    wide = _save(tmp_path, "iw.tif", Image.fromarray(np.array([[-10, 0, 100_000]], np.int32)))
    out = load_image(wide)[0, :, 0].tolist()  # min-max normalised
    assert out[0] == 0 and out[-1] == 255 and 0 <= out[1] <= 1


def test_mode_F(tmp_path: Path) -> None:
    unit = _save(tmp_path, "f.tif", Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32)))
    assert _mode(unit) == "F"
    assert load_image(unit)[0, :, 0].tolist() == [0, 128, 255]
    wide = np.array([[np.nan, -5.0, 100.0, 300.0]], np.float32)
    path = _save(tmp_path, "fw.tif", Image.fromarray(wide))
    assert load_image(path)[0, :, 0].tolist() == [0, 0, 100, 255]


def test_16bit_rgb_png(tmp_path: Path) -> None:
    rgb16 = np.array([[[65535, 0, 0], [32768, 32768, 32768], [0, 0, 65535]]], dtype=np.uint16)
    path = tmp_path / "rgb16.png"
    path.write_bytes(_png16(rgb16, 2))
    arr = load_image(path)
    _check_rgb(arr, 1, 3)
    assert _px(arr, 0, 0) == RED and _px(arr, 0, 2) == BLUE
    assert all(abs(v - 128) <= 1 for v in _px(arr, 0, 1))


def test_16bit_gray_alpha_png(tmp_path: Path) -> None:
    la16 = np.array([[[0, 65535], [0, 0]]], dtype=np.uint16)
    path = tmp_path / "la16.png"
    path.write_bytes(_png16(la16, 4))
    arr = load_image(path)
    assert _px(arr, 0, 0) == (0, 0, 0) and _px(arr, 0, 1) == WHITE


# --------------------------------------------------------------------------------------------
# load_image: EXIF orientation and animations
# --------------------------------------------------------------------------------------------


def test_exif_orientation_6_is_honoured(tmp_path: Path) -> None:
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = RED  # left half of the stored pixels
    stored[:, 20:] = BLUE
    img = Image.fromarray(stored)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = _save(tmp_path, "rot.jpg", img, exif=exif, quality=95)
    with Image.open(path) as check:
        assert check.size == (40, 20) and check.getexif()[0x0112] == 6
    arr = load_image(path)
    _check_rgb(arr, 40, 20)  # 20 wide, 40 tall
    # Rotating clockwise puts the stored left half on top.
    assert np.abs(arr[2:18].astype(int) - RED).max() <= 8
    assert np.abs(arr[22:38].astype(int) - BLUE).max() <= 8


def test_multi_picture_jpeg_gives_first_picture(tmp_path: Path) -> None:
    """Cameras write MPO files with a .jpg suffix; Pillow opens them through its JPEG opener."""
    first, *rest = _frames()
    path = tmp_path / "camera.jpg"
    first.save(path, format="MPO", save_all=True, append_images=rest, quality=95)
    with Image.open(path) as check:
        assert check.format == "MPO"
    arr = load_image(path)
    _check_rgb(arr, 4, 6)
    assert np.abs(arr.astype(int) - RED).max() <= 8


def _frames() -> list[Image.Image]:
    return [Image.new("RGB", (6, 4), c) for c in (RED, GREEN, BLUE)]


@pytest.mark.parametrize(
    ("name", "kw"),
    [
        ("anim.gif", {}),
        ("anim.webp", {"lossless": True}),
        ("anim.png", {}),  # APNG
    ],
)
def test_animation_gives_first_frame(tmp_path: Path, name: str, kw: dict) -> None:
    first, *rest = _frames()
    path = tmp_path / name
    first.save(path, save_all=True, append_images=rest, duration=100, loop=0, **kw)
    with Image.open(path) as check:
        assert getattr(check, "n_frames", 1) == 3
    arr = load_image(path)
    _check_rgb(arr, 4, 6)
    assert (arr == RED).all()


def test_gif_with_transparency_over_white(tmp_path: Path) -> None:
    img = Image.new("P", (2, 1))
    img.putpalette([*RED, *BLUE] + [0] * 762)
    img.putpixel((1, 0), 1)
    path = _save(tmp_path, "t.gif", img, transparency=0)
    arr = load_image(path)
    assert _px(arr, 0, 0) == WHITE and _px(arr, 0, 1) == BLUE


# --------------------------------------------------------------------------------------------
# load_image: threads and file handles
# --------------------------------------------------------------------------------------------


def _open_fds() -> int | None:
    fd_dir = "/proc/self/fd"
    return len(os.listdir(fd_dir)) if os.path.isdir(fd_dir) else None


def test_threads_and_no_leaked_files(tmp_path: Path) -> None:
    paths = [_save(tmp_path, f"t{i}.png", Image.fromarray(_noise(seed=i))) for i in range(24)]
    first, *rest = _frames()
    anim = tmp_path / "anim.gif"
    first.save(anim, save_all=True, append_images=rest)
    paths.append(anim)
    broken = tmp_path / "broken.png"
    broken.write_bytes(paths[0].read_bytes()[:300])
    paths.append(broken)

    def safe(p: Path) -> np.ndarray | str:
        try:
            return load_image(p)
        except ImageLoadError as e:
            return e.reason

    serial = [safe(p) for p in paths]
    before = _open_fds()
    with ThreadPoolExecutor(max_workers=8) as pool:
        parallel = list(pool.map(safe, paths * 4))
    after = _open_fds()
    for a, b in zip(serial * 4, parallel, strict=True):
        if isinstance(a, str):
            assert a == b
        else:
            np.testing.assert_array_equal(a, b)
    assert isinstance(serial[-1], str) and serial[-1].startswith("truncated")
    if before is not None:
        assert after == before


# --------------------------------------------------------------------------------------------
# collect_inputs
# --------------------------------------------------------------------------------------------


def _img(path: Path, color: tuple[int, int, int] = RED) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (2, 2), color).save(path)
    return path


def _keys(items: list[InputItem]) -> list[str]:
    return [item.key for item in items]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    for rel in ["b.png", "a.jpg", "sub/c.webp", "sub/deeper/d.TIFF", "A2.PNG"]:
        _img(root / rel)
    _img(root / ".hidden.png")
    _img(root / ".cache" / "e.png")
    (root / "notes.txt").write_text("not an image\n")
    (root / "sub" / "readme.md").write_text("hi\n")
    return root


def test_image_suffixes() -> None:
    assert {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"} <= IMAGE_SUFFIXES


def test_folder_is_recursive_sorted_and_skips_hidden(tree: Path) -> None:
    items, failures = collect_inputs([str(tree)])
    assert failures == []
    assert _keys(items) == ["A2", "a", "b", "sub/c", "sub/deeper/d"]
    assert [i.path for i in items] == [
        tree / "A2.PNG",
        tree / "a.jpg",
        tree / "b.png",
        tree / "sub" / "c.webp",
        tree / "sub" / "deeper" / "d.TIFF",
    ]
    assert all(i.path.is_absolute() and i.meta == {} for i in items)


def test_single_file_and_relative_specs(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tree)
    items, failures = collect_inputs(["b.png", "sub/../a.jpg"])
    assert failures == []
    assert [i.path for i in items] == [tree / "b.png", tree / "a.jpg"]
    assert _keys(items) == ["b", "a"]


def test_globs(tree: Path) -> None:
    items, failures = collect_inputs([str(tree / "*.png")])
    assert failures == [] and _keys(items) == ["b"]  # case-sensitive glob; hidden skipped
    items, failures = collect_inputs([str(tree / "**" / "*.*")])
    assert failures == []
    assert sorted(i.path.name for i in items) == ["A2.PNG", "a.jpg", "b.png", "c.webp", "d.TIFF"]
    items, failures = collect_inputs([str(tree / "s?b" / "[c]*")])
    assert _keys(items) == ["c"] and failures == []


def test_glob_failures(tree: Path) -> None:
    nothing = str(tree / "*.nothing")
    texts = str(tree / "*.txt")
    items, failures = collect_inputs([nothing, texts])
    assert items == []
    assert failures == [(nothing, "no files match"), (texts, "no image files match")]


def test_missing_and_unsupported_specs(tree: Path, tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.png")
    md = str(tree / "sub" / "readme.md")
    empty = tmp_path / "empty"
    empty.mkdir()
    items, failures = collect_inputs([missing, md, str(empty), str(tree / "b.png")])
    assert _keys(items) == ["b"]
    assert failures[0] == (missing, "not found")
    assert failures[1][0] == md and failures[1][1].startswith("unsupported file type .md")
    assert failures[2] == (str(empty), "no images in folder")
    assert len(failures) == 3


def test_txt_manifest(tree: Path, tmp_path: Path) -> None:
    manifest = tree / "list.txt"
    manifest.write_text(
        f"# a comment\n\nb.png\n  {tree / 'sub' / 'c.webp'}  \nmissing.png\nnotes.txt\nsub/deeper\n"
    )
    items, failures = collect_inputs([str(manifest)])
    assert [i.path for i in items] == [
        tree / "b.png",
        tree / "sub" / "c.webp",
        tree / "sub" / "deeper" / "d.TIFF",
    ]
    assert failures[0] == (str(tree / "missing.png"), f"not found (listed in {manifest}:5)")
    assert failures[1][0] == str(tree / "notes.txt")
    assert failures[1][1].startswith("unsupported file type .txt")
    assert failures[1][1].endswith(f"(listed in {manifest}:6)")
    assert len(failures) == 2


def test_empty_manifest(tmp_path: Path) -> None:
    manifest = tmp_path / "empty.txt"
    manifest.write_text("# nothing here\n\n")
    assert collect_inputs([str(manifest)]) == ([], [(str(manifest), "manifest lists no images")])


def test_jsonl_manifest(tree: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "meta" / "prompts.jsonl"
    manifest.parent.mkdir()
    lines = [
        json.dumps({"image": "../data/b.png", "prompt": "a cat", "category": "animal"}),
        "",
        "{not json",
        json.dumps({"prompt": "no image field"}),
        json.dumps(["a", "list"]),
        json.dumps({"image": str(tree / "a.jpg"), "prompt": "a hand", "seed": 7}),
        json.dumps({"image": "gone.png"}),
    ]
    manifest.write_text("\n".join(lines) + "\n")
    items, failures = collect_inputs([str(manifest)])
    assert [(i.path, i.meta) for i in items] == [
        (tree / "b.png", {"prompt": "a cat", "category": "animal"}),
        (tree / "a.jpg", {"prompt": "a hand", "seed": 7}),
    ]
    assert _keys(items) == ["b", "a"]
    where = [f for f, _ in failures]
    assert where == [
        f"{manifest}:3",
        f"{manifest}:4",
        f"{manifest}:5",
        str(manifest.parent / "gone.png"),
    ]
    assert failures[0][1].startswith("invalid JSON")
    assert failures[3][1] == f"not found (listed in {manifest}:7)"


def test_dedup_keeps_first_and_its_meta(tree: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"image": str(tree / "b.png"), "prompt": "first"}) + "\n")
    link = tmp_path / "link.png"
    link.symlink_to(tree / "b.png")
    specs = [str(manifest), str(tree), str(tree / "b.png"), str(link), str(tree / "*.png")]
    items, failures = collect_inputs(specs)
    assert failures == []
    paths = [i.path for i in items]
    assert len(paths) == len({os.path.realpath(p) for p in paths}) == 5
    assert paths[0] == tree / "b.png" and items[0].meta == {"prompt": "first"}


def test_keys_disambiguate_same_stem(tmp_path: Path) -> None:
    root = tmp_path / "r"
    a_png, a_jpg, a_png_png = _img(root / "a.png"), _img(root / "a.jpg"), _img(root / "a_png.png")
    other = _img(root / "x" / "a.png")
    items, _ = collect_inputs([str(a_png), str(a_jpg), str(a_png_png), str(other)])
    keys = _keys(items)
    # "a_png" is a natural key of a_png.png, so a.png must take another one.
    assert keys == ["a_png_2", "a_jpg", "a_png", "x/a"]
    assert len(set(keys)) == len(keys)


def test_keys_are_case_insensitively_unique(tmp_path: Path) -> None:
    upper, lower = tmp_path / "Cat.png", tmp_path / "cat.png"
    _img(upper)
    if lower.exists():
        pytest.skip("case-insensitive filesystem")
    _img(lower)
    items, _ = collect_inputs([str(upper), str(lower)])
    keys = _keys(items)
    assert len({k.casefold() for k in keys}) == 2
    assert keys == ["Cat_png", "cat_png_2"]


def test_keys_are_safe(tmp_path: Path) -> None:
    root = tmp_path / "root"
    names = ["..sneaky.png", "a..b.png", 'we:ird*na"me?.png', "sp ace.jpg", "über/ß.png"]
    paths = [_img(root / n) for n in names]
    items, failures = collect_inputs([str(p) for p in paths])
    assert failures == []
    keys = _keys(items)
    assert len(set(keys)) == len(keys) == len(names)
    for k in keys:
        assert ".." not in k and not k.startswith("/") and "\\" not in k
        assert not any(c in k for c in '<>:"|?*')
        assert not any(part.startswith(".") for part in k.split("/"))
    assert "sp ace" in keys and "über/ß" in keys


def test_keys_are_stable(tree: Path, tmp_path: Path) -> None:
    _img(tree / "a.png")  # same stem as a.jpg
    specs = [str(tree), str(tree / "sub" / "c.webp")]
    first = collect_inputs(specs)
    second = collect_inputs(specs)
    assert first == second
    keys = _keys(first[0])
    assert keys == ["A2", "a_jpg", "a_png", "b", "sub/c", "sub/deeper/d"]


def test_keys_relative_to_common_parent(tmp_path: Path) -> None:
    one = _img(tmp_path / "x" / "y" / "one.png")
    two = _img(tmp_path / "x" / "z" / "two.png")
    items, _ = collect_inputs([str(one), str(two)])
    assert _keys(items) == ["y/one", "z/two"]


def test_collect_then_load(tree: Path) -> None:
    items, _ = collect_inputs([str(tree)])
    load: Callable[[Path], np.ndarray] = load_image
    for item in items:
        _check_rgb(load(item.path), 2, 2)


def test_spec_order_does_not_matter_for_a_manifest_s_metadata(tree: Path, tmp_path: Path):
    """`dd label mine FOLDER prompts.jsonl`: the folder names the image first, the manifest
    still gives its prompt (as in the other order)."""
    manifest = tmp_path / "prompts.jsonl"
    manifest.write_text(json.dumps({"image": str(tree / "a.jpg"), "prompt": "a hand"}) + "\n")
    for specs in ([str(tree), str(manifest)], [str(manifest), str(tree)]):
        items, _ = collect_inputs(specs)
        by_path = {i.path: i.meta for i in items}
        assert by_path[tree / "a.jpg"] == {"prompt": "a hand"}, specs
