"""dd.data.augment: image and map stay in exact correspondence; randomness is seeded."""

from __future__ import annotations

import pytest
import torch

from dd.data.augment import (
    AugmentConfig,
    ShrinkSpec,
    StrongConfig,
    crop_box,
    hflip,
    parse_shrink_spec,
    random_affine,
    resized_crop,
    shrink_pad,
    strong_augment,
    train_pair,
)
from dd.errors import DDError


def _gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def _pair(h: int = 48, w: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """An image whose three channels all equal the map: any geometric transform applied
    identically keeps ``image[c] == map`` bit for bit."""
    target = torch.rand(1, h, w, generator=_gen(seed))
    return target.repeat(3, 1, 1), target


def _square(h: int, w: int, top: int, left: int, size: int) -> torch.Tensor:
    m = torch.zeros(1, h, w)
    m[:, top : top + size, left : left + size] = 1.0
    return m


def test_shrink_pad_exact_correspondence_and_geometry():
    image, target = _pair(40, 60)
    out_img, out_map = shrink_pad(image, target, 0.5, offset=(3, 7))
    assert out_img.shape == image.shape and out_map.shape == target.shape
    for c in range(3):
        assert torch.equal(out_img[c], out_map[0])
    # the shrunk content sits in a 20 x 30 box at (3, 7); zeros (map and fill 0) elsewhere
    inside = torch.zeros(40, 60, dtype=torch.bool)
    inside[3:23, 7:37] = True
    assert out_map[0][~inside].abs().max() == 0
    assert out_map[0][inside].min() > 0  # torch.rand is positive almost surely
    # antialiased shrink preserves the mean of the content
    assert out_map[0][inside].mean() == pytest.approx(float(target.mean()), abs=0.02)


def test_shrink_pad_moves_a_square_to_the_expected_place():
    target = _square(64, 64, 16, 16, 32)  # a 32 x 32 artifact in the middle
    image = torch.full((3, 64, 64), 0.25)
    image[:, 16:48, 16:48] = 0.75
    out_img, out_map = shrink_pad(image, target, 0.5)  # centred: 32 x 32 at (16, 16)
    # the square becomes 16 x 16 at (24, 24) in both
    assert torch.allclose(out_map[0, 25:39, 25:39], torch.ones(14, 14))
    assert out_map[0, :22].abs().max() == 0 and out_map[0, 42:].abs().max() == 0
    assert torch.allclose(out_img[:, 25:39, 25:39], torch.full((3, 14, 14), 0.75))
    assert torch.allclose(out_img[:, 17:23, 17:23], torch.full((3, 6, 6), 0.25))
    assert torch.equal(out_img[:, :16], torch.zeros(3, 16, 64))  # constant fill 0
    assert out_map.sum() == pytest.approx(float(target.sum()) / 4, rel=1e-5)


def test_shrink_pad_fill_constant_and_reflect():
    image, target = _pair(20, 20)
    img, m = shrink_pad(image, target, 0.5, offset=(0, 0), fill=0.5)
    assert torch.equal(img[:, 10:, :], torch.full((3, 10, 20), 0.5))
    assert m[:, 10:].abs().max() == 0
    img_r, m_r = shrink_pad(image, target, 0.5, offset=(0, 0), fill="reflect")
    assert torch.equal(m_r, m)  # the map is always padded with 0
    small = img_r[:, :10, :10]
    assert torch.equal(img_r[:, :10, :10], img[:, :10, :10])
    # reflection without repeating the edge: column 10 mirrors column 8, row 10 row 8
    assert torch.equal(img_r[:, :10, 10], small[:, :, 8])
    assert torch.equal(img_r[:, 10, :10], small[:, 8, :])
    # padding wider than the shrunk image (torch's reflect pad would refuse it)
    img_w, _ = shrink_pad(image, target, 0.2, offset=(0, 0), fill="reflect")
    assert img_w.shape == image.shape and torch.isfinite(img_w).all()


def test_shrink_pad_rejects_bad_arguments():
    image, target = _pair(16, 16)
    with pytest.raises(DDError):
        shrink_pad(image, target, 0.0)
    with pytest.raises(DDError):
        shrink_pad(image, target, 1.5)
    with pytest.raises(DDError):
        shrink_pad(image, target, 0.5, offset=(9, 0))
    with pytest.raises(DDError):
        shrink_pad(image, target, 0.5, fill="wrap")
    with pytest.raises(DDError):
        shrink_pad(image, target[:, :8], 0.5)


@pytest.mark.parametrize("seed", range(4))
def test_geometric_transforms_keep_correspondence(seed):
    image, target = _pair(50, 70, seed)
    g = _gen(seed)
    box = crop_box(g, 50, 70)
    for img, m in (
        resized_crop(image, target, box, (32, 40)),
        hflip(image, target),
        random_affine(image, target, g, degrees=30),
    ):
        for c in range(3):
            assert torch.equal(img[c], m[0])
    img, m = hflip(image, target)
    assert torch.equal(m[0, :, 0], target[0, :, -1])


def test_crop_box_stays_inside_and_follows_scale():
    g = _gen(1)
    for _ in range(200):
        top, left, h, w = crop_box(g, 40, 90, scale=(0.3, 0.6))
        assert top >= 0 and top + h <= 40 and left >= 0 and left + w <= 90
    # impossible aspect ratio: falls back to the largest centred crop within the ratio
    assert crop_box(g, 10, 100, scale=(1.0, 1.0), ratio=(1.0, 1.0)) == (0, 45, 10, 10)


def test_train_pair_is_seeded_and_keeps_correspondence_without_photometric_changes():
    image, target = _pair(80, 96, 3)
    cfg = AugmentConfig(size=(48, 48), shrink_prob=1.0)
    spec = ShrinkSpec(0.4, 0.6)
    a = train_pair(image, target, _gen(5), cfg, shrink=spec)
    b = train_pair(image, target, _gen(5), cfg, shrink=spec)
    c = train_pair(image, target, _gen(6), cfg, shrink=spec)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    for img, m in (a, c):
        assert img.shape == (3, 48, 48) and m.shape == (1, 48, 48)
        for ch in range(3):
            assert torch.equal(img[ch], m[0])
    # shrink-and-pad happened: a zero border (map and image) surrounds the content
    zero_rows = (a[1][0].abs().sum(1) == 0).sum()
    assert zero_rows >= 48 - round(48 * 0.6)


def test_strong_augment_changes_the_image_only_photometrically():
    image, target = _pair(32, 32, 4)
    cfg = StrongConfig(p_affine=0.0, p_jitter=1.0, p_blur=1.0, p_noise=1.0, noise_std=(0.05, 0.05))
    img, m = strong_augment(image, target, _gen(0), cfg)
    assert torch.equal(m, target)  # no geometric part: the map is untouched
    assert not torch.equal(img, image)
    assert img.min() >= 0 and img.max() <= 1
    # with the affine warp on, the map follows the image geometry (before photometrics)
    only_affine = StrongConfig(p_affine=1.0, p_jitter=0.0, p_blur=0.0, p_noise=0.0)
    img2, m2 = strong_augment(image, target, _gen(0), only_affine)
    assert not torch.equal(m2, target)
    assert torch.equal(img2[0], m2[0])


def test_parse_shrink_spec():
    assert parse_shrink_spec(None) is None
    assert parse_shrink_spec(False) is None
    assert parse_shrink_spec({"scale": 0.5}) == ShrinkSpec(0.5, 0.5)
    assert parse_shrink_spec({"scale": [0.3, 0.7]}) == ShrinkSpec(0.3, 0.7)
    default = ShrinkSpec(0.2, 0.4)
    assert parse_shrink_spec(True, default) is default
    for bad in ({"scale": 0}, {"scale": 1.5}, {"scale": [0.7, 0.3]}, {"scale": "x"}, {}, 3):
        with pytest.raises(DDError):
            parse_shrink_spec(bad)
    assert ShrinkSpec(0.5, 0.5).draw(_gen(0)) == 0.5
    assert 0.3 <= ShrinkSpec(0.3, 0.7).draw(_gen(0)) <= 0.7
