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
from dd.runtime.progress import progress_bar


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
) -> None:
    """Score a detector against a dataset's masks: MSE, KL, CC, IoU, F1, AUROC.

    Prints a table (overall and per category); see docs/datasets.md for the definitions.
    In JSON, undefined metrics (e.g. MSE on clean images when there are none) are null.
    """
    from dd.cli.options import parse_options
    from dd.data.datasets import read_dataset
    from dd.errors import DDError
    from dd.metrics import evaluate_detector, format_table, json_safe
    from dd.plugins import load_detector
    from dd.runtime.io import atomic_write_json, check_output_folder, mark_run_folder

    if out is not None:  # checked before the evaluation, not after it
        check_output_folder(out, "eval-detector", overwrite=overwrite)
        if (out / "metrics.json").exists() and not overwrite:
            raise DDError(
                f"{out} already holds a metrics.json",
                hint="pass --overwrite to replace it, or choose a new --out",
            )
    err = Console(stderr=True)
    samples = read_dataset(dataset)
    det = load_detector(detector, weights, parse_options(option), device, dtype)
    if det.untrained:
        err.print(
            f"[bold yellow]Warning: the {detector!r} detector is UNTRAINED (random weights): "
            "these metrics mean nothing.[/bold yellow] Pass --weights.",
            highlight=False,
        )
    with progress_bar("eval", console=err) as progress:
        task = progress.add_task("eval", total=len(samples))
        metrics = evaluate_detector(
            det,
            samples,
            batch_size,
            workers=workers,
            on_progress=lambda done, total: progress.update(task, completed=done, total=total),
        )
    report = json_safe({"dataset": str(dataset), "detector": det.describe(), "metrics": metrics})
    if out is not None:
        mark_run_folder(out, "eval-detector")
        atomic_write_json(out / "metrics.json", report)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    console = Console()
    console.print(format_table(metrics, title=f"detector metrics on {dataset}"))
    if out is not None:
        console.print(f"Metrics: {out / 'metrics.json'}", highlight=False)
