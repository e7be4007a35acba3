"""``dd eval-detector``: a detector's metrics on a dataset with ground-truth maps (pixel
metrics, image-level rule at the detector's threshold or one calibrated here), optionally
written to ``OUT/metrics.json`` and the calibrated threshold stored with the weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dd.training.settings as shared
from dd.errors import DDError
from dd.runtime.config import setting


@dataclass
class EvalDetectorConfig:
    """Everything ``dd eval-detector`` takes: each field declared once (default, help,
    flag), the source of the command's options."""

    dataset: Path = setting(
        help="Dataset folder or shards (images/, masks/, manifest.jsonl).", cli=False
    )
    weights: str | None = setting(
        None, help="Detector weights: a .bin/.safetensors file, a folder or a hub id."
    )
    detector: str = shared.detector()
    detector_options: dict[str, Any] = shared.detector_options()
    batch_size: int = shared.batch_size(8)
    workers: int = shared.workers(4, "Threads decoding images and masks.")
    device: str = shared.inference_device()
    dtype: str = setting("fp32", help="fp32, bf16 or fp16.")
    #: Write ``metrics.json`` here (None: nothing written).
    out: Path | None = shared.run_folder(None, "Write metrics.json to this folder.")
    overwrite: bool = setting(
        False, help="Replace the metrics.json of an earlier evaluation in --out."
    )
    #: Choose the image threshold under which this share of the clean images fall.
    calibrate: float | None = setting(
        None,
        min=0.5,
        max=0.999,
        help="Choose the image threshold under which this share of the dataset's clean images "
        "fall (e.g. 0.95), and report at it. Calibrate on data you do not test on.",
    )
    #: Store the calibrated threshold in the weights folder's ``config.json``.
    save_threshold: bool = setting(
        False,
        help="With --calibrate: store the threshold in the --weights folder's config.json "
        "(dd_image_threshold), which dd detect then uses.",
    )


@dataclass
class EvalDetectorResult:
    #: What ``metrics.json`` holds: dataset, detector, metrics, image_level.
    report: dict[str, Any]
    #: The pixel metrics as computed (NaN where undefined; the report has null).
    metrics: dict[str, Any]
    #: The image-level rule's counts and AUROC (NaN where undefined).
    image_level: dict[str, Any]
    threshold: float
    #: The detector had a calibrated threshold of its own.
    calibrated_detector: bool
    #: ``(config.json path, previous threshold or None)`` when the threshold was stored.
    saved: tuple[Path, float | None] | None = None
    metrics_file: Path | None = None


def evaluate_detector(
    cfg: EvalDetectorConfig, *, detector: Any = None, reporter: Any = None
) -> EvalDetectorResult:
    """Evaluate ``detector`` (default: the one ``cfg`` names; or a loaded detector) on
    ``cfg.dataset``. The output folder is checked before anything loads."""
    from dd.api.detectors import store_image_threshold
    from dd.api.plugins import DetectorRef, as_detector
    from dd.data.datasets import read_dataset
    from dd.inference.metrics import (
        DetectorMetrics,
        calibrate_image_threshold,
        image_level_scores,
        image_level_summary,
        json_safe,
    )
    from dd.runtime.io import atomic_write_json, check_output_folder, mark_run_folder
    from dd.runtime.progress import as_reporter

    rep = as_reporter(reporter)
    out = cfg.out
    if out is not None:  # checked before the evaluation, not after it
        check_output_folder(out, "eval-detector", overwrite=cfg.overwrite)
        if (out / "metrics.json").exists() and not cfg.overwrite:
            raise DDError(
                f"{out} already holds a metrics.json",
                hint="pass --overwrite to replace it, or choose a new --out",
            )
    samples = read_dataset(cfg.dataset)
    det = as_detector(
        DetectorRef.of(cfg) if detector is None else detector, rep, meaning="these metrics"
    )
    with rep.progress("eval") as progress:
        task = progress.add_task("eval", total=len(samples))
        pixel = DetectorMetrics()
        rows = image_level_scores(
            det,
            samples,
            cfg.batch_size,
            workers=cfg.workers,
            metrics=pixel,
            on_progress=lambda done, total: progress.update(task, completed=done, total=total),
        )
    metrics = pixel.compute()
    threshold = det.flag_threshold
    if cfg.calibrate is not None:
        clean = [r["max"] for r in rows if r["max_in_mask"] is None]
        threshold = calibrate_image_threshold(clean, cfg.calibrate)
    image_level = image_level_summary(rows, threshold)
    image_level["calibrated_here"] = cfg.calibrate is not None
    report = json_safe(
        {
            "dataset": str(cfg.dataset),
            "detector": det.describe(),
            "metrics": metrics,
            "image_level": image_level,
        }
    )
    saved = store_image_threshold(cfg.weights, threshold) if cfg.save_threshold else None
    written = None
    if out is not None:
        mark_run_folder(out, "eval-detector")
        written = out / "metrics.json"
        atomic_write_json(written, report)
    return EvalDetectorResult(
        report=report,
        metrics=metrics,
        image_level=image_level,
        threshold=threshold,
        calibrated_detector=det.image_threshold is not None,
        saved=saved,
        metrics_file=written,
    )
