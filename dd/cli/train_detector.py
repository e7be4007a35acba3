"""``dd train-detector``: train a SegFormer artifact detector on artifact datasets."""

from __future__ import annotations

import os
from typing import Annotated

import typer
from rich.console import Console

from dd.cli.options import (
    DetectorOptions,
    LogEvery,
    Overwrite,
    SaveEvery,
    WeightDecay,
    parse_pair,
)
from dd.runtime.tracking import REPORT_TO_HELP


def train_detector(
    datasets: Annotated[
        list[str], typer.Argument(help="Dataset folders (images/, masks/, manifest.jsonl).")
    ],
    out: Annotated[str, typer.Option("--out", "-o", help="Run folder for all outputs.")],
    val: Annotated[
        list[str] | None,
        typer.Option(help="Validation dataset (repeatable); default: hold out --val-fraction."),
    ] = None,
    val_fraction: Annotated[
        float | None,
        typer.Option(help="Fraction of the data held out for validation (default 0.1)."),
    ] = None,
    detector: Annotated[
        str,
        typer.Option(help="Detector plugin to train (one that implements TrainableDetector)."),
    ] = "segformer",
    option: DetectorOptions = None,
    init: Annotated[
        str | None,
        typer.Option(help="Start from these weights: a file, a save_pretrained folder, hub id."),
    ] = None,
    variant: Annotated[
        str | None,
        typer.Option(
            help="SegFormer variant: tiny, small or b0..b5 (b5: DiffDoctor's released "
            "detector); from scratch the default is b0, with --init the file's."
        ),
    ] = None,
    input_size: Annotated[
        int | None, typer.Option(help="Detector input size (default 512).")
    ] = None,
    size: Annotated[
        int | None,
        typer.Option(help="Training crop size; the loss is computed at it (default: input size)."),
    ] = None,
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps in total.")] = 1000,
    batch_size: Annotated[int, typer.Option(min=1, help="Samples per process per batch.")] = 8,
    grad_accum: Annotated[
        int, typer.Option(min=1, help="Batches accumulated per optimizer step.")
    ] = 1,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW).")] = 6e-5,
    weight_decay: WeightDecay = 0.01,
    betas: Annotated[str, typer.Option(help="AdamW betas B1,B2.")] = "0.9,0.999",
    warmup_steps: Annotated[
        int | None, typer.Option(min=0, help="Linear warmup steps (default: 5% of --steps).")
    ] = None,
    min_lr_ratio: Annotated[
        float, typer.Option(help="Final learning rate of the cosine, as a fraction of --lr.")
    ] = 0.0,
    clip_grad: Annotated[
        float, typer.Option(help="Clip the gradient norm to this (0: off).")
    ] = 1.0,
    loss: Annotated[
        str,
        typer.Option(help="mse (seed 000, Eq. 1) or bce (stronger gradient from scratch)."),
    ] = "mse",
    pos_weight: Annotated[
        float,
        typer.Option(
            help="BCE weight of artifact pixels against clean ones (sparse masks: 2-10 "
            "lifts detections over 0.5 sooner)."
        ),
    ] = 1.0,
    precision: Annotated[
        str, typer.Option(help="fp32, bf16 (GPU or CPU) or fp16 (GPU, with loss scaling).")
    ] = "fp32",
    cpu: Annotated[bool, typer.Option("--cpu", help="Train on the CPU even with a GPU.")] = False,
    workers: Annotated[int, typer.Option(min=0, help="Data loader worker processes.")] = 2,
    seed: Annotated[int, typer.Option(help="Seed of everything (split, order, init).")] = 0,
    balance: Annotated[
        str | None,
        typer.Option(
            help='Positive:negative draws per category, e.g. "hand=1:1,face=1:2,*=1:1" '
            "(negatives without a category, e.g. real photos, are shared)."
        ),
    ] = None,
    crop_scale: Annotated[
        float, typer.Option(help="Smallest random crop, as a fraction of the image area.")
    ] = 0.5,
    hflip: Annotated[bool, typer.Option(help="Random horizontal flips.")] = True,
    mask_dilate: Annotated[
        int,
        typer.Option(
            help="Grow training targets by this many pixels at the training size (thin masks, "
            "e.g. watermark strokes, train faster as regions); validation uses exact masks."
        ),
    ] = 0,
    strong_pseudo: Annotated[
        bool, typer.Option(help="Strong augmentation for pseudo-labelled samples.")
    ] = True,
    shrink_pad_prob: Annotated[
        float, typer.Option(help="Probability of shrink-and-pad for a flagged sample.")
    ] = 0.5,
    shrink_pad_fill: Annotated[
        str,
        typer.Option(help="Image padding of shrink-and-pad: a value in [0, 1] or 'reflect'."),
    ] = "0",
    shrink_pad_threshold: Annotated[
        float | None,
        typer.Option(
            help="Flag samples whose predicted max confidence is below this, checked "
            "on the fly every --shrink-pad-every steps (manifest shrink_pad fields apply always)."
        ),
    ] = None,
    shrink_pad_every: Annotated[
        int, typer.Option(min=1, help="Steps between on-the-fly shrink-pad checks.")
    ] = 500,
    shrink_pad_scope: Annotated[
        str,
        typer.Option(
            help="Samples the on-the-fly check may flag: pseudo (pseudo labels, as the paper) "
            "or all (human labels and real photos too)."
        ),
    ] = "pseudo",
    shrink_pad_scale: Annotated[
        str, typer.Option(help="Scale range LO,HI of on-the-fly shrink-and-pad.")
    ] = "0.3,0.7",
    val_every: Annotated[int, typer.Option(min=1, help="Validate every N steps.")] = 500,
    val_batch_size: Annotated[int, typer.Option(min=1, help="Validation batch size.")] = 8,
    select_metric: Annotated[
        str,
        typer.Option(
            help="Validation metric choosing the best model: mse, mse_clean, kl_fn, kl_fp "
            "(lower is better), cc, iou, f1, pixel_auroc, image_auroc (higher is better)."
        ),
    ] = "mse",
    patience: Annotated[
        int | None,
        typer.Option(min=1, help="Stop after this many validations without improvement."),
    ] = None,
    save_every: SaveEvery = 500,
    log_every: LogEvery = 10,
    stop_at: Annotated[
        int | None,
        typer.Option(
            min=1, help="Stop (with a checkpoint) at this step; continue later with --resume."
        ),
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue the run in --out from its last checkpoint.")
    ] = False,
    overwrite: Overwrite = False,
    report_to: Annotated[str, typer.Option(help=REPORT_TO_HELP)] = "none",
) -> None:
    """Train an artifact detector (SegFormer by default; DiffDoctor's loss, balance, augmentation).

    --detector NAME trains any detector plugin that implements dd.api.detectors.TrainableDetector.

    Writes to --out: model/ (best weights; load with dd detect --weights RUN/model), checkpoints/,
    metrics.jsonl, balance.json, train_config.json, curves.png and README.md. Several GPUs:
    `accelerate launch --multi_gpu --num_processes N -m dd train-detector ...` (or torchrun
    --nproc_per_node N -m dd ...); several CPU processes: the same plus --cpu after
    train-detector. Resume with the same options plus --resume.
    """
    from dd.cli.options import parse_options
    from dd.engines.train_detector import TrainConfig
    from dd.engines.train_detector import train_detector as run
    from dd.inference.metrics import format_table
    from dd.runtime.progress import ConsoleReporter

    cfg = TrainConfig(
        datasets=[os.path.abspath(d) for d in datasets],
        out=out,
        detector=detector,
        detector_options=parse_options(option),
        val=[os.path.abspath(d) for d in val or []],
        val_fraction=val_fraction,
        init=init,
        variant=variant,
        input_size=input_size,
        size=size,
        steps=steps,
        batch_size=batch_size,
        grad_accum=grad_accum,
        lr=lr,
        weight_decay=weight_decay,
        betas=parse_pair(betas, "--betas"),
        warmup_steps=warmup_steps,
        min_lr_ratio=min_lr_ratio,
        clip_grad=clip_grad,
        loss=loss.lower(),
        precision=precision.lower(),
        cpu=cpu,
        workers=workers,
        seed=seed,
        balance=balance,
        crop_scale=crop_scale,
        hflip=hflip,
        mask_dilate=mask_dilate,
        pos_weight=pos_weight,
        strong_pseudo=strong_pseudo,
        shrink_prob=shrink_pad_prob,
        shrink_fill=shrink_pad_fill,
        shrink_threshold=shrink_pad_threshold,
        shrink_scope=shrink_pad_scope,
        shrink_every=shrink_pad_every,
        shrink_scale=parse_pair(shrink_pad_scale, "--shrink-pad-scale"),
        val_every=val_every,
        val_batch_size=val_batch_size,
        select_metric=select_metric.lower(),
        patience=patience,
        save_every=save_every,
        log_every=log_every,
        stop_at=stop_at,
        resume=resume,
        overwrite=overwrite,
        report_to=report_to,
    )
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
