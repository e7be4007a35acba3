"""``dd train-detector``: train a SegFormer artifact detector on artifact datasets."""

from __future__ import annotations

import os

import typer
from rich.console import Console

import dd.cli.options as opt
from dd.engines.train_detector import TrainConfig


def _train(ctx: typer.Context, values: dict, datasets: list[str]) -> None:
    """Run dd train-detector with the settings given (see TrainConfig) and print the best
    validation."""
    from dd.engines.train_detector import train_detector as run
    from dd.inference.metrics import format_table
    from dd.runtime.progress import ConsoleReporter

    values["datasets"] = [os.path.abspath(d) for d in datasets]
    values["val"] = [os.path.abspath(d) for d in values.get("val") or []]
    for key in ("loss", "precision", "select_metric"):
        values[key] = values[key].lower()
    cfg = TrainConfig(**values)
    result = run(cfg, reporter=ConsoleReporter(Console(stderr=True)))
    if not result.main:
        return
    if result.best is not None:
        title = f"validation at step {result.best['step']} (best {cfg.select_metric})"
        Console().print(format_table(result.best["metrics"], title=title))
    elif result.last_val is not None:
        console = Console()
        console.print(f"no best step: {cfg.select_metric} was undefined at every validation")
        console.print(format_table(result.last_val, title="last validation"))


# Every option comes from TrainConfig's declarations (one declaration per setting).
train_detector = opt.config_command(
    TrainConfig,
    _train,
    name="train-detector",
    doc="""Train an artifact detector (SegFormer by default; DiffDoctor's loss, balance,
    augmentation).

    --detector NAME trains any detector plugin that implements
    dd.api.detectors.TrainableDetector.

    Writes to --out: model/ (best weights; load with dd detect --weights RUN/model),
    checkpoints/, metrics.jsonl, balance.json, train_config.json, curves.png and README.md.
    Several GPUs: `accelerate launch --multi_gpu --num_processes N -m dd train-detector ...`
    (or torchrun --nproc_per_node N -m dd ...); several CPU processes: the same plus --cpu
    after train-detector. Resume with the same options plus --resume.
    """,
    leading=[
        opt.argument_parameter(
            "datasets", "Dataset folders or shards (images/, masks/, manifest.jsonl)."
        )
    ],
)
