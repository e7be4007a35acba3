"""``dd generate``: images from a (treated) model, optionally scored by a detector."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from dd.cli.options import (
    BackboneOption,
    BatchSize,
    Device,
    Dtype,
    Guidance,
    GuideEvery,
    GuideLoss,
    GuideScale,
    GuideSteps,
    Model,
    PromptsFile,
    Seeds,
)
from dd.engines.generate import candidate_seeds  # noqa: F401 - importable from here too
from dd.ops.attention import ATTENTION_HELP

#: Preset keys ``dd generate`` uses (a preset's training keys are ignored here).
PRESET_KEYS = (
    "backbone",
    "model",
    "backbone_options",
    "resolution",
    "steps",
    "guidance",
    "dtype",
    "detector",
    "detector_weights",
    "detector_options",
)


def generate(
    ctx: typer.Context,
    backbone: Annotated[
        str | None, typer.Option(help="Backbone plugin: flux, sd15, sd3, sdxl (see `dd plugins`).")
    ] = None,
    model: Model = None,
    config: Annotated[
        str | None,
        typer.Option(
            "--config", "-c", help="Preset name or TOML file (its sampling settings are used)."
        ),
    ] = None,
    backbone_option: BackboneOption = None,
    lora: Annotated[
        str | None,
        typer.Option(help="A diffusers-format LoRA: folder or .safetensors (e.g. RUN/best)."),
    ] = None,
    prompts: PromptsFile = None,
    seeds: Seeds = "1",
    steps: Annotated[
        int | None, typer.Option(min=1, help="Sampling steps; default: the backbone's.")
    ] = None,
    guidance: Guidance = None,
    resolution: Annotated[
        int | None, typer.Option(min=8, help="Image size (square); default: the backbone's.")
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("dd-generate"),
    batch_size: BatchSize = 1,
    dtype: Dtype = "fp32",
    device: Device = "auto",
    guide: Annotated[
        bool,
        typer.Option(
            "--guide",
            help="Steer sampling away from artifacts with the detector (no training; see "
            "docs/guide.md): slower sampling, the same model.",
        ),
    ] = False,
    guide_scale: GuideScale = 12.0,
    guide_steps: GuideSteps = None,
    guide_loss: GuideLoss = "mean",
    guide_every: GuideEvery = 1,
    best_of: Annotated[
        int,
        typer.Option(
            min=1,
            help="Generate N candidates per prompt and seed and keep the one the detector "
            "scores lowest (mean confidence); every candidate's scores go to the report.",
        ),
    ] = 1,
    detect: Annotated[
        bool, typer.Option("--detect", help="Score every image with the artifact detector.")
    ] = False,
    detector: Annotated[str, typer.Option(help="Detector plugin (with --detect).")] = "segformer",
    detector_weights: Annotated[
        str | None,
        typer.Option("--weights", "--detector-weights", help="Detector weights (with --detect)."),
    ] = None,
    detector_option: Annotated[
        list[str] | None,
        typer.Option(
            "--option", "--detector-option", "-O", help="Detector option KEY=VALUE (with --detect)."
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(help="Continue the run in --out: skip the images it already wrote."),
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option(help="Replace the run in --out (or write into a non-empty folder)."),
    ] = False,
    attention: Annotated[str, typer.Option(help=ATTENTION_HELP)] = "auto",
) -> None:
    """Generate images for prompts x seeds (to look at a base or treated model).

    Writes PPPP-seedS.png per prompt index and seed, grid.png (a row per prompt, a column
    per seed) and report.jsonl (prompt, seed, file; with --detect the artifact scores mean,
    max, weighted, artifact_ratio) to --out. --guide steers sampling with the detector and
    --best-of N keeps the lowest-scoring of N candidates (docs/guide.md); --resume continues
    an interrupted run.

    Without --guide, each image uses a CPU generator seeded with its seed. It equals
    diffusers' pipeline output at that seed, steps and guidance when the pipeline samples
    the same way: SD3 as it is (max_sequence_length 256 in both); FLUX with dd's
    max_sequence_length (256 for models without guidance embedding such as schnell, 512 with
    it; FluxPipeline's default is 512); SD1.5 and SDXL with
    DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False), as dd samples DDIM
    (their pipelines default to other schedulers).
    """

    from dd.cli.options import parse_options
    from dd.engines.treat import TreatConfig
    from dd.runtime.config import load_preset, passed_flags

    values: dict[str, Any] = {
        "backbone": backbone,
        "model": model,
        "backbone_option": parse_options(backbone_option),
        "resolution": resolution,
        "steps": steps,
        "guidance": guidance,
        "dtype": dtype,
        "detector": detector,
        "detector_weights": detector_weights,
        "detector_option": parse_options(detector_option),
    }
    settings = {k.replace("_option", "_options"): v for k, v in values.items()}
    if config is not None:
        preset, source = load_preset(config, TreatConfig)
        given = {k.replace("_option", "_options") for k in passed_flags(ctx, values)}
        settings.update({k: preset[k] for k in PRESET_KEYS if k in preset and k not in given})
    from dd.engines.generate import GenerateConfig
    from dd.engines.generate import generate as run
    from dd.runtime.progress import ConsoleReporter

    err = Console(stderr=True)
    if config is not None:
        err.print(f"preset {source}", highlight=False)
    cfg = GenerateConfig(
        settings=settings, prompts=Path(prompts) if prompts else None, out=out, seeds=seeds,
        lora=lora, detect=detect,
        best_of=best_of, guide=guide, guide_scale=guide_scale, guide_steps=guide_steps,
        guide_loss=guide_loss, guide_every=guide_every, batch_size=batch_size, device=device,
        resume=resume, overwrite=overwrite, attention=attention,
    )  # fmt: skip
    result = run(cfg, reporter=ConsoleReporter(err))
    records = result.records
    msg = f"{len(records)} images ({result.steps} steps, {result.size}px"
    msg += f", LoRA {result.lora})" if result.lora else ")"
    if result.scored:
        mean = sum(r["mean"] for r in records) / len(records)
        mx = sum(r["max"] for r in records) / len(records)
        msg += f"; artifact confidence mean {mean:.4f}, max {mx:.4f}"
    Console().print(f"{msg}. Output: {result.out}", highlight=False)
