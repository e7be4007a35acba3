"""The engine behind ``dd generate``: images for prompts x seeds from a (treated) model,
optionally guided, best-of-N or scored by a detector; resumable (``OUT/.dd`` journal)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dd.runtime.progress import Reporter, as_reporter

__all__ = ["GenerateConfig", "GenerateResult", "candidate_seeds", "generate"]

GRID_CELL = 256
SETTINGS = ".dd/generate.json"
JOURNAL = ".dd/generate-journal.jsonl"
SCORE_KEYS = ("mean", "max", "weighted", "artifact_ratio")


@dataclass
class GenerateConfig:
    """What ``dd generate`` takes. ``settings``: backbone, model, backbone_options,
    resolution, steps, guidance, dtype, detector, detector_weights, detector_options (after
    a preset was applied)."""

    settings: dict[str, Any]
    prompts: Path | None
    out: Path
    seeds: str = "1"
    lora: str | None = None
    detect: bool = False
    best_of: int = 1
    guide: bool = False
    guide_scale: float = 12.0
    guide_steps: str | None = None
    guide_loss: str = "mean"
    guide_every: int = 1
    batch_size: int = 1
    device: str = "auto"
    resume: bool = False
    overwrite: bool = False
    #: ``--attention`` (:meth:`dd.api.backbones.Backbone.set_attention`).
    attention: str = "auto"


@dataclass
class GenerateResult:
    out: Path
    records: list[dict[str, Any]] = field(default_factory=list)
    steps: int = 0
    size: int = 0
    lora: str | None = None
    scored: bool = False


def generate(cfg: GenerateConfig, *, reporter: Reporter | None = None) -> GenerateResult:
    """Generate (or resume generating) ``cfg``'s images; see the module docstring."""
    from PIL import Image

    from dd.api.plugins import load_backbone, load_detector_warned
    from dd.data.prompts import parse_seeds, read_prompts
    from dd.errors import UsageError
    from dd.report.grid import image_grid
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

    settings = dict(cfg.settings)
    prompts, seeds, lora, out = cfg.prompts, cfg.seeds, cfg.lora, Path(cfg.out)
    detect, best_of, batch_size, device = cfg.detect, cfg.best_of, cfg.batch_size, cfg.device
    guide, guide_scale, guide_steps = cfg.guide, cfg.guide_scale, cfg.guide_steps
    guide_loss, guide_every = cfg.guide_loss, cfg.guide_every
    resume, overwrite = cfg.resume, cfg.overwrite
    rep = as_reporter(reporter)
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
        from dd.api.backbones import check_lora_source

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
        from dd.inference.guidance import Guide, parse_guide_steps

        # checked now (usage errors), the detector is filled in once loaded
        guide_plan = Guide(None, guide_scale, parse_guide_steps(guide_steps), guide_loss,
                           guide_every)  # fmt: skip
    if not (detect or guide or best_of > 1):
        for k in ("detector", "detector_weights", "detector_options"):
            record.pop(k)
    if cfg.attention != "auto":  # (runs made before --attention record none)
        from dd.ops.attention import backend_for

        backend_for(cfg.attention)
        record["attention"] = cfg.attention
    _claim(out, record, resume=resume, overwrite=overwrite)

    dev, dt = resolve_device(device), resolve_dtype(settings["dtype"])
    with undo_if_nothing_written(out):
        bb = load_backbone(
            settings["backbone"],
            settings["model"],
            device=dev,
            dtype=dt,
            options=settings["backbone_options"],
            attention=cfg.attention,
        )
        if lora:
            bb.load_lora(lora, trainable=False)
        det = None
        if detect or guide or best_of > 1:
            det = load_detector_warned(
                settings["detector"],
                settings["detector_weights"],
                settings["detector_options"],
                str(dev),
                settings["dtype"],
                rep,
                meaning="its scores",
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
            rep.message(f"resuming: {len(pairs) - len(todo)} image(s) already written")
        cells: dict[tuple[int, int], tuple[Any, str]] = {}
        for key, rec in written.items():
            with Image.open(out / rec["image"]) as im:
                cells[key] = (_thumb(im.convert("RGB")), _caption(rec))
        try:
            with rep.progress("generate") as progress:
                task = progress.add_task("generate", total=len(pairs), completed=len(written))
                chosen_images = best_of_images(
                    bb,
                    det,
                    [prompt_list[pi] for pi, _ in todo],
                    [s for _, s in todo],
                    best_of,
                    height=size,
                    width=size,
                    steps=n_steps,
                    guidance=settings["guidance"],
                    batch_size=batch_size,
                    guide=guide_plan,
                )
                for i, chosen_seed, image, scores, candidates in chosen_images:
                    pi, s = todo[i]
                    name = f"{pi:04d}-seed{s}.png"
                    save_image_atomic(Image.fromarray(image), out / name)
                    rec = {"prompt_index": pi, "prompt": prompt_list[pi], "seed": s}
                    rec["image"] = name
                    rec.update({k: v for k, v in scores.items() if k != "seed"})
                    if best_of > 1:
                        rec["chosen_seed"] = chosen_seed
                        rec["candidates"] = candidates
                    journal.append(rec)
                    written[(pi, s)] = rec
                    cells[(pi, s)] = (_thumb(Image.fromarray(image)), _caption(rec))
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
    return GenerateResult(out, records, n_steps, size, lora, det is not None)


def best_of_images(
    bb: Any,
    det: Any,
    prompts: list[str],
    seeds: list[int],
    n: int,
    *,
    height: int,
    width: int,
    steps: int,
    guidance: float | None,
    batch_size: int,
    guide: Any = None,
) -> Iterator[tuple[int, int, Any, dict[str, Any], list[dict[str, Any]]]]:
    """Images for ``prompts[i]`` at ``seeds[i]`` through the one batched sampling path, each
    the best of ``n`` candidates (:func:`candidate_seeds`; the lowest mean confidence of
    ``det``, the first on ties; ``n = 1`` is plain sampling). Yields, in order,
    ``(i, chosen seed, uint8 image H x W x 3, its scores, every candidate's scores)``; scores
    are the detector's (:data:`SCORE_KEYS`) when ``det`` is given, else just the seed."""
    import torch

    from dd.inference import generate_batches
    from dd.inference.scores import map_scores
    from dd.report.grid import to_uint8

    # N candidates per (prompt, seed), consecutive in this list
    cands = [(i, c) for i, s in enumerate(seeds) for c in candidate_seeds(s, n)]
    pending: list[tuple[int, dict[str, Any], Any]] = []
    for start, images in generate_batches(
        bb,
        [prompts[i] for i, _ in cands],
        [c for _, c in cands],
        height=height,
        width=width,
        steps=steps,
        guidance=guidance,
        batch_size=batch_size,
        guide=guide,
    ):
        probs = None
        if det is not None:
            with torch.no_grad():
                probs = det(images).float().cpu().numpy()
        u8 = to_uint8(images)
        for j in range(images.shape[0]):
            i, c = cands[start + j]
            sc: dict[str, Any] = {"seed": c}
            if probs is not None:
                full = map_scores(probs[j, 0])
                sc.update({k: full[k] for k in SCORE_KEYS})
            pending.append((c, sc, u8[j]))
            if len(pending) < n:
                continue
            chosen = min(pending, key=lambda t: t[1].get("mean", 0.0))
            yield i, chosen[0], chosen[2], chosen[1], [t[1] for t in pending]
            pending = []


def candidate_seeds(seed: int, n: int) -> list[int]:
    """The seeds of ``--best-of n`` candidates for ``seed``: the seed itself first (so
    ``--best-of 1`` is plain generation), then seeds derived from it, above 2**32 so that they
    never repeat another image's seed."""
    return [seed] + [(2**32 + seed * 1_000_003 + k) % 2**63 for k in range(1, n)]


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
