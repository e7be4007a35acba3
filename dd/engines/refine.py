"""The refine engine behind ``dd refine`` (seed 002: late-step SDEdit repair).

An artifact image is not a super-resolution problem: noise it part-way and let a diffusion
model redo only the late steps (SDEdit). Step semantics (T = the backbone's training
timesteps, 1000):

* ``--late-steps A-B`` counts reverse-process steps out of T from pure noise. The image is
  noised to ``t = T - A`` (``T - 1`` for A = 0: step 0 is t = 999) and denoised from there
  down to ``t = T - B`` by the model of that segment; the rest of the way to t = 0 goes to
  the next segment's model (by default the base ``--model``). Several segments chain, each
  with its own model (``--segment 500-750=A --segment 750-1000=B``); gaps are filled with
  the base model. ``500-750`` noises to t = 500 and denoises 500 -> 250, then 250 -> 0.
* ``--steps N`` is the density: the number of steps of a full run from pure noise, as for
  generation; a segment spanning ``L`` of the T timesteps gets ``round(N * L / T)`` steps (at
  least 1), spaced evenly between its boundaries, so every boundary timestep is exact.
* DDPM models (SD1.5, SDXL, LDM) step with deterministic DDIM between those timesteps
  (:meth:`dd.api.backbones.Backbone.step`). Flow-matching models (FLUX, SD3) place the steps
  evenly in the *unshifted* time ``u = t / T`` and go through the scheduler's shift (static,
  or FLUX's resolution-dependent ``mu``): step A of T is sigma ``shift(1 - A/T)``, exactly
  where a full sampling run would be after that share of its steps. The resolved timesteps
  (and sigmas) are printed.
* ``--strength S`` is diffusers' img2img meaning instead: of the backbone's own N-step
  schedule, the last ``int(N * S)`` steps run, starting at the timestep where they start.

With a mask (``--mask auto``: the detector's map thresholded, dilated and feathered;
``--mask FILE``) only the masked region is repainted: after each step, latents outside the
mask are replaced by the original's latents noised to the next step's level with the same
noise (RePaint-style), and the decoded result is composited in pixel space with the input so
that every pixel outside the mask is bit-identical to the input. ``--until-clean N`` repeats
up to N rounds until the detector's max confidence falls under a threshold.

Outputs (all written atomically; a journal makes ``--resume`` skip finished images)::

    OUT/images/KEY.png        refined images (input size)
    OUT/compare/KEY.png       before / after with both artifact maps (and the mask)
    OUT/masks/KEY.png         the mask used (masked runs)
    OUT/report.jsonl, report.csv, summary.json   confidence before and after per image
    OUT/plan.txt              the resolved timesteps of each segment
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import dd.training.settings as shared
from dd.api.backbones import FLOW, Backbone, Schedule, flow_schedule
from dd.errors import DDError, UsageError
from dd.inference.guidance import GUIDE_LOSSES, Guide, parse_guide_steps
from dd.runtime.checkpoint import LORA_FILE
from dd.runtime.config import check_declared, setting
from dd.runtime.io import (
    Journal,
    absolutize,
    atomic_write_json,
    atomic_write_text,
    mark_run_folder,
    save_image_atomic,
    undo_if_nothing_written,
)
from dd.runtime.progress import Reporter, as_reporter

JOURNAL = ".dd/refine-journal.jsonl"
RUN_INFO = ".dd/refine-run.json"
#: Written by ``dd refine train`` next to the model: backbone, range, base model.
MODEL_INFO = "refine.json"
CSV_FIELDS = [
    "key",
    "image",
    "output",
    "compare",
    "mask",
    "prompt",
    "seed",
    "rounds",
    "mask_fraction",
    "before_mean",
    "before_max",
    "after_mean",
    "after_max",
    "status",
]
#: Config fields a resumed run may change.
RESUMABLE = frozenset({"resume", "overwrite", "inputs", "batch_size", "device"})


# ------------------------------------------------------------------------------------------
# Step ranges and segments
# ------------------------------------------------------------------------------------------
def parse_late_steps(text: str, total: int = 1000, flag: str = "--late-steps") -> tuple[int, int]:
    """``"A-B"`` -> ``(A, B)`` with ``0 <= A < B <= total``."""
    m = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", str(text))
    if not m:
        raise DDError(f"bad {flag} {text!r}", hint="write a step range A-B, e.g. 500-750")
    a, b = int(m.group(1)), int(m.group(2))
    if not 0 <= a < b <= total:
        raise DDError(
            f"{flag} {text!r} must satisfy 0 <= A < B <= {total}",
            hint=f"steps count from pure noise (step 0 = t {total - 1}) to the end ({total})",
        )
    return a, b


@dataclass
class Segment:
    """Steps ``start .. end`` (of T) denoised by ``model`` (None: the base model)."""

    start: int
    end: int
    model: str | None = None

    @property
    def label(self) -> str:
        return self.model or "base"


def read_model_info(path: str | os.PathLike) -> dict[str, Any] | None:
    """The ``refine.json`` a ``dd refine train`` run wrote in ``path``, if any."""
    p = Path(path) / MODEL_INFO
    if not p.is_file():
        return None
    try:
        info = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise DDError(f"cannot read {p}: {e}") from None
    return info if isinstance(info, dict) else None


def parse_segment(text: str, total: int = 1000) -> Segment:
    """``A-B=PATH`` (a model for steps A-B), or ``PATH`` of a ``dd refine train`` run whose
    ``refine.json`` names the range it was trained on."""
    m = re.fullmatch(r"\s*(\d+\s*-\s*\d+)\s*=(.+)", str(text))
    if m:
        a, b = parse_late_steps(m.group(1), total, flag="--segment")
        path = m.group(2).strip()
    else:
        path = str(text).strip()
        info = read_model_info(path) if Path(path).is_dir() else None
        if not info or "late_steps" not in info:
            raise DDError(
                f"bad --segment {text!r}",
                hint="write A-B=PATH, or give the folder of a `dd refine train` run",
            )
        a, b = (int(x) for x in info["late_steps"])
    if not path:
        raise UsageError(f"--segment {text!r} names no model", hint="write A-B=PATH")
    if not Path(path).expanduser().exists():
        raise DDError(f"segment model not found: {path}", hint="check the path after '='")
    return Segment(a, b, path)


def plan_segments(
    late_steps: str | None, segments: Sequence[str], total: int = 1000
) -> list[Segment]:
    """Ordered, non-overlapping segments from ``--late-steps`` (base model) and
    ``--segment`` specs, covering the first start to ``total``; gaps and the tail go to the
    base model."""
    named: list[Segment] = [parse_segment(s, total) for s in segments]
    if late_steps:
        a, b = parse_late_steps(late_steps, total)
        covered = [s for s in named if s.start < b and a < s.end]
        # --late-steps A-B with segments inside it: the segments say which model runs where
        if not covered:
            named.append(Segment(a, b, None))
        elif min(s.start for s in covered) > a:
            named.append(Segment(a, min(s.start for s in covered), None))
    if not named:
        raise DDError(
            "nothing to do: give --late-steps A-B, --segment A-B=MODEL or --strength",
            hint="e.g. --late-steps 500-750 noises to t = 500 and denoises from there",
        )
    named.sort(key=lambda s: (s.start, s.end))
    for prev, nxt in zip(named, named[1:], strict=False):
        if nxt.start < prev.end:
            raise DDError(
                f"segments {prev.start}-{prev.end} and {nxt.start}-{nxt.end} overlap",
                hint="chain segments end to start, e.g. 500-750=A 750-1000=B",
            )
    out: list[Segment] = []
    for seg in named:
        if out and seg.start > out[-1].end:
            out.append(Segment(out[-1].end, seg.start, None))
        out.append(seg)
    if out[-1].end < total:
        out.append(Segment(out[-1].end, total, None))
    return out


# ------------------------------------------------------------------------------------------
# The plan: one schedule for all steps, and which segment owns each step
# ------------------------------------------------------------------------------------------
@dataclass
class RefinePlan:
    schedule: Schedule
    #: ``owner[i]``: index into ``segments`` of step ``i``.
    owner: list[int]
    segments: list[Segment]
    kind: str  # "ddim" or "flow"
    total: int = 1000
    strength: float | None = None

    @property
    def start_timestep(self) -> float:
        return float(self.schedule.timesteps[0])

    def steps_of(self, k: int) -> list[int]:
        return [i for i, o in enumerate(self.owner) if o == k]

    def describe(self) -> list[str]:
        """Human-readable resolved timesteps (and sigmas) per segment."""
        sch, lines = self.schedule, []
        if self.strength is not None:
            lines.append(
                f"strength {self.strength:g} (diffusers img2img): {len(sch)} step(s) of the "
                "backbone's schedule"
            )
        elif self.kind == "flow":
            lines.append(
                f"late steps out of T = {self.total} from pure noise (step s is sigma = "
                "shift(1 - s/T), the scheduler's shift)"
            )
        else:
            lines.append(
                f"late steps out of T = {self.total} from pure noise (step s is t = T - s; "
                f"step 0 is t = {self.total - 1})"
            )
        t0 = self.start_timestep
        noise = f"noise the input to t = {_fmt_t(t0)}"
        if self.kind == "flow":
            assert sch.sigmas is not None
            noise += f" (sigma {float(sch.sigmas[0]):.4f})"
        else:
            assert sch.alphas is not None
            noise += f" (alpha_bar {float(sch.alphas[0]):.4f})"
        lines.append(noise)
        for k, seg in enumerate(self.segments):
            idx = self.steps_of(k)
            if not idx:
                continue
            ts = " ".join(_fmt_t(float(sch.timesteps[i])) for i in idx)
            end = idx[-1] + 1
            end_t = _fmt_t(float(sch.timesteps[end])) if end < len(sch) else "0 (clean)"
            rng = "" if self.strength is not None else f"steps {seg.start}-{seg.end}: "
            lines.append(f"  {rng}t {ts} -> {end_t}  ({len(idx)} call(s), model {seg.label})")
            if self.kind == "flow":
                assert sch.sigmas is not None
                sig = " ".join(f"{float(sch.sigmas[i]):.4f}" for i in [*idx, end])
                lines.append(f"    sigmas {sig}")
        return lines


def _fmt_t(t: float) -> str:
    return str(int(round(t))) if abs(t - round(t)) < 1e-4 else f"{t:.2f}"


def _final_alpha(bb: Backbone) -> torch.Tensor:
    """The cumulative alpha after the last step, as DDIM ends (1 with set_alpha_to_one)."""
    from diffusers import DDIMScheduler

    cfg = dict(bb.pipe.scheduler.config)
    cfg.setdefault("set_alpha_to_one", False)
    return DDIMScheduler.from_config(cfg).final_alpha_cumprod.to(torch.float32)


def flow_mu(bb: Backbone, height: int, width: int) -> float | None:
    """FLUX/SD3 dynamic shifting's ``mu`` for this image size (None: static shift), from the
    image's token count in the family's own latent layout."""
    cfg = bb.pipe.scheduler.config
    if not cfg.get("use_dynamic_shifting", False):
        return None
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    lat = bb.prepare_latents(1, height, width, torch.Generator("cpu").manual_seed(0))
    if lat.ndim == 3:  # packed tokens (FLUX)
        seq = int(lat.shape[1])
    else:
        p = int(getattr(bb.denoiser.config, "patch_size", 1) or 1)
        seq = (int(lat.shape[-2]) // p) * (int(lat.shape[-1]) // p)
    return float(
        calculate_shift(
            seq,
            cfg.get("base_image_seq_len", 256),
            cfg.get("max_image_seq_len", 4096),
            cfg.get("base_shift", 0.5),
            cfg.get("max_shift", 1.15),
        )
    )


def _segment_counts(segments: Sequence[Segment], steps: int, total: int) -> list[int]:
    return [max(1, round(steps * (s.end - s.start) / total)) for s in segments]


def build_plan(
    bb: Backbone, segments: Sequence[Segment], steps: int, height: int, width: int
) -> RefinePlan:
    """The schedule for chained late-step ``segments`` (see the module docstring)."""
    total = bb.num_train_timesteps
    if steps < 1:
        raise UsageError(f"--steps must be at least 1, got {steps}")
    if segments[-1].end != total:
        raise DDError(f"the last segment must end at step {total}")
    counts = _segment_counts(segments, steps, total)
    owner: list[int] = []
    device = bb.device
    if bb.prediction_type == FLOW:
        us: list[float] = []
        for k, (seg, n) in enumerate(zip(segments, counts, strict=True)):
            hi, lo = (total - seg.start) / total, (total - seg.end) / total
            us += [hi - j * (hi - lo) / n for j in range(n)]
            owner += [k] * n
        sched = flow_schedule(
            bb.pipe.scheduler,
            len(us),
            mu=flow_mu(bb, height, width),
            sigmas=us,
            device=device,
        )
        return RefinePlan(sched, owner, list(segments), "flow", total)
    ts: list[int] = []
    for k, (seg, n) in enumerate(zip(segments, counts, strict=True)):
        hi = min(total - seg.start, total - 1)
        lo = total - seg.end
        n = max(1, min(n, hi - lo)) if hi > lo else 1
        ts += [int(round(hi - j * (hi - lo) / n)) for j in range(n)]
        owner += [k] * n
    ac = bb.alphas_cumprod()
    alphas = torch.stack([ac[t] for t in ts] + [_final_alpha(bb)])
    sched = Schedule(
        timesteps=torch.tensor(ts, dtype=torch.long, device=device), alphas=alphas.to(device)
    )
    return RefinePlan(sched, owner, list(segments), "ddim", total)


def strength_plan(bb: Backbone, strength: float, steps: int, height: int, width: int) -> RefinePlan:
    """diffusers' img2img ``strength``: the last ``int(steps * strength)`` steps of the
    backbone's ``steps``-step schedule."""
    if not 0 < strength <= 1:
        raise UsageError(f"--strength must be in (0, 1], got {strength}")
    full = bb.make_schedule(steps, height, width)
    n = len(full)
    init = min(int(n * strength), n)
    if init < 1:
        raise DDError(
            f"--strength {strength} of {n} steps leaves no step to run",
            hint="raise --strength or --steps",
        )
    sched = full.slice(n - init)
    kind = "flow" if bb.prediction_type == FLOW else "ddim"
    seg = Segment(0, bb.num_train_timesteps, None)
    return RefinePlan(sched, [0] * len(sched), [seg], kind, bb.num_train_timesteps, strength)


def noise_level(
    plan: RefinePlan, x0: torch.Tensor, noise: torch.Tensor, level: int
) -> torch.Tensor:
    """``x0`` noised to the level before step ``level`` (``len(schedule)``: the end)."""
    sch = plan.schedule
    if plan.kind == "flow":
        assert sch.sigmas is not None
        s = sch.sigmas[level].to(x0.device, torch.float32)
        return ((1 - s) * x0.float() + s * noise.float()).to(x0.dtype)
    assert sch.alphas is not None
    a = sch.alphas[level].to(x0.device, torch.float32)
    return (a.sqrt() * x0.float() + (1 - a).sqrt() * noise.float()).to(x0.dtype)


# ------------------------------------------------------------------------------------------
# Models of the segments
# ------------------------------------------------------------------------------------------
@dataclass
class SegmentModel:
    """The backbone that runs a segment; LoRA segments share the base pipeline and switch
    adapters (``adapter``) before their steps."""

    label: str
    backbone: Backbone
    adapter: str | None = None
    #: adapters loaded on this backbone's denoiser (to switch them off for the base)
    shared_adapters: list[str] = field(default_factory=list)

    def activate(self) -> None:
        den = self.backbone.denoiser
        if self.adapter is not None:
            den.enable_lora()
            den.set_adapters([self.adapter])
        elif self.shared_adapters:
            den.disable_lora()


def load_segment_models(
    base: Backbone,
    segments: Sequence[Segment],
    *,
    loader: Callable[[str], Backbone],
) -> list[SegmentModel]:
    """One :class:`SegmentModel` per segment: the base, a full model folder (loaded once per
    path with ``loader``) or a LoRA (file or folder) loaded onto the base as an adapter."""
    full: dict[str, Backbone] = {}
    adapters: dict[str, str] = {}
    models: list[SegmentModel] = []
    for seg in segments:
        if seg.model is None:
            models.append(SegmentModel("base", base))
            continue
        p = Path(seg.model).expanduser()
        key = str(p.resolve())
        if (p / "model_index.json").is_file():
            if key not in full:
                full[key] = loader(str(p))
            models.append(SegmentModel(seg.model, full[key]))
            continue
        lora = p if p.is_file() else p / LORA_FILE
        if not lora.is_file():
            raise DDError(
                f"segment model {p} is neither a diffusers folder (model_index.json) nor a LoRA",
                hint=f"pass a `dd refine train` output, a pipeline folder or {LORA_FILE}",
            )
        if key not in adapters:
            name = f"segment{len(adapters)}"
            base.load_lora(str(lora), trainable=False, adapter_name=name)
            adapters[key] = name
        models.append(SegmentModel(seg.model, base, adapters[key]))
    shared = list(adapters.values())
    for m in models:
        if m.backbone is base:
            m.shared_adapters = shared
    return models


# ------------------------------------------------------------------------------------------
# The denoising core
# ------------------------------------------------------------------------------------------
@torch.no_grad()
def refine_latents(
    models: Sequence[SegmentModel],
    plan: RefinePlan,
    x0: torch.Tensor,
    noise: torch.Tensor,
    prompts: Sequence[str],
    *,
    guidance: float | None,
    height: int,
    width: int,
    latent_mask: torch.Tensor | None = None,
    guide: Guide | None = None,
) -> torch.Tensor:
    """SDEdit from clean latents ``x0``: noise to the plan's first level, then run every step
    with its segment's model. With ``latent_mask`` (1 = repaint), latents outside it are
    reset to ``x0`` noised to the next level (same ``noise``) after each step. With ``guide``
    its active steps (indices among the steps run) are detector-guided steps
    (:meth:`Backbone.guided_step`), before that reset."""
    sch = plan.schedule
    first = models[0].backbone
    t0 = sch.timesteps[:1].expand(x0.shape[0])
    if plan.kind == "flow":
        assert sch.sigmas is not None
        t0 = (sch.sigmas[:1] * first.num_train_timesteps).expand(x0.shape[0])
    latents = first.add_noise(x0, noise, t0.to(x0.device))
    conds: dict[int, Any] = {}
    for i in range(len(sch)):
        k = plan.owner[i]
        model = models[k]
        if k not in conds:
            conds[k] = model.backbone.encode_prompts(list(prompts))
        model.activate()
        if guide is not None and guide.active(i, len(sch)):
            latents = model.backbone.guided_step(
                latents, i, sch, conds[k], guidance, height, width, guide
            )
        else:
            latents = model.backbone.step(latents, i, sch, conds[k], guidance, height, width)
        if latent_mask is not None:
            known = noise_level(plan, x0, noise, i + 1)
            latents = latent_mask * latents + (1 - latent_mask) * known
    return latents


# ------------------------------------------------------------------------------------------
# Masks
# ------------------------------------------------------------------------------------------
def grow(mask: np.ndarray, px: int) -> np.ndarray:
    """Dilate a [0, 1] map by ``px`` pixels (max filter over a disc of radius ``px``)."""
    if px <= 0:
        return mask.astype(np.float32)
    from scipy import ndimage

    yy, xx = np.mgrid[-px : px + 1, -px : px + 1]
    disc = (xx * xx + yy * yy) <= px * px
    return ndimage.grey_dilation(mask.astype(np.float32), footprint=disc, mode="nearest")


def feather(mask: np.ndarray, px: int) -> np.ndarray:
    """Soft edge outside a binary mask: 1 inside, falling linearly to 0 at ``px`` pixels
    away (exactly 0 beyond), so what lies further out is untouched."""
    binary = mask > 0.5
    if px <= 0 or not binary.any():
        return binary.astype(np.float32)
    from scipy import ndimage

    dist = ndimage.distance_transform_edt(~binary)
    return np.clip(1.0 - dist / (px + 1), 0.0, 1.0).astype(np.float32)


def mask_from_map(prob: np.ndarray, threshold: float, dilate: int, feather_px: int) -> np.ndarray:
    """The repaint mask of an artifact map: ``p >= threshold``, dilated, feathered."""
    return feather(grow((prob >= threshold).astype(np.float32), dilate), feather_px)


def load_user_mask(spec: str, item_path: Path, key: str, size: tuple[int, int]) -> np.ndarray:
    """``--mask FILE`` (one mask for every image) or ``--mask DIR`` (``DIR/<stem>.png``):
    white = repaint. Resized to the image's ``size`` (H, W) when it differs."""
    from dd.data.datasets import load_mask

    p = Path(spec).expanduser()
    if p.is_dir():
        cands = [p / f"{item_path.stem}.png", p / f"{key}.png", p / f"{item_path.stem}.jpg"]
        found = next((c for c in cands if c.is_file()), None)
        if found is None:
            raise DDError(
                f"no mask for {item_path.name} in {p}",
                hint=f"name it {item_path.stem}.png (white = repaint)",
            )
        p = found
    return load_mask(p, size)


def latent_mask(bb: Backbone, mask: torch.Tensor, latents_like: torch.Tensor) -> torch.Tensor:
    """A pixel mask ``B x 1 x H x W`` to the latents' layout: a latent cell is repainted when
    any pixel it covers is (max pooling), so the repainted latents cover the whole mask."""
    f = bb.vae_scale_factor
    m = F.max_pool2d(mask.float(), kernel_size=f, stride=f)
    if latents_like.ndim == 3:  # packed latents (FLUX): pack the mask the same way
        b, _, h, w = m.shape
        c = latents_like.shape[-1] // 4
        return bb.pipe._pack_latents(m.expand(b, c, h, w), b, c, h, w).to(latents_like)
    return m.expand(-1, latents_like.shape[1], -1, -1).to(latents_like)


def composite(original: np.ndarray, refined: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """uint8 ``refined`` blended into ``original`` by ``mask`` in [0, 1]; where the mask is 0
    the result is the original's bytes, bit for bit."""
    m = mask.astype(np.float32)[..., None]
    blend = np.clip(np.rint(m * refined.astype(np.float32) + (1 - m) * original), 0, 255)
    return np.where(m > 0, blend.astype(np.uint8), original)


# ------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------
@dataclass
class RefineConfig:
    """Everything ``dd refine`` takes: each field declared once (default, help, flag), the
    source of the command's options."""

    inputs: list[str] = setting(
        factory=list,
        help="Image files, folders (recursive), globs, or .txt/.jsonl manifests.",
        cli=False,
    )
    out: str = shared.run_folder("dd-refine", "Output folder.")
    backbone: str | None = setting(
        None, help="Backbone plugin: sd15, sdxl, sd3, flux, ldm (default: a trained segment's)."
    )
    model: str | None = shared.model("Base model: diffusers folder, .safetensors file or hub id.")
    backbone_options: dict[str, Any] = shared.backbone_options()
    late_steps: str | None = setting(
        None,
        help="Steps A-B out of 1000 from pure noise: noise to t = 1000 - A, denoise to "
        "t = 1000 - B with --model, the rest with the next segment's model (e.g. 500-750).",
    )
    segments: list[str] = setting(
        factory=list,
        help="A-B=MODEL: steps A-B run by MODEL (a `dd refine train` output, pipeline folder "
        "or LoRA); repeat to chain; a train output alone uses its own range.",
        flags=("--segment",),
    )
    strength: float | None = setting(
        None, help="diffusers img2img strength in (0, 1] instead of --late-steps."
    )
    steps: int | None = setting(
        None,
        help="Steps of a full run from pure noise; a segment gets its share (default: the "
        "backbone's).",
        min=1,
    )
    guidance: float | None = setting(None, help="Guidance scale (default: the backbone's).")
    prompt: str | None = setting(
        None, help="Prompt for images without a manifest 'prompt' or a sidecar .txt."
    )
    mask: str | None = setting(
        None,
        help="auto (repaint what the detector flags), a mask PNG (white = repaint) for every "
        "image, or a folder of masks named like the images.",
    )
    threshold: float = setting(
        0.5, help="--mask auto: pixels with confidence >= this are repainted."
    )
    dilate: int = setting(8, help="Grow the mask by this many pixels.", min=0)
    feather: int = setting(8, help="Soft mask edge width in pixels (outside the mask).", min=0)
    until_clean: int | None = setting(
        None, help="Repeat up to N rounds until the max confidence is under the threshold.", min=1
    )
    clean_threshold: float | None = setting(
        None, help="--until-clean stops under this max confidence (default --threshold)."
    )
    detector: str = setting("segformer", help="Detector plugin.")
    detector_weights: str | None = shared.detector_weights()
    detector_options: dict[str, Any] = shared.detector_options("Detector option KEY=VALUE.")
    guide: bool = setting(
        False,
        help="Detector guidance in the redone steps (as dd generate --guide): each guided "
        "step moves the latents down the detector's confidence; with a mask, of the pixels "
        "inside it.",
    )
    guide_scale: float = setting(
        12.0, min=0, help="Guidance step size at the first guided step (falls to 1/12 of it)."
    )
    guide_steps: str | None = setting(
        None, help="Guided steps A-B, 0-based among the steps refine runs (default: all)."
    )
    guide_loss: str = setting(
        "mean", help="Per-image confidence to lower: mean, max or weighted.", choices=GUIDE_LOSSES
    )
    guide_every: int = setting(1, min=1, help="Guide every Nth step.")
    seed: int = setting(0, help="Run seed (each image's noise derives from it).")
    batch_size: int = setting(1, help="Images per batch.", min=1)
    attention: str = shared.attention()
    device: str = setting("auto", help="auto, cpu, cuda, cuda:N or mps.")
    dtype: str = setting("fp32", help="fp32, bf16 or fp16.")
    resume: bool = setting(False, help="Skip images already refined in --out.")
    overwrite: bool = setting(
        False, help="Replace the refine run in --out (or write into a non-empty folder)."
    )


@dataclass
class RefineResult:
    records: list[dict[str, Any]]
    failures: list[dict[str, str]]
    plan: list[str]
    summary: dict[str, Any]


def image_seed(run_seed: int, key: str, round_: int) -> int:
    from dd.training.draws import noise_seed

    return noise_seed(run_seed, 100 + round_, zlib.crc32(key.encode()))


def size_multiple(bb: Backbone) -> int:
    """Refine resizes images to multiples of this: what the backbone needs, and for a UNet
    its full downsampling (so that no padding shifts the repaired pixels)."""
    m = int(bb.size_multiple)
    cfg = bb.denoiser.config
    blocks = getattr(cfg, "block_out_channels", None)
    if blocks and not getattr(cfg, "patch_size", None):
        return max(m, bb.vae_scale_factor * 2 ** (len(blocks) - 1))
    return m


def read_prompt(item: Any, default: str | None) -> str:
    """A manifest's ``prompt`` field, else the image's sidecar ``.txt``, else ``default``."""
    meta = getattr(item, "meta", {}) or {}
    if isinstance(meta.get("prompt"), str):
        return meta["prompt"]
    txt = Path(item.path).with_suffix(".txt")
    if txt.is_file():
        try:
            return txt.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise DDError(f"cannot read prompt {txt}: {e}") from None
    return default or ""


def _to_tensor(images: Sequence[np.ndarray]) -> torch.Tensor:
    return torch.stack(
        [torch.from_numpy(np.array(a)).permute(2, 0, 1).float() / 255 for a in images]
    )


def _to_u8(x: torch.Tensor) -> np.ndarray:
    x = x.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def _resize_u8(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an H x W x 3 uint8 image to ``size`` (H, W), bicubic."""
    from PIL import Image

    if img.shape[:2] == tuple(size):
        return img
    return np.asarray(Image.fromarray(img).resize((size[1], size[0]), Image.BICUBIC))


def _check_config(c: RefineConfig) -> None:
    """Refuses bad settings before anything loads (usage errors exit 2)."""
    if c.strength is not None and (c.late_steps or c.segments):
        raise DDError(
            "--strength cannot be combined with --late-steps or --segment",
            hint="use either diffusers' strength or dd's late-step ranges",
        )
    if c.strength is None and not (c.late_steps or c.segments):
        raise DDError(
            "give --late-steps A-B, --segment A-B=MODEL or --strength S",
            hint="e.g. --late-steps 500-750 noises to t = 500 and denoises from there",
        )
    if c.strength is not None and not 0 < c.strength <= 1:
        raise UsageError(f"--strength must be in (0, 1], got {c.strength}")
    if not 0 <= c.threshold <= 1:
        raise UsageError(f"--threshold must be in [0, 1], got {c.threshold}")
    if c.clean_threshold is not None and not 0 < c.clean_threshold <= 1:
        raise UsageError(f"--clean-threshold must be in (0, 1], got {c.clean_threshold}")
    for name, v in (("dilate", c.dilate), ("feather", c.feather)):
        if v < 0:
            raise UsageError(f"--{name} must be 0 or more, got {v}")
    for name, v in (
        ("batch-size", c.batch_size),
        ("until-clean", c.until_clean),
        ("steps", c.steps),
    ):
        if v is not None and v < 1:
            raise UsageError(f"--{name} must be at least 1, got {v}")
    if c.mask is not None and c.mask != "auto" and not Path(c.mask).expanduser().exists():
        raise DDError(f"mask not found: {c.mask}", hint="pass --mask auto, a PNG or a folder")
    if not c.inputs:
        raise DDError("no input images given", hint="pass image files, folders or globs")
    check_declared(c)  # guide choices and bounds
    parse_guide_steps(c.guide_steps)


def _infer_base(c: RefineConfig) -> None:
    """--backbone / --model from a trained segment's refine.json when not given."""
    for spec in c.segments:
        path = spec.split("=", 1)[1] if re.match(r"\s*\d+\s*-\s*\d+\s*=", spec) else spec
        info = read_model_info(path) if Path(path).is_dir() else None
        if not info:
            continue
        c.backbone = c.backbone or info.get("backbone")
        if not c.model:
            c.model = info.get("init") if info.get("kind") == "lora" else path
    if not c.backbone:
        raise UsageError("--backbone is required", hint="e.g. --backbone sd15 (see `dd plugins`)")
    if not c.model:
        raise UsageError("--model is required", hint="a diffusers folder, file or hub id")


def _check_out(c: RefineConfig, out: Path) -> tuple[dict[str, Any], bool]:
    """Refuses to overwrite a run (or to resume with other settings) before anything is
    loaded; returns the settings to record and whether an existing run is replaced
    (``--overwrite``). Nothing is written here."""
    from dd.runtime.io import check_output_folder

    if c.resume and c.overwrite:
        raise UsageError("--resume and --overwrite exclude each other", hint="pick one")
    check_output_folder(out, "refine", overwrite=c.overwrite)
    info = out / RUN_INFO
    replace = False
    now = {k: v for k, v in asdict(c).items() if k not in RESUMABLE}
    if info.is_file() and c.overwrite:
        replace = True  # the old run's settings and journal go when this one starts
    elif info.is_file():
        if not c.resume:
            raise DDError(
                f"{out} already holds a refine run",
                hint="pass --resume to continue it, --overwrite to replace it, "
                "or choose a new --out folder",
            )
        try:
            before = json.loads(info.read_text())
        except ValueError:
            raise DDError(f"{info} is damaged; cannot resume") from None
        # a setting an older run did not record counts at its default (e.g. --guide)
        before = {**asdict(RefineConfig()), **before} if isinstance(before, dict) else {}
        diff = sorted(k for k in now if before.get(k) != now[k])
        if diff:
            raise DDError(
                f"--resume with different settings than the run in {out}: "
                + ", ".join(f"{k} {before.get(k)!r} -> {now[k]!r}" for k in diff),
                hint="resume with the original options, or use a new --out",
            )
    return now, replace


class _RefineOutputs:
    """The output part of :class:`_Refiner` (a mixin): refined images, before/after
    comparisons, masks and the reports."""

    def _write_outputs(
        self,
        item: Any,
        original: np.ndarray,
        refined: np.ndarray,
        before: np.ndarray,
        after: np.ndarray,
        mask: np.ndarray,
        prompt: str,
        rounds: int,
        status: str,
    ) -> dict[str, Any]:
        from PIL import Image

        from dd.data.datasets import save_mask
        from dd.report.grid import image_grid
        from dd.report.viz import overlay

        c = self.cfg
        key = item.key
        out_rel = f"images/{key}.png"
        save_image_atomic(Image.fromarray(refined), self.out / out_rel)
        b_mean, b_max = float(before.mean()), float(before.max())
        a_mean, a_max = float(after.mean()), float(after.max())
        row = [
            (original, "input"),
            (overlay(original, before), f"before max {b_max:.3f} mean {b_mean:.3f}"),
            (refined, f"refined ({rounds} round(s))"),
            (overlay(refined, after), f"after max {a_max:.3f} mean {a_mean:.3f}"),
        ]
        mask_rel = None
        if c.mask is not None:
            mask_rel = f"masks/{key}.png"
            save_mask(self.out / mask_rel, mask)
            mask_u8 = (np.clip(mask, 0, 1) * 255).round().astype(np.uint8)
            mask_rgb = np.repeat(mask_u8[..., None], 3, 2)
            row.append((mask_rgb, "mask"))
        cmp_rel = f"compare/{key}.png"
        grid = image_grid([row], row_titles=[], col_titles=[])
        save_image_atomic(grid, self.out / cmp_rel)
        return {
            "key": key,
            "image": str(item.path),
            "output": out_rel,
            "compare": cmp_rel,
            "mask": mask_rel,
            "prompt": prompt,
            "seed": image_seed(c.seed, key, 0),
            "rounds": rounds,
            "mask_fraction": float((mask > 0).mean()),
            "before": {"mean": b_mean, "max": b_max},
            "after": {"mean": a_mean, "max": a_max},
            "status": status,
        }

    def _write_reports(
        self, records: list[dict[str, Any]], failures: list[dict[str, str]]
    ) -> dict[str, Any]:
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
        atomic_write_text(self.out / "report.jsonl", text)
        buf = io.StringIO()
        wr = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
        wr.writeheader()
        for r in records:
            flat = dict(r)
            for when in ("before", "after"):
                for k in ("mean", "max"):
                    flat[f"{when}_{k}"] = f"{r[when][k]:.6f}"
            wr.writerow(flat)
        atomic_write_text(self.out / "report.csv", buf.getvalue())

        def avg(when: str, k: str) -> float | None:
            vals = [r[when][k] for r in records]
            return float(np.mean(vals)) if vals else None

        summary = {
            "images": len(records),
            "failed": len(failures),
            "failures": failures,
            "before_max": avg("before", "max"),
            "after_max": avg("after", "max"),
            "before_mean": avg("before", "mean"),
            "after_mean": avg("after", "mean"),
            "plan": self.printed_plan,
            "detector": self.det.describe(),
        }
        atomic_write_json(self.out / "summary.json", summary)
        return summary


class _Refiner(_RefineOutputs):
    def __init__(self, cfg: RefineConfig, reporter: Reporter | None):
        self.cfg = absolutize(cfg)  # records name inputs by absolute path
        self.reporter = as_reporter(reporter)
        self.out = Path(cfg.out)
        self.replace = False
        self.plans: dict[tuple[int, int], RefinePlan] = {}
        self.printed_plan: list[str] = []

    def log(self, msg: str) -> None:
        self.reporter.message(msg)

    # -- setup -----------------------------------------------------------------------------
    def plan_for(self, h: int, w: int) -> RefinePlan:
        key = (h, w)
        if key not in self.plans:
            c, bb = self.cfg, self.base
            steps = c.steps or int(bb.default_steps)
            if c.strength is not None:
                plan = strength_plan(bb, c.strength, steps, h, w)
            else:
                plan = build_plan(bb, self.segments, steps, h, w)
            self.plans[key] = plan
            lines = plan.describe()
            if lines != self.printed_plan:
                header = [f"resolved plan for {w}x{h}:"] if plan.kind == "flow" else []
                for line in header + lines:
                    self.log(line)
                self.printed_plan = lines
                text = "\n".join(header + lines) + "\n"
                prev = (self.out / "plan.txt").read_text() if self.plans_written else ""
                atomic_write_text(self.out / "plan.txt", prev + text)
                self.plans_written = True
        return self.plans[key]

    # -- run -------------------------------------------------------------------------------
    def run(self) -> RefineResult:
        from dd.api.plugins import backbone_from, load_detector
        from dd.data.images import collect_inputs
        from dd.runtime.device import resolve_device, resolve_dtype

        c = self.cfg
        _check_config(c)
        items, fails = collect_inputs(list(c.inputs), exclude=[self.out])
        failures = [{"image": s, "error": r} for s, r in fails]
        if not items:
            detail = f": {fails[0][0]}: {fails[0][1]}" if fails else ""
            raise DDError(f"no input images found{detail}", hint="check the paths")
        _infer_base(c)
        self.segments = (
            plan_segments(c.late_steps, c.segments) if c.strength is None else [Segment(0, 1000)]
        )
        settings, self.replace = _check_out(c, self.out)
        self.plans_written = False
        device, dtype = resolve_device(c.device), resolve_dtype(c.dtype)

        def loader(model: str) -> Backbone:
            return backbone_from(c, device=device, dtype=dtype, model=model)

        self.log(f"loading {c.backbone} model {c.model} on {device}")
        self.base = loader(str(c.model))
        total = self.base.num_train_timesteps
        if c.strength is None and total != 1000:
            self.segments = plan_segments(c.late_steps, c.segments, total)
        self.models = load_segment_models(self.base, self.segments, loader=loader)
        self.det = load_detector(
            c.detector, c.detector_weights, dict(c.detector_options), str(device), c.dtype
        )
        self.det.eval()
        if self.det.untrained:
            self.log(
                f"[yellow]the {c.detector} detector has random weights: its maps and the "
                "auto mask mean nothing (pass --detector-weights)[/yellow]"
            )
        self.guidance = c.guidance if c.guidance is not None else self.base.default_guidance
        self.guide = None
        if c.guide:
            self.det.requires_grad_(False)
            self.guide = Guide(
                self.det, c.guide_scale, parse_guide_steps(c.guide_steps), c.guide_loss,
                c.guide_every,
            )  # fmt: skip
        self.multiple = size_multiple(self.base)

        # Only now, with every input, model and detector loaded, does --out get written:
        # bad input leaves no run folder behind that a corrected rerun would trip over.
        with undo_if_nothing_written(self.out, bookkeeping=("plan.txt",)):
            return self._run_images(items, failures, settings)

    def _run_images(
        self, items: list[Any], failures: list[dict[str, str]], settings: dict[str, Any]
    ) -> RefineResult:
        c = self.cfg
        if self.replace:
            for name in (RUN_INFO, JOURNAL, "plan.txt"):
                (self.out / name).unlink(missing_ok=True)
        mark_run_folder(self.out, "refine", not_inputs=("compare", "masks"))
        atomic_write_json(self.out / RUN_INFO, settings)
        journal = Journal(self.out / JOURNAL)
        done = {r["key"]: r for r in journal.records if "key" in r}
        todo = [it for it in items if it.key not in done]
        if done:
            self.log(f"resuming: {len(done)} image(s) already refined")
        progress = self.reporter.progress("refine")
        try:
            with progress:
                task = progress.add_task("refine", total=len(todo))
                for start in range(0, len(todo), c.batch_size):
                    chunk = todo[start : start + c.batch_size]
                    for rec in self._refine_chunk(chunk, failures):
                        journal.append(rec)
                    progress.update(task, advance=len(chunk))
        finally:
            journal.close()
        by_key = {r["key"]: r for r in journal.records if "key" in r}
        records = [by_key[it.key] for it in items if it.key in by_key]
        failures += [
            {"image": str(it.path), "error": by_key[it.key]["error"]}
            for it in items
            if it.key in by_key and by_key[it.key].get("status") == "failed"
        ]
        records = [r for r in records if r.get("status") != "failed"]
        summary = self._write_reports(records, failures)
        return RefineResult(records, failures, self.printed_plan, summary)

    # -- one chunk of images ---------------------------------------------------------------
    def _refine_chunk(self, chunk: list[Any], failures: list[dict[str, str]]) -> list[dict]:
        from dd.data.images import ImageLoadError, load_image

        c = self.cfg
        loaded: list[tuple[Any, np.ndarray]] = []
        recs: list[dict[str, Any]] = []
        for it in chunk:
            try:
                loaded.append((it, load_image(it.path)))
            except ImageLoadError as e:
                recs.append({"key": it.key, "status": "failed", "error": e.message})
        if not loaded:
            return recs
        originals = [img for _, img in loaded]
        prompts = [read_prompt(it, c.prompt) for it, _ in loaded]
        current = list(originals)
        before = self._detect(originals)
        union = [np.zeros(img.shape[:2], np.float32) for img in originals]
        rounds = [0] * len(loaded)
        clean_t = c.clean_threshold if c.clean_threshold is not None else c.threshold
        n_rounds = c.until_clean or 1
        maps = before
        active = list(range(len(loaded)))
        if c.until_clean:
            active = [i for i in active if float(maps[i].max()) >= clean_t]
        status = ["refined"] * len(loaded)
        for r in range(n_rounds):
            if not active:
                break
            masks: dict[int, np.ndarray | None] = {}
            for i in active:
                it, img = loaded[i]
                if c.mask is None:
                    masks[i] = None
                elif c.mask == "auto":
                    masks[i] = mask_from_map(maps[i], c.threshold, c.dilate, c.feather)
                else:
                    user = load_user_mask(c.mask, Path(it.path), it.key, img.shape[:2])
                    masks[i] = feather(grow((user > 0.5).astype(np.float32), c.dilate), c.feather)
            run = [i for i in active if masks[i] is None or bool(masks[i].any())]
            for i in active:
                if i not in run and rounds[i] == 0:
                    status[i] = "nothing masked"
            # group by working size
            groups: dict[tuple[int, int], list[int]] = {}
            for i in run:
                groups.setdefault(self._work_size(current[i].shape[:2]), []).append(i)
            for size, idx in groups.items():
                outs = self._refine_group(
                    [current[i] for i in idx],
                    [prompts[i] for i in idx],
                    [masks[i] for i in idx],
                    [image_seed(c.seed, loaded[i][0].key, r) for i in idx],
                    size,
                )
                for i, out in zip(idx, outs, strict=True):
                    current[i] = out
                    rounds[i] += 1
                    if masks[i] is not None:
                        union[i] = np.maximum(union[i], masks[i])
                    else:
                        union[i][:] = 1.0
            maps = list(maps)
            if run:
                new = self._detect([current[i] for i in run])
                for i, m in zip(run, new, strict=True):
                    maps[i] = m
            if c.until_clean:
                active = [i for i in run if float(maps[i].max()) >= clean_t]
            else:
                active = []
        after = maps
        if c.until_clean:
            for i in range(len(loaded)):
                if rounds[i] == 0 and status[i] == "refined":
                    status[i] = "already clean"
                elif rounds[i] and float(after[i].max()) >= clean_t:
                    status[i] = f"not clean after {rounds[i]} round(s)"
        for i, (it, img) in enumerate(loaded):
            recs.append(
                self._write_outputs(
                    it, img, current[i], before[i], after[i], union[i], prompts[i], rounds[i],
                    status[i],
                )
            )  # fmt: skip
        return recs

    def _work_size(self, hw: tuple[int, int]) -> tuple[int, int]:
        m = self.multiple
        return tuple(max(m, int(round(s / m)) * m) for s in hw)  # type: ignore[return-value]

    def _detect(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        p = next(self.det.parameters())
        out = []
        for img in images:
            x = _to_tensor([img]).to(p.device, p.dtype)
            out.append(self.det.predict(x)[0, 0].float().cpu().numpy())
        return out

    def _refine_group(
        self,
        images: list[np.ndarray],
        prompts: list[str],
        masks: list[np.ndarray | None],
        seeds: list[int],
        size: tuple[int, int],
    ) -> list[np.ndarray]:
        """Refine same-size images; returns uint8 images at their own size, composited."""
        bb = self.base
        h, w = size
        work = [_resize_u8(img, size) for img in images]
        x = _to_tensor(work).to(bb.device)
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        x0 = torch.cat([bb.encode_images(x[j : j + 1], generator=g) for j, g in enumerate(gens)])
        noise = torch.cat([bb.prepare_latents(1, h, w, g) for g in gens]).to(x0)
        plan = self.plan_for(h, w)
        lmask = pm = None
        if any(m is not None for m in masks):
            pm = torch.stack(
                [
                    torch.from_numpy(
                        np.ones(size, np.float32) if m is None else _resize_mask(m, size)
                    )[None]
                    for m in masks
                ]
            ).to(bb.device)
            lmask = latent_mask(bb, pm, x0)
        guide = None
        if self.guide is not None:  # the confidence inside the repaint mask pushes
            guide = dataclasses.replace(self.guide, weight=pm)
        lat = refine_latents(
            self.models, plan, x0, noise, prompts,
            guidance=self.guidance, height=h, width=w, latent_mask=lmask, guide=guide,
        )  # fmt: skip
        with torch.no_grad():
            dec = _to_u8(bb.decode(lat, h, w))
        outs = []
        for j, img in enumerate(images):
            ref = _resize_u8(dec[j], img.shape[:2])
            outs.append(ref if masks[j] is None else composite(img, ref, masks[j]))
        return outs

    # -- outputs ---------------------------------------------------------------------------


def _resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if mask.shape == tuple(size):
        return mask.astype(np.float32)
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


def refine(cfg: RefineConfig, *, reporter: Reporter | None = None) -> RefineResult:
    """Refine images with late-step SDEdit; see the module docstring."""
    return _Refiner(cfg, reporter).run()


__all__ = [
    "RefineConfig",
    "RefinePlan",
    "RefineResult",
    "Segment",
    "SegmentModel",
    "build_plan",
    "composite",
    "feather",
    "grow",
    "latent_mask",
    "load_segment_models",
    "mask_from_map",
    "noise_level",
    "parse_late_steps",
    "parse_segment",
    "plan_segments",
    "refine",
    "refine_latents",
    "strength_plan",
]
