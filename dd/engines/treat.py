"""The treat engine behind ``dd treat`` (DiffDoctor, seed 000, Sec. 3.3, Eq. 2-4).

Pixel-aware treating tunes a LoRA of a diffusion model so that a frozen artifact detector
finds fewer artifacts in what the model generates:

* each micro-batch samples prompts (a seeded permutation per epoch) and initial noise (one
  seed per sample, derived from the run seed and the sample's position), generates with
  :meth:`dd.api.backbones.Backbone.sample` so that gradients flow only through the last ``K``
  denoising steps (``grad_steps``, or ``K`` drawn per sample from ``grad_steps_random``),
  decodes to images in [0, 1] with gradient and runs the detector on them;
* the loss is ``loss_scale`` times the detector map reduced per image (:func:`confidence_loss`:
  ``mean`` is Eq. 2; ``max``; ``sum``; ``weighted`` = mean over pixels with p > threshold),
  averaged over the batch, plus, on regularisation steps, ``reg_weight`` times the
  backbone's own diffusion loss on real (image, prompt) pairs (Eq. 3-4), in ONE backward
  (the released code took a separate optimizer step for it);
* AdamW on the LoRA parameters (kept in float32 while the frozen models may be bf16/fp16),
  warmup then constant or cosine learning rate, gradient clipping, gradient accumulation,
  all through ``accelerate`` (one process, or several under ``accelerate launch``).

Evaluation (step 0 = the untreated model, then every ``eval_every`` steps and at the end)
generates every held-out prompt at every eval seed with no gradient and reports the mean
over images of each image's mean and max artifact confidence (paper Table 2), writes a
before/after grid and a line of ``metrics.jsonl``. ``drift`` is the mean absolute pixel
difference (in [0, 1] units, on the 8-bit images) between an eval image and the untreated
model's image at the same prompt and seed, averaged over the eval images; ``psnr`` of the
same pairs is logged too. With ``--quality`` (the presets: ``detail`` and ``drift``), each
quality scorer (:mod:`dd.api.scorers`) measures the eval images and the untreated model's at
the same seeds (``quality`` and ``base_quality`` in the eval row). The best LoRA by eval mean
confidence among evals within every scorer's tolerance (and ``max_drift``) is kept in
``OUT/best/``; the run's README says which rule chose it and why each other eval was
rejected. Training stops early after ``patience`` evals without improvement, after
``patience`` (default 1) evals in a row out of quality tolerance, or when drift exceeds
``max_drift``: collapse (smooth, washed out images that fool the detector) is this method's
known failure.

Run folder::

    OUT/pytorch_lora_weights.safetensors   final LoRA (diffusers format)
    OUT/best/                              best LoRA by eval mean confidence + best.json
    OUT/checkpoints/step-N/, last/         trainable.safetensors (exact LoRA parameters),
                                           pytorch_lora_weights.safetensors, state.pt
                                           (optimizer, grad scaler), rng_rank*.pt,
                                           trainer.json (step, data positions, scheduler,
                                           best score, world size)
    OUT/eval/base/*.png, eval/step-N.png   untreated eval images; before/after grids
    OUT/metrics.jsonl, curves.png          train / eval / stop records and their plot
    OUT/config.toml, README.md             the resolved configuration; a model card
    OUT/tensorboard/                       with ``--report-to tensorboard``

Checkpoints are written to a temporary folder and renamed into place; ``torch.load`` is only
called with ``weights_only=True``. ``resume`` restores LoRA, optimizer, scheduler, RNG states
and data positions: since every random draw of a step is a function of the run seed and the
step's position, a resumed run gives the same weights and metrics as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import dd.training.settings as shared
from dd.data.images import load_training_image
from dd.data.prompts import read_prompts, read_reg_data
from dd.errors import DDError, UsageError
from dd.inference import generate_batches
from dd.ops.quantize import (
    check_available,
    make_optimizer,
    quantize_backbone,
)
from dd.report.grid import image_grid, to_uint8
from dd.runtime.checkpoint import (
    LORA_FILE,
    prepare_run_folder,
    save_lora_file,
    save_run_config,
)
from dd.runtime.config import check_declared, check_settings, setting
from dd.runtime.device import check_training_device, run_accelerated
from dd.runtime.io import absolutize, atomic_write_json, atomic_write_text
from dd.runtime.progress import QUIET, Reporter, as_reporter
from dd.runtime.tracking import check_report_to
from dd.training import loop
from dd.training.draws import EpochOrder, noise_seed
from dd.training.outputs import TIMING_FIELDS  # noqa: F401 - re-exported
from dd.training.outputs import plot_curves as write_curves
from dd.training.setup import PRECISIONS, RESUMABLE, embed_prompts, training_accelerator

__all__ = [
    "REDUCTIONS",
    "TreatConfig",
    "TreatObjective",
    "TreatResult",
    "confidence_loss",
    "parse_grad_steps_range",
    "treat",
]

REDUCTIONS = ("mean", "max", "sum", "weighted")
LR_SCHEDULES = ("constant", "cosine")
DEVICES = ("auto", "cpu", "cuda")
#: Config fields a resumed run may change: they do not affect the results.
RESUMABLE_CHANGES = RESUMABLE
OOM_HINT = (
    "lower memory use: --gradient-checkpointing, --grad-steps 1, a lower --resolution, "
    "--dtype bf16, --batch-size 1 with --grad-accum"
)


@dataclass
class TreatConfig:
    """Everything ``dd treat`` takes, each setting declared once (its default, help and
    flag): the source of ``dd treat``'s options, of what a preset may set and of the run's
    ``config.toml``.

    ``steps`` is the number of *sampling* (denoising) steps, as in ``dd generate``;
    ``train_steps`` is the number of optimizer steps. ``None`` means the backbone's default
    (resolution, steps, guidance, LoRA targets) or "off" (patience, max_drift, stop_at).
    """

    backbone: str | None = setting(
        None, help="Backbone plugin: flux, sd15, sd3, sdxl (see `dd plugins`)."
    )
    model: str | None = shared.model()
    backbone_options: dict[str, Any] = shared.backbone_options(
        "Backbone option KEY=VALUE (e.g. max_sequence_length=256)."
    )
    detector: str = setting("segformer", help="Detector plugin.")
    detector_weights: str | None = shared.detector_weights()
    detector_options: dict[str, Any] = shared.detector_options()
    prompts: str | None = setting(
        None, help="Training prompts: .txt (one per line), .jsonl or .json."
    )
    eval_prompts: str | None = setting(None, help="Held-out prompts evaluated at fixed seeds.")
    out: str | None = shared.run_folder()
    resolution: int | None = setting(
        None, min=1, help="Image size (square); default: the backbone's."
    )
    steps: int | None = setting(
        None, min=1, help="Sampling (denoising) steps; default: the backbone's."
    )
    guidance: float | None = setting(None, help="Guidance scale (FLUX dev: embedded; SD: CFG).")
    dtype: str = shared.dtype("Frozen models' dtype: fp32, bf16, fp16 (LoRA stays fp32).")
    device: str = shared.device("auto, cpu or cuda (under accelerate launch: one GPU per process).")
    seed: int = setting(0, help="Seed of prompt order, noise and LoRA init.")
    train_steps: int = shared.train_steps(1000)
    batch_size: int = setting(1, min=1, help="Samples per process per micro-batch.")
    grad_accum: int = shared.grad_accum()
    lr: float = shared.lr(1e-4, "AdamW learning rate (paper: 1e-4).")
    weight_decay: float = shared.weight_decay(1e-2)
    lr_schedule: str = shared.lr_schedule()
    warmup_steps: int = shared.warmup_steps()
    clip_grad: float = shared.clip_grad()
    lora_rank: int = setting(16, min=1, help="LoRA rank (paper 16; the released code used 8).")
    lora_alpha: float | None = setting(None, help="LoRA alpha (default: the rank).")
    lora_targets: list[str] | None = setting(
        None,
        text="list",
        help="Comma-separated module names (default to_q,to_k,to_v,to_out.0).",
    )
    init_lora: str | None = setting(
        None, help="Continue from this diffusers-format LoRA (e.g. a DreamBooth one)."
    )
    grad_steps: int = setting(1, min=1, help="Back-propagate through the last K denoising steps.")
    grad_steps_random: str | None = setting(
        None, help="Draw K per sample from the range A-B instead."
    )
    reduction: str = setting(
        "mean",
        choices=REDUCTIONS,
        help="Per-image loss: mean (Eq. 2), max, sum (use a small --loss-scale, the "
        "released code: 1e-5) or weighted (mean over pixels above --weighted-threshold).",
    )
    loss_scale: float = setting(1.0, help="Multiplier of the artifact loss.")
    weighted_threshold: float = setting(0.1, help="Pixel threshold of the weighted reduction.")
    gradient_checkpointing: bool = setting(
        False, help="Recompute sampling steps, denoiser blocks, VAE and detector in backward."
    )
    vae_tiling: bool = setting(
        False, help="Decode with the VAE in tiles (less memory at large resolutions)."
    )
    attention: str = shared.attention()
    embedding_cache: str | None = shared.embedding_cache()
    offload_text_encoders: bool = shared.offload_text_encoders()
    quantize: str = shared.quantize()
    optimizer: str = shared.optimizer()
    reg_data: str | None = setting(
        None, help="Folder of real (image, prompt) pairs for the diffusion-loss regulariser."
    )
    reg_weight: float = setting(0.25, help="Weight of the regulariser (Eq. 4; released code 0.25).")
    reg_every: int = setting(1, min=1, help="Regularise every N optimizer steps.")
    reg_batch_size: int | None = setting(
        None, min=1, help="Real images per micro-batch (default --batch-size)."
    )
    eval_every: int = setting(50, min=1, help="Evaluate every N steps.")
    eval_seeds: list[int] = setting(
        factory=lambda: [0, 1],
        text="seeds",
        help="Eval image seeds: a list 0,1, a count N (0..N-1) or a range A-B.",
    )
    eval_batch_size: int = setting(4, min=1, help="Images per eval batch.")
    patience: int | None = setting(None, min=1, help="Stop after P evals without a better mean.")
    report_to: str = shared.report_to()
    quality: list[str] | None = setting(
        None,
        text="list",
        help="Quality scorers that guard best/ against collapse, comma-separated NAME or "
        "NAME=TOLERANCE (built-ins: detail, drift; `dd plugins` lists more): an eval out of "
        "tolerance of the untreated model cannot become best/, and --patience (default 1) "
        "such evals in a row stop the run.",
    )
    quality_weights: dict[str, Any] = setting(
        factory=dict,
        text="options",
        help="Local weights of a quality scorer that needs them: NAME=PATH, repeatable "
        "(clip and pickscore: a CLIPModel folder; imagereward: a folder with ImageReward.pt).",
    )
    max_drift: float | None = setting(
        None,
        help="Stop when eval images drift more than this from the untreated model's at the "
        "same seeds: mean |difference| of pixels in [0, 1] (collapse guard, e.g. 0.1).",
    )
    save_every: int = shared.save_every(100)
    keep_checkpoints: int | None = setting(
        None, min=1, help="Keep only the newest N step-N checkpoints."
    )
    log_every: int = shared.log_every(1)
    stop_at: int | None = shared.stop_at()
    resume: bool = shared.resume()
    overwrite: bool = shared.overwrite("LoRA")

    plan: bool = setting(
        False,
        help="Print the estimated peak GPU memory of one treat step (weights, LoRA and "
        "optimizer, activations, text encoders) from the models' configurations, and exit "
        "without loading weights or training.",
    )
    max_memory: str | None = setting(
        None, help="With --plan: the GPU's memory (e.g. 24GB); say what fits it."
    )

    def resolved(self) -> dict[str, Any]:
        """The settings of the run (``plan``/``max_memory`` only steer the command)."""
        out = asdict(self)
        out.pop("plan", None)
        out.pop("max_memory", None)
        return out


@dataclass
class TreatResult:
    out: Path
    step: int
    stop_reason: str
    base: dict[str, Any] | None
    best: dict[str, Any] | None
    last_eval: dict[str, Any] | None
    lora: Path
    best_lora: Path
    #: True on the process that wrote the outputs.
    main: bool = True


# ------------------------------------------------------------------------------------------
# Small pieces without state
# ------------------------------------------------------------------------------------------
def parse_grad_steps_range(text: str, steps: int) -> tuple[int, int]:
    """``"A-B"`` -> ``(A, B)`` with ``1 <= A <= B <= steps``."""
    try:
        lo, hi = (int(x) for x in text.replace(",", "-").split("-"))
    except ValueError:
        raise DDError(
            f"bad --grad-steps-random {text!r}", hint="write a range A-B, e.g. 1-3"
        ) from None
    if not 1 <= lo <= hi <= steps:
        raise DDError(
            f"--grad-steps-random {text!r} must lie in 1..{steps} (the sampling steps)",
            hint="lower the range or raise --steps",
        )
    return lo, hi


def confidence_loss(
    detector: torch.nn.Module,
    images: torch.Tensor,
    reduction: str = "mean",
    threshold: float = 0.1,
) -> torch.Tensor:
    """The pixel-aware loss (seed 000, Eq. 2) of ``images`` (``B x 3 x H x W`` in [0, 1]):
    the detector's probability map at image resolution reduced per image (``mean``,
    ``max``, ``sum``, or ``weighted``: mean over pixels with p > ``threshold``, 0 where none),
    averaged over the batch. Differentiable w.r.t. ``images``.

    Runs through :func:`dd.ops.artifact_confidence_loss` (upsample + sigmoid + reduction
    fused where a native kernel is available, so the full-resolution map is not kept for
    backward); the PyTorch reference is the fallback and the spec."""
    from dd.ops import artifact_confidence_loss

    logits = detector.logits(images)
    size = tuple(images.shape[-2:])
    return artifact_confidence_loss(logits, size, reduction, threshold=threshold).mean()


def generated_confidence(
    bb: Any,
    detector: torch.nn.Module,
    cond: Any,
    latents: torch.Tensor,
    *,
    height: int,
    width: int,
    steps: int,
    guidance: float | None,
    grad_steps: int,
    reduction: str = "mean",
    threshold: float = 0.1,
) -> torch.Tensor:
    """The treat objective of one group of samples sharing ``K``: sample from ``latents``
    with gradients through the last ``grad_steps`` steps, decode (checkpointed when
    enabled), and the detector's :func:`confidence_loss` of the images (batch mean). The one
    copy: :class:`TreatObjective` and ``dd bench treat`` both call it."""
    lat = bb.sample(
        cond,
        height=height,
        width=width,
        steps=steps,
        guidance=guidance,
        latents=latents,
        grad_steps=grad_steps,
    )
    images = bb.decode_maybe_checkpointed(lat, height, width)
    return confidence_loss(detector, images, reduction, threshold)


# ------------------------------------------------------------------------------------------
# The objective: one micro-batch's loss (the module accelerate wraps)
# ------------------------------------------------------------------------------------------
class TreatObjective(torch.nn.Module):
    """``forward`` computes one micro-batch's loss: sample with truncated backprop, decode,
    detect, reduce; plus the regularisation loss when a batch of real images is given.

    The denoiser is a submodule, so DDP (``accelerate``) synchronises the LoRA gradients in
    exactly one forward/backward per micro-batch; the detector and VAE are frozen.
    """

    def __init__(
        self,
        backbone: Any,
        detector: torch.nn.Module,
        *,
        height: int,
        width: int,
        steps: int,
        guidance: float | None,
        reduction: str = "mean",
        threshold: float = 0.1,
        loss_scale: float = 1.0,
        reg_weight: float = 0.0,
    ):
        super().__init__()
        self.denoiser = backbone.denoiser
        # Not submodules: frozen, and DDP must not see them.
        self.__dict__["backbone"] = backbone
        self.__dict__["detector"] = detector
        self.height, self.width, self.steps, self.guidance = height, width, steps, guidance
        self.reduction, self.threshold = reduction, threshold
        self.loss_scale, self.reg_weight = loss_scale, reg_weight

    def forward(
        self,
        prompts: list[str],
        seeds: list[int],
        grad_steps: list[int],
        reg_images: torch.Tensor | None = None,
        reg_prompts: list[str] | None = None,
        reg_seed: int = 0,
    ) -> dict[str, torch.Tensor]:
        """``prompts``/``seeds``/``grad_steps``: one each per sample (samples sharing a ``K``
        are generated together). Returns ``loss`` (to back-propagate), ``confidence`` and
        ``reg`` (detached; ``reg`` is NaN without regularisation)."""
        bb, h, w = self.backbone, self.height, self.width
        cond = bb.encode_prompts(prompts)
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        latents = torch.cat([bb.prepare_latents(1, h, w, g) for g in gens])
        total = None
        for k in sorted(set(grad_steps)):
            idx = [i for i, g in enumerate(grad_steps) if g == k]
            part = generated_confidence(
                bb,
                self.detector,
                cond.select(idx),
                latents[idx],
                height=h,
                width=w,
                steps=self.steps,
                guidance=self.guidance,
                grad_steps=k,
                reduction=self.reduction,
                threshold=self.threshold,
            )
            part = part * (len(idx) / len(prompts))
            total = part if total is None else total + part
        if total is None:
            raise DDError("a treat step got no prompts to generate from")
        confidence = total * self.loss_scale
        loss = confidence
        reg = torch.full((), float("nan"), device=confidence.device)
        if reg_images is not None and reg_prompts is not None:
            reg = bb.diffusion_loss(
                reg_images.to(bb.device),
                bb.encode_prompts(reg_prompts),
                generator=torch.Generator("cpu").manual_seed(int(reg_seed)),
            )
            loss = loss + self.reg_weight * reg
        return {"loss": loss, "confidence": confidence.detach(), "reg": reg.detach()}


# ------------------------------------------------------------------------------------------
# The trainer
# ------------------------------------------------------------------------------------------
def _check_treat_config(c: TreatConfig) -> None:
    """Refuses bad settings before anything loads (usage errors exit 2)."""
    for key in ("backbone", "model", "prompts", "eval_prompts", "out"):
        if not getattr(c, key):
            flag = "--" + key.replace("_", "-")
            raise UsageError(f"{flag} is required", hint=f"pass {flag} or set {key} in --config")
    if c.init_lora:
        from dd.api.backbones import check_lora_source

        check_lora_source(c.init_lora, "--init-lora")
    check_declared(c)  # choices and lower bounds of the fields
    checks = [
        *shared.optimisation_checks(c),
        (c.reg_weight >= 0, "--reg-weight must be 0 or more"),
        (0 <= c.weighted_threshold < 1, "--weighted-threshold must be in [0, 1)"),
        (c.max_drift is None or c.max_drift > 0, "--max-drift must be above 0"),
        (c.lora_alpha is None or c.lora_alpha > 0, "--lora-alpha must be above 0"),
        (bool(c.eval_seeds), "--eval-seeds must name at least one seed"),
        (len(set(c.eval_seeds)) == len(c.eval_seeds), "--eval-seeds repeat a seed"),
    ]
    check_settings(checks=checks)
    check_available(c.quantize, c.optimizer)
    check_report_to(c.report_to)
    check_training_device(c.device, c.dtype)


def _adopt_lora_shape(cfg: TreatConfig, bb: Any, log: Callable[[str], None]) -> None:
    """--init-lora sets the LoRA's rank, alpha and targets: record those, not the flags'
    defaults (a rank-4 DreamBooth LoRA is trained, and recorded, as rank 4)."""
    peft_cfg = getattr(bb.denoiser, "peft_config", {}).get("default")
    if peft_cfg is None:
        return
    rank, alpha = int(peft_cfg.r), float(peft_cfg.lora_alpha)
    targets = sorted(peft_cfg.target_modules or []) or cfg.lora_targets
    if rank != cfg.lora_rank:
        log(f"--init-lora {cfg.init_lora} has rank {rank}: training rank {rank}")
    cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets = rank, alpha, targets


class _Treater(loop.Recipe):
    """The recipe of ``dd treat`` for :func:`dd.training.loop.fit`: the backbone with its
    LoRA, the frozen detector, the prompts and the treat objective; evaluation is
    :class:`_TreatEvaluator`'s."""

    log_keys = ("loss", "reg_loss")

    def __init__(self, cfg: TreatConfig, reporter: Reporter | None):
        # a copy (filled in with the backbone's defaults below), inputs by absolute path
        self.cfg = absolutize(cfg)
        _check_treat_config(self.cfg)
        from dd.api.plugins import load_quality_guard

        assert cfg.out is not None
        self.out = Path(cfg.out)
        self.acc = self._accelerator()
        # unknown names and missing weights fail here, before the diffusion model loads
        self.guard = load_quality_guard(
            self.cfg.quality, device=str(self.acc.device), weights=self.cfg.quality_weights
        )
        self.main = self.acc.is_main_process
        self.reporter = as_reporter(reporter) if self.main else QUIET
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        self.order = EpochOrder(self.cfg.seed)
        self._reg_now = False

    # -- setup --------------------------------------------------------------------------------
    def _accelerator(self) -> Any:
        c = self.cfg
        hint = "check --dtype and the accelerate config (accelerate env)"
        return training_accelerator(c.device, PRECISIONS[c.dtype], hint=hint)

    def log(self, text: str) -> None:
        self.reporter.message(text)

    # -- run ----------------------------------------------------------------------------------
    def run(self) -> TreatResult:
        from dd.api.plugins import backbone_from, load_detector
        from dd.runtime.device import resolve_dtype

        cfg, acc = self.cfg, self.acc
        files = ("checkpoints", "metrics.jsonl", LORA_FILE)
        self.last = prepare_run_folder(
            self.out, cfg.resume, "treat", files, log=self.log, overwrite=cfg.overwrite
        )
        self.prompts = read_prompts(cfg.prompts)  # type: ignore[arg-type]
        self.eval_prompts = read_prompts(cfg.eval_prompts)  # type: ignore[arg-type]
        self.reg_pairs = read_reg_data(cfg.reg_data) if cfg.reg_data else []

        # models
        dtype = resolve_dtype(cfg.dtype)
        self.log(f"loading {cfg.backbone} model {cfg.model} ({cfg.dtype}) on {acc.device}")
        bb = backbone_from(cfg, device=acc.device, dtype=dtype)
        quantize_backbone(bb, cfg.quantize, self.log)
        det = load_detector(
            cfg.detector,
            cfg.detector_weights,
            dict(cfg.detector_options),
            str(acc.device),
            cfg.dtype,
        )
        if det.untrained:
            raise DDError(
                f"the {cfg.detector!r} detector has random weights: treating against it "
                "teaches the model nothing",
                hint="pass --detector-weights (e.g. DiffDoctor's ad_pytorch_model.bin)",
            )
        if getattr(det, "source", "") == "dd default (synthetic artifacts)":
            self.log(
                "note: no --detector-weights, so the treatment uses dd's embedded default "
                "detector, trained only on synthetic watermarks and patches (docs/models.md); "
                "for hands, faces and other real artifacts pass DiffDoctor's "
                "ad_pytorch_model.bin"
            )
        det.eval()
        det.requires_grad_(False)
        if cfg.gradient_checkpointing:
            bb.enable_gradient_checkpointing()
            if hasattr(det, "enable_gradient_checkpointing"):
                det.enable_gradient_checkpointing()

        # effective sampling settings, then the resolved config
        cfg.resolution = cfg.resolution or int(bb.default_resolution)
        bb.check_size(cfg.resolution, cfg.resolution)
        cfg.steps = cfg.steps or int(bb.default_steps)
        if cfg.guidance is None and bb.default_guidance is not None:
            cfg.guidance = float(bb.default_guidance)
        if cfg.grad_steps > cfg.steps:
            raise DDError(
                f"--grad-steps {cfg.grad_steps} exceeds the {cfg.steps} sampling steps",
                hint="lower --grad-steps or raise --steps",
            )
        self.k_range = (
            parse_grad_steps_range(cfg.grad_steps_random, cfg.steps)
            if cfg.grad_steps_random
            else None
        )
        if cfg.vae_tiling:
            bb.enable_vae_tiling()
        reg_prompts = [t for _, t in self.reg_pairs]
        embed_prompts(
            bb,
            [*self.prompts, *self.eval_prompts, *reg_prompts],
            cache=cfg.embedding_cache,
            offload=cfg.offload_text_encoders,
            reporter=self.reporter,
        )
        self.bb, self.det = bb, det
        self.evaluator = _TreatEvaluator(self)
        result = loop.fit(self, self._settings(), self.out, self.reporter, resume_from=self.last)
        return result.output

    def _settings(self) -> loop.LoopSettings:
        c = self.cfg
        return loop.loop_settings(
            c,
            keep_step_checkpoints=True,
            score_name="eval mean confidence",
            run_name="dd-treat",
            title="treat",
            oom_hint=OOM_HINT,
            oom_detail=f" ({c.resolution}px, batch {c.batch_size}, "
            f"K={c.grad_steps_random or c.grad_steps})",
            eval_oom_hint="lower --eval-batch-size (e.g. 1), or " + OOM_HINT.split(": ", 1)[1],
            eval_oom_detail=f" ({c.resolution}px, {c.eval_batch_size} images per batch)",
            nonfinite_hint="lower --lr, use --dtype fp32 or bf16, or keep --clip-grad on",
        )

    def initial_state(self) -> dict[str, Any]:
        return {
            "position": 0,
            "reg_position": 0,
            "evaluated": [],
            "best": None,
            "best_step": None,
            "bad_evals": 0,
        }

    def setup(self, run: loop.Run) -> loop.Setup:
        """The LoRA (its gaussian init draws from the generators ``fit`` seeded), the
        resolved config, the objective and the optimizer."""
        from diffusers.training_utils import cast_training_params

        cfg, bb = self.cfg, self.bb
        if cfg.init_lora:
            bb.load_lora(cfg.init_lora, trainable=True)
            _adopt_lora_shape(cfg, bb, self.log)
        else:
            bb.add_lora(
                rank=cfg.lora_rank, alpha=cfg.lora_alpha, targets=cfg.lora_targets, init="gaussian"
            )
        save_run_config(
            self.out,
            cfg.resolved(),
            "treat",
            resuming=self.last is not None,
            resumable=RESUMABLE_CHANGES,
            main=self.main,
            defaults=TreatConfig().resolved(),
        )
        self.acc.wait_for_everyone()
        cast_training_params(bb.denoiser, dtype=torch.float32)
        params = [p for p in bb.denoiser.parameters() if p.requires_grad]
        names = [n for n, p in bb.denoiser.named_parameters() if p.requires_grad]
        objective = TreatObjective(
            bb,
            self.det,
            height=cfg.resolution,
            width=cfg.resolution,
            steps=cfg.steps,
            guidance=cfg.guidance,
            reduction=cfg.reduction,
            threshold=cfg.weighted_threshold,
            loss_scale=cfg.loss_scale,
            reg_weight=cfg.reg_weight,
        )
        objective.eval()  # no dropout: the step is a pure function of its seeds
        optimizer = make_optimizer(cfg.optimizer, params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.log(
            f"treating {cfg.backbone} with a LoRA of {sum(p.numel() for p in params):,} "
            f"parameters on {len(self.prompts)} prompts; {self.world} process(es), batch "
            f"{cfg.batch_size} x {self.world} x {cfg.grad_accum} accumulation, "
            f"{cfg.resolution}px, {cfg.steps} steps, "
            f"K={cfg.grad_steps_random or cfg.grad_steps}, {cfg.reduction} loss"
            + (f", {len(self.reg_pairs)} regularisation pairs" if self.reg_pairs else "")
        )
        return loop.Setup(objective, names, params, optimizer)

    # -- data ---------------------------------------------------------------------------------
    def before_step(self, run: loop.Run) -> None:
        cfg = self.cfg
        self._reg_now = (
            bool(self.reg_pairs) and cfg.reg_weight > 0 and run.state["step"] % cfg.reg_every == 0
        )

    def micro_batch(self, run: loop.Run, micro: int) -> dict[str, Any]:
        cfg, st = self.cfg, run.state
        bs = cfg.batch_size
        first = st["position"] + (micro * self.world + self.rank) * bs
        draws = range(first, first + bs)
        prompts = [self.prompts[self.order.at(i, len(self.prompts), 1)] for i in draws]
        seeds = [noise_seed(cfg.seed, 2, i) for i in draws]
        if self.k_range is None:
            ks = [cfg.grad_steps] * bs
        else:
            lo, hi = self.k_range
            ks = [lo + noise_seed(cfg.seed, 3, i) % (hi - lo + 1) for i in draws]
        batch: dict[str, Any] = {"prompts": prompts, "seeds": seeds, "grad_steps": ks}
        if self._reg_now:
            rbs = cfg.reg_batch_size or bs
            rfirst = st["reg_position"] + (micro * self.world + self.rank) * rbs
            picks = [
                self.reg_pairs[self.order.at(i, len(self.reg_pairs), 4)]
                for i in range(rfirst, rfirst + rbs)
            ]
            batch["reg_images"] = torch.stack(
                [load_training_image(p, cfg.resolution) for p, _ in picks]
            )  # type: ignore[arg-type]
            batch["reg_prompts"] = [t for _, t in picks]
            batch["reg_seed"] = noise_seed(cfg.seed, 5, rfirst)
        return batch

    def loss(self, run: loop.Run, batch: dict[str, Any]) -> loop.StepLoss:
        out = run.wrapped(**batch)
        logged = {"loss": out["confidence"]}
        if self._reg_now:
            logged["reg_loss"] = out["reg"]
        return loop.StepLoss(out["loss"], logged)

    def end_step(self, run: loop.Run) -> None:
        cfg, st = self.cfg, run.state
        st["position"] += cfg.batch_size * self.world * cfg.grad_accum
        if self._reg_now:
            st["reg_position"] += (
                (cfg.reg_batch_size or cfg.batch_size) * self.world * cfg.grad_accum
            )

    # -- evaluation, best/ and checkpoints ----------------------------------------------------
    def start(self, run: loop.Run) -> None:
        if run.state["step"] > 0:  # resumed: the untreated model's images are on disk
            self.evaluator.load_base_images(run)
            run.eval_summary = self.evaluator.summary()

    def evaluate(self, run: loop.Run) -> loop.Evaluation:
        return self.evaluator.evaluate(run)

    def after_evaluation(self, run: loop.Run, evaluation: loop.Evaluation, improved: bool) -> None:
        self.evaluator.report(run, evaluation, improved)

    def save_best(self, run: loop.Run, folder: Path, evaluation: loop.Evaluation) -> None:
        rec = evaluation.record or {}
        save_lora_file(self.bb, folder)
        skip = ("images", "best", "eval_time_s")
        atomic_write_json(
            folder / "best.json",
            {"step": rec["step"], "metric": "mean"}
            | {k: v for k, v in rec.items() if k not in skip},
        )

    def save_checkpoint(self, run: loop.Run, folder: Path) -> None:
        save_lora_file(self.bb, folder)

    # -- outputs ------------------------------------------------------------------------------
    def finish(self, run: loop.Run, reason: str) -> TreatResult:
        st = run.state
        evals = list(self.evaluator.evals)
        best = None
        best_json = self.out / "best" / "best.json"
        if best_json.is_file():
            best = json.loads(best_json.read_text())
        if self.main:
            save_lora_file(self.bb, self.out)
            plot_curves(run.records, self.out / "curves.png")
            card = _model_card(self, st, evals, best, reason)
            atomic_write_text(self.out / "README.md", card)
            self.log(
                f"LoRA: {self.out / LORA_FILE} (step {st['step']}); best: "
                f"{self.out / 'best'} (step {best['step'] if best else '-'})"
            )
        self.acc.wait_for_everyone()
        return TreatResult(
            out=self.out,
            step=st["step"],
            stop_reason=reason,
            base=evals[0] if evals else None,
            best=best,
            last_eval=evals[-1] if evals else None,
            lora=self.out / LORA_FILE,
            best_lora=self.out / "best" / LORA_FILE,
            main=self.main,
        )


class _TreatEvaluator:
    """Treat's evaluation: the held-out prompts at the eval seeds, generated without
    gradient, scored by the detector (mean/max confidence, paper Table 2), compared with the
    untreated model's images at the same seeds (drift, PSNR, the quality guard), written as
    a before/after grid; an eval within tolerance competes for ``best/``."""

    def __init__(self, treater: _Treater):
        self.t = treater
        cfg = treater.cfg
        self.items = [(i, s) for i in range(len(treater.eval_prompts)) for s in cfg.eval_seeds]
        self.base_images: np.ndarray | None = None
        self.evals: list[dict[str, Any]] = []  # eval records of this run, step 0 first

    def summary(self) -> str:
        if not self.evals:
            return ""
        r, base = self.evals[-1], self.evals[0]
        return f"mean {r['mean']:.4f} (base {base['mean']:.4f}) drift {r['drift']:.3f}"

    def _generate_and_score(self) -> tuple[list[dict[str, float]], np.ndarray]:
        """Every eval image of this process, gathered over processes in item order."""
        from accelerate.utils import gather_object

        from dd.inference.scores import map_scores

        t, cfg = self.t, self.t.cfg
        mine = list(range(t.rank, len(self.items), t.world))
        prompts = [t.eval_prompts[self.items[i][0]] for i in mine]
        seeds = [self.items[i][1] for i in mine]
        results: list[tuple[int, dict[str, Any], np.ndarray]] = []
        with t.acc.autocast():
            for start, images in generate_batches(
                t.bb,
                prompts,
                seeds,
                height=cfg.resolution,  # type: ignore[arg-type]
                width=cfg.resolution,  # type: ignore[arg-type]
                steps=cfg.steps,
                guidance=cfg.guidance,
                batch_size=cfg.eval_batch_size,
            ):
                with torch.no_grad():
                    probs = t.det(images).float().cpu().numpy()
                u8 = to_uint8(images)
                for j in range(images.shape[0]):
                    s = map_scores(probs[j, 0], weighted_threshold=cfg.weighted_threshold)
                    keep = {k: s[k] for k in ("mean", "max", "weighted", "artifact_ratio")}
                    results.append((mine[start + j], keep, u8[j]))
        gathered = sorted(gather_object(results), key=lambda r: r[0])
        return [r[1] for r in gathered], np.stack([r[2] for r in gathered])

    def evaluate(self, run: loop.Run) -> loop.Evaluation:
        """Score the eval prompts at the eval seeds (all processes compute the same decision
        from gathered results); the loop keeps the best score and applies patience."""
        t, cfg, st = self.t, self.t.cfg, run.state
        t0 = time.perf_counter()
        scores, images_u8 = self._generate_and_score()
        step = st["step"]
        if step == 0:
            self.base_images = images_u8
            if t.main:
                from PIL import Image

                from dd.runtime.io import save_image_atomic

                for i, img in enumerate(images_u8):
                    save_image_atomic(
                        Image.fromarray(img), t.out / "eval" / "base" / f"{i:04d}.png"
                    )
        assert self.base_images is not None
        diff = np.abs(images_u8.astype(np.float32) - self.base_images.astype(np.float32)) / 255
        drift = float(diff.mean())
        mse = (diff**2).reshape(len(diff), -1).mean(1)
        psnr = float(
            np.mean([100.0 if m == 0 else min(100.0, 10 * math.log10(1 / m)) for m in mse])
        )
        rec: dict[str, Any] = {
            "type": "eval",
            "step": step,
            "mean": float(np.mean([s["mean"] for s in scores])),
            "max": float(np.mean([s["max"] for s in scores])),
            "weighted": float(np.mean([s["weighted"] for s in scores])),
            "artifact_ratio": float(np.mean([s["artifact_ratio"] for s in scores])),
            "drift": drift,
            "psnr": psnr,
            "images": [
                {"prompt": self.items[i][0], "seed": self.items[i][1]}
                | {k: round(v, 6) for k, v in s.items()}
                for i, s in enumerate(scores)
            ],
        }
        drift_ok = cfg.max_drift is None or drift <= cfg.max_drift
        rejected = [] if drift_ok else [f"drift {drift:.4g} above --max-drift {cfg.max_drift}"]
        if t.guard is not None:
            eval_prompts = [t.eval_prompts[p] for p, _ in self.items]
            rec["quality"] = t.guard.measure(images_u8, self.base_images, eval_prompts)
            if step == 0 or "base_quality" not in st:
                base_u8 = self.base_images
                st["base_quality"] = t.guard.measure(base_u8, base_u8, eval_prompts)
            rec["base_quality"] = dict(st["base_quality"])
            rejected += t.guard.check(rec["quality"], rec["base_quality"])
            st["bad_quality"] = st.get("bad_quality", 0) + 1 if rejected else 0
        if rejected:
            rec["rejected"] = rejected
        rec["eval_time_s"] = time.perf_counter() - t0
        st["evaluated"] = sorted(set(st["evaluated"]) | {step})
        self.evals.append(rec)
        stop = None
        if not drift_ok:
            stop = (
                f"drift guard: eval images moved {drift:.4f} from the untreated model's "
                f"(--max-drift {cfg.max_drift}); collapse suspected"
            )
        elif t.guard is not None and st.get("bad_quality", 0) >= (cfg.patience or 1):
            stop = (
                f"quality guard: {st['bad_quality']} eval(s) in a row out of tolerance "
                f"({'; '.join(rejected)}); collapse suspected"
            )
        if t.main:
            self._write_grid(run, step, images_u8, scores)
        return loop.Evaluation(
            rec, score=rec["mean"], eligible=not rejected, stop=stop, summary=self.summary()
        )

    def report(self, run: loop.Run, ev: loop.Evaluation, improved: bool) -> None:
        rec, st = ev.record or {}, run.state
        quality = "".join(f" {k} {v:.4g}" for k, v in rec.get("quality", {}).items())
        rejected = rec.get("rejected")
        self.t.log(
            f"step {rec['step']}: eval mean {rec['mean']:.5f} max {rec['max']:.5f} drift "
            f"{rec['drift']:.4f}"
            + quality
            + (" (best)" if improved else f" (best {st['best_step']})")
            + (f" [rejected: {'; '.join(rejected)}]" if rejected else "")
        )

    def load_base_images(self, run: loop.Run) -> None:
        from dd.data.images import load_image

        folder = self.t.out / "eval" / "base"
        paths = [folder / f"{i:04d}.png" for i in range(len(self.items))]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise DDError(
                f"cannot resume: the untreated model's eval image {missing[0]} is missing",
                hint="start a new run (--out elsewhere)",
            )
        self.base_images = np.stack([load_image(p) for p in paths])
        self.evals = [r for r in run.records if r.get("type") == "eval"]

    def _write_grid(
        self, run: loop.Run, step: int, images: np.ndarray, scores: list[dict[str, Any]]
    ) -> None:
        from dd.runtime.io import save_image_atomic

        assert self.base_images is not None
        base_scores = self.evals[0]["images"] if step and self.evals else None
        rows, titles = [], []
        for i, (pi, seed) in enumerate(self.items):
            s = scores[i]
            cap = f"mean {s['mean']:.3f} max {s['max']:.3f}"
            if step == 0:
                rows.append([(images[i], cap)])
            else:
                b = base_scores[i] if base_scores else None
                bcap = f"mean {b['mean']:.3f} max {b['max']:.3f}" if b else ""
                rows.append([(self.base_images[i], bcap), (images[i], cap)])
            titles.append(f"{pi}: {self.t.eval_prompts[pi]} (seed {seed})")
        cols = ["untreated"] if step == 0 else ["untreated", f"step {step}"]
        grid = image_grid(rows, row_titles=titles, col_titles=cols)
        save_image_atomic(grid, self.t.out / "eval" / f"step-{step:06d}.png")
        run.tracker.image("eval/grid", np.asarray(grid.convert("RGB")), step)


def _best_rule(t: _Treater, evals: list[dict[str, Any]], best: dict[str, Any] | None) -> list[str]:
    """The rule that chose ``best/`` and why each rejected eval was rejected."""
    cfg = t.cfg
    guards = t.guard.describe() if t.guard is not None else []
    if cfg.max_drift is not None:
        guards.append(f"drift at most --max-drift {cfg.max_drift:g}")
    if guards:
        lines = [
            "`best/` holds the eval with the lowest mean artifact confidence among the evals "
            "whose image quality stayed within tolerance of the untreated model's at the "
            "same prompts and seeds (collapse also lowers the confidence: DiffDoctor, "
            "Sec. 4.2):",
            "",
            *[f"- {g}" for g in guards],
        ]
    else:
        lines = [
            "`best/` holds the eval with the lowest mean artifact confidence. No quality "
            "guard was on (`--quality`, `--max-drift`): a run that collapses (smooth, "
            "washed-out images also score low) can make its collapsed step `best/`; "
            "look at the grids in `eval/`.",
        ]
    rejected = [r for r in evals if r.get("rejected")]
    if rejected:
        lines += ["", "Rejected evals:", ""]
        lines += [f"- step {r['step']}: {'; '.join(r['rejected'])}" for r in rejected]
    if best is not None:
        lines += ["", f"Chosen: step {best['step']} (mean {best['mean']:.5f})."]
    return lines


def _model_card(
    t: _Treater,
    st: dict[str, Any],
    evals: list[dict[str, Any]],
    best: dict[str, Any] | None,
    reason: str,
) -> str:
    """The run's README.md: base model, detector, settings, the eval table, how ``best/``
    was chosen, use and limits."""
    cfg = t.cfg
    det = t.det.describe() if hasattr(t.det, "describe") else {"detector": cfg.detector}
    peft_cfg = getattr(t.bb.denoiser, "peft_config", {}).get("default")
    rank = getattr(peft_cfg, "r", cfg.lora_rank)
    alpha = getattr(peft_cfg, "lora_alpha", cfg.lora_alpha)
    targets = sorted(getattr(peft_cfg, "target_modules", None) or cfg.lora_targets or [])
    lines = [
        f"# {cfg.backbone} LoRA treated with `dd treat` (DiffDoctor pixel-aware treating)",
        "",
        "A LoRA tuned so that an artifact detector finds fewer artifacts in the images the "
        "model generates (DiffDoctor, Sec. 3.3).",
        "",
        "## Base model and detector",
        f"- Backbone: {cfg.backbone}, model `{cfg.model}`",
        f"- Detector: {det.get('detector', cfg.detector)}, weights "
        f"`{det.get('weights', cfg.detector_weights)}`",
        "",
        "## Treating",
        f"- {st['step']} of {cfg.train_steps} optimizer steps; stopped: {reason}",
        f"- LoRA rank {rank}, alpha {alpha}, targets {', '.join(map(str, targets)) or '-'}"
        + (f", initialised from `{cfg.init_lora}`" if cfg.init_lora else "")
        + (
            f"; trained over a base quantised to {cfg.quantize} (the LoRA loads into the "
            "unquantised model)"
            if cfg.quantize != "none"
            else ""
        ),
        f"- {'AdamW8bit' if cfg.optimizer == 'adamw8bit' else 'AdamW'} lr {cfg.lr:g}, "
        f"weight decay {cfg.weight_decay:g}, {cfg.lr_schedule} "
        f"schedule, warmup {cfg.warmup_steps}, clip {cfg.clip_grad:g}, batch "
        f"{cfg.batch_size} x {t.world} process(es) x {cfg.grad_accum} accumulation",
        f"- Sampling: {cfg.resolution}x{cfg.resolution}, {cfg.steps} steps, guidance "
        f"{cfg.guidance if cfg.guidance is not None else 'none'}; gradients through the "
        f"last {cfg.grad_steps_random or cfg.grad_steps} step(s)",
        f"- Loss: {cfg.loss_scale:g} x {cfg.reduction} artifact confidence"
        + (
            f" + {cfg.reg_weight:g} x diffusion loss on {len(t.reg_pairs)} real images "
            f"every {cfg.reg_every} step(s)"
            if t.reg_pairs and cfg.reg_weight > 0
            else ""
        ),
        f"- dtype {cfg.dtype}, seed {cfg.seed}, {len(t.prompts)} training prompts",
        "",
        "## Evaluation",
        f"{len(t.eval_prompts)} held-out prompts x seeds "
        f"{', '.join(map(str, cfg.eval_seeds))}; "
        "artifact confidence averaged over images (lower is better); drift = mean "
        "|image - untreated image| in [0, 1].",
        "",
        "| model | step | mean | max | drift |",
        "| --- | --- | --- | --- | --- |",
    ]
    rows = []
    if evals:
        rows.append(("untreated", evals[0]))
    if best:
        rows.append(("best (`best/`)", best))
    if evals and evals[-1]["step"] > 0:
        rows.append(("final (this folder)", evals[-1]))
    for name, r in rows:
        lines.append(
            f"| {name} | {r['step']} | {r['mean']:.5f} | {r['max']:.5f} | {r['drift']:.4f} |"
        )
    lines += ["", "## How `best/` was chosen", *_best_rule(t, evals, best)]
    lines += [
        "",
        "## Use",
        "```python",
        f"pipe = {type(t.bb.pipe).__name__}.from_pretrained({cfg.model!r})",
        f"pipe.load_lora_weights({str(t.out / 'best')!r})",
        "```",
        f"or `dd generate --backbone {cfg.backbone} --model {cfg.model} --lora "
        f"{t.out / 'best'} --prompts PROMPTS.txt --seeds 4 --out samples`.",
        "",
        "## Limits",
        "- The treated model avoids what this detector flags; it learns nothing the "
        "detector does not see, and may take shortcuts (e.g. leave hands out).",
        "- Over-treating collapses image quality (smooth, washed-out images): prefer "
        "`best/` and look at the grids in `eval/`.",
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# Plot (Pillow only)
# ------------------------------------------------------------------------------------------
def plot_curves(records: list[dict[str, Any]], path: Path) -> None:
    """Training loss, eval mean/max confidence and drift against steps, and one chart per
    quality scorer, as a PNG."""
    from dd.report.plot import Panel

    colours = {"confidence loss": (31, 119, 180), "reg loss": (148, 103, 189),
               "mean": (214, 39, 40), "max": (255, 127, 14), "drift": (44, 160, 44)}  # fmt: skip
    curves = [
        ("train loss", "loss",
         {"confidence loss": ("train", "loss"), "reg loss": ("train", "reg_loss")}),
        ("eval artifact confidence", "confidence",
         {"mean": ("eval", "mean"), "max": ("eval", "max")}),
        ("eval drift", "drift", {"drift": ("eval", "drift")}),
    ]  # fmt: skip
    evals = [r for r in records if r.get("type") == "eval" and "quality" in r]
    extra = []
    for name in evals[0]["quality"] if evals else []:  # one panel per quality scorer
        series = {
            name: [(r["step"], r["quality"][name]) for r in evals],
            "untreated": [(r["step"], r["base_quality"][name]) for r in evals],
        }
        extra.append(Panel(f"quality: {name}", "step", name, series))
    write_curves(records, path, curves, colours=colours, extra=extra)


def treat(cfg: TreatConfig, *, reporter: Reporter | None = None) -> TreatResult:
    """Treat (or resume treating) a diffusion model's LoRA; see the module docstring.

    ``reporter`` (e.g. the CLI's console reporter) receives messages and the progress bar
    on the main process."""
    return run_accelerated(lambda: _Treater(cfg, reporter))
