"""``dd eval-detector``: a detector's metrics on a dataset with ground-truth maps."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

import dd.cli.options as opt
from dd.engines.eval_detector import EvalDetectorConfig


def _eval_detector(ctx: typer.Context, values: dict, dataset: Path, as_json: bool) -> None:
    """Run dd eval-detector with the settings given (see EvalDetectorConfig) and print."""
    from dd.engines.eval_detector import evaluate_detector
    from dd.inference.metrics import format_table
    from dd.runtime.progress import ConsoleReporter

    calibrate, save_threshold, weights = (
        values["calibrate"], values["save_threshold"], values["weights"]
    )  # fmt: skip
    if save_threshold and calibrate is None:
        raise typer.BadParameter("needs --calibrate", param_hint="'--save-threshold'")
    if save_threshold and (weights is None or not (Path(weights) / "config.json").is_file()):
        raise typer.BadParameter(
            "needs --weights FOLDER with a config.json (e.g. a train-detector run's model/)",
            param_hint="'--save-threshold'",
        )
    cfg = EvalDetectorConfig(dataset=dataset, **values)
    res = evaluate_detector(cfg, reporter=ConsoleReporter(Console(stderr=True)))
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


# Every option comes from EvalDetectorConfig's declarations (one declaration per setting).
eval_detector = opt.config_command(
    EvalDetectorConfig,
    _eval_detector,
    name="eval-detector",
    doc="""Score a detector against a dataset's masks: MSE, KL, CC, IoU, F1, AUROC.

    Prints a table (overall and per category) and the image-level rule: clean images
    flagged and artifacts found at the detector's image threshold (max confidence; its
    calibrated one, else 0.5). See docs/datasets.md for the definitions. In JSON, undefined
    metrics (e.g. MSE on clean images when there are none) are null.
    """,
    leading=[
        opt.argument_parameter(
            "dataset", "Dataset folder or shards (images/, masks/, manifest.jsonl).", Path
        ),
        opt.json_parameter("Print JSON to stdout."),
    ],
)
