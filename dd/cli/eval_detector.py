"""``dd eval-detector``: a detector's metrics on a dataset with ground-truth maps."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


def eval_detector(
    dataset: Annotated[
        Path, typer.Argument(help="Dataset folder (images/, masks/, manifest.jsonl).")
    ],
    weights: Annotated[
        str | None,
        typer.Option(help="Detector weights: a .bin/.safetensors file, a folder or a hub id."),
    ] = None,
    detector: Annotated[str, typer.Option(help="Detector plugin (see `dd plugins`).")] = (
        "segformer"
    ),
    option: Annotated[
        list[str] | None,
        typer.Option("--option", "-O", help="Detector option KEY=VALUE (e.g. variant=b5)."),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per model call.")] = 8,
    workers: Annotated[int, typer.Option(min=1, help="Threads decoding images and masks.")] = 4,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    dtype: Annotated[str, typer.Option(help="fp32, bf16 or fp16.")] = "fp32",
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write metrics.json to this folder.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON to stdout.")] = False,
) -> None:
    """Score a detector against a dataset's masks: MSE, KL, CC, IoU, F1, AUROC.

    Prints a table (overall and per category); see docs/datasets.md for the definitions.
    In JSON, undefined metrics (e.g. MSE on clean images when there are none) are null.
    """
    from dd.cli.detect import load_detector
    from dd.cli.options import parse_options
    from dd.datasets import read_dataset
    from dd.io import atomic_write_json
    from dd.metrics import evaluate_detector, format_table, json_safe

    err = Console(stderr=True)
    samples = read_dataset(dataset)
    det = load_detector(detector, weights, parse_options(option), device, dtype)
    if det.untrained:
        err.print(
            f"[bold yellow]Warning: the {detector!r} detector is UNTRAINED (random weights): "
            "these metrics mean nothing.[/bold yellow] Pass --weights.",
            highlight=False,
        )
    with Progress(
        TextColumn("[bold]eval"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err,
    ) as progress:
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
        atomic_write_json(out / "metrics.json", report)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    console = Console()
    console.print(format_table(metrics, title=f"detector metrics on {dataset}"))
    if out is not None:
        console.print(f"Metrics: {out / 'metrics.json'}", highlight=False)
