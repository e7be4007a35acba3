"""The engine behind ``dd refine train``: train a diffusion model on a late-step range only.

Seed 002 trains latent diffusion on a range of the reverse process, e.g. steps 500-750 of
1000 (the seed's ``t = torch.randint(250, 500)``), then 750-1000 for details, so a small
model learns only what repairing needs. Here ``--late-steps A-B`` trains on integer
timesteps drawn **uniformly from** ``[T - B, min(T - A, T - 1)]``: exactly the timesteps
``dd refine --late-steps A-B`` calls the model at (from ``T - A`` down to, and handing over
at, ``T - B``), so the seed's ``[250, 500)`` plus the starting timestep 500.

* ``--backbone ldm``: the whole UNet is trained (``--init`` gives the pipeline: its VQ/KL
  autoencoder, scheduler and UNet, which ``--from-scratch`` re-initialises from its config).
  The output folder is a diffusers ``LDMPipeline`` folder.
* ``--backbone sd15``: a LoRA on the UNet of ``--init``; the output holds
  ``pytorch_lora_weights.safetensors`` (diffusers format) and is loaded on top of the base.
* The loss is the model's own epsilon / v-prediction MSE on latents from the autoencoder
  (with its shift and scale), through :meth:`dd.api.backbones.Backbone.add_noise`,
  :meth:`~dd.api.backbones.Backbone.predict` and :meth:`~dd.api.backbones.Backbone.training_target`.
* EMA of the trained weights (diffusers' ``EMAModel`` with warmup; the saved model and the
  range-loss evaluation use the EMA weights), AdamW, warmup + constant/cosine learning rate,
  gradient clipping and accumulation, mixed precision, all through ``accelerate`` (one
  process, or ``accelerate launch`` over GPUs).
* Evaluation: the denoising loss on the range over fixed (image, noise, timestep) draws,
  at step 0 and every ``eval_every`` steps, logged to ``metrics.jsonl`` and ``curves.png``.

Run folder (``OUT`` is itself the model ``dd refine --segment A-B=OUT`` loads)::

    OUT/model_index.json, unet/, vqvae/, scheduler/   ldm: the fine-tuned pipeline
    OUT/pytorch_lora_weights.safetensors              sd15: the LoRA
    OUT/refine.json                                   backbone, range, base model, losses
    OUT/checkpoints/last/                             trainable.safetensors, ema.pt,
                                                      state.pt, rng_rank*.pt, trainer.json
    OUT/metrics.jsonl, curves.png, README.md
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import dd.training.settings as shared
from dd.errors import DDError, UsageError
from dd.ops.quantize import (
    check_available,
    make_optimizer,
    quantize_backbone,
)
from dd.runtime.checkpoint import (
    check_same_settings,
    load_tensors,
    prepare_run_folder,
    save_lora_file,
    save_tensors,
    swap_in,
)
from dd.runtime.config import check_declared, check_settings, setting
from dd.runtime.device import run_accelerated
from dd.runtime.io import absolutize, atomic_write_json, atomic_write_text, mark_run_folder
from dd.runtime.progress import QUIET, Reporter, as_reporter
from dd.runtime.tracking import check_report_to
from dd.training import loop
from dd.training.draws import EpochOrder
from dd.training.outputs import plot_curves
from dd.training.setup import PRECISIONS, RESUMABLE, embed_prompts, training_accelerator

#: refine train takes accelerate's names for the precisions.
MIXED_PRECISIONS = tuple(PRECISIONS.values())


@dataclass
class RefineTrainConfig:
    """Everything ``dd refine train`` takes: each field declared once (default, help, flag),
    the source of the command's options."""

    backbone: str = setting("ldm", help="ldm (full fine-tune) or sd15 (LoRA).")
    late_steps: str | None = setting(
        None,
        help="Step range A-B out of 1000 to train: timesteps t in [1000 - B, 1000 - A] "
        "(e.g. 500-750 trains t 250..500).",
    )
    data: str | None = setting(
        None, help="Folder of images (manifest.jsonl or sidecar .txt prompts), or shards."
    )
    init: str | None = setting(
        None, help="Model to start from: diffusers folder or hub id (the base of a LoRA)."
    )
    out: str | None = shared.run_folder()
    from_scratch: bool = setting(
        False, help="ldm: re-initialise the UNet (keep --init's autoencoder)."
    )
    resolution: int | None = setting(None, help="Square crop size (default: the model's).", min=8)
    train_steps: int = shared.train_steps(1000)
    batch_size: int = setting(4, help="Images per process per step.", min=1)
    grad_accum: int = shared.grad_accum()
    lr: float = shared.lr(1e-4)
    weight_decay: float = shared.weight_decay(1e-2)
    lr_schedule: str = shared.lr_schedule()
    warmup_steps: int = shared.warmup_steps()
    clip_grad: float = shared.clip_grad()
    ema_decay: float = setting(0.999, help="EMA decay of the saved weights (0: no EMA).")
    mixed_precision: str = setting("no", help="no, bf16 or fp16.")
    lora_rank: int = setting(16, help="sd15: LoRA rank.", min=1)
    lora_alpha: float | None = setting(None, help="sd15: LoRA alpha (default rank).")
    quantize: str = shared.quantize("sd15: ")
    optimizer: str = shared.optimizer()
    report_to: str = shared.report_to()
    embedding_cache: str | None = shared.embedding_cache()
    offload_text_encoders: bool = shared.offload_text_encoders(
        "sd15: move the text encoder to the CPU once prompts are embedded."
    )
    device: str = setting("auto", help="auto, cpu or cuda.")
    seed: int = setting(0, help="Seed of data order, noise and timesteps.")
    eval_every: int = setting(100, help="Range loss every N steps.", min=1)
    eval_images: int = setting(8, help="Images in the range-loss eval.", min=1)
    save_every: int = shared.save_every(500)
    log_every: int = shared.log_every(10)
    stop_at: int | None = shared.stop_at()
    resume: bool = shared.resume()
    overwrite: bool = shared.overwrite()


@dataclass
class RefineTrainResult:
    out: Path
    step: int
    first_loss: float
    last_loss: float
    stop_reason: str
    main: bool = True


def train_timestep_range(late_steps: str, total: int = 1000) -> tuple[int, int]:
    """``A-B`` -> the inclusive training timesteps ``(T - B, min(T - A, T - 1))``."""
    from dd.engines.refine import parse_late_steps

    a, b = parse_late_steps(late_steps, total)
    return total - b, min(total - a, total - 1)


def sample_range_timesteps(
    lo: int, hi: int, batch: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``batch`` integer timesteps uniform over ``[lo, hi]`` (inclusive)."""
    return torch.randint(lo, hi + 1, (batch,), generator=generator)


def read_train_data(folder: str | os.PathLike, need_prompts: bool) -> list[tuple[Path, str]]:
    """(image, prompt) pairs of ``folder``: with prompts as ``dd treat --reg-data`` reads
    them (manifest.jsonl or sidecar .txt) when the model is conditional, else every image
    (recursively) with its sidecar prompt if any."""
    from dd.data.images import collect_inputs
    from dd.data.prompts import read_reg_data
    from dd.data.shards import is_shard_spec

    root = Path(folder)
    shards = is_shard_spec(str(folder))  # WebDataset shards (docs/datasets.md)
    if not shards and not root.is_dir():
        raise DDError(f"--data folder not found: {root}")
    if need_prompts:
        try:
            return read_reg_data(root)
        except DDError as e:
            raise DDError(str(e.message).replace("--reg-data", "--data"), hint=e.hint) from None
    items, failures = collect_inputs([str(folder)])
    if shards and failures:
        raise DDError(f"{failures[0][0]}: {failures[0][1]}", hint="repair or drop the shard")
    pairs = []
    for it in items:
        if shards:
            pairs.append((it.path, str(it.meta.get("prompt", ""))))
            continue
        txt = it.path.with_suffix(".txt")
        pairs.append((it.path, txt.read_text(encoding="utf-8").strip() if txt.is_file() else ""))
    if not pairs:
        raise DDError(f"no images in --data {root}", hint="a folder of PNG/JPEG images")
    return pairs


class RangeObjective(torch.nn.Module):
    """One micro-batch's denoising loss with timesteps uniform over ``[lo, hi]``; the
    denoiser is the submodule ``accelerate`` wraps."""

    def __init__(self, backbone: Any, lo: int, hi: int):
        super().__init__()
        self.denoiser = backbone.denoiser
        self.__dict__["backbone"] = backbone
        self.lo, self.hi = lo, hi

    def forward(self, images: torch.Tensor, prompts: list[str], seed: int) -> torch.Tensor:
        bb = self.backbone
        g = torch.Generator("cpu").manual_seed(int(seed))
        return range_loss(bb, images, prompts, self.lo, self.hi, g)


def range_loss(
    bb: Any,
    images: torch.Tensor,
    prompts: list[str],
    lo: int,
    hi: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """The backbone's own epsilon / v MSE at timesteps uniform over ``[lo, hi]``."""
    h, w = images.shape[-2:]
    x0 = bb.encode_images(images.to(bb.device), generator=generator).to(bb.dtype)
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0)
    t = sample_range_timesteps(lo, hi, x0.shape[0], generator).to(x0.device)
    xt = bb.add_noise(x0, noise, t)
    cond = bb.encode_prompts(prompts)
    pred = bb.predict(xt, bb.model_timestep(t), cond, None, h, w)
    return F.mse_loss(pred.float(), bb.training_target(x0, noise, t).float())


@torch.no_grad()
def eval_range_loss(
    bb: Any,
    images: torch.Tensor,
    prompts: list[str],
    lo: int,
    hi: int,
    *,
    seed: int = 0,
    draws: int = 4,
    batch_size: int = 8,
) -> float:
    """Mean range loss over ``draws`` fixed (noise, timestep) draws per image."""
    total, n = 0.0, 0
    for d in range(draws):
        for s in range(0, images.shape[0], batch_size):
            g = torch.Generator("cpu").manual_seed(seed * 7919 + d * 104729 + s)
            chunk = images[s : s + batch_size]
            loss = range_loss(bb, chunk, prompts[s : s + batch_size], lo, hi, g)
            total += float(loss) * chunk.shape[0]
            n += chunk.shape[0]
    return total / max(1, n)


def training_mode(backbone: str) -> str | None:
    """``full`` or ``lora`` as the backbone plugin declares (``late_step_training``)."""
    from dd.api.plugins import get_host

    return getattr(get_host().backbones.get(backbone), "late_step_training", None)


def _check_config(c: RefineTrainConfig) -> None:
    """Refuses bad settings before anything loads (usage errors exit 2)."""
    for key in ("late_steps", "data", "init", "out"):
        if not getattr(c, key):
            flag = "--" + key.replace("_", "-")
            hint = {
                "init": "the model to start from: a diffusers folder or hub id (for ldm "
                "its autoencoder and UNet layout; for sd15 the LoRA's base)",
                "late_steps": "e.g. --late-steps 500-750 (trains t 250..500)",
            }.get(key, f"pass {flag}")
            raise UsageError(f"{flag} is required", hint=hint)
    mode = training_mode(c.backbone)
    if mode is None:
        from dd.api.plugins import get_host

        able = [
            f"{e.name} ({e.obj.late_step_training})"
            for e in get_host().backbones.entries.values()
            if getattr(e.obj, "late_step_training", None)
        ]
        raise DDError(
            f"dd refine train cannot train --backbone {c.backbone!r} on a step range",
            hint=f"backbones that can: {', '.join(able) or 'none installed'}",
        )
    if c.mixed_precision not in MIXED_PRECISIONS:
        raise DDError(
            f"unknown --mixed-precision {c.mixed_precision!r}",
            hint=f"one of {', '.join(MIXED_PRECISIONS)}",
        )
    check_declared(c)  # choices and lower bounds of the fields
    if not 0 <= c.ema_decay < 1:
        raise UsageError(f"--ema-decay must be in [0, 1), got {c.ema_decay}")
    check_settings(checks=shared.optimisation_checks(c))
    if c.quantize != "none" and mode == "full":
        raise DDError(
            f"--quantize {c.quantize} quantises a frozen denoiser under a LoRA, but "
            f"--backbone {c.backbone} trains the whole denoiser",
            hint="drop --quantize, or train a LoRA backbone (e.g. --backbone sd15)",
        )
    check_available(c.quantize, c.optimizer)
    check_report_to(c.report_to)
    if c.from_scratch and mode != "full":
        raise DDError(
            "--from-scratch re-initialises a fully fine-tuned denoiser",
            hint=f"--backbone {c.backbone} trains a LoRA; drop --from-scratch",
        )
    on_cpu = c.device == "cpu" or not torch.cuda.is_available()
    if c.mixed_precision == "fp16" and on_cpu:
        raise UsageError("--mixed-precision fp16 needs a GPU", hint="use bf16 or no on the CPU")
    train_timestep_range(c.late_steps or "")


class _RangeTraining(loop.Recipe):
    """The recipe of ``dd refine train`` for :func:`dd.training.loop.fit`: the model, the
    data and the range objective; the loop does the rest."""

    log_keys = ("loss",)

    def __init__(self, cfg: RefineTrainConfig, reporter: Reporter | None):
        self.cfg = absolutize(cfg)  # records name inputs by absolute path
        _check_config(self.cfg)
        self.out = Path(str(cfg.out))
        self.acc = training_accelerator(cfg.device, cfg.mixed_precision)
        self.main = self.acc.is_main_process
        self.reporter = as_reporter(reporter) if self.main else QUIET
        self.world = self.acc.num_processes
        self.order = EpochOrder(self.cfg.seed)
        self._cache: dict[int, torch.Tensor] = {}

    def log(self, msg: str) -> None:
        self.reporter.message(msg)

    def _settings(self) -> loop.LoopSettings:
        return loop.loop_settings(
            self.cfg,
            run_name="dd-refine-train",
            title="refine train",
            oom_hint="lower memory use: a smaller --batch-size with --grad-accum, a lower "
            "--resolution, --mixed-precision bf16",
            nonfinite_hint="lower --lr, or use --mixed-precision no or bf16",
        )

    # -- run -------------------------------------------------------------------------------
    def run(self) -> RefineTrainResult:
        from dd.api.plugins import get_host

        cfg, acc = self.cfg, self.acc
        last = prepare_run_folder(
            self.out,
            cfg.resume,
            "refine train",
            ("checkpoints", "metrics.jsonl"),
            overwrite=cfg.overwrite,
        )
        bb_cls = get_host().backbones.get(cfg.backbone)
        self.log(f"loading {cfg.backbone} model {cfg.init} on {acc.device}")
        bb = bb_cls.from_pretrained(str(cfg.init), device=acc.device, dtype=torch.float32)
        self.bb = bb
        self.lo, self.hi = train_timestep_range(str(cfg.late_steps), bb.num_train_timesteps)
        conditional = bool(getattr(bb, "conditional", True))
        self.data = read_train_data(str(cfg.data), need_prompts=conditional)
        cfg.resolution = cfg.resolution or int(bb.default_resolution)
        bb.check_size(cfg.resolution, cfg.resolution)
        if conditional:
            embed_prompts(
                bb,
                [t for _, t in self.data],
                cache=cfg.embedding_cache,
                offload=cfg.offload_text_encoders,
                reporter=self.reporter,
            )
        n_eval = min(cfg.eval_images, len(self.data))
        self.eval_images = torch.stack([self._image(i) for i in range(n_eval)])
        self.eval_prompts = [self.data[i][1] for i in range(n_eval)]
        if self.main:
            mark_run_folder(self.out, "refine train")
        result = loop.fit(self, self._settings(), self.out, self.reporter, resume_from=last)
        st = result.state
        return RefineTrainResult(
            self.out,
            result.step,
            float(st["first_loss"]),
            float(st["last"]),
            result.stop_reason,
            self.main,
        )

    # -- the recipe ------------------------------------------------------------------------
    def initial_state(self) -> dict[str, Any]:
        return {"position": 0, "first_loss": None, "last": None}

    def setup(self, run: loop.Run) -> loop.Setup:
        cfg, bb, acc = self.cfg, self.bb, self.acc
        if training_mode(cfg.backbone) == "full":
            self.kind = "full"
            if cfg.from_scratch:
                unet = type(bb.denoiser).from_config(bb.denoiser.config).to(acc.device)
                bb.pipe.unet = unet
            bb.denoiser.requires_grad_(True)
        else:
            self.kind = "lora"
            quantize_backbone(bb, cfg.quantize, self.log)
            bb.add_lora(rank=cfg.lora_rank, alpha=cfg.lora_alpha, init="gaussian")
        bb.denoiser.train()
        names = [n for n, p in bb.denoiser.named_parameters() if p.requires_grad]
        self.params = [p for p in bb.denoiser.parameters() if p.requires_grad]
        self.ema = None
        if cfg.ema_decay > 0:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(
                self.params, decay=cfg.ema_decay, use_ema_warmup=True, inv_gamma=1.0, power=2 / 3
            )
        optimizer = make_optimizer(
            cfg.optimizer, self.params, lr=cfg.lr, weight_decay=cfg.weight_decay
        )
        n_params = sum(p.numel() for p in self.params)
        self.log(
            f"training {self.kind} ({n_params:,} parameters) on t in [{self.lo}, {self.hi}] "
            f"(--late-steps {cfg.late_steps}) with {len(self.data)} images at "
            f"{cfg.resolution}px; batch {cfg.batch_size} x {self.world} x {cfg.grad_accum}"
        )
        return loop.Setup(RangeObjective(bb, self.lo, self.hi), names, self.params, optimizer)

    def _image(self, index: int) -> torch.Tensor:
        from dd.data.images import load_training_image

        if index not in self._cache:
            img = load_training_image(self.data[index][0], int(self.cfg.resolution or 0))
            if len(self._cache) < 2048:
                self._cache[index] = img
            return img
        return self._cache[index]

    def micro_batch(self, run: loop.Run, micro: int) -> dict[str, Any]:
        from dd.training.draws import noise_seed

        cfg = self.cfg
        first = run.state["position"] + (micro * run.world + run.rank) * cfg.batch_size
        idx = [self.order.at(i, len(self.data), 11) for i in range(first, first + cfg.batch_size)]
        return {
            "images": torch.stack([self._image(i) for i in idx]),
            "prompts": [self.data[i][1] for i in idx],
            "seed": noise_seed(cfg.seed, 12, first),
        }

    def loss(self, run: loop.Run, batch: dict[str, Any]) -> loop.StepLoss:
        return loop.StepLoss(run.wrapped(**batch))

    def after_optimizer_step(self, run: loop.Run) -> None:
        if self.ema is not None:
            self.ema.step(self.params)

    def end_step(self, run: loop.Run) -> None:
        run.state["position"] += self.cfg.batch_size * run.world * self.cfg.grad_accum

    @contextlib.contextmanager
    def _ema_weights(self):
        if self.ema is None:
            yield
            return
        self.ema.store(self.params)
        self.ema.copy_to(self.params)
        try:
            yield
        finally:
            self.ema.restore(self.params)

    def evaluate(self, run: loop.Run) -> loop.Evaluation:
        """The range loss of the weights that get saved (the EMA ones)."""
        den, st = self.bb.denoiser, run.state
        den.eval()
        try:
            with self._ema_weights(), self.acc.autocast():
                loss = eval_range_loss(
                    self.bb,
                    self.eval_images,
                    self.eval_prompts,
                    self.lo,
                    self.hi,
                    seed=self.cfg.seed,
                )
        finally:
            den.train()
        if st["first_loss"] is None:
            st["first_loss"] = loss
        st["last"] = loss
        self.log(f"step {st['step']}: range loss {loss:.5f}")
        return loop.Evaluation(
            {"type": "eval", "step": st["step"], "range_loss": loss},
            summary=f"range loss {st['first_loss']:.4f} -> {loss:.4f}",
        )

    # -- checkpoints -----------------------------------------------------------------------
    def _config_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self.cfg).items() if k not in RESUMABLE}

    def trainer_record(self, run: loop.Run) -> dict[str, Any]:
        return {"config": self._config_dict()}

    def save_checkpoint(self, run: loop.Run, folder: Path) -> None:
        if self.ema is not None:
            save_tensors(folder / "ema.pt", self.ema.state_dict())

    def load_checkpoint(self, run: loop.Run, folder: Path, trainer: dict[str, Any]) -> None:
        check_same_settings(
            self.out, "checkpoints/last/trainer.json", trainer.get("config", {}),
            self._config_dict(), RESUMABLE,
        )  # fmt: skip
        if self.ema is not None:
            self.ema.load_state_dict(load_tensors(folder / "ema.pt"))

    # -- outputs ---------------------------------------------------------------------------
    def finish(self, run: loop.Run, reason: str) -> None:
        cfg, st = self.cfg, run.state
        if not self.main:
            return
        if self.ema is not None:
            self.ema.copy_to(self.params)
        if self.kind == "lora":
            save_lora_file(self.bb, self.out)
        else:
            tmp = self.out / ".model.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            self.bb.pipe.save_pretrained(tmp, safe_serialization=True)
            for entry in sorted(tmp.iterdir()):
                dest = self.out / entry.name
                if entry.is_dir():
                    swap_in(entry, dest)
                else:
                    os.replace(entry, dest)
            shutil.rmtree(tmp, ignore_errors=True)
        a, b = (int(x) for x in str(cfg.late_steps).split("-"))
        info = {
            "backbone": cfg.backbone,
            "kind": self.kind,
            "late_steps": [a, b],
            "timesteps": [self.lo, self.hi],
            "init": cfg.init,
            "from_scratch": cfg.from_scratch,
            "step": st["step"],
            "ema_decay": cfg.ema_decay,
            "range_loss": {"first": st["first_loss"], "last": st["last"]},
            "stop_reason": reason,
        }
        atomic_write_json(self.out / "refine.json", info)
        plot_curves(run.records, self.out / "curves.png", CURVES)
        use = (
            f"dd refine IMAGES --backbone {cfg.backbone} --model {cfg.init} "
            f"--segment {a}-{b}={self.out} --out refined/"
        )
        card = [
            f"# {cfg.backbone} late-step model (`dd refine train`, steps {a}-{b})",
            "",
            f"- {'Full fine-tune' if self.kind == 'full' else 'LoRA'} of `{cfg.init}`"
            + (" (UNet re-initialised)" if cfg.from_scratch else ""),
            f"- Timesteps t uniform in [{self.lo}, {self.hi}] of {self.bb.num_train_timesteps}",
            f"- {st['step']} steps, batch {cfg.batch_size} x {self.world} x {cfg.grad_accum}, "
            f"lr {cfg.lr:g}, EMA {cfg.ema_decay:g}, {cfg.resolution}px, {len(self.data)} images",
            f"- Range loss (EMA weights): {st['first_loss']:.5f} -> {st['last']:.5f}",
            f"- Stopped: {reason}",
            "",
            "## Use",
            "",
            f"`{use}`",
            "",
        ]
        atomic_write_text(self.out / "README.md", "\n".join(card))
        self.log(f"model: {self.out} ({self.kind}); range loss {st['first_loss']:.5f} -> "
                 f"{st['last']:.5f}")  # fmt: skip


#: ``curves.png`` of a run.
CURVES = [
    ("train loss", "loss", {"loss": ("train", "loss")}),
    ("range loss (EMA)", "loss", {"range loss": ("eval", "range_loss")}),
]


def refine_train(cfg: RefineTrainConfig, *, reporter: Reporter | None = None) -> RefineTrainResult:
    """Train (or resume training) a late-step model; see the module docstring."""
    return run_accelerated(lambda: _RangeTraining(cfg, reporter))
