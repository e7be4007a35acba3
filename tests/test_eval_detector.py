"""`dd eval-detector` and `evaluate_detector`: the loop that feeds DetectorMetrics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dd.data.datasets import Sample, load_mask, read_dataset, save_mask, write_manifest
from dd.data.images import load_image
from dd.detectors import Detector
from dd.metrics import METRIC_KEYS, DetectorMetrics, evaluate_detector
from dd.plugins import get_host

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
