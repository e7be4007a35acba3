"""DetectorMetrics against values computed by hand on tiny maps."""

from __future__ import annotations

import io
import itertools
import math

import pytest
import torch

from dd.errors import DDError
from dd.inference.metrics import (
    COUNT_KEYS,
    METRIC_KEYS,
    DetectorMetrics,
    format_table,
    json_safe,
    rank_auroc,
)

EPS = 1e-6
L = math.log


def _maps(*flat: list[float]) -> torch.Tensor:
    """2x2 maps (row-major lists) as a B x 1 x 2 x 2 float64 batch."""
    return torch.tensor(flat, dtype=torch.float64).reshape(len(flat), 1, 2, 2)


# Three 2x2 images (pixels in row-major order):
#   A positive: g = [1, 0, 0, 0],   p = [0.5, 0.5, 0, 0]
#   B clean:    g = [0, 0, 0, 0],   p = [0.2, 0, 0, 0]
#   C soft:     g = [0.6, 0.2, 0, 0], p = [1, 0, 0, 0]   (p = 0 and 1 exactly)
G = _maps([1, 0, 0, 0], [0, 0, 0, 0], [0.6, 0.2, 0, 0])
P = _maps([0.5, 0.5, 0, 0], [0.2, 0, 0, 0], [1, 0, 0, 0])

# Per image, mean over the 4 pixels:
MSE = {
    "A": (0.5**2 + 0.5**2) / 4,  # 0.125
    "B": 0.2**2 / 4,  # 0.01
    "C": (0.4**2 + 0.2**2) / 4,  # 0.05
}
# kl_fn = mean g*log(g'/p'), p', g' clamped to [eps, 1-eps]; g = 0 pixels add 0.
KL_FN = {
    "A": 1 * L((1 - EPS) / 0.5) / 4,
    "B": 0.0,
    "C": (0.6 * L(0.6 / (1 - EPS)) + 0.2 * L(0.2 / EPS)) / 4,  # p = 0 -> p' = eps
}
# kl_fp = mean (1-g)*log((1-g')/(1-p')); g = 1 pixels add 0; p = 0, g = 0 pixels add 0.
KL_FP = {
    "A": 1 * L((1 - EPS) / 0.5) / 4,  # pixel 2: g = 0, p = 0.5
    "B": 1 * L((1 - EPS) / 0.8) / 4,
    "C": (0.4 * L(0.4 / EPS) + 0.8 * L(0.8 / (1 - EPS))) / 4,  # p = 1 -> 1 - p' = eps
}
# Pearson: A: dp = [.25,.25,-.25,-.25], dg = [.75,-.25,-.25,-.25]; cov = .25,
#   |dp|^2 = .25, |dg|^2 = .75 -> 1/sqrt(3).
#   C: dp = [.75,-.25,-.25,-.25], dg = [.4,0,-.2,-.2]; cov = .4, |dp|^2 = .75, |dg|^2 = .24
#   -> .4/sqrt(.18) = 2*sqrt(2)/3.   B: g constant -> left out of cc.
CC = {"A": 1 / math.sqrt(3), "C": 2 * math.sqrt(2) / 3}


def test_hand_computed_metrics():
    m = DetectorMetrics(eps=EPS)
    m.update(P, G)
    r = m.compute()
    assert r["n_images"] == 3 and r["n_clean"] == 1 and r["n_positive"] == 2
    assert r["mse"] == pytest.approx(sum(MSE.values()) / 3, abs=1e-12)
    assert r["mse_clean"] == pytest.approx(MSE["B"], abs=1e-12)
    assert r["kl_fn"] == pytest.approx(sum(KL_FN.values()) / 3, abs=1e-12)
    assert r["kl_fp"] == pytest.approx(sum(KL_FP.values()) / 3, abs=1e-10)
    assert r["cc"] == pytest.approx((CC["A"] + CC["C"]) / 2, abs=1e-12)
    # p >= .5 vs g >= .5 over all pixels: A: TP 1 (px1), FP 1 (px2); C: TP 1 -> TP 2, FP 1, FN 0
    assert r["iou"] == pytest.approx(2 / 3)  # 2 / (2 + 1 + 0)
    assert r["f1"] == pytest.approx(4 / 5)  # 2*2 / (2*2 + 1 + 0)
    # Pixel labels g >= .5: positives p = {.5 (A), 1 (C)}; 10 negatives: .5 (A), .2 (B), eight 0.
    # .5 beats 9 and ties 1 -> 9.5; 1 beats 10 -> (9.5 + 10) / 20
    assert r["pixel_auroc"] == pytest.approx(19.5 / 20, abs=1e-12)
    # image max p: A .5 (pos), C 1 (pos), B .2 (neg) -> every positive above the negative
    assert r["image_auroc"] == 1.0
    assert "by_category" not in r
    assert set(r) == set(METRIC_KEYS) | set(COUNT_KEYS)


def test_histogram_resolution_counts_same_bin_as_tie():
    """With 2 bins, [0, .5) and [.5, 1]: both positives (.5, 1) share bin 1 with the .5
    negative, the other 9 negatives are in bin 0: each positive scores 9 + .5 -> 19/20."""
    m = DetectorMetrics(eps=EPS, bins=2)
    m.update(P, G)
    assert m.compute()["pixel_auroc"] == pytest.approx(19 / 20)


def test_iou_and_f1_are_dataset_level_on_3x3_maps():
    """X: one positive pixel found (TP 1). Y: eight positive pixels all missed (FN 8).
    Dataset level: IoU = 1/(1+0+8) = 1/9, F1 = 2/(2+0+8) = 1/5; a per-image mean would
    give (1 + 0)/2 = .5, which is not what is reported."""
    gx = torch.zeros(3, 3)
    gx[1, 1] = 1
    px = gx.clone()
    gy = torch.ones(3, 3)
    gy[0, 0] = 0
    py = torch.full((3, 3), 0.25)
    m = DetectorMetrics()
    m.update(torch.stack([px, py])[:, None], torch.stack([gx, gy])[:, None])
    r = m.compute()
    assert r["iou"] == pytest.approx(1 / 9)
    assert r["f1"] == pytest.approx(1 / 5)
    # Y's prediction is constant -> only X counts for cc, where p == g -> 1
    assert r["cc"] == pytest.approx(1.0)
    # X: no clean image (both have artifacts) -> mse_clean undefined
    assert math.isnan(r["mse_clean"])


def test_all_clean_set_leaves_aurocs_undefined():
    g = torch.zeros(2, 1, 2, 2)
    p = torch.tensor([[0.1, 0.0, 0.3, 0.2], [0.0, 0.0, 0.0, 0.4]]).reshape(2, 1, 2, 2)
    m = DetectorMetrics()
    m.update(p, g)
    r = m.compute()
    assert r["n_clean"] == 2 and r["n_positive"] == 0
    assert math.isnan(r["image_auroc"]) and math.isnan(r["pixel_auroc"])
    # nothing predicted >= .5 and no positive pixel: IoU and F1 undefined
    assert math.isnan(r["iou"]) and math.isnan(r["f1"])
    assert math.isnan(r["cc"])  # g constant everywhere
    # mse = ((.01 + .09 + .04)/4 + .16/4) / 2 = (.035 + .04) / 2
    assert r["mse"] == pytest.approx(0.0375) and r["mse_clean"] == pytest.approx(0.0375)
    assert r["kl_fn"] == 0.0


def test_exact_zero_and_one_stay_finite():
    """g = 1 with p = 0 and g = 0 with p = 1: the clamp keeps the logs finite."""
    g = _maps([1, 0, 1, 0])
    p = _maps([0, 1, 1, 0])
    m = DetectorMetrics(eps=EPS)
    m.update(p, g)
    r = m.compute()
    worst = L((1 - EPS) / EPS)
    assert r["kl_fn"] == pytest.approx(worst / 4, abs=1e-9)  # px1: 1*log((1-eps)/eps)
    assert r["kl_fp"] == pytest.approx(worst / 4, abs=1e-9)  # px2: 1*log((1-eps)/eps)
    assert r["mse"] == pytest.approx(0.5)


def test_categories_break_down_and_none_is_kept():
    m = DetectorMetrics(eps=EPS)
    m.update(P[:2], G[:2], ["hand", None])
    m.update(P[2:], G[2:], ["face"])
    r = m.compute()
    assert list(r["by_category"]) == ["face", "hand", "(none)"]
    hand = r["by_category"]["hand"]
    assert hand["n_images"] == 1 and hand["n_positive"] == 1
    assert hand["mse"] == pytest.approx(MSE["A"])
    assert hand["cc"] == pytest.approx(CC["A"])
    assert hand["iou"] == pytest.approx(1 / 2)  # TP 1, FP 1
    assert math.isnan(hand["image_auroc"]) and math.isnan(hand["mse_clean"])
    none = r["by_category"]["(none)"]
    assert none["n_clean"] == 1 and none["mse_clean"] == pytest.approx(MSE["B"])
    face = r["by_category"]["face"]
    assert face["kl_fp"] == pytest.approx(KL_FP["C"], abs=1e-10)  # 1 - (1 - eps) rounds
    # the overall numbers do not depend on the grouping
    whole = DetectorMetrics(eps=EPS)
    whole.update(P, G)
    assert {k: r[k] for k in METRIC_KEYS} == pytest.approx(
        {k: v for k, v in whole.compute().items() if k in METRIC_KEYS}
    )


def test_image_auroc_ties_count_half():
    """Max p: positives .3 and .9, negatives .3 and .1. Pairs: (.3,.3) tie = .5, (.3,.1) = 1,
    (.9, both) = 2 -> 3.5 / 4."""
    g = torch.zeros(4, 1, 2, 2)
    g[0, 0, 0, 0] = g[3, 0, 1, 1] = 1
    p = torch.zeros(4, 1, 2, 2, dtype=torch.float64)
    p[0, 0, 0, 0], p[1, 0, 1, 0], p[2, 0, 0, 1], p[3, 0, 1, 1] = 0.3, 0.3, 0.1, 0.9
    m = DetectorMetrics()
    m.update(p, g)
    assert m.compute()["image_auroc"] == pytest.approx(3.5 / 4)
    assert rank_auroc([0.3, 0.3, 0.1, 0.9], [1, 0, 0, 1]) == pytest.approx(3.5 / 4)


def _brute_auroc(scores, labels) -> float:
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_aurocs_match_brute_force():
    gen = torch.Generator().manual_seed(0)
    # Scores on a 1/1000 grid: never two distinct values in one of 10000 bins -> exact.
    p = torch.randint(0, 1001, (6, 1, 5, 4), generator=gen).double() / 1000
    g = (torch.rand(6, 1, 5, 4, generator=gen) > 0.7).double()
    g[0] = 0
    m = DetectorMetrics()
    m.update(p, g)
    r = m.compute()
    flat_p, flat_g = p.flatten().tolist(), (g.flatten() >= 0.5).tolist()
    assert r["pixel_auroc"] == pytest.approx(_brute_auroc(flat_p, flat_g), abs=1e-12)
    maxes = p.flatten(1).amax(1).tolist()
    labels = (g.flatten(1).amax(1) >= 0.5).tolist()
    assert r["image_auroc"] == pytest.approx(_brute_auroc(maxes, labels), abs=1e-12)


def _random_batches(n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    cats = ["hand", "face", None]
    for i in range(n):
        b = 3
        p = torch.rand(b, 1, 6, 5, generator=gen)
        g = (torch.rand(b, 1, 6, 5, generator=gen) > 0.6).float() * torch.rand(
            b, 1, 6, 5, generator=gen
        )
        if i % 2:
            g[0] = 0
        yield p, g, [cats[(i + j) % 3] for j in range(b)]


def _close(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _close(a[k], b[k])
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    else:
        assert a == pytest.approx(b, rel=1e-9, abs=1e-12)


def test_merge_and_states_equal_one_accumulator():
    batches = list(_random_batches(6, seed=1))
    one = DetectorMetrics()
    for p, g, c in batches:
        one.update(p, g, c)
    left, right = DetectorMetrics(), DetectorMetrics()
    for i, (p, g, c) in enumerate(batches):
        (left if i < 4 else right).update(p, g, c)
    expected = one.compute()
    assert "by_category" in expected
    _close(DetectorMetrics().merge(left).merge(right).compute(), expected)

    # state() -> (pickled, as a gather would) -> from_states
    states = []
    for part in (left, right):
        buf = io.BytesIO()
        torch.save(part.state(), buf)
        buf.seek(0)
        states.append(torch.load(buf, weights_only=True))
    _close(DetectorMetrics.from_states(states).compute(), expected)

    one.reset()
    assert one.compute()["n_images"] == 0 and math.isnan(one.compute()["mse"])


def test_merge_refuses_other_settings_and_bad_inputs():
    with pytest.raises(DDError, match="bins"):
        DetectorMetrics(bins=100).merge(DetectorMetrics(bins=10))
    m = DetectorMetrics()
    with pytest.raises(DDError, match="sigmoid"):
        m.update(torch.tensor([[[[2.0, -1.0]]]]), torch.zeros(1, 1, 1, 2))
    with pytest.raises(DDError, match="sigmoid"):
        m.update(torch.tensor([[[[float("nan"), 0.5]]]]), torch.zeros(1, 1, 1, 2))
    with pytest.raises(DDError, match="ground-truth"):
        m.update(torch.zeros(1, 1, 1, 2), torch.full((1, 1, 1, 2), 255.0))
    with pytest.raises(DDError, match="equal shape"):
        m.update(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 4, 4))
    with pytest.raises(DDError, match="categories"):
        m.update(torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 2, 2), ["hand"])
    with pytest.raises(DDError, match="no metric states"):
        DetectorMetrics.from_states([])
    assert m.compute()["n_images"] == 0  # nothing was added by the refused batches


def test_table_and_json_output():
    from rich.console import Console

    m = DetectorMetrics()
    m.update(P, G.float(), ["hand", None, "face"])
    r = m.compute()
    console = Console(record=True, width=200)
    console.print(format_table(r))
    text = console.export_text()
    for word in ("all", "hand", "face", "(none)", "MSE", "AUROC image"):
        assert word in text
    header = next(line for line in text.splitlines() if "hand" in line)
    assert [c.strip() for c in header.split("┃")[1:-1]] == [
        "metric",
        "all",
        "face",
        "hand",
        "(none)",
    ]
    row = next(line for line in text.splitlines() if "AUROC image" in line)
    # image AUROC is defined overall only: every category holds one image label
    assert [c.strip() for c in row.split("│")[1:-1]] == ["AUROC image", "1.0000", "-", "-", "-"]
    row = next(line for line in text.splitlines() if "clean images" in line)
    assert [c.strip() for c in row.split("│")[2:-1]] == ["1", "0", "0", "1"]
    safe = json_safe(r)
    assert safe["by_category"]["hand"]["image_auroc"] is None
    assert safe["image_auroc"] == 1.0
