"""dd synth: determinism, exact masks, dataset format, resume, photos and the CLI."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dd.data.datasets import load_mask, read_dataset
from dd.data.synth import KINDS, TOL, apply_artifact, make_sample, procedural_image, synthesize
from dd.errors import DDError
from dd.report.viz import to_uint8_map

FAST = {"use_skimage": False, "progress": False}


def _files(root: Path) -> dict[str, bytes]:
    """The dataset's files (not synth's own record in .dd/)."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and not p.relative_to(root).as_posix().startswith(".dd/")
    }


def _changed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(np.int16) - b.astype(np.int16)).max(axis=2) > TOL


def _flat(seed: int, size: int = 96) -> np.ndarray:
    color = np.random.default_rng(seed).integers(0, 256, 3, dtype=np.uint8)
    return np.broadcast_to(color, (size, size, 3)).copy()


def _textured(seed: int, size: int = 96) -> np.ndarray:
    """Busy content everywhere: upsampled random colours plus fine noise."""
    rng = np.random.default_rng(1000 + seed)
    coarse = Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8))
    base = np.asarray(coarse.resize((size, size), Image.BILINEAR), np.float32)
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def test_same_seed_same_bytes_and_sample_independent_of_count_and_workers(tmp_path):
    synthesize(tmp_path / "a", 5, size=48, seed=3, **FAST)
    synthesize(tmp_path / "b", 10, size=48, seed=3, workers=2, **FAST)
    synthesize(tmp_path / "c", 5, size=48, seed=3, **FAST)
    synthesize(tmp_path / "d", 5, size=48, seed=4, **FAST)
    a, b, c, d = (_files(tmp_path / k) for k in "abcd")
    assert a == c
    assert len([k for k in b if k.startswith("images/")]) == 10
    for name, data in a.items():
        if name != "manifest.jsonl":
            assert b[name] == data, name
    lines_a = a["manifest.jsonl"].decode().splitlines()
    assert lines_a == b["manifest.jsonl"].decode().splitlines()[:5]
    assert a["images/000000.png"] != d["images/000000.png"]


@pytest.mark.parametrize("seed", range(12))
def test_watermark_mask_is_exactly_the_changed_pixels_on_flat_background(seed):
    clean = _flat(seed)
    art = apply_artifact(np.random.default_rng(seed), clean, "watermark")
    assert art is not None
    differs = (art.image != clean).any(axis=2)
    assert differs.sum() > 0
    assert np.array_equal(art.mask > 0, differs)
    assert np.array_equal(to_uint8_map(art.mask) > 0, differs)  # also once saved as 8 bits
    assert art.mask.dtype == np.float32 and 0 < art.mask.max() <= 1


def test_watermarks_vary_and_have_soft_edges():
    arts = [apply_artifact(np.random.default_rng(s), _flat(s), "watermark") for s in range(12)]
    assert {a.info["mode"] for a in arts} == {"text", "tiled", "logo", "logo+text"}
    soft = np.concatenate([a.mask[(a.mask > 0) & (a.mask < 1)] for a in arts])
    assert soft.size > 100


def test_watermark_opacity_range_is_respected_and_changes_the_fingerprint(tmp_path):
    for s in range(8):
        rng = np.random.default_rng(s)
        art = apply_artifact(rng, _flat(s), "watermark", watermark_opacity=(0.9, 0.95))
        assert 0.9 <= art.info["opacity"] <= 0.95
    kw = {"size": 40, "seed": 3, "kinds": ["watermark"], **FAST}
    synthesize(tmp_path / "ds", 3, **kw)
    first = (tmp_path / "ds/images/000000.png").read_bytes()
    report = synthesize(tmp_path / "ds", 3, watermark_opacity=(0.25, 0.85), **kw)
    assert report.resumed == 3  # the default range is the default fingerprint
    report = synthesize(tmp_path / "ds", 3, watermark_opacity=(0.9, 1.0), overwrite=True, **kw)
    assert report.resumed == 0 and (tmp_path / "ds/images/000000.png").read_bytes() != first
    with pytest.raises(DDError, match="opacity"):
        synthesize(tmp_path / "bad", 1, watermark_opacity=(0.8, 0.2), **kw)


@pytest.mark.parametrize("bitmap", [False, True])
def test_text_watermarks_without_system_fonts(monkeypatch, bitmap):
    """No TrueType fonts installed (and optionally a Pillow without FreeType's default font)."""
    import dd.data.synth

    monkeypatch.setattr(dd.data.synth, "_font_files", lambda: ())
    if bitmap:
        from PIL import ImageFont

        monkeypatch.setattr(ImageFont, "load_default", lambda size=None: _bitmap_font())
    modes = set()
    for seed in range(10):
        clean = _flat(seed)
        art = apply_artifact(np.random.default_rng(seed), clean, "watermark")
        assert art is not None and np.array_equal(art.mask > 0, (art.image != clean).any(2))
        modes.add(art.info["mode"])
    assert modes & {"text", "tiled", "logo+text"}


def _bitmap_font():
    from PIL import ImageFont

    return ImageFont.load_default_imagefont()


@pytest.mark.parametrize("seed", range(6))
def test_patch_mask_is_the_pasted_region(seed):
    clean = _textured(seed)
    art = apply_artifact(np.random.default_rng(seed), clean, "patch")
    assert art is not None
    (sy, sx), (dy, dx), (ph, pw) = art.info["src"], art.info["dst"], art.info["size"]
    box = np.zeros(clean.shape[:2], bool)
    box[dy : dy + ph, dx : dx + pw] = True
    assert not art.mask[~box].any() and np.array_equal(art.image[~box], clean[~box])
    src = clean[sy : sy + ph, sx : sx + pw]
    src = {"h": src[:, ::-1], "v": src[::-1], "none": src}[art.info["flip"]]
    full = art.mask[dy : dy + ph, dx : dx + pw] == 1
    assert full.any()
    assert np.array_equal(art.image[dy : dy + ph, dx : dx + pw][full], src[full])
    assert not ((art.image != clean).any(axis=2) & (art.mask == 0)).any()


def test_warp_on_flat_image_gives_no_mask():
    flat = _flat(5)
    assert apply_artifact(np.random.default_rng(0), flat, "warp") is None
    image, mask, cats = make_sample(np.random.default_rng(0), flat, ["warp"])
    assert cats == [] and not mask.any() and np.array_equal(image, flat)


@pytest.mark.parametrize("seed", range(6))
def test_warp_and_smear_masks_are_the_changed_pixels(seed):
    clean = _textured(seed)
    for kind in ("warp", "smear"):
        art = apply_artifact(np.random.default_rng(seed), clean, kind)
        assert art is not None
        assert np.array_equal(art.mask > 0, _changed(art.image, clean)), kind
        assert np.array_equal(art.image[art.mask == 0], clean[art.mask == 0])
        yy, xx = np.nonzero(art.mask)
        cy, cx = art.info["center"]
        reach = art.info["radius"] * (1.0 if kind == "warp" else 1.3 * math.sqrt(2)) + 2
        assert np.hypot(yy - cy, xx - cx).max() <= reach


def test_smear_edges_are_soft():
    masks = [apply_artifact(np.random.default_rng(s), _textured(s), "smear").mask for s in range(4)]
    assert all(((m > 0) & (m < 1)).any() for m in masks)


@pytest.mark.parametrize("kinds", [KINDS, ("patch", "smear")])
def test_make_sample_marks_every_changed_pixel(kinds):
    for seed in range(8):
        rng = np.random.default_rng(seed)
        clean, _ = procedural_image(rng, 64)
        image, mask, cats = make_sample(rng, clean, kinds)
        assert cats and set(cats) <= set(kinds)
        assert image.dtype == np.uint8 and image.shape == clean.shape
        assert mask.dtype == np.float32 and mask.shape == clean.shape[:2]
        assert not ((image != clean).any(axis=2) & (mask == 0)).any()


def test_dataset_is_readable_with_categories_sources_and_masks(tmp_path):
    out = tmp_path / "ds"
    report = synthesize(out, 10, size=48, seed=1, negative_ratio=0.3, **FAST)
    samples = read_dataset(out)
    assert [s.meta["index"] for s in samples] == list(range(10))
    negatives = {3, 6, 9}  # floor(n * 0.3) of the first n samples, for every n
    for i, s in enumerate(samples):
        assert s.image == out / "images" / f"{i:06d}.png" and s.image.is_file()
        assert s.meta["origin"] == "procedural"
        assert s.meta["clean"].startswith("procedural:")
        if i in negatives:
            assert (s.mask, s.source, s.category) == (None, "real", None)
            assert s.meta["artifacts"] == [] and not (out / "masks" / f"{i:06d}.png").exists()
        else:
            assert s.source == "synthetic" and s.category in KINDS
            assert s.category == s.meta["artifacts"][0]
            m = load_mask(s.mask, (48, 48))
            assert m.max() > 0
            assert s.meta["coverage"] == pytest.approx((m > 0).mean(), abs=1e-4)
    assert report.categories["clean"]["samples"] == 3
    assert sum(r["samples"] for r in report.categories.values()) == 10
    assert report.clean_sources == {"procedural": 5}


def test_resume_skips_existing_and_regenerates_missing(tmp_path):
    out = tmp_path / "ds"
    synthesize(out, 6, size=40, seed=2, **FAST)
    before = _files(out)
    stamps = {p: p.stat().st_mtime_ns for p in (out / "images").iterdir()}
    (out / "images" / "000002.png").unlink()
    r = synthesize(out, 6, size=40, seed=2, **FAST)
    assert (r.generated, r.resumed) == (1, 5)
    assert _files(out) == before
    for p, t in stamps.items():
        if p.name != "000002.png":
            assert p.stat().st_mtime_ns == t
    grown = synthesize(out, 8, size=40, seed=2, **FAST)
    assert (grown.generated, grown.resumed) == (2, 6)
    with pytest.raises(DDError, match="made with other settings"):
        synthesize(out, 8, size=40, seed=9, **FAST)
    with pytest.raises(DDError, match="would drop some"):
        synthesize(out, 5, size=40, seed=2, **FAST)
    other = synthesize(out, 8, size=40, seed=9, overwrite=True, **FAST)
    assert (other.generated, other.resumed) == (8, 0)


def _photos(folder: Path, n: int, *, seed: int, size: tuple[int, int]) -> Path:
    """``n`` procedural stand-ins for user photos, ``p0.png``..., in a new ``folder``."""
    folder.mkdir()
    for k in range(n):
        img, _ = procedural_image(np.random.default_rng(seed + k), size)
        Image.fromarray(img).save(folder / f"p{k}.png")
    return folder


def test_user_photos_are_cropped_into_clean_images(tmp_path):
    photos = _photos(tmp_path / "photos", 2, seed=50, size=(70, 90))
    (photos / "notes.txt").write_text("not an image")
    r = synthesize(tmp_path / "ds", 8, size=48, photos_dir=photos, **FAST)
    used = {s.meta["clean"] for s in read_dataset(tmp_path / "ds") if s.meta["origin"] == "photo"}
    assert used and used <= {"photos:p0.png", "photos:p1.png"}
    assert r.clean_sources == {"procedural": 5, "photos": 2}
    with pytest.raises(DDError, match="photos folder not found"):
        synthesize(tmp_path / "x", 2, photos_dir=tmp_path / "missing", **FAST)


def test_skimage_sample_photos(tmp_path):
    import skimage  # noqa: F401  - in the test extra; a missing install must fail, not skip

    r = synthesize(tmp_path / "ds", 8, size=48, seed=0, progress=False)
    assert r.clean_sources.get("skimage", 0) >= 10
    cleans = [s.meta["clean"] for s in read_dataset(tmp_path / "ds")]
    assert any(c.startswith("skimage:") for c in cleans)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"count": 0}, "count"),
        ({"size": 16}, "size"),
        ({"negative_ratio": 1.5}, "negative ratio"),
        ({"kinds": ["warp", "blur"]}, "blur"),
        ({"kinds": []}, "no artifact kinds"),
    ],
)
def test_bad_arguments_raise_dderror(tmp_path, kwargs, message):
    args = {"count": 2, **kwargs}
    with pytest.raises(DDError, match=message):
        synthesize(tmp_path / "ds", args.pop("count"), **args, **FAST)


def test_cli_end_to_end(cli, tmp_path):
    out = tmp_path / "ds"
    args = ("synth", "--out", out, "--count", "5", "--size", "40", "--seed", "2", "--no-skimage")
    res = cli(*args, "--kinds", "watermark,patch", "--watermark-opacity", "1-0.2")
    assert res.exit_code != 0 and "opacity" in res.output
    res = cli(*args, "--kinds", "watermark,patch")
    assert res.exit_code == 0, res.output
    assert "clean" in res.output and "5 generated, 0 resumed" in res.output
    samples = read_dataset(out)
    assert {s.category for s in samples} <= {"watermark", "patch", None}
    assert sum(s.category is None for s in samples) == 1
    again = cli(*args, "--kinds", "patch,watermark")  # same kinds in another order: resumed
    assert again.exit_code == 0 and "0 generated, 5 resumed" in again.output
    bad = cli(*args, "--kinds", "watermark,nope")
    assert bad.exit_code == 1 and "nope" in bad.output
    assert os.listdir(out / "images")


def test_an_existing_dataset_is_never_overwritten(tmp_path, cli):
    """A folder synth did not write (here 5 human-labelled samples) is refused, untouched."""
    from dd.data.datasets import Sample, write_manifest

    ds = tmp_path / "labelled"
    (ds / "images").mkdir(parents=True)
    samples = []
    for i in range(5):
        Image.new("RGB", (32, 32), (i, i, i)).save(ds / "images" / f"h{i}.png")
        samples.append(Sample(ds / "images" / f"h{i}.png", None, "human", "hand", 1.0, {}))
    write_manifest(ds, samples)
    before = _files(ds)
    manifest = (ds / "manifest.jsonl").read_text()
    res = cli("synth", "--out", ds, "--count", "2", "--size", "40", "--no-skimage")
    assert res.exit_code == 1 and "was not written by dd synth" in res.output
    res = cli("synth", "--out", ds, "--count", "2", "--size", "40", "--no-skimage", "--overwrite")
    assert res.exit_code == 1 and "was not written by dd synth" in res.output
    assert _files(ds) == before and (ds / "manifest.jsonl").read_text() == manifest
    # Another synth setting into a synth dataset: refused, then replaced only when told.
    out = tmp_path / "ds"
    args = ("synth", "--out", out, "--count", "3", "--size", "40", "--no-skimage")
    assert cli(*args).exit_code == 0
    res = cli(*args, "--seed", "5")
    assert res.exit_code == 1 and "made with other settings" in res.output
    assert cli(*args, "--seed", "5", "--overwrite").exit_code == 0
    # A dataset synth wrote before it kept a record (.dd/synth.json) resumes in place.
    import shutil

    shutil.rmtree(out / ".dd")
    res = cli(*args, "--seed", "5")
    assert res.exit_code == 0 and "0 generated, 3 resumed" in res.output, res.output


def test_examples_readme_gives_the_shipped_examples_settings():
    root = Path(__file__).parents[1] / "examples"
    made = (root / "synth" / "README.md").read_text()
    readme = (root / "README.md").read_text()
    line = next(x.strip() for x in readme.splitlines() if x.strip().startswith("dd synth"))
    assert " ".join(line.split()) in " ".join(made.replace("\\\n", " ").split())
    rows = (root / "synth" / "manifest.jsonl").read_text().splitlines()
    assert f"--count {len(rows)}" in line


def test_photo_scale_draws_close_ups_and_whole_views():
    from dd.data.synth import _crop_photo

    # a horizontal ramp: a crop's intensity range is its share of the picture's width
    ramp = np.broadcast_to(
        np.linspace(0, 255, 1000, dtype=np.float32)[None, :, None], (600, 1000, 3)
    )
    photo = np.ascontiguousarray(ramp).astype(np.uint8)
    rng = np.random.default_rng(0)

    def spans(scale, n=40):
        out = []
        for _ in range(n):
            c = _crop_photo(rng, photo, 32, 32, scale).astype(int)[..., 0]
            out.append((c.max() - c.min()) / 255 / 0.6)  # the largest square crop is 60 % wide
        return np.array(out)

    close = spans((0.05, 0.1))
    whole = spans((0.9, 1.0))
    assert close.max() < 0.13 and close.min() > 0.03, close
    assert whole.min() > 0.85, whole
    # log-uniform over 0.05-1.0: log(4) / log(20) = 46 % of the crops below 0.2 (uniform: 16 %)
    wide = spans((0.05, 1.0), n=300)
    assert 0.36 < (wide < 0.2).mean() < 0.56


def test_scene_text_goes_into_clean_images_and_never_into_masks(tmp_path):
    from dd.data.synth import _scene_text

    flat = _flat(3, 128)
    signed = _scene_text(np.random.default_rng(0), flat)
    changed = _changed(signed, flat)
    assert 0.01 < changed.mean() < 0.9  # a sign, not the whole picture

    r = synthesize(tmp_path / "ds", 12, size=64, negative_ratio=0.5, scene_text=1.0, **FAST)
    samples = read_dataset(tmp_path / "ds")
    assert all(s.meta.get("scene_text") for s in samples)
    assert sum(s.mask is None for s in samples) == 6 == r.categories["clean"]["samples"]
    plain = synthesize(tmp_path / "plain", 4, size=64, **FAST)
    assert plain.samples == 4
    assert not any(s.meta.get("scene_text") for s in read_dataset(tmp_path / "plain"))
    # other settings are another dataset: refused without --overwrite
    with pytest.raises(DDError, match="other settings"):
        synthesize(tmp_path / "ds", 12, size=64, negative_ratio=0.5, scene_text=0.5, **FAST)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"photo_scale": (0.0, 0.5)}, "photo scale"),
        ({"photo_scale": (0.8, 0.5)}, "photo scale"),
        ({"scene_text": 1.5}, "scene text"),
    ],
)
def test_bad_hard_negative_arguments(tmp_path, kwargs, message):
    with pytest.raises(DDError, match=message):
        synthesize(tmp_path / "ds", 2, **kwargs, **FAST)


def test_watermark_fonts_and_texts_can_be_replaced():
    from dd.data.synth import _font, _font_files, _text

    rng = np.random.default_rng(0)
    assert {_text(rng, ["HELD OUT"]) for _ in range(5)} == {"HELD OUT"}
    files = _font_files()
    if files:  # with system fonts: the given file is the one used
        assert _font(rng, 20, [files[-1]]).path == files[-1]
    img = _textured(1, 96)
    out, mask, cats = make_sample(
        rng, img, ["watermark"], watermark_texts=["ZZ"], watermark_fonts=files[:1] or None
    )
    assert cats == ["watermark"] and (mask > 0).any()


def test_cli_photo_scale_is_checked(cli, tmp_path):
    res = cli("synth", "--out", tmp_path / "ds", "--count", "2", "--photo-scale", "x")
    assert res.exit_code == 2 and "--photo-scale" in res.output and "Traceback" not in res.output
    res = cli("synth", "--out", tmp_path / "ds", "--count", "2", "--watermark-opacity", "1-0.2")
    assert res.exit_code == 2 and "--watermark-opacity" in res.output
    assert not (tmp_path / "ds").exists()


def test_procedural_share_sets_how_often_clean_images_are_procedural(tmp_path):
    photos = _photos(tmp_path / "photos", 3, seed=70, size=(80, 80))
    synthesize(tmp_path / "ds", 60, size=32, photos_dir=photos, procedural_share=0.0, **FAST)
    assert {s.meta["origin"] for s in read_dataset(tmp_path / "ds")} == {"photo"}
    synthesize(tmp_path / "all", 20, size=32, photos_dir=photos, procedural_share=1.0, **FAST)
    assert {s.meta["origin"] for s in read_dataset(tmp_path / "all")} == {"procedural"}
    # without photos every clean image is procedural, whatever the share
    synthesize(tmp_path / "none", 6, size=32, procedural_share=0.1, **FAST)
    assert {s.meta["origin"] for s in read_dataset(tmp_path / "none")} == {"procedural"}
    with pytest.raises(DDError, match="procedural share"):
        synthesize(tmp_path / "bad", 2, procedural_share=2.0, **FAST)


def test_cli_hard_negative_options_reach_the_dataset_and_bad_values_are_usage_errors(cli, tmp_path):
    out = tmp_path / "ds"
    res = cli("synth", "--out", out, "--count", "4", "--size", "32", "--no-skimage",
              "--procedural-share", "1.0", "--scene-text", "1.0",
              "--photo-scale", "0.1-0.5")  # fmt: skip
    assert res.exit_code == 0, res.output
    samples = read_dataset(out)
    assert {s.meta["origin"] for s in samples} == {"procedural"}
    assert all(s.meta.get("scene_text") for s in samples)
    for flag, bad in (("--scene-text", "1.5"), ("--procedural-share", "-0.1")):
        res = cli("synth", "--out", tmp_path / "bad", "--count", "2", flag, bad)
        assert res.exit_code == 2 and flag in res.output, res.output
        assert "Traceback" not in res.output and not (tmp_path / "bad").exists()
