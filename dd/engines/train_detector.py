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

import json
import math
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import dd.training.settings as shared
from dd.data.augment import AugmentConfig, ShrinkSpec, parse_shrink_spec, to_tensor, train_pair
from dd.data.datasets import Sample, load_mask, read_dataset
from dd.data.images import load_image
from dd.data.sampler import (
    EpochSampler,
    balance_table,
    balance_weights,
    epoch_loader,
    parse_balance,
    rows_to_json,
)
from dd.errors import DDError, UsageError
from dd.inference.metrics import METRIC_KEYS
from dd.runtime.checkpoint import check_same_settings, prepare_run_folder, swap_in
from dd.runtime.config import setting
from dd.runtime.device import run_accelerated
from dd.runtime.io import absolutize, atomic_write_json, atomic_write_text, mark_run_folder
from dd.runtime.progress import QUIET, Reporter, as_reporter
from dd.runtime.tracking import check_report_to
from dd.training import loop
from dd.training.outputs import plot_curves as write_curves
from dd.training.setup import PRECISIONS, RESUMABLE, training_accelerator

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
#: What a run saved before a setting existed did: its check flagged every sample.
_OLDER_DEFAULTS = {"shrink_scope": "all"}


@dataclass
class TrainConfig:
    """Everything ``dd train-detector`` takes: each field declared once (its default, help
    and flag), the source of the command's options (``dd.cli.options.config_command``)."""

    datasets: list[str] = setting(
        help="Dataset folders or shards (images/, masks/, manifest.jsonl).", cli=False
    )
    out: str = setting(help="Run folder for all outputs.", flags=("--out", "-o"))
    #: A detector plugin that implements ``dd.api.detectors.TrainableDetector``.
    detector: str = setting(
        "segformer", help="Detector plugin to train (one that implements TrainableDetector)."
    )
    detector_options: dict[str, Any] = shared.detector_options()
    val: list[str] = setting(
        factory=list,
        help="Validation dataset (repeatable); default: hold out --val-fraction.",
    )
    val_fraction: float | None = setting(
        None, help="Fraction of the data held out for validation (default 0.1)."
    )
    init: str | None = setting(
        None, help="Start from these weights: a file, a save_pretrained folder, hub id."
    )
    variant: str | None = setting(
        None,
        help="SegFormer variant: tiny, small or b0..b5 (b5: DiffDoctor's released detector); "
        "from scratch the default is b0, with --init the file's.",
    )
    input_size: int | None = setting(None, help="Detector input size (default 512).")
    size: int | None = setting(
        None, help="Training crop size; the loss is computed at it (default: input size)."
    )
    steps: int = shared.train_steps(1000)
    batch_size: int = setting(8, help="Samples per process per batch.", min=1)
    grad_accum: int = shared.grad_accum("Batches accumulated per optimizer step.")
    lr: float = shared.lr(6e-5, "Peak learning rate (AdamW).")
    weight_decay: float = shared.weight_decay(0.01)
    betas: tuple[float, float] = setting((0.9, 0.999), help="AdamW betas B1,B2.", text="pair")
    warmup_steps: int | None = shared.warmup_steps(
        None, "Linear warmup steps (default: 5% of --steps)."
    )
    min_lr_ratio: float = setting(
        0.0, help="Final learning rate of the cosine, as a fraction of --lr."
    )
    clip_grad: float = shared.clip_grad()
    #: ``mse`` (seed 000, Eq. 1) or ``bce`` (binary cross-entropy on the same maps).
    loss: str = setting(
        "mse", help="mse (seed 000, Eq. 1) or bce (stronger gradient from scratch)."
    )
    #: BCE only: weight of the artifact (positive) term, see :func:`detector_loss`.
    pos_weight: float = setting(
        1.0,
        help="BCE weight of artifact pixels against clean ones (sparse masks: 2-10 lifts "
        "detections over 0.5 sooner).",
    )
    precision: str = setting(
        "fp32", help="fp32, bf16 (GPU or CPU) or fp16 (GPU, with loss scaling)."
    )
    cpu: bool = setting(False, help="Train on the CPU even with a GPU.", flags=("--cpu",))
    workers: int = setting(2, help="Data loader worker processes.", min=0)
    seed: int = setting(0, help="Seed of everything (split, order, init).")
    balance: str | None = setting(
        None,
        help='Positive:negative draws per category, e.g. "hand=1:1,face=1:2,*=1:1" '
        "(negatives without a category, e.g. real photos, are shared).",
    )
    crop_scale: float = setting(0.5, help="Smallest random crop, as a fraction of the image area.")
    hflip: bool = setting(True, help="Random horizontal flips.")
    #: Grow training targets by this many pixels (a max filter at the training size) before
    #: the loss; validation always compares with the exact masks. See :func:`dilate_targets`.
    mask_dilate: int = setting(
        0,
        help="Grow training targets by this many pixels at the training size (thin masks, "
        "e.g. watermark strokes, train faster as regions); validation uses exact masks.",
    )
    strong_pseudo: bool = setting(True, help="Strong augmentation for pseudo-labelled samples.")
    shrink_prob: float = setting(
        0.5,
        help="Probability of shrink-and-pad for a flagged sample.",
        flags=("--shrink-pad-prob",),
    )
    shrink_fill: str = setting(
        "0",
        help="Image padding of shrink-and-pad: a value in [0, 1] or 'reflect'.",
        flags=("--shrink-pad-fill",),
    )
    shrink_threshold: float | None = setting(
        None,
        help="Flag samples whose predicted max confidence is below this, checked on the fly "
        "every --shrink-pad-every steps (manifest shrink_pad fields apply always).",
        flags=("--shrink-pad-threshold",),
    )
    shrink_every: int = setting(
        500,
        help="Steps between on-the-fly shrink-pad checks.",
        flags=("--shrink-pad-every",),
        min=1,
    )
    #: Which samples the on-the-fly check may flag: ``pseudo`` (the paper: pseudo labels
    #: whose predicted max confidence is low) or ``all`` (human labels and photos too).
    shrink_scope: str = setting(
        "pseudo",
        help="Samples the on-the-fly check may flag: pseudo (pseudo labels, as the paper) or "
        "all (human labels and real photos too).",
        flags=("--shrink-pad-scope",),
    )
    shrink_scale: tuple[float, float] = setting(
        (0.3, 0.7),
        help="Scale range LO,HI of on-the-fly shrink-and-pad.",
        flags=("--shrink-pad-scale",),
        text="pair",
    )
    val_every: int = setting(500, help="Validate every N steps.", min=1)
    val_batch_size: int = setting(8, help="Validation batch size.", min=1)
    select_metric: str = setting(
        "mse",
        help="Validation metric choosing the best model: mse, mse_clean, kl_fn, kl_fp (lower "
        "is better), cc, iou, f1, pixel_auroc, image_auroc (higher is better).",
    )
    patience: int | None = setting(
        None, help="Stop after this many validations without improvement.", min=1
    )
    save_every: int = shared.save_every(500)
    log_every: int = shared.log_every(10)
    stop_at: int | None = shared.stop_at()
    resume: bool = shared.resume()
    overwrite: bool = shared.overwrite()
    report_to: str = shared.report_to()

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
def _check_train_config(c: TrainConfig) -> None:
    """Refuses bad settings before anything loads (usage errors exit 2)."""
    check_report_to(c.report_to)
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
        (c.shrink_scope in ("pseudo", "all"), "--shrink-pad-scope must be pseudo or all"),
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


def _load_detector(cfg: TrainConfig) -> Any:
    """The ``--detector`` plugin, built to be trained (see ``TrainableDetector``)."""
    from dd.api.detectors import TrainableDetector
    from dd.api.plugin_options import declared_options
    from dd.api.plugins import get_host, load_detector

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
            "default_train_options (dd.api.detectors.TrainableDetector)",
        )
    return detector


class _TrainData:
    """train-detector's training data: the augmented dataset, class balance over an epoch
    sampler, the loader, and micro-batches that continue from the saved epoch position
    (restarting the loader when the shrink-and-pad flags change)."""

    def __init__(self, trainer: _DetectorTraining, train: list[Sample], size: tuple[int, int]):
        cfg = trainer.cfg
        aug = AugmentConfig(
            size=size,
            crop_scale=(cfg.crop_scale, 1.0),
            hflip=cfg.hflip,
            shrink_prob=cfg.shrink_prob,
            shrink_fill=cfg.shrink_fill if cfg.shrink_fill == "reflect" else float(cfg.shrink_fill),
        )
        self.dataset = _TrainSet(train, aug, cfg.strong_pseudo)
        ratios = parse_balance(cfg.balance)
        weights, self.rows = balance_weights(train, ratios)
        self.global_batch = cfg.batch_size * trainer.world
        self.sampler = EpochSampler(
            len(train), cfg.seed, weights=weights if ratios else None, multiple=self.global_batch
        )
        self.loader = epoch_loader(
            self.dataset,
            self.sampler,
            batch_size=cfg.batch_size,
            workers=cfg.workers,
            seed=cfg.seed,
            collate_fn=_collate,
        )
        self.restart = False
        self._it: Iterator[dict[str, Any]] | None = None

    def report(self, trainer: _DetectorTraining, n_val: int) -> None:
        """The balance table and ``balance.json`` (main process)."""
        cfg, n = trainer.cfg, len(self.dataset)
        title = f"class balance ({n} training samples, {self.sampler.length} draws/epoch)"
        trainer.log(balance_table(self.rows, self.sampler.length, title))
        atomic_write_json(
            trainer.out / "balance.json",
            {
                "spec": cfg.balance,
                "train_samples": n,
                "val_samples": n_val,
                "draws_per_epoch": self.sampler.length,
                "categories": rows_to_json(self.rows),
            },
        )

    def next_batch(self, loader: Any, state: dict[str, Any]) -> dict[str, Any]:
        """The next micro-batch of the (prepared) ``loader``, advancing ``state["epoch"]`` and
        ``["position"]``."""
        while True:
            if self._it is None or self.restart:
                self.restart = False
                self.sampler.epoch, self.sampler.start = state["epoch"], state["position"]
                self._it = iter(loader)
            try:
                batch = next(self._it)
            except StopIteration:
                state["epoch"], state["position"] = state["epoch"] + 1, 0
                self._it = None
                continue
            state["position"] += self.global_batch
            if batch["error"]:
                raise DDError(f"cannot load a training sample: {batch['error']}")
            return batch


class _DetectorTraining(loop.Recipe):
    """The recipe of ``dd train-detector`` for :func:`dd.training.loop.fit`: the detector,
    its data (:class:`_TrainData`), the map loss, shrink-and-pad checks and validation."""

    def __init__(self, cfg: TrainConfig, reporter: Reporter | None):
        self.cfg = absolutize(cfg)  # records name inputs by absolute path
        self.out = Path(cfg.out)
        _check_train_config(self.cfg)
        self.acc = training_accelerator(
            "cpu" if self.cfg.cpu else "auto",
            PRECISIONS[self.cfg.precision],
            hint="check --precision and the accelerate config (accelerate env)",
        )
        self.main = self.acc.is_main_process
        self.reporter = as_reporter(reporter) if self.main else QUIET
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        self._last_val: dict[str, Any] | None = None

    # -- setup ---------------------------------------------------------------------------------
    def log(self, renderable: Any) -> None:
        if self.reporter.console is not None:  # rich renderables (the balance table)
            self.reporter.console.print(renderable, highlight=False)

    # -- run -----------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg = self.cfg
        # data (read before anything is written to --out: bad input leaves no run folder)
        samples = _read_all(cfg.datasets)
        if cfg.val:
            train, val = samples, _read_all(cfg.val)
        else:
            frac = 0.1 if cfg.val_fraction is None else cfg.val_fraction
            train, val = _split(samples, frac, cfg.seed)
        if not train:
            raise DDError("no training samples", hint="check the dataset folders")
        self.train, self.val = train, val
        last = self._prepare_out()
        self.detector = _load_detector(cfg)
        self.detector.untrained = False
        if cfg.init:
            self.log(f"initial weights: {self.detector.source}")
            if getattr(self.detector, "input_size_assumed", False):
                size = "x".join(map(str, self.detector.input_size))
                self.log(
                    f"[yellow]note:[/yellow] {cfg.init} records no input size; training at "
                    f"{size} (what DiffDoctor's released weights use): pass --input-size if "
                    "it was trained at another; the trained detector records its size"
                )
        with warnings.catch_warnings():
            # DDP warns that depthwise-conv gradients have other (equivalent) strides.
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view")
            result = loop.fit(self, self._settings(), self.out, self.reporter, resume_from=last)
        return result.output

    def _settings(self) -> loop.LoopSettings:
        c = self.cfg
        return loop.loop_settings(
            c,
            train_steps=c.steps,
            device_specific_seed=True,
            lr_schedule="cosine",
            warmup_steps=c.warmup_steps if c.warmup_steps is not None else c.steps // 20,
            eval_every=c.val_every,
            eval_at_start=False,
            best_dir="checkpoints/best",
            before_step_records=("shrink_pad",),
            higher_is_better=c.select_metric in HIGHER_IS_BETTER,
            score_name=f"validation {c.select_metric}",
            run_name="dd-train-detector",
            title="train",
            oom_hint="lower memory use: a smaller --batch-size with --grad-accum, a smaller "
            "--size, --precision bf16",
            nonfinite_hint="lower --lr, or use --precision fp32 or bf16",
        )

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
            before = {**_OLDER_DEFAULTS, **before}  # a run of an older dd
            check_same_settings(self.out, saved.name, before, cfg.resolved(), _RESUMABLE_CHANGES)
        if self.main:
            mark_run_folder(self.out, "train-detector")
            atomic_write_json(saved, cfg.resolved())
        self.acc.wait_for_everyone()
        return last

    # -- the recipe ----------------------------------------------------------------------------
    def initial_state(self) -> dict[str, Any]:
        return {
            "epoch": 0,
            "position": 0,
            "best": None,
            "best_step": None,
            "bad_evals": 0,
            "dynamic": [],
        }

    def setup(self, run: loop.Run) -> loop.Setup:
        cfg, detector = self.cfg, self.detector
        input_size = tuple(detector.input_size)
        size = (cfg.size, cfg.size) if cfg.size else input_size
        self.data = _TrainData(self, self.train, size)  # type: ignore[arg-type]
        if self.main:
            self.data.report(self, len(self.val))
            self.log(
                f"train {len(self.train)} samples, validate on {len(self.val)}; "
                f"{self.world} process(es), global batch {self.data.global_batch} x "
                f"{cfg.grad_accum} accumulation, device {self.acc.device}, precision "
                f"{cfg.precision}"
            )
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
        names = [n for n, _ in detector.named_parameters()]
        params = list(detector.parameters())
        module = _LogitsModule(detector)
        return loop.Setup(module, names, params, optimizer, extra=[self.data.loader])

    def before_step(self, run: loop.Run) -> None:
        cfg = self.cfg
        if cfg.shrink_threshold is not None and run.state["step"] % cfg.shrink_every == 0:
            self._refresh_shrink(run)
        run.wrapped.train()

    def micro_batch(self, run: loop.Run, micro: int) -> dict[str, Any]:
        return self.data.next_batch(run.prepared[0], run.state)

    def loss(self, run: loop.Run, batch: dict[str, Any]) -> loop.StepLoss:
        cfg = self.cfg
        logits = run.wrapped(batch["image"])
        target = dilate_targets(batch["target"], cfg.mask_dilate)
        return loop.StepLoss(
            detector_loss(logits, target, batch["weight"], cfg.loss, pos_weight=cfg.pos_weight)
        )

    def train_fields(self, run: loop.Run) -> dict[str, Any]:
        return {"epoch": run.state["epoch"]}

    def _refresh_shrink(self, run: loop.Run) -> None:
        """On-the-fly shrink-and-pad (seed 000, Sec. 3.2): flag the pseudo-labelled training
        samples (``shrink_scope="all"``: every sample) whose predicted max confidence
        (current model, no augmentation, in batches of ``val_batch_size``) is below the
        threshold."""
        from accelerate.utils import gather_object

        from dd.inference import detect_batches, resize_for

        cfg, det = self.cfg, self.detector
        samples = self.data.dataset.samples
        mine = [
            i
            for i in range(self.rank, len(samples), self.world)
            if cfg.shrink_scope == "all" or samples[i].source == "pseudo"
        ]

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
        self.data.dataset.dynamic = {i: ShrinkSpec(*cfg.shrink_scale) for i in flagged}
        run.state["dynamic"] = flagged
        self.data.restart = True  # new loader workers see the new flags
        run.record({"type": "shrink_pad", "step": run.state["step"], "flagged": len(flagged)})

    # -- validation ------------------------------------------------------------------------------
    def evaluate(self, run: loop.Run) -> loop.Evaluation | None:
        """Metrics on the held-out split (all processes; gathered)."""
        from accelerate.utils import gather_object

        from dd.inference.metrics import DetectorMetrics, evaluate_detector, json_safe

        if not self.val:
            return None
        cfg, st = self.cfg, run.state
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
        self._last_val = result
        value = result[cfg.select_metric]
        score = float("nan") if value is None else float(value)  # never the best
        rec = {"type": "val", "step": st["step"], "epoch": st["epoch"]} | json_safe(result)
        return loop.Evaluation(rec, score=score, summary=f"{cfg.select_metric} {score:.4f}")

    def after_evaluation(self, run: loop.Run, evaluation: loop.Evaluation, improved: bool) -> None:
        cfg, st = self.cfg, run.state
        value = evaluation.score
        shown = f"{value:.5f}" if value is not None and not math.isnan(value) else "n/a"
        self.log(
            f"step {st['step']}: val {cfg.select_metric} {shown}"
            + (" (best)" if improved else f" (best: step {st['best_step'] or '-'})")
        )

    def save_best(self, run: loop.Run, folder: Path, evaluation: loop.Evaluation) -> None:
        from dd.inference.metrics import json_safe

        _save_model(self.detector, folder / "model")
        atomic_write_json(
            folder / "best.json",
            {"step": run.state["step"], "metric": self.cfg.select_metric}
            | {"metrics": json_safe(self._last_val or {})},
        )

    # -- checkpoints -----------------------------------------------------------------------------
    def save_weights(self, run: loop.Run, folder: Path) -> None:
        _save_model(self.detector, folder / "model")

    def load_weights(self, run: loop.Run, folder: Path) -> None:
        self.detector.load_pretrained_weights(folder / "model")

    def load_checkpoint(self, run: loop.Run, folder: Path, trainer: dict[str, Any]) -> None:
        dynamic = trainer["state"].get("dynamic", [])
        self.data.dataset.dynamic = {i: ShrinkSpec(*self.cfg.shrink_scale) for i in dynamic}

    # -- outputs ---------------------------------------------------------------------------------
    def finish(self, run: loop.Run, reason: str) -> TrainResult:
        cfg, st = self.cfg, run.state
        ckpt_dir = self.out / "checkpoints"
        model_dir = self.out / "model"
        if run.stopped_early:
            self.log(
                f"early stop at step {st['step']}: {cfg.select_metric} did not improve in "
                f"{cfg.patience} evaluations"
            )
        best = None
        best_json = ckpt_dir / "best" / "best.json"
        if st["best_step"] is not None and best_json.is_file():
            best = json.loads(best_json.read_text())
            if best.get("step") != st["best_step"]:  # written after the checkpoint resumed
                self.log("[yellow]the best checkpoint is not this run's best; using last[/yellow]")
                best = None
        source = ckpt_dir / ("best" if best else "last") / "model"
        if self.main:
            tmp = self.out / ".model.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(source, tmp)
            swap_in(tmp, model_dir)
            plot_curves(run.records, self.out / "curves.png", cfg.select_metric)
            card = _model_card(self, run, best, run.stopped_early)
            atomic_write_text(self.out / "README.md", card)
            self.log(f"model: {model_dir} (step {best['step'] if best else st['step']})")
        return TrainResult(
            out=self.out,
            step=st["step"],
            best=best,
            last_val=self._last_val,
            stopped_early=run.stopped_early,
            model_dir=model_dir,
            main=self.main,
        )


def _model_card(
    t: _DetectorTraining, run: loop.Run, best: dict[str, Any] | None, stopped_early: bool
) -> str:
    """The run's README.md: model, data, training, validation metrics, use and limits."""
    cfg, st, det = t.cfg, run.state, t.detector
    n_train, n_val = len(t.data.dataset), len(t.val)
    sources: dict[str, int] = {}
    for s in t.data.dataset.samples:
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
        + f", batch {cfg.batch_size} x {t.world} process(es) x {cfg.grad_accum} "
        f"accumulation, crop {t.data.dataset.aug.size[0]}x{t.data.dataset.aug.size[1]}",
        f"- AdamW lr {cfg.lr:g}, weight decay {cfg.weight_decay:g}, warmup + cosine, "
        f"precision {cfg.precision}, seed {cfg.seed}",
        "- Loss: MSE between sigmoid(upsampled logits) and the target map",
        "",
        "## Validation metrics",
    ]
    vals = [r for r in run.records if r.get("type") == "val"]
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
    input_opt = f"--detector {cfg.detector} -O input_size={det.input_size[0]}x{det.input_size[1]}"
    lines += [
        "",
        "## Use",
        f"`dd detect IMAGES --weights {t.out / 'model'} {input_opt}`",
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
    colours = {"loss": (31, 119, 180), f"val {metric}": (214, 39, 40), "val mse": (44, 160, 44)}
    curves: list[Any] = [("train loss", "loss", {"loss": ("train", "loss")})]
    if any(r.get("type") == "val" for r in records):
        val = {f"val {metric}": ("val", metric), "val mse": ("val", "mse")}
        curves.append(("validation", metric, val))
    write_curves(records, path, curves, size=(480, 300), colours=colours)


def train_detector(cfg: TrainConfig, *, reporter: Reporter | None = None) -> TrainResult:
    """Train (or resume training) a SegFormer artifact detector; see the module docstring.

    ``reporter`` receives the balance table, progress bar and messages on the main process;
    None trains silently."""
    from dd.runtime.io import undo_if_nothing_written

    # A run that fails before its first checkpoint or metric (a detector that does not load,
    # data too small for a batch) leaves no folder to block the corrected rerun.
    with undo_if_nothing_written(cfg.out, bookkeeping=("train_config.json",)):
        return run_accelerated(lambda: _DetectorTraining(cfg, reporter))
