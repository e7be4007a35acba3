"""``dd refine``: late-step SDEdit repair of images, and ``dd refine train`` (seed 002).

``dd refine IMAGES... [OPTIONS]`` refines images (it is ``dd refine run IMAGES...``: the group
forwards anything that is not a subcommand name to ``run``); ``dd refine train ...`` trains a
model on a late-step range. An image literally named ``train`` or ``run`` needs the explicit
``dd refine run train``.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

import dd.cli.options as opt
from dd.cli.groups import DefaultCommandGroup
from dd.ops.quantize import OPTIMIZER_HELP, QUANTIZE_HELP
from dd.runtime.tracking import REPORT_TO_HELP
from dd.training.setup import EMBEDDING_CACHE_HELP

DEFAULT_COMMAND = "run"


class RefineGroup(DefaultCommandGroup):
    """A group whose default command is ``run``: ``dd refine a.png`` = ``dd refine run a.png``."""

    default_command = DEFAULT_COMMAND


app = typer.Typer(
    cls=RefineGroup,
    name="refine",
    help="Repair images by redoing the late diffusion steps (SDEdit), whole or masked by the "
    "detector; `dd refine IMAGES... --backbone B --model M --late-steps A-B --out DIR`. "
    "`dd refine train` trains a model on a late-step range.",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.command("run")
def run(
    images: Annotated[
        list[str],
        typer.Argument(help="Image files, folders (recursive), globs, or .txt/.jsonl manifests."),
    ],
    out: Annotated[str, typer.Option("--out", "-o", help="Output folder.")] = "dd-refine",
    backbone: Annotated[
        str | None,
        typer.Option(
            help="Backbone plugin: sd15, sdxl, sd3, flux, ldm (default: a trained segment's)."
        ),
    ] = None,  # fmt: skip
    model: Annotated[
        str | None,
        typer.Option(help="Base model: diffusers folder, .safetensors file or hub id."),
    ] = None,
    backbone_option: opt.BackboneOption = None,
    late_steps: Annotated[
        str | None,
        typer.Option(
            help="Steps A-B out of 1000 from pure noise: noise to t = 1000 - A, denoise to "
            "t = 1000 - B with --model, the rest with the next segment's model (e.g. 500-750)."
        ),
    ] = None,
    segment: Annotated[
        list[str] | None,
        typer.Option(
            help="A-B=MODEL: steps A-B run by MODEL (a `dd refine train` output, pipeline "
            "folder or LoRA); repeat to chain; a train output alone uses its own range."
        ),
    ] = None,
    strength: Annotated[
        float | None,
        typer.Option(help="diffusers img2img strength in (0, 1] instead of --late-steps."),
    ] = None,
    steps: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Steps of a full run from pure noise; a segment gets its share "
            "(default: the backbone's).",
        ),
    ] = None,
    guidance: Annotated[
        float | None, typer.Option(help="Guidance scale (default: the backbone's).")
    ] = None,
    prompt: Annotated[
        str | None,
        typer.Option(help="Prompt for images without a manifest 'prompt' or a sidecar .txt."),
    ] = None,
    mask: Annotated[
        str | None,
        typer.Option(
            help="auto (repaint what the detector flags), a mask PNG (white = repaint) for "
            "every image, or a folder of masks named like the images."
        ),
    ] = None,
    threshold: Annotated[
        float, typer.Option(help="--mask auto: pixels with confidence >= this are repainted.")
    ] = 0.5,
    dilate: Annotated[int, typer.Option(min=0, help="Grow the mask by this many pixels.")] = 8,
    feather: Annotated[
        int, typer.Option(min=0, help="Soft mask edge width in pixels (outside the mask).")
    ] = 8,
    until_clean: Annotated[
        int | None,
        typer.Option(
            min=1, help="Repeat up to N rounds until the max confidence is under the threshold."
        ),
    ] = None,
    clean_threshold: Annotated[
        float | None,
        typer.Option(help="--until-clean stops under this max confidence (default --threshold)."),
    ] = None,
    detector: opt.DetectorPlugin = "segformer",
    detector_weights: Annotated[
        str | None,
        typer.Option("--detector-weights", "--weights", help="Detector weights: file or folder."),
    ] = None,
    detector_option: Annotated[
        list[str] | None,
        typer.Option("--option", "--detector-option", "-O", help="Detector option KEY=VALUE."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Run seed (each image's noise derives from it).")] = 0,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per batch.")] = 1,
    device: opt.Device = "auto",
    dtype: opt.Dtype = "fp32",
    resume: Annotated[bool, typer.Option(help="Skip images already refined in --out.")] = False,
    overwrite: Annotated[
        bool,
        typer.Option(help="Replace the refine run in --out (or write into a non-empty folder)."),
    ] = False,
) -> None:
    """Refine images: noise them part-way and redo the late steps (seed 002, SDEdit).

    Writes to --out: images/ (refined), compare/ (before/after with both artifact maps),
    masks/, report.jsonl, report.csv, summary.json and plan.txt (the resolved timesteps).
    """
    from rich.console import Console

    from dd.engines.refine import RefineConfig, refine

    cfg = RefineConfig(
        inputs=list(images),
        out=out,
        backbone=backbone,
        model=model,
        backbone_options=opt.parse_options(backbone_option),
        late_steps=late_steps,
        segments=list(segment or []),
        strength=strength,
        steps=steps,
        guidance=guidance,
        prompt=prompt,
        mask=mask,
        threshold=threshold,
        dilate=dilate,
        feather=feather,
        until_clean=until_clean,
        clean_threshold=clean_threshold,
        detector=detector,
        detector_weights=detector_weights,
        detector_options=opt.parse_options(detector_option),
        seed=seed,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        resume=resume,
        overwrite=overwrite,
    )
    result = refine(cfg, console=Console(stderr=True))
    s = result.summary
    console = Console()
    if s["images"]:
        console.print(
            f"refined {s['images']} image(s) -> {out}; artifact confidence, averaged over "
            f"the images: per-image max {s['before_max']:.4f} -> {s['after_max']:.4f}, "
            f"per-image mean {s['before_mean']:.4f} -> {s['after_mean']:.4f}",
            highlight=False,
        )
    for f in result.failures:
        # load errors already name the file
        where = "" if f["error"].startswith(f["image"]) else f"{f['image']}: "
        console.print(f"failed: {where}{f['error']}", highlight=False)
    if result.failures:
        from dd.errors import EXIT_SOME_INPUTS_FAILED

        raise typer.Exit(EXIT_SOME_INPUTS_FAILED)


@app.command("train")
def train(
    ctx: typer.Context,
    backbone: Annotated[str, typer.Option(help="ldm (full fine-tune) or sd15 (LoRA).")] = "ldm",
    late_steps: Annotated[
        str | None,
        typer.Option(
            help="Step range A-B out of 1000 to train: timesteps t in [1000 - B, 1000 - A] "
            "(e.g. 500-750 trains t 250..500)."
        ),
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(help="Folder of images (manifest.jsonl or sidecar .txt prompts)."),
    ] = None,
    init: Annotated[
        str | None,
        typer.Option(help="Model to start from: diffusers folder or hub id (the base of a LoRA)."),
    ] = None,
    out: opt.RunFolder = None,
    from_scratch: Annotated[
        bool, typer.Option(help="ldm: re-initialise the UNet (keep --init's autoencoder).")
    ] = False,
    resolution: Annotated[
        int | None, typer.Option(min=8, help="Square crop size (default: the model's).")
    ] = None,
    train_steps: opt.TrainSteps = 1000,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per process per step.")] = 4,
    grad_accum: Annotated[int, typer.Option(min=1, help="Micro-batches per step.")] = 1,
    lr: opt.Lr = 1e-4,
    weight_decay: opt.WeightDecay = 1e-2,
    lr_schedule: opt.LrSchedule = "constant",
    warmup_steps: opt.WarmupSteps = 0,
    clip_grad: Annotated[float, typer.Option(help="Gradient norm clip (0: off).")] = 1.0,
    ema_decay: Annotated[
        float, typer.Option(help="EMA decay of the saved weights (0: no EMA).")
    ] = 0.999,
    mixed_precision: Annotated[str, typer.Option(help="no, bf16 or fp16.")] = "no",
    lora_rank: Annotated[int, typer.Option(min=1, help="sd15: LoRA rank.")] = 16,
    lora_alpha: Annotated[float | None, typer.Option(help="sd15: LoRA alpha (default rank).")] = (
        None
    ),
    quantize: Annotated[str, typer.Option(help="sd15: " + QUANTIZE_HELP)] = "none",
    optimizer: Annotated[str, typer.Option(help=OPTIMIZER_HELP)] = "adamw",
    report_to: Annotated[str, typer.Option(help=REPORT_TO_HELP)] = "none",
    embedding_cache: Annotated[str | None, typer.Option(help=EMBEDDING_CACHE_HELP)] = None,
    offload_text_encoders: Annotated[
        bool, typer.Option(help="sd15: move the text encoder to the CPU once prompts are embedded.")
    ] = True,
    device: opt.TrainDevice = "auto",
    seed: Annotated[int, typer.Option(help="Seed of data order, noise and timesteps.")] = 0,
    eval_every: Annotated[int, typer.Option(min=1, help="Range loss every N steps.")] = 100,
    eval_images: Annotated[int, typer.Option(min=1, help="Images in the range-loss eval.")] = 8,
    save_every: opt.SaveEvery = 500,
    log_every: opt.LogEvery = 10,
    stop_at: Annotated[
        int | None, typer.Option(min=1, help="Stop (with a checkpoint) here; --resume later.")
    ] = None,
    resume: opt.Resume = False,
    overwrite: opt.Overwrite = False,
) -> None:
    """Train a model on a late-step range only (seed 002).

    Full fine-tuning for a small LDM, a LoRA for SD1.5; timesteps uniform over the range,
    EMA, checkpoints, --resume. The output folder loads with `dd refine --segment A-B=OUT`
    (or just `--segment OUT`). Several GPUs: `accelerate launch -m dd refine train ...`.
    """
    from rich.console import Console

    from dd.engines.refine_train import RefineTrainConfig, refine_train
    from dd.runtime.progress import ConsoleReporter

    values: dict[str, Any] = dict(ctx.params)
    cfg = RefineTrainConfig(**values)
    result = refine_train(cfg, reporter=ConsoleReporter(Console(stderr=True)))
    if result.main:
        Console().print(
            f"range loss {result.first_loss:.5f} -> {result.last_loss:.5f} "
            f"(step {result.step}); model: {result.out}",
            highlight=False,
        )
