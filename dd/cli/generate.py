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
    guide: Annotated[
        bool,
        typer.Option(
            "--guide",
            help="Steer sampling away from artifacts with the detector (no training; see "
            "docs/guide.md): slower sampling, the same model.",
        ),
    ] = False,
    guide_scale: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="Guidance step size at the first step, falling to 1/12 of it by the last "
            "(DIAMOND's schedule; 0: unguided, bit for bit).",
        ),
    ] = 12.0,
    guide_steps: Annotated[
        str | None,
        typer.Option(help="Guided sampling steps A-B (0-based, inclusive; default: all)."),
    ] = None,
    guide_loss: Annotated[
        str, typer.Option(help="Per-image confidence to lower: mean, max or weighted.")
    ] = "mean",
    guide_every: Annotated[int, typer.Option(min=1, help="Guide every Nth step.")] = 1,
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
    import torch
    from PIL import Image

    from dd.cli.options import parse_options
    from dd.data.prompts import parse_seeds, read_prompts
    from dd.engines.treat import TreatConfig
    from dd.errors import UsageError
    from dd.inference import generate_batches
    from dd.plugins import load_backbone, load_detector
    from dd.report.grid import image_grid, to_uint8
    from dd.runtime.config import load_preset, passed_flags
    from dd.runtime.device import resolve_device, resolve_dtype
    from dd.runtime.io import (
        Journal,
        absolute_path,
        atomic_write_json,
        atomic_write_text,
        check_output_folder,
        mark_run_folder,
        save_image_atomic,
        undo_if_nothing_written,
    )
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
            raise UsageError(
                f"--{key} is required", hint=f"pass --{key} or a --config that sets it"
            )
    if prompts is None:
        raise UsageError("--prompts is required", hint="a .txt file with one prompt per line")
    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other", hint="pick one")
    check_output_folder(out, "generate", overwrite=overwrite)
    if lora:
        from dd.backbones import check_lora_source

        check_lora_source(lora, "--lora")
    prompt_list = read_prompts(prompts)
    seed_list = parse_seeds(seeds)
    record = {
        **{k: absolute_path(v) for k, v in settings.items()},
        "lora": absolute_path(lora),
        "prompts": prompt_list,
        "seeds": seed_list,
        "detect": detect,
        "best_of": best_of,
        "guide": (
            {"scale": guide_scale, "steps": guide_steps, "loss": guide_loss, "every": guide_every}
            if guide
            else None
        ),
    }
    guide_plan = None
    if guide:
        from dd.guidance import Guide, parse_guide_steps

        # checked now (usage errors), the detector is filled in once loaded
        guide_plan = Guide(None, guide_scale, parse_guide_steps(guide_steps), guide_loss,
                           guide_every)  # fmt: skip
    if not (detect or guide or best_of > 1):
        for k in ("detector", "detector_weights", "detector_options"):
            record.pop(k)
    _claim(out, record, resume=resume, overwrite=overwrite)

    err = Console(stderr=True)
    if config is not None:
        err.print(f"preset {source}", highlight=False)
    dev, dt = resolve_device(device), resolve_dtype(settings["dtype"])
    with undo_if_nothing_written(out):
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
        if detect or guide or best_of > 1:
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
            det.eval()
            det.requires_grad_(False)
            if guide_plan is not None:
                guide_plan.detector = det
        size = settings["resolution"] or int(bb.default_resolution)
        bb.check_size(size, size)
        n_steps = settings["steps"] or int(bb.default_steps)
        pairs = [(pi, s) for pi in range(len(prompt_list)) for s in seed_list]
        mark_run_folder(out, "generate", not_inputs=("grid.png",))
        atomic_write_json(out / SETTINGS, record)
        journal = Journal(out / JOURNAL, fresh=overwrite)
        written = {(r["prompt_index"], r["seed"]): r for r in journal.records}
        todo = [pair for pair in pairs if pair not in written]
        if written:
            err.print(
                f"resuming: {len(pairs) - len(todo)} image(s) already written", highlight=False
            )
        cells: dict[tuple[int, int], tuple[Any, str]] = {}
        for key, rec in written.items():
            with Image.open(out / rec["image"]) as im:
                cells[key] = (_thumb(im.convert("RGB")), _caption(rec))
        try:
            with progress_bar("generate", console=err) as progress:
                task = progress.add_task("generate", total=len(pairs), completed=len(written))
                # best-of-N: N candidates per (prompt, seed), consecutive in this list
                cands = [(pi, s, c) for pi, s in todo for c in candidate_seeds(s, best_of)]
                pending: list[tuple[int, dict[str, Any], Any]] = []
                for start, images in generate_batches(
                    bb,
                    [prompt_list[pi] for pi, _, _ in cands],
                    [c for _, _, c in cands],
                    height=size,
                    width=size,
                    steps=n_steps,
                    guidance=settings["guidance"],
                    batch_size=batch_size,
                    guide=guide_plan,
                ):
                    probs = None
                    if det is not None:
                        with torch.no_grad():
                            probs = det(images).float().cpu().numpy()
                    u8 = to_uint8(images)
                    for j in range(images.shape[0]):
                        pi, s, c = cands[start + j]
                        sc: dict[str, Any] = {"seed": c}
                        if probs is not None:
                            full = map_scores(probs[j, 0])
                            sc.update({k: full[k] for k in SCORE_KEYS})
                        pending.append((c, sc, u8[j]))
                        if len(pending) < best_of:
                            continue
                        # the candidate with the lowest mean confidence (the first on ties)
                        chosen = min(pending, key=lambda t: t[1].get("mean", 0.0))
                        name = f"{pi:04d}-seed{s}.png"
                        save_image_atomic(Image.fromarray(chosen[2]), out / name)
                        rec = {"prompt_index": pi, "prompt": prompt_list[pi], "seed": s}
                        rec["image"] = name
                        rec.update({k: v for k, v in chosen[1].items() if k != "seed"})
                        if best_of > 1:
                            rec["chosen_seed"] = chosen[0]
                            rec["candidates"] = [t[1] for t in pending]
                        journal.append(rec)
                        written[(pi, s)] = rec
                        cells[(pi, s)] = (_thumb(Image.fromarray(chosen[2])), _caption(rec))
                        pending = []
                    progress.update(task, completed=len(written))
        finally:
            journal.close()
    records = [written[pair] for pair in pairs]

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


SETTINGS = ".dd/generate.json"
SCORE_KEYS = ("mean", "max", "weighted", "artifact_ratio")


def candidate_seeds(seed: int, n: int) -> list[int]:
    """The seeds of ``--best-of n`` candidates for ``seed``: the seed itself first (so
    ``--best-of 1`` is plain generation), then seeds derived from it, above 2**32 so that they
    never repeat another image's seed."""
    return [seed] + [(2**32 + seed * 1_000_003 + k) % 2**63 for k in range(1, n)]


JOURNAL = ".dd/generate-journal.jsonl"


def _thumb(image: Any) -> Any:
    import numpy as np

    thumb = image.copy()
    thumb.thumbnail((GRID_CELL, GRID_CELL))  # the grid needs no more
    return np.asarray(thumb)


def _caption(rec: dict[str, Any]) -> str:
    if "mean" in rec:
        return f"s{rec['seed']} mean {rec['mean']:.3f} max {rec['max']:.3f}"
    return f"seed {rec['seed']}"


def _claim(out: Path, record: dict[str, Any], *, resume: bool, overwrite: bool) -> None:
    """Checks a ``dd generate`` run already in ``out`` before any model loads: it is
    continued with ``--resume`` (same settings), replaced with ``--overwrite``, else refused.
    (Not ``check_same_settings``: a changed prompt list is named, not printed.)"""
    from dd.errors import DDError
    from dd.runtime.io import run_command

    path = out / SETTINGS
    if not overwrite and not path.is_file() and run_command(out) == "generate":
        raise DDError(
            f"{out} holds a dd generate run of an earlier dd version",
            hint="pass --overwrite to replace it, or pick a new --out",
        )
    if not path.is_file() or overwrite:
        if resume:
            raise DDError(f"--resume: {out} holds no dd generate run", hint="drop --resume")
        return
    if not resume:
        raise DDError(
            f"{out} already holds a dd generate run",
            hint="pass --resume to continue it, --overwrite to replace it, or pick a new --out",
        )
    try:
        before = json.loads(path.read_text())
    except ValueError:
        raise DDError(f"{path} is damaged; cannot resume", hint="pass --overwrite") from None
    diff = sorted(k for k in set(before) | set(record) if before.get(k) != record.get(k))
    if diff:
        raise DDError(
            f"--resume with other settings than the run in {out}: {', '.join(diff)} differ",
            hint="resume with the original options, or pass --overwrite",
        )
