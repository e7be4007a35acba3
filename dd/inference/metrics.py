"""Detector metrics, accumulated batch by batch (see ``docs/datasets.md``, "Metrics").

With ``g`` the ground-truth map and ``p`` the predicted probability map (both in [0, 1]):

* ``mse``: mean of ``(p - g)^2`` over an image's pixels, averaged over all images.
* ``mse_clean``: the same over images whose ground truth is all zero (false positives on
  clean images: the "real" column of DiffDoctor's benchmark). NaN without such images.
* ``kl_fn``: mean over pixels of ``g * log(g' / p')``, averaged over images (missed
  artifacts, false negatives). ``kl_fp``: mean of ``(1 - g) * log((1 - g') / (1 - p'))``
  (false alarms). ``p'`` and ``g'`` are ``p`` and ``g`` clamped to ``[eps, 1 - eps]``
  (``eps = 1e-6`` by default) inside the logarithms only; the factors in front are the raw
  ``g`` and ``1 - g``, so a pixel with ``g = 0`` adds exactly 0 to ``kl_fn`` and one with
  ``g = 1`` exactly 0 to ``kl_fp``.
* ``cc``: Pearson correlation of ``p`` and ``g`` over an image's pixels, averaged over the
  images where neither map is constant (a constant map has no correlation; such images are
  left out of ``cc`` only). NaN when no image qualifies.
* ``iou`` and ``f1``: of ``p >= 0.5`` against ``g >= 0.5``, from true/false positive and false
  negative pixel counts summed over the whole dataset (not averaged per image):
  ``iou = TP / (TP + FP + FN)``, ``f1 = 2 TP / (2 TP + FP + FN)``; NaN when the denominator
  is 0 (no positive pixel predicted or present anywhere).
* ``pixel_auroc``: area under the ROC curve of ``p`` for the pixel label ``g >= 0.5``, from
  two histograms of ``p`` (positive and negative pixels) with ``bins`` equal bins on [0, 1]
  (10000 by default, so a resolution of 1e-4): predictions in one bin count as ties (half a
  pair). NaN unless both labels occur.
* ``image_auroc``: exact AUROC (Mann-Whitney U with average ranks for ties) of each image's
  ``max(p)`` for the image label "has an artifact" (``max(g) >= 0.5``). NaN unless both occur.

Counts: ``n_images``; ``n_clean`` (all-zero ground truth); ``n_positive`` (``max(g) >= 0.5``).
An image whose ``max(g)`` lies in (0, 0.5) is neither clean nor positive. Sample weights are
not used: every image counts once.

Memory stays bounded on any dataset size: per image only a few scalars are kept (its
``max(p)`` and label for ``image_auroc``), per pixel nothing but the two histograms.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dd.data.images import DEFAULT_MAX_PIXELS
from dd.errors import DDError

if TYPE_CHECKING:
    from rich.table import Table

    from dd.api.detectors import Detector
    from dd.data.datasets import Sample

__all__ = [
    "COUNT_KEYS",
    "METRIC_KEYS",
    "DetectorMetrics",
    "calibrate_image_threshold",
    "evaluate_detector",
    "image_level_scores",
    "image_level_summary",
    "format_table",
    "json_safe",
    "rank_auroc",
]

#: The float metrics ``DetectorMetrics.compute`` returns (overall and per category).
METRIC_KEYS = (
    "mse",
    "mse_clean",
    "kl_fn",
    "kl_fp",
    "cc",
    "iou",
    "f1",
    "pixel_auroc",
    "image_auroc",
)
#: The integer counts returned beside them.
COUNT_KEYS = ("n_images", "n_clean", "n_positive")

# Layout of a bucket's running sums (one float64 vector, so states add up elementwise).
_SUMS = (
    "n_images",
    "n_clean",
    "n_positive",
    "mse",
    "mse_clean",
    "kl_fn",
    "kl_fp",
    "cc",
    "n_cc",
    "tp",
    "fp",
    "fn",
)
_I = {k: i for i, k in enumerate(_SUMS)}
_NONE_LABEL = "(none)"


class _Bucket:
    """Running sums of one group of images (all of them, or one category)."""

    def __init__(self, bins: int):
        self.sums = torch.zeros(len(_SUMS), dtype=torch.float64)
        self.hist = torch.zeros(2, bins, dtype=torch.int64)  # [negative, positive] pixels
        self.scores: list[float] = []  # max(p) per image
        self.labels: list[float] = []  # 1.0 if max(g) >= 0.5

    def merge(self, other: _Bucket) -> None:
        self.sums += other.sums
        self.hist += other.hist
        self.scores.extend(other.scores)
        self.labels.extend(other.labels)

    def compute(self) -> dict[str, Any]:
        s = {k: float(self.sums[i]) for k, i in _I.items()}
        n, tp, fp, fn = s["n_images"], s["tp"], s["fp"], s["fn"]
        out: dict[str, Any] = {
            "mse": _div(s["mse"], n),
            "mse_clean": _div(s["mse_clean"], s["n_clean"]),
            "kl_fn": _div(s["kl_fn"], n),
            "kl_fp": _div(s["kl_fp"], n),
            "cc": _div(s["cc"], s["n_cc"]),
            "iou": _div(tp, tp + fp + fn),
            "f1": _div(2 * tp, 2 * tp + fp + fn),
            "pixel_auroc": _hist_auroc(self.hist),
            "image_auroc": rank_auroc(self.scores, self.labels),
        }
        out.update({k: int(s[k]) for k in COUNT_KEYS})
        return out


def _div(a: float, b: float) -> float:
    return a / b if b > 0 else math.nan


def _hist_auroc(hist: torch.Tensor) -> float:
    """AUROC from per-bin counts of negatives (row 0) and positives (row 1); a bin = ties."""
    neg, pos = hist[0].double(), hist[1].double()
    n_neg, n_pos = float(neg.sum()), float(pos.sum())
    if n_neg == 0 or n_pos == 0:
        return math.nan
    below = torch.cumsum(neg, 0) - neg  # negatives in lower bins
    return float((pos * (below + 0.5 * neg)).sum()) / (n_pos * n_neg)


def rank_auroc(scores: Sequence[float], labels: Sequence[float]) -> float:
    """Exact AUROC of ``scores`` for binary ``labels`` (Mann-Whitney U, ties count half).

    NaN unless both labels occur.
    """
    s = np.asarray(scores, np.float64)
    y = np.asarray(labels, np.float64) > 0.5
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    first_rank = np.cumsum(counts) - counts + 1  # 1-based rank of each distinct value's first
    avg_rank = first_rank + (counts - 1) / 2.0
    u = float(avg_rank[inverse][y].sum()) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


class DetectorMetrics:
    """Streaming detector metrics (module docstring) for overall and per-category results.

    ``update`` per batch (any device); ``compute`` at the end. For several processes, gather
    ``state()`` from each (e.g. ``accelerate.utils.gather_object([m.state()])``) and combine
    them with ``DetectorMetrics.from_states(states)``, or ``merge`` accumulators directly.
    """

    def __init__(self, eps: float = 1e-6, bins: int = 10000):
        if not 0.0 < eps < 0.5:
            raise DDError(f"metrics eps must be in (0, 0.5), got {eps}")
        if int(bins) < 2:
            raise DDError(f"metrics bins must be at least 2, got {bins}")
        self.eps = float(eps)
        self.bins = int(bins)
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated."""
        self._all = _Bucket(self.bins)
        self._cats: dict[str | None, _Bucket] = {}

    # -- accumulating ----------------------------------------------------------------------------
    @torch.no_grad()
    def update(
        self,
        pred: torch.Tensor,
        target: torch.Tensor,
        categories: list[str | None] | None = None,
    ) -> None:
        """Add a batch: ``pred`` and ``target`` are ``B x 1 x H x W`` floats in [0, 1].

        ``categories`` (one per image, None for none) feeds the per-category breakdown.
        """
        if pred.ndim != 4 or pred.shape[1] != 1 or tuple(pred.shape) != tuple(target.shape):
            raise DDError(
                f"metrics need pred and target of equal shape B x 1 x H x W, got "
                f"{tuple(pred.shape)} and {tuple(target.shape)}",
                hint="upsample the prediction to the ground truth's size first",
            )
        b = pred.shape[0]
        cats = (
            [None] * b if categories is None else [c if c is None else str(c) for c in categories]
        )
        if len(cats) != b:
            raise DDError(f"got {len(cats)} categories for a batch of {b} images")
        if b == 0:
            return
        dt = torch.float32 if pred.device.type == "mps" else torch.float64
        p = pred.detach().to(dt).reshape(b, -1)
        g = target.detach().to(device=p.device, dtype=dt).reshape(b, -1)
        pmin, pmax = p.amin(1), p.amax(1)
        gmin, gmax = g.amin(1), g.amax(1)
        lo_hi = torch.stack([pmin.min(), pmax.max(), gmin.min(), gmax.max()]).tolist()
        if not (lo_hi[0] >= 0.0 and lo_hi[1] <= 1.0):  # NaN fails too
            raise DDError(
                f"predictions must be probabilities in [0, 1], got values in "
                f"[{lo_hi[0]:.4g}, {lo_hi[1]:.4g}]",
                hint="apply a sigmoid to logits (Detector.forward does)",
            )
        if not (lo_hi[2] >= 0.0 and lo_hi[3] <= 1.0):
            raise DDError(
                f"ground-truth maps must lie in [0, 1], got values in "
                f"[{lo_hi[2]:.4g}, {lo_hi[3]:.4g}]",
                hint="scale 8-bit masks by 1/255 (dd.data.datasets.load_mask does)",
            )

        eps = self.eps
        pc, gc = p.clamp(eps, 1 - eps), g.clamp(eps, 1 - eps)
        mse = (p - g).square().mean(1)
        kl_fn = (g * (gc.log() - pc.log())).mean(1)
        kl_fp = ((1 - g) * (torch.log1p(-gc) - torch.log1p(-pc))).mean(1)
        dp, dg = p - p.mean(1, keepdim=True), g - g.mean(1, keepdim=True)
        has_cc = (pmax > pmin) & (gmax > gmin)
        denom = (dp.square().sum(1) * dg.square().sum(1)).sqrt()
        cc = torch.where(has_cc, (dp * dg).sum(1) / denom.clamp_min(torch.finfo(dt).tiny), 0.0)
        pb, gb = p >= 0.5, g >= 0.5
        tp, fp, fn = (pb & gb).sum(1), (pb & ~gb).sum(1), (~pb & gb).sum(1)
        clean = (gmax == 0).to(dt)
        positive = (gmax >= 0.5).to(dt)
        per_image = torch.stack(
            [
                torch.ones_like(mse),
                clean,
                positive,
                mse,
                mse * clean,
                kl_fn,
                kl_fp,
                cc,
                has_cc.to(dt),
                tp.to(dt),
                fp.to(dt),
                fn.to(dt),
            ],
            1,
        )
        # One histogram per (category in this batch, pixel label), in one bincount.
        keys = list(dict.fromkeys(cats))
        group = torch.tensor([keys.index(c) for c in cats], device=p.device)
        idx = (p * self.bins).long().clamp_(0, self.bins - 1)
        flat = (group[:, None] * 2 + gb.long()) * self.bins + idx
        hist = torch.bincount(flat.reshape(-1), minlength=len(keys) * 2 * self.bins)
        hist = hist.reshape(len(keys), 2, self.bins).cpu()
        per_image = per_image.cpu().double()
        scores, labels = pmax.cpu().tolist(), positive.cpu().tolist()

        for k, key in enumerate(keys):
            rows = [i for i, c in enumerate(cats) if c == key]
            bucket = self._cats.setdefault(key, _Bucket(self.bins))
            bucket.sums += per_image[rows].sum(0)
            bucket.hist += hist[k]
            bucket.scores.extend(scores[i] for i in rows)
            bucket.labels.extend(labels[i] for i in rows)
        self._all.sums += per_image.sum(0)
        self._all.hist += hist.sum(0)
        self._all.scores.extend(scores)
        self._all.labels.extend(labels)

    # -- results ---------------------------------------------------------------------------------
    def compute(self) -> dict[str, Any]:
        """Overall metrics (``METRIC_KEYS`` floats, NaN where undefined, ``COUNT_KEYS`` ints)
        and, when any image had a named category, ``by_category`` with the same keys per
        category (images without one under ``"(none)"``)."""
        out = self._all.compute()
        if any(c is not None for c in self._cats):
            named = sorted(c for c in self._cats if c is not None)
            order: list[str | None] = [*named, *([None] if None in self._cats else [])]
            out["by_category"] = {
                (_NONE_LABEL if c is None else c): self._cats[c].compute() for c in order
            }
        return out

    # -- combining -------------------------------------------------------------------------------
    def merge(self, other: DetectorMetrics) -> DetectorMetrics:
        """Add ``other``'s accumulated data to this one (in place; returns self)."""
        if other.bins != self.bins or other.eps != self.eps:
            raise DDError(
                f"cannot merge metrics with bins={other.bins}, eps={other.eps} into "
                f"bins={self.bins}, eps={self.eps}",
                hint="create every accumulator with the same settings",
            )
        self._all.merge(other._all)
        for c, bucket in other._cats.items():
            self._cats.setdefault(c, _Bucket(self.bins)).merge(bucket)
        return self

    def state(self) -> dict[str, torch.Tensor]:
        """Everything accumulated, as CPU tensors (picklable; for gathering across processes).

        Keys: ``config`` (eps, bins), then ``all/...`` and ``category/<json name>/...`` with
        ``sums``, ``hist`` and ``images`` (``N x 2``: max(p), label) each.
        """
        out = {"config": torch.tensor([self.eps, float(self.bins)], dtype=torch.float64)}
        buckets = {"all": self._all}
        buckets.update({f"category/{json.dumps(c)}": b for c, b in self._cats.items()})
        for prefix, b in buckets.items():
            out[f"{prefix}/sums"] = b.sums.clone()
            out[f"{prefix}/hist"] = b.hist.clone()
            out[f"{prefix}/images"] = torch.tensor(
                list(zip(b.scores, b.labels, strict=True)), dtype=torch.float64
            ).reshape(-1, 2)
        return out

    @classmethod
    def from_states(cls, states: Iterable[Mapping[str, torch.Tensor]]) -> DetectorMetrics:
        """One accumulator holding the sum of several ``state()`` dicts (e.g. one per rank)."""
        merged: DetectorMetrics | None = None
        for st in states:
            part = cls._from_state(st)
            merged = part if merged is None else merged.merge(part)
        if merged is None:
            raise DDError("no metric states to combine")
        return merged

    @classmethod
    def _from_state(cls, st: Mapping[str, torch.Tensor]) -> DetectorMetrics:
        try:
            eps, bins = st["config"].tolist()
            m = cls(eps=eps, bins=int(bins))
            for key in st:
                if not key.endswith("/sums"):
                    continue
                prefix = key[: -len("/sums")]
                if prefix == "all":
                    bucket = m._all
                else:
                    bucket = m._cats.setdefault(
                        json.loads(prefix[len("category/") :]), _Bucket(m.bins)
                    )
                bucket.sums = st[key].detach().cpu().double().clone()
                bucket.hist = st[f"{prefix}/hist"].detach().cpu().long().clone()
                images = st[f"{prefix}/images"].detach().cpu().double()
                bucket.scores = images[:, 0].tolist()
                bucket.labels = images[:, 1].tolist()
        except (KeyError, ValueError, IndexError) as e:
            raise DDError(f"not a DetectorMetrics state ({type(e).__name__}: {e})") from None
        return m


# ------------------------------------------------------------------------------------------------
# Presentation
# ------------------------------------------------------------------------------------------------

_HEADERS = {
    "n_images": "images",
    "n_clean": "clean images",
    "n_positive": "with artifacts",
    "mse": "MSE",
    "mse_clean": "MSE clean",
    "kl_fn": "KL FN",
    "kl_fp": "KL FP",
    "cc": "CC",
    "iou": "IoU",
    "f1": "F1",
    "pixel_auroc": "AUROC pixel",
    "image_auroc": "AUROC image",
}


def _fmt(v: float) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def format_table(metrics: Mapping[str, Any], title: str = "detector metrics") -> Table:
    """A rich table of ``DetectorMetrics.compute()`` output: one row per metric, one column
    overall (``all``) and one per category. Undefined (NaN) values show as ``-``."""
    from rich.table import Table

    sets = [("all", metrics), *metrics.get("by_category", {}).items()]
    table = Table(title=title)
    table.add_column("metric", no_wrap=True)
    for name, _ in sets:
        table.add_column(name, justify="right", no_wrap=True)
    for k in COUNT_KEYS:
        table.add_row(_HEADERS[k], *(str(m[k]) for _, m in sets), end_section=k == COUNT_KEYS[-1])
    for k in METRIC_KEYS:
        table.add_row(_HEADERS[k], *(_fmt(m[k]) for _, m in sets))
    return table


def json_safe(obj: Any) -> Any:
    """``obj`` with every NaN float replaced by None (JSON has no NaN)."""
    if isinstance(obj, float):
        return None if math.isnan(obj) else obj
    if isinstance(obj, Mapping):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


# ------------------------------------------------------------------------------------------------
# Evaluation loop
# ------------------------------------------------------------------------------------------------


class _Item:
    """One loaded sample: detector input at its working size, target at the image size."""

    __slots__ = ("category", "size", "target", "tensor")
    error = None  # a sample that cannot be read raises instead (see evaluate_detector)

    def __init__(
        self, tensor: torch.Tensor, target: np.ndarray, size: tuple[int, int], cat: str | None
    ):
        self.tensor, self.target, self.size, self.category = tensor, target, size, cat


class _Indexed(_Item):
    __slots__ = ("index",)

    def __init__(self, tensor, target, size, cat, index: int):
        super().__init__(tensor, target, size, cat)
        self.index = index


def _load_sample(detector: Detector, sample: Sample, max_pixels: int | None) -> _Item:
    from dd.data.datasets import load_mask
    from dd.data.images import load_image
    from dd.inference import resize_for

    image = load_image(sample.image, max_pixels=max_pixels)
    size = (int(image.shape[0]), int(image.shape[1]))
    return _Item(resize_for(detector, image), load_mask(sample.mask, size), size, sample.category)


# Deliberate copy: the parameters of image_level_scores below, which it wraps.
def evaluate_detector(
    detector: Detector,
    samples: Sequence[Sample],
    batch_size: int = 8,
    *,
    workers: int = 4,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    metrics: DetectorMetrics | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Run ``detector`` over dataset ``samples`` and return ``DetectorMetrics.compute()``.

    Images are decoded and resized to ``detector.working_size`` in ``workers`` threads and
    batched by working size; each image's logits are upsampled to its own size (bilinear,
    then sigmoid, as ``Detector.forward``) and compared with its mask (``load_mask`` at the
    image size; no mask = all zero). Runs in eval mode under ``torch.inference_mode`` and
    restores the detector's training flag afterwards. ``metrics``: accumulate into this
    instance (e.g. one shard per process, then ``state()`` + ``from_states``); ``max_pixels``
    is ``load_image``'s decompression-bomb guard (None: no limit). An unreadable image or
    mask raises ``DDError`` naming it: metrics over a silently shortened dataset would
    mislead.
    """
    m = metrics if metrics is not None else DetectorMetrics()
    image_level_scores(
        detector,
        samples,
        batch_size,
        workers=workers,
        max_pixels=max_pixels,
        metrics=m,
        on_progress=on_progress,
    )
    return m.compute()


def image_level_scores(
    detector: Detector,
    samples: Sequence[Sample],
    batch_size: int = 8,
    *,
    workers: int = 2,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    metrics: DetectorMetrics | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """Per sample, in order: ``max`` (the image's max confidence) and ``max_in_mask`` (the
    max inside its mask, None without one), with its ``category`` and ``meta``.

    The loop of :func:`evaluate_detector` (see there); pixel metrics accumulate into
    ``metrics`` when given.
    """
    from dd.inference import detect_batches

    if batch_size < 1:
        raise DDError(f"batch size must be at least 1, got {batch_size}")

    def load(pair: tuple[int, Sample]) -> _Item:
        item = _load_sample(detector, pair[1], max_pixels)
        return _Indexed(item.tensor, item.target, item.size, item.category, pair[0])

    rows: list[dict[str, Any] | None] = [None] * len(samples)
    total, done = len(samples), 0
    if on_progress:
        on_progress(0, total)
    # detect_batches groups images by working size, so results may come out of order
    results = detect_batches(
        detector, list(enumerate(samples)), load, batch_size=batch_size, workers=workers
    )
    with torch.inference_mode():
        for item, prob in results:
            sample = samples[item.index]
            target = torch.from_numpy(item.target).to(prob.device)
            if metrics is not None:
                metrics.update(prob[None, None], target[None, None], [item.category])
            inside = prob[target > 0]
            rows[item.index] = {
                "max": float(prob.max()),
                "max_in_mask": float(inside.max()) if inside.numel() else None,
                "category": sample.category,
                "meta": dict(sample.meta or {}),
            }
            done += 1
            if on_progress and (done % batch_size == 0 or done == total):
                on_progress(done, total)
    return [r for r in rows if r is not None]


def calibrate_image_threshold(
    clean_max: Sequence[float], pass_rate: float = 0.95, step: float = 0.01
) -> float:
    """The smallest threshold on a ``step`` grid under which at least ``pass_rate`` of the
    clean images' max confidences fall (an image is flagged when its max reaches it)."""
    if not clean_max:
        raise DDError("no clean images to calibrate the image threshold on")
    if not 0.0 < pass_rate < 1.0:
        raise DDError(f"pass rate must be in (0, 1), got {pass_rate}")
    values = sorted(float(v) for v in clean_max)
    need = math.ceil(pass_rate * len(values))
    # the need-th smallest must lie strictly under the threshold
    t = math.floor(values[need - 1] / step + 1) * step
    return round(min(max(t, step), 1.0), 6)


def image_level_summary(rows: Sequence[Mapping[str, Any]], threshold: float) -> dict[str, Any]:
    """Clean images flagged (max >= threshold) and artifact images found (max inside the
    mask >= threshold), as counts and rates."""
    clean = [r for r in rows if r["max_in_mask"] is None]
    dirty = [r for r in rows if r["max_in_mask"] is not None]
    flagged = sum(r["max"] >= threshold for r in clean)
    found = sum(r["max_in_mask"] >= threshold for r in dirty)
    return {
        "threshold": threshold,
        "clean": len(clean),
        "clean_flagged": flagged,
        "clean_pass_rate": _div(len(clean) - flagged, len(clean)),
        "artifacts": len(dirty),
        "found": found,
        "found_rate": _div(found, len(dirty)),
        "image_auroc": rank_auroc(
            [r["max"] for r in rows], [float(r["max_in_mask"] is not None) for r in rows]
        ),
    }
