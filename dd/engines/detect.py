"""The detect engine: folders of images -> artifact maps, overlays, scores and reports.

Images are decoded and resized to the detector's working size in loader threads while the
model runs on full batches. Every output file is written atomically; each finished image is
recorded in a journal (``.dd/detect-journal.jsonl``) so ``resume=True`` skips it. The final
reports are rebuilt from the journal, so they are complete and free of duplicates.

Outputs per image, by default what a user scoring many images needs (the scores are always
computed on the map at the image's full size): ``maps/KEY.png``, the 8-bit map at the
detector's working resolution (its longer side, aspect kept), and ``overlays/KEY.jpg``, a
heat-map thumbnail (longer side :data:`THUMB_SIDE`) for the contact sheet. With
``full_size_outputs`` both are PNGs at the image's size (a full-size PNG encode costs more
than the model's forward pass at 1024²: docs/performance.md, "Detect throughput").
"""

from __future__ import annotations

import collections
import contextlib
import csv
import io
import json
import os
import shutil
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

import dd.training.settings as shared
from dd.api.detectors import Detector
from dd.data.images import DEFAULT_MAX_PIXELS, ImageLoadError, InputItem, load_image
from dd.errors import DDError, UsageError
from dd.inference import detect_batches, resize_for
from dd.inference.scores import map_scores
from dd.report.viz import overlay, to_uint8_map
from dd.runtime.config import setting
from dd.runtime.io import (
    Journal,
    atomic_write_json,
    atomic_write_text,
    check_output_folder,
    mark_run_folder,
    output_dir,
    save_image_atomic,
)

JOURNAL = ".dd/detect-journal.jsonl"
RUN_INFO = ".dd/detect-run.json"
CSV_FIELDS = [
    "key",
    "image",
    "mean",
    "max",
    "weighted",
    "artifact_ratio",
    "peak_x",
    "peak_y",
    "bbox",
    "width",
    "height",
    "map",
    "overlay",
]


@dataclass
class DetectConfig:
    """Everything ``dd detect`` takes: each field declared once (default, help, flag), the
    source of the command's options. The detector fields say which one ``detect_job``
    loads; ``run_detect`` takes a loaded detector."""

    out: Path = shared.run_folder(Path("dd-detect"), "Output folder.")
    detector: str = shared.detector()
    weights: str | None = setting(
        None, help="Detector weights: a .bin/.safetensors file, a folder or a hub id."
    )
    detector_options: dict[str, Any] = shared.detector_options()
    batch_size: int = shared.batch_size(8)
    workers: int = shared.workers(4)
    device: str = shared.inference_device()
    dtype: str = shared.inference_dtype()
    fail_above: str | None = setting(
        None,
        help="Exit 3 if any image's max confidence exceeds this (quality gate): a value in "
        "[0, 1], or 'auto' for the detector's calibrated image threshold (docs/models.md; 0.5 "
        "for weights without one).",
    )
    resume: bool = setting(False, help="Skip images already done in --out.")
    #: Replace an earlier run's results in ``out`` (without it, or ``resume``, refuse).
    overwrite: bool = setting(False, help="Replace the results of an earlier run in --out.")
    save_overlays: bool = setting(
        True,
        help="Write heat-map overlays (JPEG thumbnails for the contact sheet).",
        flags=("--overlays/--no-overlays",),
    )
    #: Maps and overlays as PNGs at each image's size (default: working-size maps, thumbnails).
    full_size_outputs: bool = setting(
        False,
        help="Maps and overlays as PNGs at each image's size (default: maps at the detector's "
        "working size, overlay thumbnails; several times faster).",
    )
    max_pixels: int = setting(
        DEFAULT_MAX_PIXELS, help="Refuse images with more pixels (decompression-bomb guard)."
    )
    save_maps: bool = True


#: The longer side of an overlay thumbnail (the contact sheet shows them at 240 px).
THUMB_SIDE = 256


@dataclass
class DetectResult:
    records: list[dict[str, Any]]
    failures: list[dict[str, str]]
    processed: int = 0
    resumed: int = 0
    summary: dict[str, Any] = field(default_factory=dict)
    #: The detector's image threshold (calibrated, else None): ``--fail-above auto``.
    flag_threshold: float | None = None


@dataclass
class Loaded:
    """An input image decoded for :func:`dd.inference.detect_batches`."""

    item: InputItem
    image: np.ndarray | None = None
    tensor: torch.Tensor | None = None
    error: str | None = None

    @property
    def size(self) -> tuple[int, int]:
        assert self.image is not None
        return int(self.image.shape[0]), int(self.image.shape[1])


def load_input(item: InputItem, detector: Detector, max_pixels: int) -> Loaded:
    """Decode ``item`` and resize it for ``detector``; a failure is recorded, not raised."""
    try:
        img = load_image(item.path, max_pixels=max_pixels)
    except ImageLoadError as e:
        return Loaded(item, error=e.message)
    except Exception as e:  # never let one image stop the run
        return Loaded(item, error=f"{item.path}: {type(e).__name__}: {e}")
    return Loaded(item, image=img, tensor=resize_for(detector, img))


def _fit(size: tuple[int, int], side: int) -> tuple[int, int]:
    """``(w, h)`` of an ``(h, w)`` image scaled so its longer side is at most ``side``."""
    h, w = size
    scale = min(1.0, side / max(h, w))
    return max(1, round(w * scale)), max(1, round(h * scale))


def _write_outputs(
    cfg: DetectConfig, loaded: Loaded, prob: np.ndarray, map_side: int
) -> dict[str, Any]:
    item = loaded.item
    rec: dict[str, Any] = {"key": item.key, "image": str(item.path)}
    rec.update(map_scores(prob))
    full = cfg.full_size_outputs
    u8 = to_uint8_map(prob)
    if cfg.save_maps:
        rel = f"maps/{item.key}.png"
        m = Image.fromarray(u8, mode="L")
        if not full and max(u8.shape) > map_side:
            m = m.resize(_fit(u8.shape, map_side), Image.BILINEAR, reducing_gap=2.0)
        save_image_atomic(m, cfg.out / rel, compress_level=1)
        rec["map"] = rel
    if cfg.save_overlays:
        if full:
            rel = f"overlays/{item.key}.png"
            save_image_atomic(
                Image.fromarray(overlay(loaded.image, prob)), cfg.out / rel, compress_level=1
            )
        else:
            rel = f"overlays/{item.key}.jpg"
            size = _fit(u8.shape, THUMB_SIDE)
            img = Image.fromarray(loaded.image).resize(size, Image.BILINEAR, reducing_gap=2.0)
            small = np.asarray(Image.fromarray(u8, mode="L").resize(size, Image.BILINEAR))
            thumb = overlay(np.asarray(img), small.astype(np.float32) / 255.0)
            save_image_atomic(Image.fromarray(thumb), cfg.out / rel, quality=85)
        rec["overlay"] = rel
    if item.meta:
        rec["meta"] = item.meta
    return rec


def check_out(cfg: DetectConfig) -> None:
    """Refuse an ``out`` that is a file, or that holds a detect run, unless ``resume`` or
    ``overwrite`` (callers check before loading anything). Creates nothing: a run that
    fails to load its detector leaves no folder behind."""
    if cfg.out.exists() and not cfg.out.is_dir():
        output_dir(cfg.out)  # the one-line "is a file" error
    check_output_folder(cfg.out, "detect", overwrite=cfg.overwrite)
    if (cfg.out / RUN_INFO).exists() and not (cfg.resume or cfg.overwrite):
        raise DDError(
            f"{cfg.out} already holds a detect run",
            hint="pass --resume to continue it, --overwrite to replace it, or a new --out",
        )


def detect_job(
    paths: list[str],
    cfg: DetectConfig,
    *,
    detector: Any = None,
    reporter: Any = None,
) -> DetectResult:
    """``dd detect``: collect the inputs of ``paths`` (files, folders, globs, manifests,
    shards; never ``cfg.out``), check the output folder before anything loads, load
    ``detector`` (default: the one ``cfg`` names; or a loaded detector), and run
    :func:`run_detect` with a progress bar; skipped inputs are reported through
    ``reporter``."""
    from dd.api.plugins import DetectorRef, as_detector
    from dd.data.images import collect_inputs
    from dd.errors import EXIT_SOME_INPUTS_FAILED
    from dd.runtime.progress import as_reporter

    rep = as_reporter(reporter)
    items, failures = collect_inputs(paths, exclude=[cfg.out])
    if not items:
        reasons = "; ".join(f"{p}: {r}" for p, r in failures) or ", ".join(paths)
        raise DDError(f"no images to process ({reasons})", exit_code=EXIT_SOME_INPUTS_FAILED)
    for p, r in failures:
        rep.message(f"[yellow]skipped[/yellow] {p}: {r}")
    check_out(cfg)  # before the detector loads
    det = as_detector(DetectorRef.of(cfg) if detector is None else detector, rep)
    with rep.progress("detect") as progress:
        task = progress.add_task("detect", total=len(items))
        result = run_detect(
            items,
            det,
            cfg,
            failures=failures,
            on_progress=lambda done, total: progress.update(task, completed=done, total=total),
        )
    for f in result.failures[len(failures) :]:
        rep.message(f"[yellow]skipped[/yellow] {f['reason']}")
    result.flag_threshold = det.flag_threshold
    return result


def run_detect(
    items: list[InputItem],
    detector: Detector,
    cfg: DetectConfig,
    *,
    failures: list[tuple[str, str]] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> DetectResult:
    """Detect artifacts in ``items``; ``failures`` are earlier ones (e.g. missing paths)."""
    if cfg.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {cfg.batch_size}")
    info_path = cfg.out / RUN_INFO
    check_out(cfg)
    output_dir(cfg.out)
    if info_path.exists() and cfg.overwrite and not cfg.resume:
        for sub in ("maps", "overlays"):  # the earlier run's pictures, not the user's
            shutil.rmtree(cfg.out / sub, ignore_errors=True)
    mark_run_folder(cfg.out, "detect", not_inputs=("maps", "overlays"))
    _remove_stale_temporaries(cfg.out)
    run_info = {"detector": detector.describe(), "full_size_outputs": cfg.full_size_outputs}
    if cfg.resume and info_path.exists():
        try:
            prev = json.loads(info_path.read_text())
        except ValueError:
            prev = None
        prev_full = bool(prev.get("full_size_outputs", True)) if prev is not None else None
        if prev is not None and prev_full != cfg.full_size_outputs:
            raise DDError(
                f"{cfg.out} holds a run with{'' if prev_full else 'out'} --full-size-outputs",
                hint="resume with the same outputs, or use a new --out folder",
            )
        if prev is not None and prev.get("detector") != run_info["detector"]:
            raise DDError(
                f"{cfg.out} holds results of another detector ({prev.get('detector')}), "
                f"not {run_info['detector']}",
                hint="use a new --out folder, or run without --resume to start over",
            )
    atomic_write_json(info_path, run_info)

    journal = Journal(cfg.out / JOURNAL, fresh=not cfg.resume)
    wanted = {it.key for it in items}
    done: dict[str, dict[str, Any]] = {}
    for rec in journal.records:
        key = rec.get("key")
        if key in wanted and all(
            (cfg.out / rec[k]).exists() for k in ("map", "overlay") if k in rec
        ):
            done[key] = rec
    todo = [it for it in items if it.key not in done]
    fails = [{"path": p, "reason": r} for p, r in (failures or [])]
    total, finished = len(items), len(done)
    if on_progress:
        on_progress(finished, total)

    processed = 0
    with (
        journal,
        ThreadPoolExecutor(max(1, cfg.workers), thread_name_prefix="dd-write") as writer,
    ):
        writes: collections.deque[Future[dict[str, Any]]] = collections.deque()

        def drain(block: bool) -> None:
            nonlocal finished, processed
            while writes and (block or writes[0].done()):
                rec = writes.popleft().result()
                journal.append(rec)
                finished += 1
                processed += 1
                if on_progress:
                    on_progress(finished, total)

        results = detect_batches(
            detector,
            todo,
            lambda it: load_input(it, detector, cfg.max_pixels),
            batch_size=cfg.batch_size,
            workers=cfg.workers,
        )
        for loaded, prob in results:
            if prob is None:
                fails.append({"path": str(loaded.item.path), "reason": loaded.error})
                finished += 1
                if on_progress:
                    on_progress(finished, total)
                continue
            side = max(detector.working_size(*loaded.size))
            writes.append(writer.submit(_write_outputs, cfg, loaded, prob.cpu().numpy(), side))
            drain(block=False)
        drain(block=True)

        for rec in journal.records:
            if rec.get("key") in wanted:
                done[rec["key"]] = rec

    order = {it.key: i for i, it in enumerate(items)}
    records = sorted(done.values(), key=lambda r: order[r["key"]])
    summary = summarize(records, fails, detector)
    write_reports(cfg.out, records, fails, summary)
    return DetectResult(records, fails, processed, len(items) - len(todo), summary)


def _remove_stale_temporaries(out: Path) -> None:
    """Delete temporary files a killed run left (``dd.runtime.io.atomic_open`` names them)."""
    for dirpath, _dirs, files in os.walk(out):
        for f in files:
            if f.startswith(".") and f.endswith(".tmp"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(dirpath, f))


def summarize(
    records: list[dict[str, Any]], failures: list[dict[str, str]], detector: Detector
) -> dict[str, Any]:
    maxes = [r["max"] for r in records]
    threshold = detector.flag_threshold
    return {
        **detector.describe(),
        "images": len(records),
        "failed": len(failures),
        "with_artifacts": sum(m >= threshold for m in maxes),
        "mean_max": float(np.mean(maxes)) if maxes else 0.0,
        "mean_mean": float(np.mean([r["mean"] for r in records])) if records else 0.0,
        "worst": max(records, key=lambda r: r["max"])["key"] if records else None,
    }


def write_reports(
    out: Path,
    records: list[dict[str, Any]],
    failures: list[dict[str, str]],
    summary: dict[str, Any],
) -> None:
    from dd.report.html import contact_sheet

    atomic_write_text(
        out / "report.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
    )
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in records:
        row = dict(r)
        row["peak_x"], row["peak_y"] = r["peak"]
        row["bbox"] = " ".join(map(str, r["bbox"])) if r.get("bbox") else ""
        for k in ("mean", "max", "weighted", "artifact_ratio"):
            row[k] = f"{r[k]:.6f}"
        w.writerow(row)
    atomic_write_text(out / "report.csv", buf.getvalue())
    atomic_write_text(
        out / "failed.jsonl", "".join(json.dumps(f, sort_keys=True) + "\n" for f in failures)
    )
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "index.html", contact_sheet(out, records, failures, summary))
