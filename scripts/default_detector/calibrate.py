"""Calibrate and report the default detector's image-level threshold on the held-out set.

    python scripts/default_detector/calibrate.py runs/default-v4/model \
        --heldout tests/data/heldout-photos [--write]

The threshold is the smallest multiple of 0.01 under which ``--pass-rate`` of the clean crops
of the ``calibration`` split (half of the held-out pictures) fall; the figures are reported
on the ``test`` split (the other half) and on both. ``--write`` stores it in the weights'
``config.json`` as ``dd_image_threshold``, which ``dd detect`` reads (summary, contact sheet,
``--fail-above auto``). Prints a markdown table for docs/models.md and writes
``calibration.json`` beside the weights.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dd.api.detectors import store_image_threshold
from dd.api.plugins import load_detector
from dd.data.datasets import read_dataset
from dd.inference.metrics import (
    DetectorMetrics,
    calibrate_image_threshold,
    image_level_scores,
    image_level_summary,
    json_safe,
)
from dd.runtime.io import atomic_write_json


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("weights", help="detector weights folder (or 'default')")
    ap.add_argument("--heldout", type=Path, default=Path("tests/data/heldout-photos"))
    ap.add_argument("--pass-rate", type=float, default=0.95)
    ap.add_argument("--threshold", type=float, help="report at this threshold, no calibration")
    ap.add_argument("--write", action="store_true", help="store the threshold in config.json")
    args = ap.parse_args(argv)
    weights = None if args.weights == "default" else args.weights
    det = load_detector("segformer", weights, {}, "cpu", "fp32")
    samples = read_dataset(args.heldout)
    by_split: dict[str, DetectorMetrics] = {
        "calibration": DetectorMetrics(),
        "test": DetectorMetrics(),
    }
    rows = []
    for split, metrics in by_split.items():
        part = [s for s in samples if s.meta.get("split") == split]
        rows += image_level_scores(det, part, batch_size=32, workers=2, metrics=metrics)
    calib = [r for r in rows if r["meta"]["split"] == "calibration"]
    if args.threshold is not None:
        threshold = args.threshold
    else:
        clean = [r["max"] for r in calib if r["max_in_mask"] is None]
        threshold = calibrate_image_threshold(clean, args.pass_rate)
    report: dict[str, dict] = {}
    for split in ("calibration", "test", "all"):
        part = rows if split == "all" else [r for r in rows if r["meta"]["split"] == split]
        pix = (
            DetectorMetrics.from_states([m.state() for m in by_split.values()])
            if split == "all"
            else by_split[split]
        )
        pixel = pix.compute()
        for group in ("photo", "graphic", "all"):
            sub = part if group == "all" else [r for r in part if r["meta"]["group"] == group]
            s = image_level_summary(sub, threshold)
            s["clean_max_at_0.5_pass_rate"] = sum(
                r["max"] < 0.5 for r in sub if r["max_in_mask"] is None
            ) / max(1, sum(r["max_in_mask"] is None for r in sub))
            if group == "all":
                s["pixel_auroc"] = pixel["pixel_auroc"]
            report[f"{split}/{group}"] = s
    print(f"image threshold: {threshold:.2f} (detector {det.source})")
    print(
        "| split / pictures | clean crops under threshold | watermarks found "
        "| image AUROC | pixel AUROC |"
    )
    print("| --- | --- | --- | --- | --- |")
    for key, s in report.items():
        pix = f"{s['pixel_auroc']:.3f}" if "pixel_auroc" in s else ""
        passed = s["clean"] - s["clean_flagged"]
        print(
            f"| {key} | {passed}/{s['clean']} ({s['clean_pass_rate']:.1%}) "
            f"| {s['found']}/{s['artifacts']} ({s['found_rate']:.1%}) "
            f"| {s['image_auroc']:.3f} | {pix} |"
        )
    if weights is not None and Path(weights).is_dir() and args.threshold is None:
        out = Path(weights)
        record = {"threshold": threshold, "pass_rate": args.pass_rate, "report": report}
        atomic_write_json(out / "calibration.json", json_safe(record))
        if args.write:
            cfg_path, _ = store_image_threshold(out, threshold)
            print(f"wrote dd_image_threshold = {threshold} to {cfg_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
