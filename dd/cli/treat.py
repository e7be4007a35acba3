"""``dd treat``: tune a diffusion model's LoRA so a detector finds fewer artifacts."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from dd.cli import options as opt
from dd.engines.treat import TreatConfig

_D = TreatConfig()


def treat(
    ctx: typer.Context,
    backbone: Annotated[
        str | None, typer.Option(help="Backbone plugin: flux, sd15, sd3, sdxl (see `dd plugins`).")
    ] = None,
    model: opt.Model = None,
    config: Annotated[
        str | None,
        typer.Option(
            "--config",
            "-c",
            help="Preset name (flux-schnell, flux-dev, sd15, sd3, sdxl) or TOML file; "
            "flags given here override it.",
        ),
    ] = None,
    backbone_option: Annotated[
        list[str] | None,
        typer.Option(
            "--backbone-option",
            "-B",
            help="Backbone option KEY=VALUE (e.g. max_sequence_length=256).",
        ),
    ] = None,
    detector: opt.DetectorPlugin = _D.detector,
    detector_weights: Annotated[
        str | None,
        typer.Option(
            "--detector-weights", "--weights", help="Detector weights: file, folder or hub id."
        ),
    ] = None,
    detector_option: Annotated[
        list[str] | None,
        typer.Option(
            "--option",
            "--detector-option",
            "-O",
            help="Detector option KEY=VALUE (e.g. variant=b5).",
        ),
    ] = None,
    prompts: Annotated[
        str | None, typer.Option(help="Training prompts: .txt (one per line), .jsonl or .json.")
    ] = None,
    eval_prompts: Annotated[
        str | None, typer.Option(help="Held-out prompts evaluated at fixed seeds.")
    ] = None,
    out: opt.RunFolder = None,
    resolution: Annotated[
        int | None, typer.Option(help="Image size (square); default: the backbone's.")
    ] = None,
    steps: Annotated[
        int | None, typer.Option(help="Sampling (denoising) steps; default: the backbone's.")
    ] = None,
    guidance: Annotated[
        float | None, typer.Option(help="Guidance scale (FLUX dev: embedded; SD: CFG).")
    ] = None,
    dtype: Annotated[
        str, typer.Option(help="Frozen models' dtype: fp32, bf16, fp16 (LoRA stays fp32).")
    ] = _D.dtype,
    device: Annotated[
        str, typer.Option(help="auto, cpu or cuda (under accelerate launch: one GPU per process).")
    ] = _D.device,
    seed: Annotated[int, typer.Option(help="Seed of prompt order, noise and LoRA init.")] = _D.seed,
    train_steps: Annotated[int, typer.Option(min=1, help="Optimizer steps in total.")] = (
        _D.train_steps
    ),
    batch_size: Annotated[int, typer.Option(min=1, help="Samples per process per micro-batch.")] = (
        _D.batch_size
    ),
    grad_accum: Annotated[
        int, typer.Option(min=1, help="Micro-batches accumulated per optimizer step.")
    ] = _D.grad_accum,
    lr: Annotated[float, typer.Option(help="AdamW learning rate (paper: 1e-4).")] = _D.lr,
    weight_decay: opt.WeightDecay = _D.weight_decay,
    lr_schedule: Annotated[str, typer.Option(help="constant or cosine (after warmup).")] = (
        _D.lr_schedule
    ),
    warmup_steps: opt.WarmupSteps = _D.warmup_steps,
    clip_grad: opt.ClipGrad = _D.clip_grad,
    lora_rank: Annotated[
        int, typer.Option(min=1, help="LoRA rank (paper 16; the released code used 8).")
    ] = _D.lora_rank,
    lora_alpha: Annotated[
        float | None, typer.Option(help="LoRA alpha (default: the rank).")
    ] = None,
    lora_targets: opt.LoraTargets = None,
    init_lora: Annotated[
        str | None,
        typer.Option(help="Continue from this diffusers-format LoRA (e.g. a DreamBooth one)."),
    ] = None,
    grad_steps: Annotated[
        int, typer.Option(min=1, help="Back-propagate through the last K denoising steps.")
    ] = _D.grad_steps,
    grad_steps_random: Annotated[
        str | None, typer.Option(help="Draw K per sample from the range A-B instead.")
    ] = None,
    reduction: Annotated[
        str,
        typer.Option(
            help="Per-image loss: mean (Eq. 2), max, sum (use a small --loss-scale, the "
            "released code: 1e-5) or weighted (mean over pixels above --weighted-threshold)."
        ),
    ] = _D.reduction,
    loss_scale: Annotated[float, typer.Option(help="Multiplier of the artifact loss.")] = (
        _D.loss_scale
    ),
    weighted_threshold: Annotated[
        float, typer.Option(help="Pixel threshold of the weighted reduction.")
    ] = _D.weighted_threshold,
    gradient_checkpointing: Annotated[
        bool,
        typer.Option(
            help="Recompute sampling steps, denoiser blocks, VAE and detector in backward."
        ),
    ] = _D.gradient_checkpointing,
    reg_data: Annotated[
        str | None,
        typer.Option(
            help="Folder of real (image, prompt) pairs for the diffusion-loss regulariser."
        ),
    ] = None,
    reg_weight: Annotated[
        float, typer.Option(help="Weight of the regulariser (Eq. 4; released code 0.25).")
    ] = _D.reg_weight,
    reg_every: Annotated[int, typer.Option(min=1, help="Regularise every N optimizer steps.")] = (
        _D.reg_every
    ),
    reg_batch_size: Annotated[
        int | None, typer.Option(min=1, help="Real images per micro-batch (default --batch-size).")
    ] = None,
    eval_every: Annotated[int, typer.Option(min=1, help="Evaluate every N steps.")] = (
        _D.eval_every
    ),
    eval_seeds: Annotated[
        str, typer.Option(help="Eval image seeds: a list 0,1, a count N (0..N-1) or a range A-B.")
    ] = ",".join(map(str, _D.eval_seeds)),
    eval_batch_size: Annotated[int, typer.Option(min=1, help="Images per eval batch.")] = (
        _D.eval_batch_size
    ),
    patience: Annotated[
        int | None, typer.Option(min=1, help="Stop after P evals without a better mean.")
    ] = None,
    max_drift: Annotated[
        float | None,
        typer.Option(
            help="Stop when eval images drift more than this from the untreated model's at the "
            "same seeds: mean |difference| of pixels in [0, 1] (collapse guard, e.g. 0.1)."
        ),
    ] = None,
    save_every: opt.SaveEvery = _D.save_every,
    keep_checkpoints: Annotated[
        int | None, typer.Option(min=1, help="Keep only the newest N step-N checkpoints.")
    ] = None,
    log_every: opt.LogEvery = _D.log_every,
    stop_at: Annotated[
        int | None,
        typer.Option(min=1, help="Stop (with a checkpoint) at this step; --resume later."),
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its checkpoint.")] = (
        False
    ),
) -> None:
    """Treat a diffusion model: tune a LoRA so the artifact detector finds fewer artifacts.

    DiffDoctor's pixel-aware treating (Sec. 3.3): generate, detect, back-propagate the
    artifact confidence through the last K denoising steps; optionally regularise with the
    diffusion loss on real images. Writes to --out: pytorch_lora_weights.safetensors (final),
    best/ (best eval mean confidence), checkpoints/, eval/ grids, metrics.jsonl, curves.png,
    config.toml and README.md. Several GPUs: `accelerate launch -m dd treat ...`.
    """
    from dd.engines.treat import parse_seeds
    from dd.engines.treat import treat as run

    values = {
        "backbone": backbone,
        "model": model,
        "backbone_options": opt.parse_options(backbone_option),
        "detector": detector,
        "detector_weights": detector_weights,
        "detector_options": opt.parse_options(detector_option),
        "prompts": prompts,
        "eval_prompts": eval_prompts,
        "out": out,
        "resolution": resolution,
        "steps": steps,
        "guidance": guidance,
        "dtype": dtype,
        "device": device,
        "seed": seed,
        "train_steps": train_steps,
        "batch_size": batch_size,
        "grad_accum": grad_accum,
        "lr": lr,
        "weight_decay": weight_decay,
        "lr_schedule": lr_schedule,
        "warmup_steps": warmup_steps,
        "clip_grad": clip_grad,
        "lora_rank": lora_rank,
        "lora_alpha": lora_alpha,
        "lora_targets": opt.split_list(lora_targets),
        "init_lora": init_lora,
        "grad_steps": grad_steps,
        "grad_steps_random": grad_steps_random,
        "reduction": reduction,
        "loss_scale": loss_scale,
        "weighted_threshold": weighted_threshold,
        "gradient_checkpointing": gradient_checkpointing,
        "reg_data": reg_data,
        "reg_weight": reg_weight,
        "reg_every": reg_every,
        "reg_batch_size": reg_batch_size,
        "eval_every": eval_every,
        "eval_seeds": parse_seeds(eval_seeds),
        "eval_batch_size": eval_batch_size,
        "patience": patience,
        "max_drift": max_drift,
        "save_every": save_every,
        "keep_checkpoints": keep_checkpoints,
        "log_every": log_every,
        "stop_at": stop_at,
        "resume": resume,
    }
    # the click parameter names of options whose config field is spelled differently
    renamed = {"backbone_options": "backbone_option", "detector_options": "detector_option"}
    cfg, source = opt.config_from_flags(ctx, TreatConfig, values, config, renamed)

    err = Console(stderr=True)
    if source is not None:
        err.print(f"preset {source}", highlight=False)
    result = run(cfg, console=err)
    if not result.main:
        return
    console = Console()
    base, best, last = result.base, result.best, result.last_eval

    def fmt(r: dict | None) -> str:
        if not r:
            return "-"
        return f"step {r['step']}: mean {r['mean']:.5f}, max {r['max']:.5f}, drift {r['drift']:.4f}"

    console.print(f"untreated  {fmt(base)}", highlight=False)
    console.print(f"best       {fmt(best)}  -> {result.best_lora.parent}", highlight=False)
    console.print(f"final      {fmt(last)}  -> {result.lora}", highlight=False)
    console.print(f"stopped: {result.stop_reason}", highlight=False)
