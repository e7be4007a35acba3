"""`dd eval-detector` and `evaluate_detector`: the loop that feeds DetectorMetrics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dd.api.detectors import Detector
from dd.api.plugins import get_host
from dd.data.datasets import Sample, load_mask, read_dataset, save_mask, write_manifest
from dd.data.images import load_image
from dd.inference.metrics import METRIC_KEYS, DetectorMetrics, evaluate_detector

TINY = ["-O", "input_size=64"]


class RedDetector(Detector):
    """A real (non-learned) detector: logit = scale * (red - 0.5) at full resolution, so a pure
    red region is an artifact and anything without red is clean."""

    name = "red-test"

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(40.0))

    @classmethod
    def load(cls, weights=None, *, device="cpu", dtype=torch.float32, **options):
        return cls().to(device=device, dtype=dtype)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.scale * (images[:, :1] - 0.5)


def _dataset(root: Path, seed: int = 0) -> list[Sample]:
    """Non-square images of several sizes: red rectangles (positives, mask = rectangle),
    green ones (negatives, no mask); categories hand / face / none."""
    rng = np.random.default_rng(seed)
    samples = []
    specs = [
        ((40, 30), "hand", True),
        ((30, 40), "hand", True),
        ((33, 20), "face", True),
        ((40, 30), "face", False),
        ((24, 24), None, False),
        ((33, 20), None, True),
        ((30, 40), "hand", False),
    ]
    for i, ((h, w), cat, positive) in enumerate(specs):
        img = np.zeros((h, w, 3), np.uint8)
        img[..., 2] = rng.integers(0, 255, (h, w), dtype=np.uint8)  # blue noise: not red
        y0, x0 = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
        y1, x1 = y0 + int(rng.integers(3, h // 2)), x0 + int(rng.integers(3, w // 2))
        img[y0:y1, x0:x1] = (255, 0, 0) if positive else (0, 255, 0)
        path = root / "images" / f"img{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path)
        mask = None
        if positive:
            m = np.zeros((h, w), np.float32)
            m[y0:y1, x0:x1] = 1.0
            mask = root / "masks" / f"img{i}.png"
            save_mask(mask, m)
        samples.append(Sample(path, mask, "synthetic" if positive else "real", cat, meta={"i": i}))
    write_manifest(root, samples)
    return samples


def test_oracle_detector_scores_perfectly(tmp_path):
    samples = read_dataset(_dataset(tmp_path / "ds")[0].image.parents[1])
    det = RedDetector()
    det.train()
    seen = []
    r = evaluate_detector(
        det, samples, batch_size=2, workers=2, on_progress=lambda d, t: seen.append((d, t))
    )
    assert det.training, "evaluate_detector must restore the training flag"
    assert seen[0] == (0, 7) and seen[-1] == (7, 7)
    assert (r["n_images"], r["n_clean"], r["n_positive"]) == (7, 3, 4)
    for k in ("iou", "f1", "pixel_auroc", "image_auroc"):
        assert r[k] == 1.0, k
    assert r["mse"] < 1e-12 and r["mse_clean"] < 1e-12 and r["cc"] > 0.999999
    assert r["kl_fn"] < 1e-5 and r["kl_fp"] < 1e-5
    assert list(r["by_category"]) == ["face", "hand", "(none)"]
    assert r["by_category"]["hand"]["n_images"] == 3
    assert r["by_category"]["face"]["image_auroc"] == 1.0


def test_batched_loop_equals_per_image_forward(tmp_path):
    """The loader path (resize to working size, batch, upsample per image) gives the metrics
    of Detector.forward run image by image on the full-size image."""
    samples = _dataset(tmp_path / "ds", seed=1)
    det = get_host().detectors.get("segformer").load(None, variant="tiny", input_size=64)
    with torch.no_grad():
        det.model.decode_head.classifier.bias.fill_(-0.2)  # keep p away from 0.5 ties
    got = evaluate_detector(det, samples, batch_size=3, workers=2)
    ref = DetectorMetrics()
    with torch.inference_mode():
        for s in samples:
            img = load_image(s.image)
            x = torch.from_numpy(img).permute(2, 0, 1).float().div(255)[None]
            target = torch.from_numpy(load_mask(s.mask, img.shape[:2]))[None, None]
            ref.update(det(x), target, [s.category])
    want = ref.compute()
    for k in METRIC_KEYS:
        if math.isnan(want[k]):
            assert math.isnan(got[k]), k
        else:
            assert got[k] == pytest.approx(want[k], abs=2e-4), k
    assert got["by_category"].keys() == want["by_category"].keys()
    assert got["by_category"]["hand"]["mse"] == pytest.approx(
        want["by_category"]["hand"]["mse"], abs=1e-5
    )


def test_accumulates_into_given_metrics_for_sharding(tmp_path):
    samples = _dataset(tmp_path / "ds", seed=2)
    det = RedDetector()
    shards = [DetectorMetrics(), DetectorMetrics()]
    evaluate_detector(det, samples[:3], metrics=shards[0])
    evaluate_detector(det, samples[3:], metrics=shards[1])
    merged = DetectorMetrics.from_states([m.state() for m in shards]).compute()
    whole = evaluate_detector(det, samples)
    assert merged["n_images"] == whole["n_images"] == 7
    for k in METRIC_KEYS:
        assert merged[k] == pytest.approx(whole[k], abs=1e-12), k


def test_cli_json_table_and_metrics_file(tmp_path, cli):
    ds = tmp_path / "ds"
    _dataset(ds, seed=3)
    weights = tmp_path / "weights"
    det = get_host().detectors.get("segformer").load(None, variant="tiny", input_size=64)
    det.save_pretrained(weights)
    out = tmp_path / "eval"
    args = ["eval-detector", ds, "--weights", weights, *TINY, "--device", "cpu"]
    res = cli(*args, "--batch-size", "4", "--out", out, "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report == json.loads((out / "metrics.json").read_text())
    m = report["metrics"]
    assert m["n_images"] == 7 and m["n_positive"] == 4 and m["n_clean"] == 3
    assert set(METRIC_KEYS) <= set(m)
    assert m["by_category"]["(none)"]["n_images"] == 2
    assert report["detector"]["weights"] == str(weights)
    assert "UNTRAINED" not in res.output

    res = cli(*args)
    assert res.exit_code == 0, res.output
    for word in ("detector metrics", "hand", "face", "(none)", "AUROC image"):
        assert word in res.output


def test_cli_reports_unreadable_image(tmp_path, cli):
    ds = tmp_path / "ds"
    samples = _dataset(ds, seed=4)
    samples[2].image.write_bytes(b"not an image")
    res = cli("eval-detector", ds, "-O", "variant=tiny", *TINY, "--device", "cpu")
    assert res.exit_code == 1
    assert "img2.png" in res.output and "UNTRAINED" in res.output


def test_image_level_scores_keep_dataset_order_across_working_sizes(tmp_path):
    from dd.inference.metrics import image_level_scores, image_level_summary

    samples = read_dataset(_dataset(tmp_path / "ds")[0].image.parents[1])
    pixel = DetectorMetrics()
    rows = image_level_scores(RedDetector(), samples, batch_size=2, workers=2, metrics=pixel)
    # images of several sizes are batched by size, yet each row is its own sample's
    assert [r["meta"]["i"] for r in rows] == list(range(len(samples)))
    for s, r in zip(samples, rows, strict=True):
        red = load_image(s.image)[..., 0].astype(np.float32) / 255
        expected = float(torch.sigmoid(torch.tensor(40.0 * (red.max() - 0.5))))
        assert r["max"] == pytest.approx(expected, abs=1e-5)
        assert (r["max_in_mask"] is None) == (s.mask is None)
    assert pixel.compute()["pixel_auroc"] == pytest.approx(1.0)
    s = image_level_summary(rows, 0.5)
    assert (s["clean"], s["clean_flagged"], s["artifacts"], s["found"]) == (3, 0, 4, 4)
    assert s["clean_pass_rate"] == 1.0 and s["found_rate"] == 1.0 and s["image_auroc"] == 1.0


def test_calibrated_threshold_passes_the_asked_share_of_clean_images():
    from dd.errors import DDError
    from dd.inference.metrics import calibrate_image_threshold, image_level_summary

    clean = [0.05 * k for k in range(1, 21)]  # 0.05 .. 1.0
    t = calibrate_image_threshold(clean, pass_rate=0.9)
    # 18 of 20 (0.05 .. 0.90) must lie strictly under it; the grid's next step is 0.91
    assert t == pytest.approx(0.91)
    rows = [{"max": v, "max_in_mask": None} for v in clean]
    assert image_level_summary(rows, t)["clean_pass_rate"] == pytest.approx(0.9)
    assert calibrate_image_threshold([0.2, 0.2, 0.2], 0.5) == pytest.approx(0.21)
    assert calibrate_image_threshold([0.0], 0.5) == pytest.approx(0.01)
    assert calibrate_image_threshold([0.999], 0.5) == 1.0
    with pytest.raises(DDError, match="no clean images"):
        calibrate_image_threshold([], 0.9)
    with pytest.raises(DDError, match="pass rate"):
        calibrate_image_threshold([0.1], 1.0)


def test_cli_calibrates_and_stores_the_image_threshold(tmp_path, cli):
    """--calibrate picks the threshold from the dataset's clean images; --save-threshold
    writes it into the weights folder, which detect and eval-detector then use."""
    ds = tmp_path / "ds"
    _dataset(ds, seed=5)
    weights = tmp_path / "weights"
    get_host().detectors.get("segformer").load(None, variant="tiny", input_size=64).save_pretrained(
        weights
    )
    args = ["eval-detector", ds, "--weights", weights, *TINY, "--device", "cpu"]
    plain = json.loads(cli(*args, "--json").stdout)
    assert plain["image_level"]["threshold"] == 0.5
    assert plain["image_level"]["clean"] == 3 and plain["image_level"]["artifacts"] == 4

    res = cli(*args, "--calibrate", "0.9", "--save-threshold")
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "calibrated here for 90% of clean images" in text and "0 of 3 clean" in text
    stored = json.loads((weights / "config.json").read_text())["dd_image_threshold"]
    # strictly above every clean image's max (3 clean images: 90 % is all of them)
    clean_max = [r["max"] for r in image_level_rows(weights, ds) if r["max_in_mask"] is None]
    assert max(clean_max) < stored <= max(clean_max) + 0.01 + 1e-9
    again = json.loads(cli(*args, "--json").stdout)
    assert again["detector"]["threshold_calibrated"] is True
    assert again["image_level"]["threshold"] == pytest.approx(stored)
    assert again["image_level"]["clean_flagged"] == 0

    for bad, word in (
        (["--save-threshold"], "needs --calibrate"),
        (["--calibrate", "1.5"], "--calibrate"),
    ):
        res = cli(*args, *bad)
        assert res.exit_code == 2 and word in res.output, res.output
    res = cli("eval-detector", ds, *TINY, "-O", "variant=tiny", "--calibrate", "0.9",
              "--save-threshold")  # fmt: skip
    assert res.exit_code == 2 and "needs --weights FOLDER" in " ".join(res.output.split())


def image_level_rows(weights, ds):
    from dd.inference.metrics import image_level_scores

    det = get_host().detectors.get("segformer").load(str(weights), input_size=64)
    return image_level_scores(det, read_dataset(ds), batch_size=4)
