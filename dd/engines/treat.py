"""The treat engine behind ``dd treat`` (DiffDoctor, seed 000, Sec. 3.3, Eq. 2-4).

Pixel-aware treating tunes a LoRA of a diffusion model so that a frozen artifact detector
finds fewer artifacts in what the model generates:

* each micro-batch samples prompts (a seeded permutation per epoch) and initial noise (one
  seed per sample, derived from the run seed and the sample's position), generates with
  :meth:`dd.backbones.Backbone.sample` so that gradients flow only through the last ``K``
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
quality scorer (:mod:`dd.scorers`) measures the eval images and the untreated model's at
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

import contextlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dd.data.images import load_training_image
from dd.data.prompts import read_prompts, read_reg_data
from dd.errors import DDError, UsageError
from dd.inference import generate_batches
from dd.quantize import (
    OPTIMIZER_HELP,
    OPTIMIZERS,
    QUANTIZE_HELP,
    QUANTIZE_MODES,
    check_available,
    make_optimizer,
    quantize_backbone,
)
from dd.report.grid import image_grid, to_uint8
from dd.runtime.checkpoint import (
    LORA_FILE,
    load_lora_checkpoint,
    load_optimizer_state,
    prepare_run_folder,
    save_lora_checkpoint,
    save_lora_file,
    save_run_config,
    swap_in,
)
from dd.runtime.config import check_settings, setting
from dd.runtime.device import check_training_device, make_accelerator, run_accelerated
from dd.runtime.io import Journal, absolutize, atomic_write_json, atomic_write_text
from dd.runtime.progress import progress_bar
from dd.runtime.tracking import REPORT_TO_HELP, RunTracker, check_report_to
from dd.training.draws import noise_seed
from dd.training.outputs import TIMING_FIELDS  # noqa: F401 - re-exported
from dd.training.schedule import lr_schedule
from dd.training.setup import PRECISIONS, RESUMABLE

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
    model: str | None = setting(
        None, help="Diffusers folder, single .safetensors file or hub id of the model."
    )
    backbone_options: dict[str, Any] = setting(
        factory=dict,
        flags=("--backbone-option", "-B"),
        text="options",
        help="Backbone option KEY=VALUE (e.g. max_sequence_length=256).",
    )
    detector: str = setting("segformer", help="Detector plugin.")
    detector_weights: str | None = setting(
        None,
        flags=("--detector-weights", "--weights"),
        help="Detector weights: file, folder or hub id.",
    )
    detector_options: dict[str, Any] = setting(
        factory=dict,
        flags=("--option", "--detector-option", "-O"),
        text="options",
        help="Detector option KEY=VALUE (e.g. variant=b5).",
    )
    prompts: str | None = setting(
        None, help="Training prompts: .txt (one per line), .jsonl or .json."
    )
    eval_prompts: str | None = setting(None, help="Held-out prompts evaluated at fixed seeds.")
    out: str | None = setting(None, flags=("--out", "-o"), help="Run folder.")
    resolution: int | None = setting(None, help="Image size (square); default: the backbone's.")
    steps: int | None = setting(None, help="Sampling (denoising) steps; default: the backbone's.")
    guidance: float | None = setting(None, help="Guidance scale (FLUX dev: embedded; SD: CFG).")
    dtype: str = setting("fp32", help="Frozen models' dtype: fp32, bf16, fp16 (LoRA stays fp32).")
    device: str = setting(
        "auto", help="auto, cpu or cuda (under accelerate launch: one GPU per process)."
    )
    seed: int = setting(0, help="Seed of prompt order, noise and LoRA init.")
    train_steps: int = setting(1000, min=1, help="Optimizer steps in total.")
    batch_size: int = setting(1, min=1, help="Samples per process per micro-batch.")
    grad_accum: int = setting(1, min=1, help="Micro-batches accumulated per optimizer step.")
    lr: float = setting(1e-4, help="AdamW learning rate (paper: 1e-4).")
    weight_decay: float = setting(1e-2, help="AdamW weight decay.")
    lr_schedule: str = setting("constant", help="constant or cosine (after warmup).")
    warmup_steps: int = setting(0, min=0, help="Linear warmup steps.")
    clip_grad: float = setting(1.0, help="Clip the gradient norm (0: off).")
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
        help="Per-image loss: mean (Eq. 2), max, sum (use a small --loss-scale, the "
        "released code: 1e-5) or weighted (mean over pixels above --weighted-threshold).",
    )
    loss_scale: float = setting(1.0, help="Multiplier of the artifact loss.")
    weighted_threshold: float = setting(0.1, help="Pixel threshold of the weighted reduction.")
    gradient_checkpointing: bool = setting(
        False, help="Recompute sampling steps, denoiser blocks, VAE and detector in backward."
    )
    quantize: str = setting("none", help=QUANTIZE_HELP)
    optimizer: str = setting("adamw", help=OPTIMIZER_HELP)
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
    report_to: str = setting("none", help=REPORT_TO_HELP)
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
    save_every: int = setting(100, min=1, help="Checkpoint every N steps.")
    keep_checkpoints: int | None = setting(
        None, min=1, help="Keep only the newest N step-N checkpoints."
    )
    log_every: int = setting(1, min=1, help="Log the loss every N steps.")
    stop_at: int | None = setting(
        None, min=1, help="Stop (with a checkpoint) at this step; --resume later."
    )
    resume: bool = setting(False, help="Continue the run in --out from its checkpoint.")
    overwrite: bool = setting(
        False, help="Replace the run in --out (its checkpoints, metrics and LoRA) with a new one."
    )

    def resolved(self) -> dict[str, Any]:
        return asdict(self)


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
            lat = bb.sample(
                cond.select(idx),
                height=h,
                width=w,
                steps=self.steps,
                guidance=self.guidance,
                latents=latents[idx],
                grad_steps=k,
            )
            images = bb.decode_maybe_checkpointed(lat, h, w)
            part = confidence_loss(self.detector, images, self.reduction, self.threshold)
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
class _Treater:
    def __init__(self, cfg: TreatConfig, console: Any | None):
        # a copy (filled in with the backbone's defaults below), inputs by absolute path
        self.cfg = absolutize(cfg)
        self._check_config()
        from dd.plugins import load_quality_guard

        assert cfg.out is not None
        self.out = Path(cfg.out)
        self.ckpt_dir = self.out / "checkpoints"
        self.acc = self._accelerator()
        # unknown names and missing weights fail here, before the diffusion model loads
        self.guard = load_quality_guard(
            self.cfg.quality, device=str(self.acc.device), weights=self.cfg.quality_weights
        )
        self.main = self.acc.is_main_process
        self.console = console if self.main else None
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        self._evals: list[dict[str, Any]] = []  # eval records of this run, step 0 first
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    # -- setup --------------------------------------------------------------------------------
    def _check_config(self) -> None:
        c = self.cfg
        for key in ("backbone", "model", "prompts", "eval_prompts", "out"):
            if not getattr(c, key):
                flag = "--" + key.replace("_", "-")
                raise UsageError(
                    f"{flag} is required", hint=f"pass {flag} or set {key} in --config"
                )
        if c.init_lora:
            from dd.backbones import check_lora_source

            check_lora_source(c.init_lora, "--init-lora")
        choices = [
            ("quantize", c.quantize, QUANTIZE_MODES),
            ("optimizer", c.optimizer, OPTIMIZERS),
            ("reduction", c.reduction, REDUCTIONS),
            ("lr-schedule", c.lr_schedule, LR_SCHEDULES),
            ("dtype", c.dtype, tuple(PRECISIONS)),
            ("device", c.device, DEVICES),
        ]
        positive = {
            "train-steps": c.train_steps,
            "batch-size": c.batch_size,
            "grad-accum": c.grad_accum,
            "lora-rank": c.lora_rank,
            "grad-steps": c.grad_steps,
            "reg-every": c.reg_every,
            "eval-every": c.eval_every,
            "eval-batch-size": c.eval_batch_size,
            "save-every": c.save_every,
            "log-every": c.log_every,
            "patience": c.patience,
            "keep-checkpoints": c.keep_checkpoints,
            "stop-at": c.stop_at,
            "reg-batch-size": c.reg_batch_size,
            "resolution": c.resolution,
            "steps": c.steps,
        }
        checks = [
            (c.lr > 0, "--lr must be above 0"),
            (c.warmup_steps >= 0, "--warmup-steps must be 0 or more"),
            (c.clip_grad >= 0, "--clip-grad must be 0 (off) or more"),
            (c.weight_decay >= 0, "--weight-decay must be 0 or more"),
            (c.reg_weight >= 0, "--reg-weight must be 0 or more"),
            (0 <= c.weighted_threshold < 1, "--weighted-threshold must be in [0, 1)"),
            (c.max_drift is None or c.max_drift > 0, "--max-drift must be above 0"),
            (c.lora_alpha is None or c.lora_alpha > 0, "--lora-alpha must be above 0"),
            (bool(c.eval_seeds), "--eval-seeds must name at least one seed"),
            (len(set(c.eval_seeds)) == len(c.eval_seeds), "--eval-seeds repeat a seed"),
        ]
        check_settings(choices, positive, checks)
        check_available(c.quantize, c.optimizer)
        check_report_to(c.report_to)
        check_training_device(c.device, c.dtype)

    def _accelerator(self) -> Any:
        c = self.cfg
        hint = "check --dtype and the accelerate config (accelerate env)"
        return make_accelerator(c.device, PRECISIONS[c.dtype], c.grad_accum, hint=hint)

    def log(self, renderable: Any) -> None:
        if self.console is not None:
            self.console.print(renderable, highlight=False)

    def _prepare_out(self) -> Path | None:
        """The checkpoint to resume from (None: a new run); refuses to overwrite a run."""
        files = ("checkpoints", "metrics.jsonl", LORA_FILE)
        return prepare_run_folder(
            self.out, self.cfg.resume, "treat", files, log=self.log, overwrite=self.cfg.overwrite
        )

    # -- run ----------------------------------------------------------------------------------
    def run(self) -> TreatResult:
        from accelerate.utils import set_seed
        from diffusers.training_utils import cast_training_params

        from dd.plugins import load_backbone, load_detector
        from dd.runtime.device import resolve_dtype

        cfg, acc = self.cfg, self.acc
        last = self._prepare_out()
        prompts = read_prompts(cfg.prompts)  # type: ignore[arg-type]
        eval_prompts = read_prompts(cfg.eval_prompts)  # type: ignore[arg-type]
        reg_pairs = read_reg_data(cfg.reg_data) if cfg.reg_data else []

        # models
        dtype = resolve_dtype(cfg.dtype)
        self.log(f"loading {cfg.backbone} model {cfg.model} ({cfg.dtype}) on {acc.device}")
        bb = load_backbone(
            cfg.backbone, cfg.model, device=acc.device, dtype=dtype, options=cfg.backbone_options
        )
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
        # LoRA (its gaussian init draws from the seeded global generators)
        set_seed(cfg.seed)
        if cfg.init_lora:
            bb.load_lora(cfg.init_lora, trainable=True)
            self._adopt_lora_shape(bb)
        else:
            bb.add_lora(
                rank=cfg.lora_rank, alpha=cfg.lora_alpha, targets=cfg.lora_targets, init="gaussian"
            )
        save_run_config(
            self.out,
            cfg.resolved(),
            "treat",
            resuming=last is not None,
            resumable=RESUMABLE_CHANGES,
            main=self.main,
        )
        acc.wait_for_everyone()
        cast_training_params(bb.denoiser, dtype=torch.float32)
        params = [p for p in bb.denoiser.parameters() if p.requires_grad]
        self.param_names = [n for n, p in bb.denoiser.named_parameters() if p.requires_grad]
        n_params = sum(p.numel() for p in params)

        objective = TreatObjective(
            bb,
            det,
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
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_schedule(cfg.lr_schedule, cfg.train_steps, cfg.warmup_steps)
        )
        state: dict[str, Any] = {
            "step": 0,
            "position": 0,
            "reg_position": 0,
            "evaluated": [],
            "best": None,
            "best_step": None,
            "bad_evals": 0,
            # since the last log line: confidence sum, reg sum, steps, reg steps, seconds
            "window": [0.0, 0.0, 0, 0, 0.0],
        }
        if last is not None:
            state = self._load_checkpoint(last, params, scheduler, state)
        wrapped, optimizer, scheduler = acc.prepare(objective, optimizer, scheduler)
        if last is not None:
            load_optimizer_state(last, optimizer, acc)

        self.bb, self.det, self.params, self.wrapped = bb, det, params, wrapped
        self.optimizer, self.scheduler, self.state = optimizer, scheduler, state
        self.prompts, self.eval_prompts, self.reg_pairs = prompts, eval_prompts, reg_pairs
        self.eval_items = [(i, s) for i in range(len(eval_prompts)) for s in cfg.eval_seeds]
        self.base_images: np.ndarray | None = None
        self.journal = self._open_journal(state["step"], fresh=last is None) if self.main else None
        self.tracker = RunTracker(
            cfg.report_to, self.out, "dd-treat", step=state["step"], main=self.main
        )
        if self.journal is not None:
            self.journal.on_append = self.tracker.record
        self.log(
            f"treating {cfg.backbone} with a LoRA of {n_params:,} parameters on "
            f"{len(prompts)} prompts; {self.world} process(es), batch {cfg.batch_size} x "
            f"{self.world} x {cfg.grad_accum} accumulation, {cfg.resolution}px, "
            f"{cfg.steps} steps, K={cfg.grad_steps_random or cfg.grad_steps}, "
            f"{cfg.reduction} loss"
            + (f", {len(reg_pairs)} regularisation pairs" if reg_pairs else "")
        )
        try:
            stop_reason = self._loop()
            result = self._finish(stop_reason)
        finally:
            if self.journal is not None:
                self.journal.close()
            self.tracker.close()
        acc.wait_for_everyone()
        return result

    def _open_journal(self, step: int, fresh: bool) -> Journal:
        path = self.out / "metrics.jsonl"
        journal = Journal(path, fresh=fresh)
        # Keep what the checkpoint's step had logged; "stop" lines end an earlier session.
        keep = [r for r in journal.records if r.get("step", 0) <= step and r.get("type") != "stop"]
        if len(keep) != len(journal.records):
            journal.close()
            atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in keep))
            journal = Journal(path)
        return journal

    def _load_checkpoint(
        self, last: Path, params: list[torch.nn.Parameter], scheduler: Any, state: dict
    ) -> dict[str, Any]:
        trainer = load_lora_checkpoint(last, self.world, self.param_names, params, scheduler)
        self.log(f"resuming {self.out} at step {trainer['state']['step']}")
        return {**state, **trainer["state"]}

    # -- data ---------------------------------------------------------------------------------
    def _perm(self, n: int, epoch: int, stream: int) -> np.ndarray:
        return np.random.default_rng([self.cfg.seed & 0xFFFFFFFF, stream, epoch]).permutation(n)

    def _at(self, index: int, n: int, stream: int) -> int:
        """Item of global draw ``index`` in a seeded per-epoch permutation of ``n`` items."""
        epoch, j = divmod(index, n)
        cache = self._perms
        key = (stream, epoch)
        if key not in cache:
            if len(cache) > 8:
                cache.clear()
            cache[key] = self._perm(n, epoch, stream)
        return int(cache[key][j])

    def _micro_batch(self, micro: int, reg: bool) -> dict[str, Any]:
        cfg, st = self.cfg, self.state
        bs = cfg.batch_size
        first = st["position"] + (micro * self.world + self.rank) * bs
        draws = range(first, first + bs)
        prompts = [self.prompts[self._at(i, len(self.prompts), 1)] for i in draws]
        seeds = [noise_seed(cfg.seed, 2, i) for i in draws]
        if self.k_range is None:
            ks = [cfg.grad_steps] * bs
        else:
            lo, hi = self.k_range
            ks = [lo + noise_seed(cfg.seed, 3, i) % (hi - lo + 1) for i in draws]
        batch: dict[str, Any] = {"prompts": prompts, "seeds": seeds, "grad_steps": ks}
        if reg:
            rbs = cfg.reg_batch_size or bs
            rfirst = st["reg_position"] + (micro * self.world + self.rank) * rbs
            picks = [
                self.reg_pairs[self._at(i, len(self.reg_pairs), 4)]
                for i in range(rfirst, rfirst + rbs)
            ]
            batch["reg_images"] = torch.stack(
                [load_training_image(p, cfg.resolution) for p, _ in picks]
            )  # type: ignore[arg-type]
            batch["reg_prompts"] = [t for _, t in picks]
            batch["reg_seed"] = noise_seed(cfg.seed, 5, rfirst)
        return batch

    # -- the loop -----------------------------------------------------------------------------
    def _loop(self) -> str:
        cfg, st = self.cfg, self.state
        stop_at = min(cfg.train_steps, cfg.stop_at or cfg.train_steps)
        if 0 not in st["evaluated"]:
            self._guarded_evaluate()  # the untreated model
        elif self.base_images is None:
            self._load_base_images()
        progress = progress_bar(
            "treat", "loss {task.fields[loss]}", "eval {task.fields[eval]}", console=self.console
        )
        reason = ""
        with progress if progress is not None else contextlib.nullcontext():
            task = None
            if progress is not None:
                task = progress.add_task(
                    "treat",
                    total=cfg.train_steps,
                    completed=st["step"],
                    loss="",
                    eval=self._eval_text(),
                )
            while st["step"] < stop_at:
                t0 = time.perf_counter()
                conf, reg, grad_norm, lr = self._guarded_train_step()
                st["step"] += 1
                w = st["window"]
                w[0], w[2], w[4] = w[0] + conf, w[2] + 1, w[4] + time.perf_counter() - t0
                if math.isfinite(reg):
                    w[1], w[3] = w[1] + reg, w[3] + 1
                step = st["step"]
                if progress is not None:
                    progress.update(task, completed=step, loss=f"{conf:.4f}")
                if step % cfg.log_every == 0 or step == stop_at:
                    self._log_train(grad_norm, lr)
                if step % cfg.eval_every == 0 or step == cfg.train_steps:
                    reason = self._guarded_evaluate()
                    if progress is not None:
                        progress.update(task, eval=self._eval_text())
                if not reason and step == cfg.train_steps:
                    reason = f"reached --train-steps {cfg.train_steps}"
                elif not reason and step == stop_at:
                    reason = f"stopped at --stop-at {stop_at} (continue with --resume)"
                if step % cfg.save_every == 0 or reason:
                    self._save_checkpoint(keep_step=step % cfg.save_every == 0)
                if reason:
                    break
        if not reason:  # resumed at or after the end
            reason = (
                f"reached --train-steps {cfg.train_steps}"
                if st["step"] >= cfg.train_steps
                else (f"stopped at --stop-at {stop_at} (continue with --resume)")
            )
        if self.journal is not None:
            self.journal.append({"type": "stop", "step": st["step"], "reason": reason})
        self.log(f"stopped at step {st['step']}: {reason}")
        return reason

    def _eval_text(self) -> str:
        recs = self._evals
        if not recs:
            return ""
        r, base = recs[-1], recs[0]
        return f"mean {r['mean']:.4f} (base {base['mean']:.4f}) drift {r['drift']:.3f}"

    def _guarded_train_step(self) -> tuple[float, float, float | None, float]:
        try:
            return self._train_step()
        except torch.cuda.OutOfMemoryError:
            raise DDError(
                f"out of GPU memory at step {self.state['step'] + 1} "
                f"({self.cfg.resolution}px, batch {self.cfg.batch_size}, "
                f"K={self.cfg.grad_steps_random or self.cfg.grad_steps})",
                hint=OOM_HINT,
            ) from None

    def _guarded_evaluate(self) -> str:
        try:
            return self._evaluate()
        except torch.cuda.OutOfMemoryError:
            raise DDError(
                f"out of GPU memory evaluating at step {self.state['step']} "
                f"({self.cfg.resolution}px, {self.cfg.eval_batch_size} images per batch)",
                hint="lower --eval-batch-size (e.g. 1), or " + OOM_HINT.split(": ", 1)[1],
            ) from None

    def _train_step(self) -> tuple[float, float, float | None, float]:
        """One optimizer step over ``grad_accum`` micro-batches; returns the mean confidence
        loss and regularisation loss over all processes, the gradient norm and the learning
        rate of the step."""
        cfg, acc, st = self.cfg, self.acc, self.state
        lr = float(self.scheduler.get_last_lr()[0])
        reg = bool(self.reg_pairs) and cfg.reg_weight > 0 and st["step"] % cfg.reg_every == 0
        conf_sum = torch.zeros((), device=acc.device)
        reg_sum = torch.zeros((), device=acc.device)
        grad_norm = None
        for micro in range(cfg.grad_accum):
            batch = self._micro_batch(micro, reg)
            with acc.accumulate(self.wrapped):
                out = self.wrapped(**batch)
                acc.backward(out["loss"])
                if acc.sync_gradients and cfg.clip_grad > 0:
                    grad_norm = float(acc.clip_grad_norm_(self.params, cfg.clip_grad))
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            conf_sum += out["confidence"] / cfg.grad_accum
            if reg:
                reg_sum += out["reg"] / cfg.grad_accum
        self.scheduler.step()
        per = cfg.batch_size * self.world * cfg.grad_accum
        st["position"] += per
        if reg:
            st["reg_position"] += (
                (cfg.reg_batch_size or cfg.batch_size) * self.world * cfg.grad_accum
            )
        conf = float(acc.reduce(conf_sum, reduction="mean"))
        regv = float(acc.reduce(reg_sum, reduction="mean")) if reg else float("nan")
        if not math.isfinite(conf):
            raise DDError(
                f"the loss became {conf} at step {st['step'] + 1}",
                hint="lower --lr, use --dtype fp32 or bf16, or keep --clip-grad on",
            )
        return conf, regv, grad_norm, lr

    def _log_train(self, grad_norm: float | None, lr: float) -> None:
        st = self.state
        conf, reg, n, n_reg, seconds = st["window"]
        st["window"] = [0.0, 0.0, 0, 0, 0.0]
        if n == 0:
            return
        rec = {
            "type": "train",
            "step": st["step"],
            "loss": conf / n,
            "reg_loss": reg / n_reg if n_reg else None,
            "lr": lr,
            "grad_norm": grad_norm,
            "step_time_s": seconds / n,
        }
        if self.journal is not None:
            self.journal.append(rec)  # and to the tracker

    # -- evaluation ---------------------------------------------------------------------------
    def _evaluate(self) -> str:
        """Score the eval prompts at the eval seeds (all processes); returns a stop reason
        (empty: go on). Every process computes the same decision from gathered results."""
        from accelerate.utils import gather_object

        from dd.scores import map_scores

        cfg, st, bb = self.cfg, self.state, self.bb
        t0 = time.perf_counter()
        mine = list(range(self.rank, len(self.eval_items), self.world))
        prompts = [self.eval_prompts[self.eval_items[i][0]] for i in mine]
        seeds = [self.eval_items[i][1] for i in mine]
        results: list[tuple[int, dict[str, Any], np.ndarray]] = []
        with self.acc.autocast():
            for start, images in generate_batches(
                bb,
                prompts,
                seeds,
                height=cfg.resolution,  # type: ignore[arg-type]
                width=cfg.resolution,  # type: ignore[arg-type]
                steps=cfg.steps,
                guidance=cfg.guidance,
                batch_size=cfg.eval_batch_size,
            ):
                with torch.no_grad():
                    probs = self.det(images).float().cpu().numpy()
                u8 = to_uint8(images)
                for j in range(images.shape[0]):
                    s = map_scores(probs[j, 0], weighted_threshold=cfg.weighted_threshold)
                    keep = {k: s[k] for k in ("mean", "max", "weighted", "artifact_ratio")}
                    results.append((mine[start + j], keep, u8[j]))
        gathered = sorted(gather_object(results), key=lambda r: r[0])
        scores = [r[1] for r in gathered]
        images_u8 = np.stack([r[2] for r in gathered])
        step = st["step"]
        if step == 0:
            self.base_images = images_u8
            if self.main:
                from PIL import Image

                from dd.runtime.io import save_image_atomic

                for i, img in enumerate(images_u8):
                    save_image_atomic(
                        Image.fromarray(img), self.out / "eval" / "base" / f"{i:04d}.png"
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
                {"prompt": self.eval_items[i][0], "seed": self.eval_items[i][1]}
                | {k: round(v, 6) for k, v in s.items()}
                for i, s in enumerate(scores)
            ],
        }
        reason = ""
        drift_ok = cfg.max_drift is None or drift <= cfg.max_drift
        rejected = [] if drift_ok else [f"drift {drift:.4g} above --max-drift {cfg.max_drift}"]
        if self.guard is not None:
            eval_prompts = [self.eval_prompts[p] for p, _ in self.eval_items]
            rec["quality"] = self.guard.measure(images_u8, self.base_images, eval_prompts)
            if step == 0 or "base_quality" not in st:
                base_u8 = self.base_images
                st["base_quality"] = self.guard.measure(base_u8, base_u8, eval_prompts)
            rec["base_quality"] = dict(st["base_quality"])
            rejected += self.guard.check(rec["quality"], rec["base_quality"])
            st["bad_quality"] = st.get("bad_quality", 0) + 1 if rejected else 0
        if rejected:
            rec["rejected"] = rejected
        improved = not rejected and (st["best"] is None or rec["mean"] < st["best"])
        if improved:
            st["best"], st["best_step"], st["bad_evals"] = rec["mean"], step, 0
            self._save_best(rec)
        elif step > 0:
            st["bad_evals"] += 1
        rec["best"] = improved
        rec["eval_time_s"] = time.perf_counter() - t0
        st["evaluated"] = sorted(set(st["evaluated"]) | {step})
        self._evals.append(rec)
        if not drift_ok:
            reason = (
                f"drift guard: eval images moved {drift:.4f} from the untreated model's "
                f"(--max-drift {cfg.max_drift}); collapse suspected"
            )
        elif self.guard is not None and st.get("bad_quality", 0) >= (cfg.patience or 1):
            reason = (
                f"quality guard: {st['bad_quality']} eval(s) in a row out of tolerance "
                f"({'; '.join(rejected)}); collapse suspected"
            )
        elif cfg.patience is not None and st["bad_evals"] >= cfg.patience:
            reason = (
                f"eval mean confidence did not improve in {cfg.patience} evaluations "
                f"(best {st['best']:.5f} at step {st['best_step']})"
            )
        if self.main:
            assert self.journal is not None
            self.journal.append(rec)  # and to the tracker
            self._write_grid(step, images_u8, scores)
        quality = "".join(f" {k} {v:.4g}" for k, v in rec.get("quality", {}).items())
        self.log(
            f"step {step}: eval mean {rec['mean']:.5f} max {rec['max']:.5f} drift {drift:.4f}"
            + quality
            + (" (best)" if improved else f" (best {st['best_step']})")
            + (f" [rejected: {'; '.join(rejected)}]" if rejected else "")
        )
        return reason

    def _load_base_images(self) -> None:
        from dd.data.images import load_image

        folder = self.out / "eval" / "base"
        paths = [folder / f"{i:04d}.png" for i in range(len(self.eval_items))]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise DDError(
                f"cannot resume: the untreated model's eval image {missing[0]} is missing",
                hint="start a new run (--out elsewhere)",
            )
        self.base_images = np.stack([load_image(p) for p in paths])
        base = [r for r in self.journal.records if r.get("type") == "eval"] if self.journal else []
        self._evals = base

    def _write_grid(self, step: int, images: np.ndarray, scores: list[dict[str, Any]]) -> None:
        from dd.runtime.io import save_image_atomic

        assert self.base_images is not None
        base_scores = self._evals[0]["images"] if step and self._evals else None
        rows, titles = [], []
        for i, (pi, seed) in enumerate(self.eval_items):
            s = scores[i]
            cap = f"mean {s['mean']:.3f} max {s['max']:.3f}"
            if step == 0:
                rows.append([(images[i], cap)])
            else:
                b = base_scores[i] if base_scores else None
                bcap = f"mean {b['mean']:.3f} max {b['max']:.3f}" if b else ""
                rows.append([(self.base_images[i], bcap), (images[i], cap)])
            titles.append(f"{pi}: {self.eval_prompts[pi]} (seed {seed})")
        cols = ["untreated"] if step == 0 else ["untreated", f"step {step}"]
        grid = image_grid(rows, row_titles=titles, col_titles=cols)
        save_image_atomic(grid, self.out / "eval" / f"step-{step:06d}.png")
        self.tracker.image("eval/grid", np.asarray(grid.convert("RGB")), step)

    def _save_best(self, rec: dict[str, Any]) -> None:
        self.acc.wait_for_everyone()
        if self.main:
            tmp = self.out / ".best.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            save_lora_file(self.bb, tmp)
            atomic_write_json(
                tmp / "best.json",
                {"step": rec["step"], "metric": "mean"}
                | {k: v for k, v in rec.items() if k != "images"},
            )
            swap_in(tmp, self.out / "best")
        self.acc.wait_for_everyone()

    # -- checkpoints --------------------------------------------------------------------------
    def _save_checkpoint(self, keep_step: bool) -> None:
        save_lora_checkpoint(
            self.acc,
            self.ckpt_dir,
            self.state,
            self.bb,
            self.param_names,
            self.params,
            self.optimizer,
            self.scheduler,
            keep_step=keep_step,
        )
        if keep_step and self.main:
            self._prune_checkpoints()

    def _prune_checkpoints(self) -> None:
        keep = self.cfg.keep_checkpoints
        if keep is None:
            return
        steps = sorted(
            int(p.name.split("-", 1)[1])
            for p in self.ckpt_dir.glob("step-*")
            if p.is_dir() and p.name.split("-", 1)[1].isdigit()
        )
        for s in steps[:-keep]:
            shutil.rmtree(self.ckpt_dir / f"step-{s}", ignore_errors=True)

    # -- outputs ------------------------------------------------------------------------------
    def _finish(self, stop_reason: str) -> TreatResult:
        st, acc = self.state, self.acc
        acc.wait_for_everyone()
        evals = list(self._evals)
        best = None
        best_json = self.out / "best" / "best.json"
        if best_json.is_file():
            best = json.loads(best_json.read_text())
        if self.main:
            save_lora_file(self.bb, self.out)
            records = list(self.journal.records) if self.journal is not None else []
            plot_curves(records, self.out / "curves.png")
            atomic_write_text(self.out / "README.md", self._model_card(evals, best, stop_reason))
            self.log(
                f"LoRA: {self.out / LORA_FILE} (step {st['step']}); best: "
                f"{self.out / 'best'} (step {best['step'] if best else '-'})"
            )
        acc.wait_for_everyone()
        return TreatResult(
            out=self.out,
            step=st["step"],
            stop_reason=stop_reason,
            base=evals[0] if evals else None,
            best=best,
            last_eval=evals[-1] if evals else None,
            lora=self.out / LORA_FILE,
            best_lora=self.out / "best" / LORA_FILE,
            main=self.main,
        )

    def _adopt_lora_shape(self, bb: Any) -> None:
        """--init-lora sets the LoRA's rank, alpha and targets: record those, not the flags'
        defaults (a rank-4 DreamBooth LoRA is trained, and recorded, as rank 4)."""
        cfg = self.cfg
        peft_cfg = getattr(bb.denoiser, "peft_config", {}).get("default")
        if peft_cfg is None:
            return
        rank, alpha = int(peft_cfg.r), float(peft_cfg.lora_alpha)
        targets = sorted(peft_cfg.target_modules or []) or cfg.lora_targets
        if rank != cfg.lora_rank:
            self.log(f"--init-lora {cfg.init_lora} has rank {rank}: training rank {rank}")
        cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets = rank, alpha, targets

    def _best_rule(self, evals: list[dict[str, Any]], best: dict[str, Any] | None) -> list[str]:
        """The rule that chose ``best/`` and why each rejected eval was rejected."""
        cfg = self.cfg
        guards = self.guard.describe() if self.guard is not None else []
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
        self, evals: list[dict[str, Any]], best: dict[str, Any] | None, reason: str
    ) -> str:
        cfg, st = self.cfg, self.state
        det = self.det.describe() if hasattr(self.det, "describe") else {"detector": cfg.detector}
        peft_cfg = getattr(self.bb.denoiser, "peft_config", {}).get("default")
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
            f"{cfg.batch_size} x {self.world} process(es) x {cfg.grad_accum} accumulation",
            f"- Sampling: {cfg.resolution}x{cfg.resolution}, {cfg.steps} steps, guidance "
            f"{cfg.guidance if cfg.guidance is not None else 'none'}; gradients through the "
            f"last {cfg.grad_steps_random or cfg.grad_steps} step(s)",
            f"- Loss: {cfg.loss_scale:g} x {cfg.reduction} artifact confidence"
            + (
                f" + {cfg.reg_weight:g} x diffusion loss on {len(self.reg_pairs)} real images "
                f"every {cfg.reg_every} step(s)"
                if self.reg_pairs and cfg.reg_weight > 0
                else ""
            ),
            f"- dtype {cfg.dtype}, seed {cfg.seed}, {len(self.prompts)} training prompts",
            "",
            "## Evaluation",
            f"{len(self.eval_prompts)} held-out prompts x seeds "
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
        lines += ["", "## How `best/` was chosen", *self._best_rule(evals, best)]
        lines += [
            "",
            "## Use",
            "```python",
            f"pipe = {type(self.bb.pipe).__name__}.from_pretrained({cfg.model!r})",
            f"pipe.load_lora_weights({str(self.out / 'best')!r})",
            "```",
            f"or `dd generate --backbone {cfg.backbone} --model {cfg.model} --lora "
            f"{self.out / 'best'} --prompts PROMPTS.txt --seeds 4 --out samples`.",
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
    """Training loss, eval mean/max confidence and drift against steps, as a PNG."""
    from dd.report.plot import Panel, metric_points, plot_panels

    def pts(kind: str, key: str) -> list[tuple[float, float]]:
        return metric_points(records, kind, key)

    colours = {"confidence loss": (31, 119, 180), "reg loss": (148, 103, 189),
               "mean": (214, 39, 40), "max": (255, 127, 14), "drift": (44, 160, 44)}  # fmt: skip
    panels = [
        Panel("train loss", "step", "loss",
              {"confidence loss": pts("train", "loss"), "reg loss": pts("train", "reg_loss")},
              colours=colours),
        Panel("eval artifact confidence", "step", "confidence",
              {"mean": pts("eval", "mean"), "max": pts("eval", "max")}, colours=colours),
        Panel("eval drift", "step", "drift", {"drift": pts("eval", "drift")}, colours=colours),
    ]  # fmt: skip
    evals = [r for r in records if r.get("type") == "eval" and "quality" in r]
    for name in evals[0]["quality"] if evals else []:  # one panel per quality scorer
        series = {
            name: [(r["step"], r["quality"][name]) for r in evals],
            "untreated": [(r["step"], r["base_quality"][name]) for r in evals],
        }
        panels.append(Panel(f"quality: {name}", "step", name, series))
    plot_panels(panels, path, size=(420, 280))


def treat(cfg: TreatConfig, *, console: Any | None = None) -> TreatResult:
    """Treat (or resume treating) a diffusion model's LoRA; see the module docstring.

    ``console`` (a rich Console) receives messages and the progress bar on the main process.
    """
    return run_accelerated(lambda: _Treater(cfg, console))
