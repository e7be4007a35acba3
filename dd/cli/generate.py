"""``dd generate``: images from a (treated) model, optionally scored by a detector."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from dd.cli.options import BackboneOption, BatchSize, Device, Dtype, Guidance, Model

GRID_CELL = 256
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
    prompts: Annotated[
        Path | None, typer.Option(help="Prompts: .txt (one per line), .jsonl or .json.")
    ] = None,
    seeds: Annotated[
        str, typer.Option(help="Seeds per prompt: a list 0,1,2, a count N (0..N-1) or a range 5-7.")
    ] = "1",
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
    overwrite: Annotated[
        bool, typer.Option(help="Write into a non-empty --out, replacing files of the same name.")
    ] = False,
) -> None:
    """Generate images for prompts x seeds (to look at a base or treated model).

    Writes PPPP-seedS.png per prompt index and seed, grid.png (a row per prompt, a column
    per seed) and report.jsonl (prompt, seed, file; with --detect the artifact scores mean,
    max, weighted, artifact_ratio) to --out.

    Each image uses a CPU generator seeded with its seed. It equals diffusers' pipeline
    output at that seed, steps and guidance when the pipeline samples the same way: SD3 as
    it is (max_sequence_length 256 in both); FLUX with dd's max_sequence_length (256 for
    models without guidance embedding such as schnell, 512 with it; FluxPipeline's default
    is 512); SD1.5 and SDXL with DDIMScheduler.from_config(pipe.scheduler.config,
    clip_sample=False), as dd samples DDIM (their pipelines default to other schedulers).
    """
    import numpy as np
    import torch
    from PIL import Image

    from dd.cli.options import parse_options
    from dd.engines.treat import (
        TreatConfig,
        generate_batches,
        image_grid,
        parse_seeds,
        read_prompts,
        to_uint8,
    )
    from dd.errors import DDError
    from dd.plugins import load_backbone, load_detector
    from dd.runtime.config import load_preset, passed_flags
    from dd.runtime.device import resolve_device, resolve_dtype
    from dd.runtime.io import atomic_write_text, mark_run_folder, output_dir, save_image_atomic
    from dd.runtime.progress import progress_bar
    from dd.scores import map_scores

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
    for key in ("backbone", "model"):
        if not settings[key]:
            raise DDError(f"--{key} is required", hint=f"pass --{key} or a --config that sets it")
    if out.exists() and not out.is_dir():
        output_dir(out)  # the one-line "is a file" error
    if not overwrite and out.is_dir() and any(not p.name.startswith(".") for p in out.iterdir()):
        raise DDError(
            f"--out {out} is not empty",
            hint="choose a new folder, or pass --overwrite to replace same-named images",
        )
    if prompts is None:
        raise DDError("--prompts is required", hint="a .txt file with one prompt per line")
    prompt_list = read_prompts(prompts)
    seed_list = parse_seeds(seeds)

    err = Console(stderr=True)
    if config is not None:
        err.print(f"preset {source}", highlight=False)
    dev, dt = resolve_device(device), resolve_dtype(settings["dtype"])
    bb = load_backbone(
        settings["backbone"],
        settings["model"],
        device=dev,
        dtype=dt,
        options=settings["backbone_options"],
    )
    if lora:
        bb.load_lora(lora, trainable=False)
    det = None
    if detect:
        det = load_detector(
            settings["detector"],
            settings["detector_weights"],
            settings["detector_options"],
            str(dev),
            settings["dtype"],
        )
        if det.untrained:
            err.print(
                f"[bold yellow]Warning: the {settings['detector']!r} detector is UNTRAINED "
                "(random weights): its scores mean nothing.[/bold yellow] Pass --weights.",
                highlight=False,
            )
    size = settings["resolution"] or int(bb.default_resolution)
    bb.check_size(size, size)
    n_steps = settings["steps"] or int(bb.default_steps)
    pairs = [(pi, s) for pi in range(len(prompt_list)) for s in seed_list]
    mark_run_folder(out, "generate")
    records: list[dict[str, Any]] = []
    cells: dict[tuple[int, int], tuple[Any, str]] = {}
    with progress_bar("generate", console=err) as progress:
        task = progress.add_task("generate", total=len(pairs))
        for start, images in generate_batches(
            bb,
            [prompt_list[pi] for pi, _ in pairs],
            [s for _, s in pairs],
            height=size,
            width=size,
            steps=n_steps,
            guidance=settings["guidance"],
            batch_size=batch_size,
        ):
            probs = None
            if det is not None:
                with torch.no_grad():
                    probs = det(images).float().cpu().numpy()
            u8 = to_uint8(images)
            for j in range(images.shape[0]):
                pi, s = pairs[start + j]
                name = f"{pi:04d}-seed{s}.png"
                save_image_atomic(Image.fromarray(u8[j]), out / name)
                rec: dict[str, Any] = {"prompt_index": pi, "prompt": prompt_list[pi], "seed": s}
                rec["image"] = name
                caption = f"seed {s}"
                if probs is not None:
                    sc = map_scores(probs[j, 0])
                    rec.update({k: sc[k] for k in ("mean", "max", "weighted", "artifact_ratio")})
                    caption = f"s{s} mean {sc['mean']:.3f} max {sc['max']:.3f}"
                records.append(rec)
                thumb = Image.fromarray(u8[j])
                thumb.thumbnail((GRID_CELL, GRID_CELL))  # the grid needs no more
                cells[(pi, s)] = (np.asarray(thumb), caption)
            progress.update(task, completed=start + images.shape[0])

    rows = [[cells[(pi, s)] for s in seed_list] for pi in range(len(prompt_list))]
    titles = [f"{pi}: {p}" for pi, p in enumerate(prompt_list)]
    save_image_atomic(image_grid(rows, row_titles=titles, cell=GRID_CELL), out / "grid.png")
    atomic_write_text(
        out / "report.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
    )
    msg = f"{len(records)} images ({n_steps} steps, {size}px"
    msg += f", LoRA {lora})" if lora else ")"
    if det is not None:
        mean = sum(r["mean"] for r in records) / len(records)
        mx = sum(r["max"] for r in records) / len(records)
        msg += f"; artifact confidence mean {mean:.4f}, max {mx:.4f}"
    Console().print(f"{msg}. Output: {out}", highlight=False)
