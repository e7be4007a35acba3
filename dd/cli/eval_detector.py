"""``dd eval-detector``: a detector's metrics on a dataset with ground-truth maps."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from dd.cli.options import (
    BatchSize,
    DetectorName,
    DetectorOptions,
    DetectorWeights,
    Device,
    Dtype,
)


def eval_detector(
    dataset: Annotated[
        Path, typer.Argument(help="Dataset folder (images/, masks/, manifest.jsonl).")
    ],
    weights: DetectorWeights = None,
    detector: DetectorName = "segformer",
    option: DetectorOptions = None,
    batch_size: BatchSize = 8,
    workers: Annotated[int, typer.Option(min=1, help="Threads decoding images and masks.")] = 4,
    device: Device = "auto",
    dtype: Dtype = "fp32",
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write metrics.json to this folder.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON to stdout.")] = False,
    overwrite: Annotated[
        bool, typer.Option(help="Replace the metrics.json of an earlier evaluation in --out.")
    ] = False,
    calibrate: Annotated[
        float | None,
        typer.Option(
            min=0.5,
            max=0.999,
            help="Choose the image threshold under which this share of the dataset's clean "
            "images fall (e.g. 0.95), and report at it. Calibrate on data you do not test on.",
        ),
    ] = None,
    save_threshold: Annotated[
        bool,
        typer.Option(
            help="With --calibrate: store the threshold in the --weights folder's config.json "
            "(dd_image_threshold), which dd detect then uses."
        ),
    ] = False,
) -> None:
    """Score a detector against a dataset's masks: MSE, KL, CC, IoU, F1, AUROC.

    Prints a table (overall and per category) and the image-level rule: clean images
    flagged and artifacts found at the detector's image threshold (max confidence; its
    calibrated one, else 0.5). See docs/datasets.md for the definitions. In JSON, undefined
    metrics (e.g. MSE on clean images when there are none) are null.
    """
    from dd.api.plugins import DetectorRef
    from dd.cli.options import parse_options
    from dd.engines.eval_detector import EvalDetectorConfig, evaluate_detector
    from dd.inference.metrics import format_table
    from dd.runtime.progress import ConsoleReporter

    if save_threshold and calibrate is None:
        raise typer.BadParameter("needs --calibrate", param_hint="'--save-threshold'")
    if save_threshold and (weights is None or not (Path(weights) / "config.json").is_file()):
        raise typer.BadParameter(
            "needs --weights FOLDER with a config.json (e.g. a train-detector run's model/)",
            param_hint="'--save-threshold'",
        )
    cfg = EvalDetectorConfig(
        dataset=dataset,
        batch_size=batch_size,
        workers=workers,
        out=out,
        overwrite=overwrite,
        calibrate=calibrate,
        save_threshold=save_threshold,
    )
    ref = DetectorRef(detector, weights, parse_options(option), device, dtype)
    res = evaluate_detector(cfg, ref, reporter=ConsoleReporter(Console(stderr=True)))
    report, threshold, saved = res.report, res.threshold, res.saved
    metrics, image_level = res.metrics, res.image_level
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    console = Console()
    console.print(format_table(metrics, title=f"detector metrics on {dataset}"))
    how = (
        f"calibrated here for {calibrate:.0%} of clean images"
        if calibrate is not None
        else "the detector's calibrated threshold"
        if res.calibrated_detector
        else "default; not calibrated for these weights"
    )
    s = image_level
    console.print(
        f"image threshold {threshold:.2f} ({how}): {s['clean_flagged']} of {s['clean']} clean "
        f"images flagged, {s['found']} of {s['artifacts']} artifacts found (max inside the "
        f"mask >= threshold); image AUROC {s['image_auroc']:.3f}",
        highlight=False,
    )
    if saved is not None:
        was = f" (it was {saved[1]})" if saved[1] is not None else ""
        console.print(
            f"Stored dd_image_threshold = {threshold} in {saved[0]}{was}", highlight=False
        )
    if res.metrics_file is not None:
        console.print(f"Metrics: {res.metrics_file}", highlight=False)
