"""``dd eval gen``: generate with a base model and LoRAs at identical seeds, and score them.

For every model (the base, then each LoRA) every prompt is generated at every seed with
the same initial noise (a CPU generator seeded per image, as ``dd generate``), so rows of
the grids differ only by the model. Images go to ``OUT/images/<model>/PPPP-seedS.png``;
an existing image is kept (a killed run resumes where it stopped). All metrics are then
computed from the saved 8-bit PNGs (images in [0, 1], never [-1, 1]):

* artifact scores from the detector (seed 000, Table 2): per model the mean over images of
  each image's **mean** and **max** artifact confidence, the **artifact frequency** (share of
  images whose max is >= 0.5) and the **artifact pixel ratio** (mean share of pixels >= 0.5);
* with ``refs`` (a folder of reference images): **FID** and **KID** of each model's images
  against all references, on 2048-d Inception pool features (:func:`fid`, :func:`kid`), and
  **SSIM** / **PSNR** (seed 001) against *paired* references: a reference named
  ``PPPP-seedS.*`` pairs with that image, one named ``PPPP.*`` with every seed of prompt
  ``PPPP`` (resized to the image's size when they differ);
* optional, only from local weights: **CLIP score** (``100 * max(cos(image, text), 0)`` with
  a transformers ``CLIPModel`` folder), **PickScore** (``logit_scale * cos`` with the PickScore
  CLIP folder) and **ImageReward** (the ``image-reward`` package with a local ``.pt``).

Inception weights are never downloaded: FID/KID read the TorchScript ``inception-2015-12-05.pt``
(the file clean-fid and StyleGAN2-ADA/3 use; images at 299 px, values 0-255) from
``inception`` or ``$DD_HOME/inception-2015-12-05.pt`` (``DD_HOME`` defaults to
``~/.cache/dd``), and a missing file is a one-line error saying where to put it. Tests (and
callers) may inject any ``features`` function instead.

Outputs: ``results.json`` (settings, per-model metrics, per-image scores), ``results.md``
(a table to paste into a paper), ``grids/prompt-PPPP.png`` (a row per seed: base | each LoRA,
scores under each image) and ``bars.png`` (a bar chart per metric).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dd.engines.generate import best_of_images
from dd.errors import DDError, UsageError
from dd.inference.image_scores import ClipModel, ImageRewardModel, clip_scores, pick_scores

__all__ = [
    "EvalGenConfig",
    "clip_scores",
    "eval_gen",
    "fid",
    "inception_features",
    "kid",
    "psnr",
    "ssim",
]

INCEPTION_FILE = "inception-2015-12-05.pt"
#: Metrics of a model row, in table order: (key, header, lower is better?).
METRICS = (
    ("mean_conf", "mean artifact conf.", True),
    ("max_conf", "max artifact conf.", True),
    ("artifact_freq", "artifact freq.", True),
    ("artifact_pixels", "artifact pixel ratio", True),
    ("seconds_per_image", "s / image", True),
    ("peak_extra_mib", "peak extra MiB", True),
    ("fid", "FID", True),
    ("kid", "KID", True),
    ("ssim", "SSIM", False),
    ("psnr", "PSNR (dB)", False),
    ("clip_score", "CLIP score", False),
    ("pickscore", "PickScore", False),
    ("image_reward", "ImageReward", False),
)
PSNR_CAP = 100.0

FeatureFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class EvalGenConfig:
    backbone: str | None = None
    model: str | None = None
    backbone_options: dict[str, Any] = field(default_factory=dict)
    loras: list[str] = field(default_factory=list)
    prompts: str | None = None
    seeds: list[int] = field(default_factory=lambda: [0])
    refs: str | None = None
    out: str | None = None
    resolution: int | None = None
    steps: int | None = None
    guidance: float | None = None
    dtype: str = "fp32"
    device: str = "auto"
    batch_size: int = 1
    detector: str = "segformer"
    detector_weights: str | None = None
    detector_options: dict[str, Any] = field(default_factory=dict)
    inception: str | None = None
    kid_subset_size: int = 1000
    kid_subsets: int = 100
    clip_model: str | None = None
    pickscore_model: str | None = None
    image_reward_model: str | None = None
    seed: int = 0
    #: Regenerate a model's images made with other settings (without it: refuse).
    overwrite: bool = False
    #: Also each model with detector guidance (``<model>+guide``): dd generate --guide's.
    guide: bool = False
    guide_scale: float = 12.0
    guide_steps: str | None = None
    guide_loss: str = "mean"
    guide_every: int = 1
    #: Also each model's best of N candidates per image (``<model>+best-of-N``).
    best_of: int = 1
    #: Quality scorers (``dd plugins``: detail, drift, clip, ...) measured per row against
    #: the base model's images at the same prompts and seeds.
    quality: list[str] = field(default_factory=list)
    quality_weights: dict[str, Any] = field(default_factory=dict)


#: Beside each model's images: the settings that made them (an image is reused only when
#: they are the same) and one record per image (prompt, seed) for ``dd eval study``.
IMAGE_SETTINGS = ".dd-settings.json"
IMAGE_REPORT = "report.jsonl"


@dataclass(frozen=True)
class Variant:
    """One row of the comparison: a model (the base or a LoRA) sampled one way."""

    name: str
    lora: str | None
    #: ``plain``, ``guide`` (detector guidance) or ``best-of`` (best of ``cfg.best_of``).
    how: str = "plain"

    def settings(self, cfg: EvalGenConfig) -> dict[str, Any]:
        """What the way of sampling adds to the image settings."""
        if self.how == "guide":
            return {"guide": [cfg.guide_scale, cfg.guide_steps, cfg.guide_loss, cfg.guide_every]}
        if self.how == "best-of":
            return {"best_of": cfg.best_of, "detector": _detector_record(cfg)}
        return {}


def _detector_record(cfg: EvalGenConfig) -> list[Any]:
    return [cfg.detector, cfg.detector_weights, dict(sorted(cfg.detector_options.items()))]


def variants(cfg: EvalGenConfig) -> list[Variant]:
    """The rows, in order: per model (base, then each LoRA) plain, guided (``--guide``),
    best of N (``--best-of N``)."""
    out = []
    for name, lora in zip(_model_names(cfg.loras), [None, *cfg.loras], strict=True):
        out.append(Variant(name, lora))
        if cfg.guide:
            out.append(Variant(f"{name}+guide", lora, "guide"))
        if cfg.best_of > 1:
            out.append(Variant(f"{name}+best-of-{cfg.best_of}", lora, "best-of"))
    return out


#: Beside each row's images: seconds and images generated, peak extra memory.
TIMING = ".dd-timing.json"


def image_settings(cfg: EvalGenConfig, lora: str | None, prompts: Sequence[str]) -> dict:
    """Every setting that changes a generated image of one model (paths absolute)."""
    import hashlib

    def where(p: str | None) -> str | None:
        if p is None:
            return None
        path = Path(p).expanduser()
        return str(path.resolve()) if path.exists() else p  # a hub id stays as it is

    def stamp(p: str | None) -> list[Any] | None:
        """A LoRA retrained in place must not pass for the old one: size and mtime."""
        if p is None:
            return None
        files = [Path(p)] if Path(p).is_file() else sorted(Path(p).glob("*.safetensors"))
        return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]

    return {
        "backbone": cfg.backbone,
        "model": where(cfg.model),
        "backbone_options": dict(sorted(cfg.backbone_options.items())),
        "lora": where(lora),
        "lora_files": stamp(lora),
        "resolution": cfg.resolution,
        "steps": cfg.steps,
        "guidance": cfg.guidance,
        "dtype": cfg.dtype,
        "prompts_sha256": hashlib.sha256(json.dumps(list(prompts)).encode()).hexdigest(),
    }


def _claim_images(folder: Path, settings: dict[str, Any], overwrite: bool) -> None:
    """Reuse ``folder``'s images only if the same settings made them (else refuse, or
    start over with ``overwrite``)."""
    import shutil

    from dd.runtime.io import atomic_write_json

    record = folder / IMAGE_SETTINGS
    has_images = folder.is_dir() and any(folder.glob("*.png"))
    if has_images:
        try:
            before = json.loads(record.read_text())
        except (OSError, ValueError):
            before = None
        if before != settings:
            if not overwrite:
                diff = (
                    ", ".join(
                        f"{k} {before.get(k)!r} -> {settings[k]!r}"
                        for k in settings
                        if before.get(k) != settings[k]
                    )
                    if isinstance(before, dict)
                    else "no record of the settings that made them"
                )
                raise DDError(
                    f"{folder} holds images made with other settings ({diff})",
                    hint="pass --overwrite to regenerate them, or choose a new --out",
                )
            shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(record, settings)


def _timed(run: Callable[[], Any], device: torch.device, *, one_image: Callable[[], Any]) -> dict:
    """Seconds ``run()`` takes (CUDA synchronised) and the peak extra memory of generating:
    on CUDA the allocator's peak during ``run()`` above what was allocated before (the
    models); on the CPU the profiler's peak of ``one_image()``, one more image generated and
    discarded (profiling the whole run would distort its time). See
    :func:`dd.runtime.memory.peak_extra_memory`."""
    import time

    from dd.runtime.memory import peak_extra_memory, sync

    base = 0
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    run()
    sync(device)
    seconds = time.perf_counter() - t0
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak, _ = peak_extra_memory(one_image, device)
    return {"seconds": seconds, "peak_extra_bytes": int(peak), "device": str(device)}


def _read_timing(folder: Path) -> dict[str, Any] | None:
    try:
        rec = json.loads((folder / TIMING).read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and rec.get("images") else None


def _add_timing(
    folder: Path, before: dict[str, Any] | None, timing: dict[str, Any], images: int
) -> dict[str, Any]:
    """This run's timing added to what earlier runs (a resumed evaluation) recorded."""
    from dd.runtime.io import atomic_write_json

    before = before or {}
    rec = {
        "seconds": float(before.get("seconds", 0.0)) + timing["seconds"],
        "images": int(before.get("images", 0)) + images,
        "peak_extra_bytes": max(int(before.get("peak_extra_bytes", 0)), timing["peak_extra_bytes"]),
        "device": timing["device"],
    }
    atomic_write_json(folder / TIMING, rec)
    return rec


# ------------------------------------------------------------------------------------------
# Metrics (pure functions, float64)
# ------------------------------------------------------------------------------------------
def _sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def fid(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """Fréchet distance of Gaussians fitted to feature sets ``a`` (N x D) and ``b`` (M x D):
    ``|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2)`` with unbiased
    covariances; the trace of the matrix square root from symmetric eigendecompositions
    (equal to ``tr(sqrtm(S_a S_b))``, without scipy)."""
    a = torch.as_tensor(np.asarray(a), dtype=torch.float64)
    b = torch.as_tensor(np.asarray(b), dtype=torch.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise DDError(f"FID needs two N x D feature sets, got {tuple(a.shape)}, {tuple(b.shape)}")
    if len(a) < 2 or len(b) < 2:
        raise DDError("FID needs at least 2 images on each side")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    root = _sqrt_psd(s_a)
    inner = torch.linalg.eigvalsh((root @ s_b @ root + (root @ s_b @ root).T) / 2)
    tr_covmean = inner.clamp(min=0).sqrt().sum()
    value = (mu_a - mu_b).pow(2).sum() + s_a.trace() + s_b.trace() - 2 * tr_covmean
    return float(value.clamp(min=0))


def _mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    d = x.shape[1]
    kxx = (x @ x.T / d + 1) ** 3
    kyy = (y @ y.T / d + 1) ** 3
    kxy = (x @ y.T / d + 1) ** 3
    n, m = len(x), len(y)
    return (
        (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
        + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
        - 2 * kxy.mean()
    )


def kid(
    a: torch.Tensor | np.ndarray,
    b: torch.Tensor | np.ndarray,
    *,
    subset_size: int = 1000,
    subsets: int = 100,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel Inception Distance (Bińkowski et al. 2018): the unbiased MMD^2 with the cubic
    polynomial kernel ``k(x, y) = (x.y / D + 1)^3``, averaged over ``subsets`` random subsets
    of ``min(subset_size, N, M)`` features from each side (one subset when that takes all of
    both: the value is then exact). Returns (mean, std)."""
    a = torch.as_tensor(np.asarray(a), dtype=torch.float64)
    b = torch.as_tensor(np.asarray(b), dtype=torch.float64)
    if len(a) < 2 or len(b) < 2:
        raise DDError("KID needs at least 2 images on each side")
    size = min(subset_size, len(a), len(b))
    if size == len(a) == len(b):
        return float(_mmd2_unbiased(a, b)), 0.0
    g = torch.Generator().manual_seed(seed)
    vals = torch.stack(
        [
            _mmd2_unbiased(
                a[torch.randperm(len(a), generator=g)[:size]],
                b[torch.randperm(len(b), generator=g)[:size]],
            )
            for _ in range(subsets)
        ]
    )
    return float(vals.mean()), float(vals.std(unbiased=False))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor) -> float:
    """SSIM (Wang et al. 2004) of two images in [0, 1] (H x W x C or H x W): an 11 x 11
    Gaussian window (sigma 1.5), ``C1 = (0.01)^2``, ``C2 = (0.03)^2``, population (co)variances,
    the mean of the SSIM map over valid window positions, averaged over channels (as
    ``skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=1, channel_axis=-1)``)."""
    a = torch.as_tensor(np.asarray(x), dtype=torch.float64)
    b = torch.as_tensor(np.asarray(y), dtype=torch.float64)
    if a.shape != b.shape:
        raise DDError(f"SSIM needs images of one size, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]
    a, b = a.permute(2, 0, 1)[:, None], b.permute(2, 0, 1)[:, None]  # C x 1 x H x W
    win = _gaussian_window().to(a)
    if min(a.shape[-2:]) < win.shape[-1]:
        raise DDError(f"SSIM needs images of at least 11 x 11 pixels, got {tuple(x.shape)}")
    w = win[None, None]
    mu_a, mu_b = F.conv2d(a, w), F.conv2d(b, w)
    var_a = F.conv2d(a * a, w) - mu_a**2
    var_b = F.conv2d(b * b, w) - mu_b**2
    cov = F.conv2d(a * b, w) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    )
    return float(s.mean(dim=(1, 2, 3)).mean())


def psnr(x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor) -> float:
    """``10 log10(1 / MSE)`` of two images in [0, 1]; identical images give ``PSNR_CAP``."""
    a = torch.as_tensor(np.asarray(x), dtype=torch.float64)
    b = torch.as_tensor(np.asarray(y), dtype=torch.float64)
    if a.shape != b.shape:
        raise DDError(f"PSNR needs images of one size, got {tuple(a.shape)} and {tuple(b.shape)}")
    mse = float((a - b).pow(2).mean())
    return PSNR_CAP if mse == 0 else min(PSNR_CAP, 10 * math.log10(1 / mse))


# ------------------------------------------------------------------------------------------
# Feature extractors and optional scorers (local weights only)
# ------------------------------------------------------------------------------------------
def default_inception_path() -> Path:
    home = Path(os.environ.get("DD_HOME", Path.home() / ".cache" / "dd")).expanduser()
    return home / INCEPTION_FILE


def inception_features(path: str | None, device: torch.device) -> FeatureFn:
    """A feature function from the TorchScript Inception of clean-fid / StyleGAN2-ADA
    (``inception-2015-12-05.pt``): [0, 1] images -> 2048-d pool features."""
    p = Path(path).expanduser() if path else default_inception_path()
    if not p.is_file():
        raise DDError(
            f"FID/KID need the Inception weights file {p}, which is missing",
            hint=f"download {INCEPTION_FILE} (the TorchScript Inception used by clean-fid and "
            f"StyleGAN2-ADA) yourself, put it at {default_inception_path()} or pass "
            "--inception PATH; dd downloads nothing",
        )
    try:
        net = torch.jit.load(str(p), map_location=device).eval()
    except Exception as e:
        raise DDError(
            f"cannot load {p} as a TorchScript Inception: {type(e).__name__}: {str(e)[:200]}",
            hint=f"use the TorchScript {INCEPTION_FILE} (clean-fid / StyleGAN2-ADA)",
        ) from None

    @torch.no_grad()
    def features(images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images.to(device).float(), size=(299, 299), mode="bilinear")
        return net(x * 255, return_features=True).float().cpu()

    return features


# ------------------------------------------------------------------------------------------
# References
# ------------------------------------------------------------------------------------------
_PAIR = re.compile(r"^(\d+)(?:-seed(-?\d+))?$")


def read_refs(folder: str | os.PathLike) -> tuple[list[Path], dict[tuple[int, int | None], Path]]:
    """All reference images of ``folder`` (for FID/KID) and those named ``PPPP-seedS`` or
    ``PPPP`` keyed by (prompt index, seed or None) for SSIM/PSNR."""
    from dd.engines.dreambooth import list_images

    root = Path(folder)
    if not root.is_dir():
        raise DDError(f"--refs folder not found: {root}")
    paths = list_images(root)
    if not paths:
        raise DDError(f"no images in --refs {root}")
    pairs: dict[tuple[int, int | None], Path] = {}
    for p in paths:
        m = _PAIR.match(p.stem)
        if m:
            pairs[(int(m.group(1)), None if m.group(2) is None else int(m.group(2)))] = p
    return paths, pairs


def _to_tensor(images: Sequence[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255


def _features_of(
    paths: Sequence[Path], features: FeatureFn, size: tuple[int, int] | None, batch: int = 16
) -> torch.Tensor:
    """Features of image files in batches (resized to ``size`` when given, so that images
    of different sizes can be batched)."""
    from PIL import Image

    from dd.data.images import load_image

    out = []
    for i in range(0, len(paths), batch):
        ims = []
        for p in paths[i : i + batch]:
            im = load_image(p)
            if size is not None and im.shape[:2] != size:
                im = np.asarray(Image.fromarray(im).resize((size[1], size[0]), Image.BICUBIC))
            ims.append(im)
        out.append(features(_to_tensor(ims)).double())
    return torch.cat(out)


# ------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------
def _model_names(loras: Sequence[str]) -> list[str]:
    names = ["base"]
    for lora in loras:
        p = Path(lora)
        stem = p.parent.name if p.is_file() else p.name
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem) or "lora"
        name, k = stem, 2
        while name in names:
            name, k = f"{stem}-{k}", k + 1
        names.append(name)
    return names


def _check(cfg: EvalGenConfig) -> None:
    for key in ("backbone", "model", "prompts", "out"):
        if not getattr(cfg, key):
            flag = "--" + key.replace("_", "-")
            raise UsageError(f"{flag} is required", hint=f"pass {flag}")
    for lora in cfg.loras:
        if not Path(lora).exists():
            raise DDError(f"--lora not found: {lora}")
    if cfg.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    if not cfg.seeds:
        raise UsageError("--seeds must name at least one seed")
    if cfg.best_of < 1:
        raise UsageError(f"--best-of must be at least 1, got {cfg.best_of}")
    if cfg.guide:  # the guidance settings are checked before anything loads
        from dd.inference.guidance import Guide, parse_guide_steps

        Guide(None, cfg.guide_scale, parse_guide_steps(cfg.guide_steps), cfg.guide_loss,
              cfg.guide_every)  # fmt: skip
    if cfg.quality:
        from dd.api.scorers import parse_quality

        parse_quality(cfg.quality)


def eval_gen(
    cfg: EvalGenConfig,
    *,
    console: Any | None = None,
    features: FeatureFn | None = None,
    detector: Any | None = None,
) -> dict[str, Any]:
    """Generate, score and write the report (see the module docstring); returns what
    ``results.json`` holds. ``features``/``detector`` replace the Inception network and the
    detector plugin (tests inject small ones)."""
    from PIL import Image

    from dd.api.plugins import load_backbone, load_detector
    from dd.data.images import load_image
    from dd.data.prompts import read_prompts
    from dd.inference.scores import ARTIFACT_THRESHOLD, map_scores
    from dd.runtime.device import resolve_device, resolve_dtype
    from dd.runtime.io import atomic_write_json, atomic_write_text, save_image_atomic
    from dd.runtime.progress import progress_or_quiet

    _check(cfg)
    from dd.runtime.io import check_output_folder

    check_output_folder(cfg.out, "eval gen", overwrite=cfg.overwrite)  # type: ignore[arg-type]
    prompts = read_prompts(cfg.prompts)  # type: ignore[arg-type]
    refs, pairs = read_refs(cfg.refs) if cfg.refs else ([], {})
    out = Path(cfg.out)  # type: ignore[arg-type]
    if refs and (len(refs) < 2 or len(prompts) * len(cfg.seeds) < 2):
        raise DDError(
            f"FID/KID need at least 2 reference and 2 generated images; --refs has "
            f"{len(refs)}, prompts x seeds give {len(prompts) * len(cfg.seeds)}",
            hint="add references, prompts or seeds",
        )
    dev, dt = resolve_device(cfg.device), resolve_dtype(cfg.dtype)
    # check every optional weight before the long generation
    feats = features
    if refs and feats is None:
        feats = inception_features(cfg.inception, dev)
    clip = ClipModel(cfg.clip_model, dev, what="CLIP score") if cfg.clip_model else None
    pick = ClipModel(cfg.pickscore_model, dev, what="PickScore") if cfg.pickscore_model else None
    reward = ImageRewardModel(cfg.image_reward_model, dev) if cfg.image_reward_model else None
    det = detector
    if det is None:
        det = load_detector(
            cfg.detector, cfg.detector_weights, dict(cfg.detector_options), str(dev), cfg.dtype
        )
    if getattr(det, "untrained", False) and console is not None:
        console.print(
            f"[bold yellow]Warning: the {cfg.detector!r} detector has random weights: its "
            "artifact scores mean nothing.[/bold yellow] Pass --detector-weights.",
            highlight=False,
        )

    rows_v = variants(cfg)
    names = [v.name for v in rows_v]
    items = [(pi, s) for pi in range(len(prompts)) for s in cfg.seeds]
    guide_plan = None
    if cfg.guide:
        from dd.inference.guidance import Guide, parse_guide_steps

        det.eval()
        det.requires_grad_(False)
        guide_plan = Guide(det, cfg.guide_scale, parse_guide_steps(cfg.guide_steps),
                           cfg.guide_loss, cfg.guide_every)  # fmt: skip
    guard = None
    if cfg.quality:
        from dd.api.plugins import load_quality_guard

        guard = load_quality_guard(cfg.quality, device=str(dev), weights=cfg.quality_weights)
    from dd.runtime.io import mark_run_folder

    mark_run_folder(out, "eval gen", not_inputs=("grids",))
    bb = None
    loaded: object = ()  # the LoRA the backbone carries now (() = not loaded yet)
    size = cfg.resolution
    timings: dict[str, dict[str, Any] | None] = {}
    with progress_or_quiet("[bold]{task.description}", console=console) as progress:
        for v in rows_v:
            folder = out / "images" / v.name
            settings = image_settings(cfg, v.lora, prompts) | v.settings(cfg)
            _claim_images(folder, settings, cfg.overwrite)
            todo = [(pi, s) for pi, s in items if not (folder / f"{pi:04d}-seed{s}.png").is_file()]
            task = progress.add_task(f"generate {v.name}", total=len(items))
            progress.update(task, completed=len(items) - len(todo))
            timings[v.name] = _read_timing(folder)
            if not todo:
                continue
            if bb is None:
                bb = load_backbone(
                    cfg.backbone, cfg.model, device=dev, dtype=dt, options=cfg.backbone_options
                )
                size = size or int(bb.default_resolution)
            if loaded != v.lora:
                if any("lora_" in n for n, _ in bb.denoiser.named_parameters()):
                    bb.pipe.unload_lora_weights()
                if v.lora is not None:
                    bb.load_lora(v.lora, trainable=False)
                loaded = v.lora

            def sample(
                pairs: list[tuple[int, int]], v: Variant = v, bb: Any = bb, size: Any = size
            ) -> Any:
                return best_of_images(
                    bb,
                    det if v.how == "best-of" else None,
                    [prompts[pi] for pi, _ in pairs],
                    [s for _, s in pairs],
                    cfg.best_of if v.how == "best-of" else 1,
                    height=size,  # type: ignore[arg-type]
                    width=size,  # type: ignore[arg-type]
                    steps=cfg.steps,  # type: ignore[arg-type]
                    guidance=cfg.guidance,
                    batch_size=cfg.batch_size,
                    guide=guide_plan if v.how == "guide" else None,
                )

            def generate_todo(todo: list = todo, folder: Path = folder, task: Any = task) -> None:
                for i, _, img, _, _ in sample(todo):
                    pi, s = todo[i]
                    save_image_atomic(Image.fromarray(img), folder / f"{pi:04d}-seed{s}.png")
                    progress.advance(task)

            timing = _timed(generate_todo, dev, one_image=lambda todo=todo: list(sample(todo[:1])))
            timings[v.name] = _add_timing(folder, timings[v.name], timing, len(todo))
    for name in names:  # per image: its prompt and seed (dd eval study pairs by these)
        atomic_write_text(
            out / "images" / name / IMAGE_REPORT,
            "".join(
                json.dumps({"image": f"{pi:04d}-seed{s}.png", "prompt": prompts[pi], "seed": s})
                + "\n"
                for pi, s in items
            ),
        )

    # ------------------------------------------------------------------ scoring
    per_image: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    ref_feats = None
    if refs and feats is not None:
        first = load_image(out / "images" / "base" / f"{items[0][0]:04d}-seed{items[0][1]}.png")
        ref_feats = _features_of(refs, feats, first.shape[:2])
    base_u8 = None
    for v in rows_v:
        name, lora = v.name, v.lora
        folder = out / "images" / name
        paths = [folder / f"{pi:04d}-seed{s}.png" for pi, s in items]
        recs: list[dict[str, Any]] = []
        for start in range(0, len(paths), 16):
            chunk = paths[start : start + 16]
            u8 = np.stack([load_image(p) for p in chunk])
            probs = det.predict(_to_tensor(u8)).float().numpy()  # [0, 1] inputs
            ptxt = [prompts[items[start + j][0]] for j in range(len(chunk))]
            extra: dict[str, list[float]] = {}
            if clip is not None:
                extra["clip_score"] = clip_scores(clip, u8, ptxt)
            if pick is not None:
                extra["pickscore"] = pick_scores(pick, u8, ptxt)
            if reward is not None:
                extra["image_reward"] = reward.scores(u8, ptxt)
            for j, p in enumerate(chunk):
                pi, s = items[start + j]
                sc = map_scores(probs[j, 0])
                rec: dict[str, Any] = {
                    "model": name,
                    "prompt_index": pi,
                    "prompt": prompts[pi],
                    "seed": s,
                    "image": str(p.relative_to(out)),
                    "mean": sc["mean"],
                    "max": sc["max"],
                    "artifact_ratio": sc["artifact_ratio"],
                }
                for k, v in extra.items():
                    rec[k] = v[j]
                ref = pairs.get((pi, s)) or pairs.get((pi, None))
                if ref is not None:
                    r = load_image(ref)
                    if r.shape != u8[j].shape:
                        r = np.asarray(
                            Image.fromarray(r).resize(
                                (u8[j].shape[1], u8[j].shape[0]), Image.BICUBIC
                            )
                        )
                    a, b = u8[j].astype(np.float64) / 255, r.astype(np.float64) / 255
                    rec["ssim"], rec["psnr"] = ssim(a, b), psnr(a, b)
                    rec["ref"] = str(ref)
                recs.append(rec)
        row: dict[str, Any] = {
            "model": name,
            "lora": lora,
            "n_images": len(recs),
            "mean_conf": float(np.mean([r["mean"] for r in recs])),
            "max_conf": float(np.mean([r["max"] for r in recs])),
            "artifact_freq": float(np.mean([r["max"] >= ARTIFACT_THRESHOLD for r in recs])),
            "artifact_pixels": float(np.mean([r["artifact_ratio"] for r in recs])),
        }
        for key in ("ssim", "psnr", "clip_score", "pickscore", "image_reward"):
            vals = [r[key] for r in recs if key in r]
            row[key] = float(np.mean(vals)) if vals else None
        row["n_paired"] = sum("ssim" in r for r in recs)
        timing = timings.get(name)
        row["seconds_per_image"] = timing["seconds"] / timing["images"] if timing else None
        row["peak_extra_mib"] = timing["peak_extra_bytes"] / 2**20 if timing else None
        row["how"] = v.how
        if guard is not None:  # against the base model's images at the same prompts and seeds
            u8_all = np.stack([load_image(p) for p in paths])
            base_u8 = u8_all if base_u8 is None else base_u8
            ptxt = [prompts[pi] for pi, _ in items]
            for qname, value in guard.measure(u8_all, base_u8, ptxt).items():
                row[f"quality:{qname}"] = value
        if ref_feats is not None and feats is not None:
            mine = _features_of(paths, feats, None)
            row["fid"] = fid(mine, ref_feats)
            row["kid"], row["kid_std"] = kid(
                mine,
                ref_feats,
                subset_size=cfg.kid_subset_size,
                subsets=cfg.kid_subsets,
                seed=cfg.seed,
            )
        else:
            row["fid"] = row["kid"] = row["kid_std"] = None
        rows.append(row)
        per_image.extend(recs)

    results = {
        "config": asdict(cfg) | {"resolution": size},
        "quality": [
            {"name": sc.name, "higher_is_better": sc.higher_is_better}
            for sc, _ in (guard.scorers if guard is not None else [])
        ],
        "detector": det.describe() if hasattr(det, "describe") else {},
        "n_refs": len(refs),
        "models": rows,
        "images": per_image,
    }
    atomic_write_json(out / "results.json", _json_safe(results))
    atomic_write_text(out / "results.md", results_markdown(results))
    _write_grids(out, prompts, cfg.seeds, names, per_image)
    bar_chart(rows, out / "bars.png", results["quality"])
    return results


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _fmt(key: str, v: Any) -> str:
    if v is None:
        return "-"
    if key == "seconds_per_image":
        return f"{v:.3g}"
    if key == "peak_extra_mib":
        return f"{v:.1f}"
    if key in ("mean_conf", "max_conf", "artifact_freq", "artifact_pixels"):
        return f"{100 * v:.2f}%"
    if key == "kid":
        return f"{v:.4f}"
    return f"{v:.2f}" if abs(v) >= 10 else f"{v:.4f}"


def columns(results: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """``(key, header, lower is better)`` of every metric some row has: :data:`METRICS`,
    then the quality scorers' (``quality:NAME``)."""
    rows = results["models"]
    quality = [
        (f"quality:{q['name']}", f"{q['name']} (quality)", not q["higher_is_better"])
        for q in results.get("quality", [])
    ]
    return [
        (k, h, low) for k, h, low in [*METRICS, *quality] if any(r.get(k) is not None for r in rows)
    ]


def results_markdown(results: dict[str, Any]) -> str:
    rows = results["models"]
    cols = columns(results)
    cfg = results["config"]
    lines = [
        "# Generation evaluation (`dd eval gen`)",
        "",
        f"{cfg['backbone']} `{cfg['model']}`, {rows[0]['n_images'] if rows else 0} images per "
        f"model (prompts x seeds {', '.join(map(str, cfg['seeds']))}), identical seeds for "
        "every model.",
        "",
        "| model | " + " | ".join(f"{h} {'↓' if low else '↑'}" for _, h, low in cols) + " |",
        "| --- | " + " | ".join("---" for _ in cols) + " |",
    ]
    for r in rows:
        cells = []
        for k, _, low in cols:
            vals = [x[k] for x in rows if x.get(k) is not None]
            best = (min(vals) if low else max(vals)) if len(vals) > 1 else None
            text = _fmt(k, r.get(k))
            if k == "kid" and r.get("kid_std"):
                text += f" ± {r['kid_std']:.4f}"
            cells.append(f"**{text}**" if best is not None and r.get(k) == best else text)
        lines.append(f"| {r['model']} | " + " | ".join(cells) + " |")
    det = results.get("detector") or {}
    lines += [
        "",
        "Artifact confidence: mean over images of each image's mean / max detector "
        "probability; frequency: share of images with max >= 0.5; pixel ratio: mean share of "
        "pixels >= 0.5"
        + (f" (detector {det.get('detector')}, weights {det.get('weights')})." if det else "."),
    ]
    if det.get("untrained"):
        lines.append("**The detector had random weights: its scores mean nothing.**")
    if any(r.get("seconds_per_image") is not None for r in rows):
        lines.append(
            "Time: seconds per image of each row's generation (best-of-N: N candidates and "
            "their detector pass; guided: the guided steps); peak extra memory: the most "
            "memory generating allocated above the loaded models (CUDA: the allocator's peak; "
            "CPU: the profiler's, for one image)."
        )
    if results.get("quality"):
        lines.append(
            "Quality: each scorer on a row's images against the base model's at the same "
            "prompts and seeds (`dd plugins` lists the scorers)."
        )
    if results.get("n_refs"):
        n_paired = rows[0].get("n_paired", 0) if rows else 0
        lines.append(
            f"FID/KID against {results['n_refs']} reference images (Inception pool features); "
            f"SSIM/PSNR against {n_paired} paired references per model."
        )
    return "\n".join(lines) + "\n"


def _write_grids(
    out: Path,
    prompts: Sequence[str],
    seeds: Sequence[int],
    names: Sequence[str],
    recs: list[dict[str, Any]],
) -> None:
    from dd.data.images import load_image
    from dd.report.grid import image_grid
    from dd.runtime.io import save_image_atomic

    by = {(r["model"], r["prompt_index"], r["seed"]): r for r in recs}
    for pi in range(len(prompts)):
        rows = []
        for s in seeds:
            row = []
            for name in names:
                r = by[(name, pi, s)]
                cap = f"mean {r['mean']:.3f} max {r['max']:.3f}"
                if "ssim" in r:
                    cap += f" ssim {r['ssim']:.2f}"
                row.append((load_image(out / r["image"]), cap))
            rows.append(row)
        grid = image_grid(
            rows, row_titles=[f"seed {s}" for s in seeds], col_titles=list(names), cell=256
        )
        save_image_atomic(grid, out / "grids" / f"prompt-{pi:04d}.png")


def bar_chart(
    rows: Sequence[dict[str, Any]], path: Path, quality: list[dict[str, Any]] | None = None
) -> None:
    """One bar panel per metric with values (Pillow only), a bar per model."""
    from PIL import Image, ImageDraw

    from dd.report.plot import PALETTE, draw_text
    from dd.runtime.io import save_image_atomic

    keys = [(k, h) for k, h, _ in columns({"models": rows, "quality": quality or []})]
    pw, ph = 240, 220
    img = Image.new("RGB", (max(1, len(keys)) * pw, ph + 20 + 14 * len(rows)), "white")
    draw = ImageDraw.Draw(img)
    for k, (key, header) in enumerate(keys):
        x0, y0, y1 = k * pw + 16, 26, ph - 24
        draw_text(draw, (x0, 6), header, (0, 0, 0))
        vals = [r.get(key) for r in rows]
        top = max([abs(v) for v in vals if v is not None] + [1e-12])
        bw = max(6, (pw - 40) // max(1, len(rows)) - 6)
        draw.line([(x0, y1), (x0 + pw - 32, y1)], fill=(0, 0, 0))
        for j, v in enumerate(vals):
            if v is None:
                continue
            h = (y1 - y0 - 14) * abs(v) / top
            bx = x0 + 4 + j * (bw + 6)
            draw.rectangle([bx, y1 - h, bx + bw, y1], fill=PALETTE[j % len(PALETTE)])
            draw_text(draw, (bx, y1 - h - 12), _fmt(key, v), (0, 0, 0))
    for j, r in enumerate(rows):
        y = ph + 4 + 14 * j
        draw.rectangle([16, y + 2, 26, y + 10], fill=PALETTE[j % len(PALETTE)])
        draw_text(draw, (32, y), str(r["model"]), (0, 0, 0))
    save_image_atomic(img, path)
