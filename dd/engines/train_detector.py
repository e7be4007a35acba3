"""The detector training engine behind ``dd train-detector`` (seed 000, Sec. 3.2).

Model and loss: the ``segformer`` detector (``SegformerDetector``), trained through
``detector.logits`` so that preprocessing (resize to the input size, ImageNet normalisation)
is the one used at inference. Loss (seed 000, Eq. 1): the logits are upsampled bilinearly
(``align_corners=False``) to the training crop, passed through a sigmoid and compared with the
target map by MSE; each sample's MSE is multiplied by its manifest ``weight`` and the batch
mean is taken. AdamW (no weight decay on biases and norms), linear warmup then cosine decay,
gradient accumulation, gradient clipping, mixed precision through ``accelerate``.

Data: datasets are concatenated; a held-out validation split is drawn with the seed (or given
with ``val``). Training samples get a random resized crop and flip (``dd.data.augment``); pseudo
labels (``source == "pseudo"``) get the strong augmentation; samples with a manifest
``shrink_pad`` field, or flagged by the on-the-fly check, get shrink-and-pad. The epoch order
comes from :class:`dd.data.sampler.EpochSampler` (class balance optional), a pure function of
``(seed, epoch)``.

On-the-fly shrink-and-pad (``shrink_threshold``): every ``shrink_every`` optimizer steps
(starting at step 0) the current model predicts every training sample at its input size, no
augmentation; samples whose maximum confidence is below the threshold are flagged and get
shrink-and-pad with a scale drawn from ``shrink_scale`` (with probability ``shrink_prob``)
until the next check. Each check costs one inference pass over the training set, split
across processes. Flags are part of the checkpoint.

Run folder::

    RUN/model/                 best (else last) weights: config.json + model.safetensors
    RUN/checkpoints/last/      model/, state.pt (optimizer, GradScaler), rng_rank*.pt,
                               trainer.json (step, epoch position, scheduler, best, ...)
    RUN/checkpoints/best/      model/ + best.json
    RUN/metrics.jsonl          one line per log step ("train") and validation ("val")
    RUN/balance.json           per-category balance, before training
    RUN/train_config.json      the resolved configuration
    RUN/curves.png, README.md  loss/validation plot and model card

Checkpoints are written to a temporary folder and renamed into place. ``torch.load`` is only
ever called with ``weights_only=True``. ``resume`` continues from ``checkpoints/last`` with
the same results as an uninterrupted run: weights, optimizer, scheduler, scaler, all RNG
states (per process) and the position in the epoch are restored, and every sample's
augmentation draws from a generator seeded by its position in the epoch order.

Several processes (``accelerate launch``): the model is wrapped in DDP, each process gets
its own batches of every global batch; validation metrics are gathered from all processes.
Only the main process writes files (except its own RNG state, which each process writes).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dd.data.augment import AugmentConfig, ShrinkSpec, parse_shrink_spec, to_tensor, train_pair
from dd.data.datasets import Sample, load_mask, read_dataset
from dd.data.images import load_image
from dd.data.sampler import (
    EpochSampler,
    balance_table,
    balance_weights,
    parse_balance,
    rows_to_json,
)
from dd.errors import DDError, UsageError
from dd.metrics import METRIC_KEYS
from dd.runtime.checkpoint import (
    check_same_settings,
    commit_checkpoint,
    load_optimizer_state,
    open_checkpoint,
    prepare_run_folder,
    read_trainer_state,
    save_optimizer_state,
    write_trainer_state,
)
from dd.runtime.checkpoint import swap_in as _swap_in
from dd.runtime.io import (
    Journal,
    absolutize,
    atomic_write_json,
    atomic_write_text,
    mark_run_folder,
)
from dd.runtime.progress import progress_bar
from dd.runtime.tracking import RunTracker, check_report_to
from dd.training.schedule import lr_schedule
from dd.training.setup import PRECISIONS, RESUMABLE

__all__ = [
    "HIGHER_IS_BETTER",
    "LOWER_IS_BETTER",
    "TrainConfig",
    "TrainResult",
    "detector_loss",
    "is_better",
    "plot_curves",
    "train_detector",
]

#: Validation metrics where larger is better; every other selectable metric is lower-better.
HIGHER_IS_BETTER = frozenset({"cc", "iou", "f1", "pixel_auroc", "image_auroc"})
LOWER_IS_BETTER = frozenset({"mse", "mse_clean", "kl_fn", "kl_fp"})
# Config fields a resumed run may change: they do not affect the results.
_RESUMABLE_CHANGES = RESUMABLE | {"workers"}


@dataclass
class TrainConfig:
    """Everything ``dd train-detector`` takes (see its ``--help`` for each field)."""

    datasets: list[str]
    out: str
    #: A detector plugin that implements ``dd.detectors.TrainableDetector``.
    detector: str = "segformer"
    detector_options: dict[str, Any] = field(default_factory=dict)
    val: list[str] = field(default_factory=list)
    val_fraction: float | None = None
    init: str | None = None
    variant: str | None = None
    input_size: int | None = None
    size: int | None = None
    steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 6e-5
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int | None = None
    min_lr_ratio: float = 0.0
    clip_grad: float = 1.0
    #: ``mse`` (seed 000, Eq. 1) or ``bce`` (binary cross-entropy on the same maps).
    loss: str = "mse"
    #: BCE only: weight of the artifact (positive) term, see :func:`detector_loss`.
    pos_weight: float = 1.0
    precision: str = "fp32"
    cpu: bool = False
    workers: int = 2
    seed: int = 0
    balance: str | None = None
    crop_scale: float = 0.5
    hflip: bool = True
    #: Grow training targets by this many pixels (a max filter at the training size) before
    #: the loss; validation always compares with the exact masks. See :func:`dilate_targets`.
    mask_dilate: int = 0
    strong_pseudo: bool = True
    shrink_prob: float = 0.5
    shrink_fill: str = "0"
    shrink_threshold: float | None = None
    shrink_every: int = 500
    shrink_scale: tuple[float, float] = (0.3, 0.7)
    val_every: int = 500
    val_batch_size: int = 8
    select_metric: str = "mse"
    patience: int | None = None
    save_every: int = 500
    log_every: int = 10
    stop_at: int | None = None
    resume: bool = False
    overwrite: bool = False
    report_to: str = "none"

    def resolved(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"], d["shrink_scale"] = list(self.betas), list(self.shrink_scale)
        return d


@dataclass
class TrainResult:
    out: Path
    step: int
    best: dict[str, Any] | None
    last_val: dict[str, Any] | None
    stopped_early: bool
    model_dir: Path
    #: True on the process that wrote the outputs (the only one with a console).
    main: bool = True


# ------------------------------------------------------------------------------------------------
# Pieces with no state
# ------------------------------------------------------------------------------------------------
LOSSES = ("mse", "bce")


def detector_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    kind: str = "mse",
    pos_weight: float = 1.0,
) -> torch.Tensor:
    """Seed 000, Eq. 1: MSE of ``sigmoid(upsample(logits))`` and ``target`` (``B x 1 x H x
    W``), per sample, times ``weight`` (``B``), averaged over the batch. In float32.

    ``kind="bce"``: binary cross-entropy on the same soft maps instead. MSE through a
    sigmoid has a vanishing gradient at saturated pixels (``2 (p - g) p (1 - p)``); from
    scratch on sparse artifacts it can stall at all-zero maps, where BCE keeps pulling.
    ``pos_weight`` (BCE only) weighs the artifact term ``g log p`` against the clean one,
    as ``binary_cross_entropy_with_logits(pos_weight=...)``: with artifacts covering a few
    percent of the pixels, a weight above 1 lifts confident detections over 0.5 sooner.
    """
    size = tuple(target.shape[-2:])
    logits = logits.float()
    if tuple(logits.shape[-2:]) != size:
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    if kind == "bce":
        pw = None if pos_weight == 1.0 else torch.tensor(pos_weight, device=logits.device)
        per_pixel = F.binary_cross_entropy_with_logits(
            logits, target.float(), reduction="none", pos_weight=pw
        )
        per_sample = per_pixel.mean(dim=(1, 2, 3))
    else:
        per_sample = (torch.sigmoid(logits) - target.float()).square().mean(dim=(1, 2, 3))
    if weight is not None:
        per_sample = per_sample * weight.to(per_sample)
    return per_sample.mean()


def dilate_targets(target: torch.Tensor, pixels: int) -> torch.Tensor:
    """``target`` (``B x 1 x H x W``) grown by ``pixels`` in every direction (a square max
    filter). Thin masks (text strokes of a watermark) are finer than SegFormer's 1/4-scale
    output can draw; region-level targets, like the painted maps of seed 000, train faster."""
    if pixels <= 0:
        return target
    return F.max_pool2d(target, kernel_size=2 * pixels + 1, stride=1, padding=pixels)


def is_better(metric: str, value: float | None, best: float | None) -> bool:
    """Whether validation ``metric`` = ``value`` beats ``best`` (None: nothing yet); NaN and
    None never do."""
    if value is None or math.isnan(value):
        return False
    if best is None:
        return True
    return value > best if metric in HIGHER_IS_BETTER else value < best


class _LogitsModule(torch.nn.Module):
    """``forward`` = ``detector.logits``, so DDP and autocast wrap the training path."""

    def __init__(self, detector: torch.nn.Module):
        super().__init__()
        self.detector = detector

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.detector.logits(images)


class _TrainSet(torch.utils.data.Dataset):
    """Training samples; an item key is ``(index, augmentation seed)`` from EpochSampler."""

    def __init__(self, samples: list[Sample], aug: AugmentConfig, strong_pseudo: bool):
        self.samples = samples
        self.aug = aug
        self.strong_pseudo = strong_pseudo
        self.manifest_shrink = [parse_shrink_spec(s.meta.get("shrink_pad")) for s in samples]
        self.dynamic: dict[int, ShrinkSpec] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        i, seed = key
        s = self.samples[i]
        try:
            image = to_tensor(load_image(s.image))
            h, w = image.shape[-2:]
            target = torch.from_numpy(load_mask(s.mask, (h, w)))[None]
        except DDError as e:  # reported by the main process as one line
            return {"error": str(e), "index": i}
        gen = torch.Generator()
        gen.manual_seed(seed)
        shrink = self.manifest_shrink[i] or self.dynamic.get(i)
        strong = self.strong_pseudo and s.source == "pseudo"
        x, y = train_pair(image, target, gen, self.aug, strong=strong, shrink=shrink)
        return {"image": x, "target": y, "weight": float(s.weight), "index": i, "error": ""}


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    errors = [it["error"] for it in items if it.get("error")]
    if errors:
        return {"error": errors[0]}
    return {
        "image": torch.stack([it["image"] for it in items]),
        "target": torch.stack([it["target"] for it in items]),
        "weight": torch.tensor([it["weight"] for it in items], dtype=torch.float32),
        "index": torch.tensor([it["index"] for it in items]),
        "error": "",
    }


def _split(samples: list[Sample], fraction: float, seed: int) -> tuple[list, list]:
    n = len(samples)
    if fraction <= 0:
        return samples, []
    if n < 2:
        raise DDError(
            f"cannot hold out a validation split from {n} sample(s)",
            hint="add samples, pass --val DATASET, or --val-fraction 0",
        )
    n_val = min(n - 1, max(1, round(n * fraction)))
    perm = np.random.default_rng([seed, 0x5A1]).permutation(n)
    val_idx = set(perm[:n_val].tolist())
    train = [s for i, s in enumerate(samples) if i not in val_idx]
    val = [s for i, s in enumerate(samples) if i in val_idx]
    return train, val


def _read_all(paths: list[str]) -> list[Sample]:
    out: list[Sample] = []
    for p in paths:
        out.extend(read_dataset(p))
    return out


# ------------------------------------------------------------------------------------------------
# RNG and checkpoint files
# ------------------------------------------------------------------------------------------------
@dataclass
class _ShrinkItem:
    """A training sample loaded for the shrink-and-pad check (``dd.inference.Loaded``)."""

    index: int
    tensor: torch.Tensor
    size: tuple[int, int]
    error: str | None = None


def _save_model(detector: Any, folder: Path) -> None:
    """``detector.save_pretrained(folder)`` without transformers' progress bar."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        detector.save_pretrained(folder)
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


# ------------------------------------------------------------------------------------------------
# The trainer
# ------------------------------------------------------------------------------------------------
class _Trainer:
    def __init__(self, cfg: TrainConfig, console: Any | None):
        self.cfg = absolutize(cfg)  # records name inputs by absolute path
        self.out = Path(cfg.out)
        self._check_config()
        self.acc = self._accelerator()
        self.main = self.acc.is_main_process
        self.console = console if self.main else None
        self.rank, self.world = self.acc.process_index, self.acc.num_processes

    # -- setup ---------------------------------------------------------------------------------
    def _check_config(self) -> None:
        check_report_to(self.cfg.report_to)
        c = self.cfg
        if not c.datasets:
            raise DDError("no training dataset given", hint="dd train-detector DATASET --out RUN")
        if c.precision not in PRECISIONS:
            raise UsageError(f"unknown precision {c.precision!r}", hint="use fp32, bf16 or fp16")
        if c.loss not in LOSSES:
            raise UsageError(f"unknown --loss {c.loss!r}", hint="use mse (the paper's) or bce")
        if c.select_metric not in HIGHER_IS_BETTER | LOWER_IS_BETTER:
            names = ", ".join(sorted(HIGHER_IS_BETTER | LOWER_IS_BETTER))
            raise UsageError(f"unknown --select-metric {c.select_metric!r}", hint=f"one of {names}")
        checks = [
            (c.steps >= 1, "--steps must be at least 1"),
            (c.batch_size >= 1, "--batch-size must be at least 1"),
            (c.grad_accum >= 1, "--grad-accum must be at least 1"),
            (c.lr > 0, "--lr must be above 0"),
            (0.0 < c.crop_scale <= 1.0, "--crop-scale must be in (0, 1]"),
            (c.mask_dilate >= 0, "--mask-dilate must be 0 or more pixels"),
            (c.pos_weight > 0, "--pos-weight must be positive"),
            (c.pos_weight == 1.0 or c.loss == "bce", "--pos-weight needs --loss bce"),
            (0.0 <= c.shrink_prob <= 1.0, "--shrink-pad-prob must be in [0, 1]"),
            (0.0 < c.shrink_scale[0] <= c.shrink_scale[1] <= 1.0, "bad --shrink-pad-scale"),
            (c.val_fraction is None or 0.0 <= c.val_fraction < 1.0, "bad --val-fraction"),
            (min(c.val_every, c.save_every, c.log_every, c.shrink_every) >= 1, "bad interval"),
            (c.patience is None or c.patience >= 1, "--patience must be at least 1"),
            (c.stop_at is None or c.stop_at >= 1, "--stop-at must be at least 1"),
            (0.0 <= c.min_lr_ratio <= 1.0, "--min-lr-ratio must be in [0, 1]"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UsageError(msg)
        if c.val and c.val_fraction is not None:
            raise UsageError(
                "--val and --val-fraction both given",
                hint="validate on --val datasets or on a held-out fraction, not both",
            )
        if c.shrink_fill != "reflect":
            try:
                ok = 0.0 <= float(c.shrink_fill) <= 1.0
            except ValueError:
                ok = False
            if not ok:
                raise UsageError(
                    f"bad --shrink-pad-fill {c.shrink_fill!r}",
                    hint="a value in [0, 1] (0 = black) or 'reflect'",
                )
        on_cpu = c.cpu or not torch.cuda.is_available()
        if c.precision == "fp16" and on_cpu:
            raise DDError(
                "--precision fp16 needs a GPU (CPU autocast supports bf16 only)",
                hint="use --precision bf16 or fp32 on the CPU",
            )

    def _accelerator(self):
        from dd.runtime.device import make_accelerator

        # Gradient accumulation is done by _train_step (no_sync), not by accelerate.
        return make_accelerator(
            "cpu" if self.cfg.cpu else "auto",
            PRECISIONS[self.cfg.precision],
            1,
            hint="check --precision and the accelerate config (accelerate env)",
        )

    def log(self, renderable: Any) -> None:
        if self.console is not None:
            self.console.print(renderable, highlight=False)

    # -- run -----------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        from accelerate.utils import set_seed

        cfg, acc = self.cfg, self.acc
        ckpt_dir = self.out / "checkpoints"

        # data (read before anything is written to --out: bad input leaves no run folder)
        samples = _read_all(cfg.datasets)
        if cfg.val:
            train, val = samples, _read_all(cfg.val)
        else:
            frac = 0.1 if cfg.val_fraction is None else cfg.val_fraction
            train, val = _split(samples, frac, cfg.seed)
        if not train:
            raise DDError("no training samples", hint="check the dataset folders")
        last = self._prepare_out()

        # model
        detector = self._load_detector()
        input_size = tuple(detector.input_size)
        size = (cfg.size, cfg.size) if cfg.size else input_size
        detector.untrained = False
        set_seed(cfg.seed, device_specific=True)

        aug = AugmentConfig(
            size=size,
            crop_scale=(cfg.crop_scale, 1.0),
            hflip=cfg.hflip,
            shrink_prob=cfg.shrink_prob,
            shrink_fill=cfg.shrink_fill if cfg.shrink_fill == "reflect" else float(cfg.shrink_fill),
        )
        dataset = _TrainSet(train, aug, cfg.strong_pseudo)
        ratios = parse_balance(cfg.balance)
        weights, rows = balance_weights(train, ratios)
        global_batch = cfg.batch_size * self.world
        sampler = EpochSampler(
            len(train),
            cfg.seed,
            weights=weights if ratios else None,
            multiple=global_batch,
        )
        if self.main:
            title = f"class balance ({len(train)} training samples, {sampler.length} draws/epoch)"
            self.log(balance_table(rows, sampler.length, title))
            atomic_write_json(
                self.out / "balance.json",
                {
                    "spec": cfg.balance,
                    "train_samples": len(train),
                    "val_samples": len(val),
                    "draws_per_epoch": sampler.length,
                    "categories": rows_to_json(rows),
                },
            )
            self.log(
                f"train {len(train)} samples, validate on {len(val)}; "
                f"{self.world} process(es), global batch {global_batch} x {cfg.grad_accum} "
                f"accumulation, device {acc.device}, precision {cfg.precision}"
            )

        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=cfg.batch_size,
            sampler=sampler,
            drop_last=True,
            num_workers=cfg.workers,
            collate_fn=_collate,
            generator=torch.Generator().manual_seed(cfg.seed),
            persistent_workers=False,
        )

        # optimisation
        decay, no_decay = [], []
        for _name, p in detector.named_parameters():
            (decay if p.ndim >= 2 else no_decay).append(p)
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": cfg.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=cfg.lr,
            betas=tuple(cfg.betas),
        )
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else cfg.steps // 20
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_schedule("cosine", cfg.steps, warmup, cfg.min_lr_ratio)
        )

        state = {
            "step": 0,
            "epoch": 0,
            "position": 0,
            "best": None,
            "best_step": None,
            "bad_evals": 0,
            "window": [0.0, 0, 0.0],  # loss sum, steps, seconds since the last log line
            "dynamic": [],
        }
        if last is not None:
            state = self._load_checkpoint(last, detector, optimizer, scheduler, state)

        wrapped = _LogitsModule(detector)
        wrapped, optimizer, loader, scheduler = acc.prepare(wrapped, optimizer, loader, scheduler)
        if last is not None:
            load_optimizer_state(last, optimizer, acc)
            dataset.dynamic = {i: ShrinkSpec(*cfg.shrink_scale) for i in state["dynamic"]}

        journal = self._open_journal(state["step"]) if self.main else None
        tracker = RunTracker(
            cfg.report_to, self.out, "dd-train-detector", step=state["step"], main=self.main
        )
        if journal is not None:
            journal.on_append = tracker.record
        self.detector, self.wrapped, self.optimizer = detector, wrapped, optimizer
        self.scheduler, self.dataset, self.val = scheduler, dataset, val
        self.sampler, self.loader, self.state, self.journal = sampler, loader, state, journal
        self.ckpt_dir, self.global_batch = ckpt_dir, global_batch
        try:
            with warnings.catch_warnings():
                # DDP warns that depthwise-conv gradients have other (equivalent) strides.
                warnings.filterwarnings("ignore", message="Grad strides do not match bucket view")
                stopped = self._loop()
            result = self._finish(stopped)
        finally:
            if journal is not None:
                journal.close()
            tracker.close()
        acc.wait_for_everyone()
        return result

    def _prepare_out(self) -> Path | None:
        """Checks --out (a resumed run's settings) and writes train_config.json; returns the
        checkpoint to resume from (None: a new run)."""
        cfg = self.cfg
        saved = self.out / "train_config.json"
        files = ("checkpoints", "metrics.jsonl", "model")
        last = prepare_run_folder(
            self.out,
            cfg.resume,
            "training",
            files,
            log=self.log,
            overwrite=cfg.overwrite,
            command="train-detector",
        )
        if last is not None:
            try:
                before = json.loads(saved.read_text())
            except (OSError, ValueError):
                raise DDError(f"{saved} is missing or damaged; cannot resume") from None
            check_same_settings(self.out, saved.name, before, cfg.resolved(), _RESUMABLE_CHANGES)
        if self.main:
            mark_run_folder(self.out, "train-detector")
            atomic_write_json(saved, cfg.resolved())
        self.acc.wait_for_everyone()
        return last

    def _open_journal(self, step: int) -> Journal:
        path = self.out / "metrics.jsonl"
        journal = Journal(path, fresh=not self.cfg.resume)
        # Keep what the checkpoint's step had logged; a shrink-pad check at that step ran
        # after the checkpoint and runs again.
        keep = [
            r
            for r in journal.records
            if r.get("step", 0) < step or (r.get("step") == step and r["type"] != "shrink_pad")
        ]
        if len(keep) != len(journal.records):  # lines logged after the checkpoint
            journal.close()
            atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in keep))
            journal = Journal(path)
        return journal

    def _load_detector(self) -> Any:
        """The ``--detector`` plugin, built to be trained (see ``TrainableDetector``)."""
        from dd.detectors import TrainableDetector
        from dd.plugin_options import declared_options
        from dd.plugins import get_host, load_detector

        cfg = self.cfg
        cls = get_host().detectors.get(cfg.detector)
        declared, _ = declared_options(cls.load)
        options: dict[str, Any] = dict(cfg.detector_options)
        if cfg.init is None:
            options = {**dict(getattr(cls, "default_train_options", {})), **options}
        if cfg.variant is not None:
            options["variant"] = cfg.variant
        if cfg.input_size is not None:
            options["input_size"] = cfg.input_size
        if "seed" in declared:
            options.setdefault("seed", cfg.seed)
        detector = load_detector(cfg.detector, cfg.init, options, "cpu", "fp32")
        # A threshold calibrated for the --init weights does not hold for the trained ones.
        detector.image_threshold = None
        if not isinstance(detector, TrainableDetector):
            raise DDError(
                f"detector {cfg.detector!r} cannot be trained by dd train-detector",
                hint="it needs input_size, save_pretrained, load_pretrained_weights and "
                "default_train_options (dd.detectors.TrainableDetector)",
            )
        return detector

    def _load_checkpoint(self, last: Path, detector, optimizer, scheduler, state) -> dict:
        trainer = read_trainer_state(last, self.world)
        detector.load_pretrained_weights(last / "model")
        scheduler.load_state_dict(trainer["scheduler"])
        self.log(f"resuming at step {trainer['state']['step']} from {last}")
        return {**state, **trainer["state"]}

    # -- the loop ------------------------------------------------------------------------------
    def _batches(self) -> Iterator[dict[str, Any]]:
        """Micro-batches forever, advancing ``state["epoch"]/["position"]``; restarts its
        iterator from the saved position whenever ``self._restart`` is set."""
        st = self.state
        it = None
        while True:
            if it is None or self._restart:
                self._restart = False
                self.sampler.epoch, self.sampler.start = st["epoch"], st["position"]
                it = iter(self.loader)
            try:
                batch = next(it)
            except StopIteration:
                st["epoch"], st["position"] = st["epoch"] + 1, 0
                it = None
                continue
            st["position"] += self.global_batch
            if batch["error"]:
                raise DDError(f"cannot load a training sample: {batch['error']}")
            yield batch

    def _loop(self) -> bool:
        cfg, st = self.cfg, self.state
        stop_at = min(cfg.steps, cfg.stop_at or cfg.steps)
        self._restart = False
        batches = self._batches()
        progress = progress_bar("train", "loss {task.fields[loss]}", console=self.console)
        stopped_early = False
        with progress if progress is not None else contextlib.nullcontext():
            task = None
            if progress is not None:
                task = progress.add_task("train", total=cfg.steps, completed=st["step"], loss="")
            while st["step"] < stop_at:
                if cfg.shrink_threshold is not None and st["step"] % cfg.shrink_every == 0:
                    self._refresh_shrink()
                t0 = time.perf_counter()
                loss, grad_norm = self._train_step(batches)
                st["step"] += 1
                w = st["window"]
                w[0], w[1], w[2] = w[0] + loss, w[1] + 1, w[2] + time.perf_counter() - t0
                step = st["step"]
                if progress is not None:
                    progress.update(task, completed=step, loss=f"{loss:.4f}")
                # Not at --stop-at: the metrics lines of a stopped and resumed run must be
                # those of an uninterrupted one (the loss window is in the checkpoint).
                if step % cfg.log_every == 0 or step == cfg.steps:
                    self._log_train(grad_norm)
                if self.val and (step % cfg.val_every == 0 or step == cfg.steps):
                    stopped_early = self._validate()
                if step % cfg.save_every == 0 or step == stop_at or stopped_early:
                    self._save_checkpoint()
                if stopped_early:
                    self.log(
                        f"early stop at step {step}: {cfg.select_metric} did not improve in "
                        f"{cfg.patience} evaluations"
                    )
                    break
        return stopped_early

    def _train_step(self, batches: Iterator[dict[str, Any]]) -> tuple[float, float | None]:
        cfg, acc = self.cfg, self.acc
        self.wrapped.train()
        total = torch.zeros((), device=acc.device)
        for micro in range(cfg.grad_accum):
            batch = next(batches)
            sync = micro == cfg.grad_accum - 1
            with contextlib.nullcontext() if sync else acc.no_sync(self.wrapped):
                logits = self.wrapped(batch["image"])
                target = dilate_targets(batch["target"], cfg.mask_dilate)
                loss = detector_loss(
                    logits, target, batch["weight"], cfg.loss, pos_weight=cfg.pos_weight
                )
                acc.backward(loss / cfg.grad_accum)
            total += loss.detach() / cfg.grad_accum
        grad_norm = None
        if cfg.clip_grad > 0:
            grad_norm = float(acc.clip_grad_norm_(self.wrapped.parameters(), cfg.clip_grad))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(acc.reduce(total, reduction="mean")), grad_norm

    def _log_train(self, grad_norm: float | None) -> None:
        st = self.state
        loss_sum, n, seconds = st["window"]
        st["window"] = [0.0, 0, 0.0]
        if self.journal is None or n == 0:
            return
        self.journal.append(
            {
                "type": "train",
                "step": st["step"],
                "epoch": st["epoch"],
                "loss": loss_sum / n,
                "lr": self.scheduler.get_last_lr()[0],
                "grad_norm": grad_norm,
                "step_time_s": seconds / n,
            }
        )

    # -- validation ------------------------------------------------------------------------------
    def _validate(self) -> bool:
        """Evaluate on the held-out split (all processes); returns True to stop early."""
        from accelerate.utils import gather_object

        from dd.metrics import DetectorMetrics, evaluate_detector, json_safe

        cfg, st = self.cfg, self.state
        metrics = DetectorMetrics()
        with self.acc.autocast():
            evaluate_detector(
                self.detector,
                self.val[self.rank :: self.world],
                cfg.val_batch_size,
                workers=max(1, cfg.workers),
                metrics=metrics,
            )
        result = DetectorMetrics.from_states(gather_object([metrics.state()])).compute()
        value = result[cfg.select_metric]
        improved = is_better(cfg.select_metric, value, st["best"])
        if improved:
            st["best"], st["best_step"], st["bad_evals"] = value, st["step"], 0
            self._save_best(result)
        else:
            st["bad_evals"] += 1
        self._last_val = result
        if self.journal is not None:
            self.journal.append(
                {"type": "val", "step": st["step"], "epoch": st["epoch"], "best": improved}
                | json_safe(result)
            )
        shown = f"{value:.5f}" if value is not None and not math.isnan(value) else "n/a"
        self.log(
            f"step {st['step']}: val {cfg.select_metric} {shown}"
            + (" (best)" if improved else f" (best: step {st['best_step'] or '-'})")
        )
        return cfg.patience is not None and st["bad_evals"] >= cfg.patience

    def _save_best(self, result: dict[str, Any]) -> None:
        from dd.metrics import json_safe

        self.acc.wait_for_everyone()
        if self.main:
            tmp = self.ckpt_dir / ".best.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            _save_model(self.detector, tmp / "model")
            atomic_write_json(
                tmp / "best.json",
                {"step": self.state["step"], "metric": self.cfg.select_metric}
                | {"metrics": json_safe(result)},
            )
            _swap_in(tmp, self.ckpt_dir / "best")
        self.acc.wait_for_everyone()

    def _refresh_shrink(self) -> None:
        """On-the-fly shrink-and-pad: flag training samples whose predicted max confidence
        (current model, no augmentation, in batches of ``val_batch_size``) is below the
        threshold."""
        from accelerate.utils import gather_object

        from dd.inference import detect_batches, resize_for

        cfg, det = self.cfg, self.detector
        samples = self.dataset.samples
        mine = list(range(self.rank, len(samples), self.world))

        def load(i: int) -> _ShrinkItem:
            img = load_image(samples[i].image)
            return _ShrinkItem(i, resize_for(det, img), (int(img.shape[0]), int(img.shape[1])))

        maxima: list[tuple[int, float]] = []
        try:
            with self.acc.autocast():
                results = detect_batches(
                    det, mine, load, batch_size=cfg.val_batch_size, workers=cfg.workers
                )
                maxima = [(item.index, float(prob.max())) for item, prob in results]
        except DDError as e:
            raise DDError(f"shrink-pad check: {e}") from None
        flagged = sorted(i for i, m in gather_object(maxima) if m < cfg.shrink_threshold)
        self.dataset.dynamic = {i: ShrinkSpec(*cfg.shrink_scale) for i in flagged}
        self.state["dynamic"] = flagged
        self._restart = True  # new loader workers see the new flags
        if self.journal is not None:
            self.journal.append(
                {"type": "shrink_pad", "step": self.state["step"], "flagged": len(flagged)}
            )

    # -- checkpoints -----------------------------------------------------------------------------
    def _save_checkpoint(self) -> None:
        acc, step = self.acc, self.state["step"]
        tmp = open_checkpoint(acc, self.ckpt_dir, step)
        if self.main:
            _save_model(self.detector, tmp / "model")
            save_optimizer_state(tmp, self.optimizer, acc)
            write_trainer_state(tmp, self.state, self.scheduler, self.world)
        acc.wait_for_everyone()
        if self.main:
            commit_checkpoint(tmp, self.ckpt_dir, step, keep_step=False)
        acc.wait_for_everyone()

    # -- outputs ---------------------------------------------------------------------------------
    def _finish(self, stopped_early: bool) -> TrainResult:
        cfg, st = self.cfg, self.state
        model_dir = self.out / "model"
        best = None
        best_json = self.ckpt_dir / "best" / "best.json"
        if st["best_step"] is not None and best_json.is_file():
            best = json.loads(best_json.read_text())
            if best.get("step") != st["best_step"]:  # written after the checkpoint resumed
                self.log("[yellow]the best checkpoint is not this run's best; using last[/yellow]")
                best = None
        source = self.ckpt_dir / ("best" if best else "last") / "model"
        if self.main:
            tmp = self.out / ".model.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(source, tmp)
            _swap_in(tmp, model_dir)
            records = list(self.journal.records) if self.journal is not None else []
            plot_curves(records, self.out / "curves.png", cfg.select_metric)
            atomic_write_text(self.out / "README.md", self._model_card(best, stopped_early))
            self.log(f"model: {model_dir} (step {best['step'] if best else st['step']})")
        return TrainResult(
            out=self.out,
            step=st["step"],
            best=best,
            last_val=getattr(self, "_last_val", None),
            stopped_early=stopped_early,
            model_dir=model_dir,
            main=self.main,
        )

    def _model_card(self, best: dict[str, Any] | None, stopped_early: bool) -> str:
        cfg, st, det = self.cfg, self.state, self.detector
        n_train, n_val = len(self.dataset), len(self.val)
        sources: dict[str, int] = {}
        for s in self.dataset.samples:
            sources[s.source] = sources.get(s.source, 0) + 1
        lines = [
            f"# {cfg.detector} artifact detector (trained with `dd train-detector`)",
            "",
            "Predicts a per-pixel artifact confidence map (0-1) for an RGB image, as "
            "DiffDoctor's detector does (seed 000, Sec. 3.2).",
            "",
            "## Model",
            f"- Detector: {cfg.detector}"
            + (f", variant {det.variant}" if getattr(det, "variant", None) else "")
            + f", input size {det.input_size[0]}x{det.input_size[1]}",
            f"- Initialised from: {cfg.init or 'random init (from scratch)'}",
            f"- Weights here: step {best['step'] if best else st['step']} "
            + (f"(best validation {cfg.select_metric})" if best else "(last step)"),
            "",
            "## Data",
            f"- Training datasets: {', '.join(cfg.datasets)}",
            f"- {n_train} training samples ("
            + ", ".join(f"{k}: {v}" for k, v in sorted(sources.items()))
            + f"), {n_val} validation samples"
            + (f" ({', '.join(cfg.val)})" if cfg.val else f" (held out, seed {cfg.seed})"),
            f"- Class balance: {cfg.balance or 'natural'} (see balance.json)",
            "",
            "## Training",
            f"- {st['step']} of {cfg.steps} optimizer steps"
            + (" (early stop)" if stopped_early else "")
            + f", batch {cfg.batch_size} x {self.world} process(es) x {cfg.grad_accum} "
            f"accumulation, crop {self.dataset.aug.size[0]}x{self.dataset.aug.size[1]}",
            f"- AdamW lr {cfg.lr:g}, weight decay {cfg.weight_decay:g}, warmup + cosine, "
            f"precision {cfg.precision}, seed {cfg.seed}",
            "- Loss: MSE between sigmoid(upsampled logits) and the target map",
            "",
            "## Validation metrics",
        ]
        vals = [r for r in self.journal.records if r.get("type") == "val"] if self.journal else []
        if best:
            m = best["metrics"]
            lines.append(f"Best {cfg.select_metric}, at step {best['step']}:")
        elif vals:
            m = vals[-1]
            lines.append(
                f"Last validation, at step {m['step']} ({cfg.select_metric} was never defined "
                "on the validation set, so no best step was chosen):"
            )
        else:
            m = None
            lines.append("No validation was run.")
        if m is not None:
            lines += [
                "",
                "| metric | value |",
                "| --- | --- |",
                *(
                    f"| {k} | {m[k]:.5f} |" if isinstance(m.get(k), float) else f"| {k} | - |"
                    for k in METRIC_KEYS
                ),
                "",
                f"Images: {m.get('n_images')}, clean: {m.get('n_clean')}, "
                f"positive: {m.get('n_positive')}.",
            ]
        input_opt = (
            f"--detector {cfg.detector} -O input_size={det.input_size[0]}x{det.input_size[1]}"
        )
        lines += [
            "",
            "## Use",
            f"`dd detect IMAGES --weights {self.out / 'model'} {input_opt}`",
            "",
            "## Intended use and limits",
            "- Finds the kinds of artifacts present in the training data, on images like it; "
            "it says nothing reliable about other artifact types or image domains.",
            "- Validation numbers come from the held-out split above, which shares the "
            "training data's distribution: expect lower numbers on other data.",
            "- A confidence map is a hint for review or for DiffDoctor-style tuning, not a "
            "verdict on an image.",
            "",
        ]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Plot (Pillow only: no plotting dependency)
# ------------------------------------------------------------------------------------------------
def plot_curves(records: list[dict[str, Any]], path: Path, metric: str = "mse") -> None:
    """Draw training loss and validation ``metric`` (and ``mse``) against steps as a PNG."""
    from dd.report.plot import Panel, plot_panels

    train = [(r["step"], r["loss"]) for r in records if r.get("type") == "train"]
    blue = {"loss": (31, 119, 180)}
    panels = [Panel("train loss", "step", "loss", {"loss": train}, colours=blue)]
    val: dict[str, list[tuple[float, float]]] = {}
    colours: dict[str, tuple[int, int, int]] = {}
    for name, colour in ((metric, (214, 39, 40)), ("mse", (44, 160, 44))):
        pts = [(r["step"], r[name]) for r in records if r.get("type") == "val" and r.get(name)]
        if pts and f"val {name}" not in val:
            val[f"val {name}"], colours[f"val {name}"] = pts, colour
    if val:
        panels.append(Panel("validation", "step", metric, val, colours=colours))
    plot_panels(panels, path, size=(480, 300))


def train_detector(cfg: TrainConfig, *, console: Any | None = None) -> TrainResult:
    """Train (or resume training) a SegFormer artifact detector; see the module docstring.

    ``console`` (a rich Console) receives the balance table, progress bar and messages on the
    main process; None trains silently.
    """
    from accelerate.state import AcceleratorState, GradientState

    # accelerate keeps its settings (precision, device) in process-wide singletons that
    # refuse to change once set. A single-process run starts from fresh ones and clears them
    # afterwards, so runs with other settings can follow in the same process (tests,
    # notebooks). Under a multi-process launch they stay (they hold the process group).
    single = int(os.environ.get("WORLD_SIZE", "1")) <= 1
    if single:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    from dd.runtime.io import undo_if_nothing_written

    try:
        # A run that fails before its first checkpoint or metric (a detector that does not
        # load, data too small for a batch) leaves no folder to block the corrected rerun.
        with undo_if_nothing_written(cfg.out, bookkeeping=("train_config.json",)):
            return _Trainer(cfg, console).run()
    finally:
        if single:
            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()
