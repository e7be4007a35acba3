"""Class balance (DiffDoctor, seed 000, Sec. 3.2) and the deterministic epoch order.

Positives and negatives: a sample is a *positive* when it shows an artifact and its source
is not ``real``; everything else is a *negative*. Whether it shows one: its manifest's
``positive`` field when present (``dd label pseudo`` writes it from the map: max confidence
>= ``positive_threshold``, recorded beside it, since it writes a soft map for every image),
else whether it has a mask (a human label's mask marks an artifact; a labelled but
artifact-free image has ``"mask": null``, and an all-zero mask file still counts as a
positive; its loss target is 0 either way).

Balance spec (``--balance``): ``"hand=1:1,face=1:2,*=1:1"`` sets, per category, the ratio of
positive to negative draws; ``*`` applies to categories not listed (and to positives without
a category, grouped as ``(none)``). Categories match case-insensitively. Weights per epoch:

* each positive of a balanced category ``c`` has weight 1 (positives keep their natural
  frequency), so ``c``'s positives weigh ``P_c``;
* ``c``'s negatives weigh ``P_c * neg / pos`` together, spread evenly over the negatives of
  category ``c`` and the *shared* negatives (negatives without a category, e.g. real photos),
  which every balanced category draws from;
* categories without a ratio (no entry and no ``*``), and categories that have negatives but
  no positives, keep natural weights (1 per sample);
* shared negatives weigh only what balanced categories draw from them; when nothing draws
  from them they keep natural weights, so they are never silently dropped.

An epoch then draws ``length`` samples with replacement, with probability proportional to
the weights. Without a balance spec an epoch is a plain permutation (each sample once).
Either way the order of epoch ``e`` is a pure function of ``(seed, e)``, so a resumed run
skips exactly the consumed part of its epoch (:class:`EpochSampler`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from dd.data.datasets import Sample
from dd.errors import DDError, UsageError

__all__ = [
    "NONE",
    "SHARED",
    "CategoryBalance",
    "EpochSampler",
    "Ratio",
    "balance_table",
    "balance_weights",
    "category_of",
    "epoch_generator",
    "epoch_loader",
    "is_positive",
    "parse_balance",
    "rows_to_json",
]

#: Group name of positives and category negatives without a category.
NONE = "(none)"
#: Row name of the shared negatives in reports.
SHARED = "(shared negatives)"


@dataclass(frozen=True)
class Ratio:
    """Positive : negative draw ratio of one category."""

    pos: float
    neg: float

    def __str__(self) -> str:
        return f"{self.pos:g}:{self.neg:g}"


_RATIO = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*:\s*([0-9]*\.?[0-9]+)\s*$")


def parse_balance(spec: str | None) -> dict[str, Ratio]:
    """``"hand=1:1,face=1:2,*=1:1"`` -> ``{"hand": Ratio(1, 1), ...}`` (keys lower case)."""
    out: dict[str, Ratio] = {}
    if spec is None or not spec.strip():
        return out
    for part in spec.split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        m = _RATIO.match(value)
        if not sep or not key or m is None:
            raise UsageError(
                f"bad --balance entry {part.strip()!r}",
                hint='write CATEGORY=POS:NEG pairs, e.g. "hand=1:1,face=1:2,*=1:1"',
            )
        ratio = Ratio(float(m[1]), float(m[2]))
        if ratio.pos <= 0:
            raise UsageError(
                f"bad --balance entry {part.strip()!r}: the positive part must be above 0",
                hint="to leave out a category's positives, filter the dataset instead",
            )
        if key in out:
            raise UsageError(f"--balance names category {key!r} twice")
        out[key] = ratio
    return out


def is_positive(sample: Sample) -> bool:
    """A sample that shows an artifact (:attr:`Sample.positive`: the manifest's ``positive``
    decision, else a mask) and is not a real photo."""
    return sample.positive and sample.source != "real"


def category_of(sample: Sample) -> str | None:
    """The sample's category, lower case and stripped (None when missing or blank)."""
    c = (sample.category or "").strip().lower()
    return c or None


@dataclass
class CategoryBalance:
    """One row of the balance report (shares are expected fractions of all draws)."""

    category: str
    positives: int
    negatives: int
    ratio: str
    pos_share: float
    neg_share: float
    note: str = ""

    @property
    def effective(self) -> str:
        if self.pos_share == 0:
            return "-"
        return f"1:{self.neg_share / self.pos_share:.2f}"


def balance_weights(
    samples: Sequence[Sample], ratios: dict[str, Ratio]
) -> tuple[np.ndarray, list[CategoryBalance]]:
    """Per-sample draw weights (float64) and the per-category report (module docstring).

    With empty ``ratios`` every weight is 1 (the natural distribution)."""
    n = len(samples)
    if n == 0:
        raise DDError("no training samples to balance")
    pos = np.array([is_positive(s) for s in samples])
    cats = [category_of(s) for s in samples]
    weights = np.ones(n, np.float64) if not ratios else np.zeros(n, np.float64)
    shared = np.array([(not p) and c is None for p, c in zip(pos, cats, strict=True)])
    groups = sorted({c for c in cats if c is not None})
    if pos[[c is None for c in cats]].any():
        groups.append(NONE)

    def members(group: str) -> np.ndarray:
        key = None if group == NONE else group
        return np.array([c == key for c in cats])

    # mass attributed to each group: [positive mass, negative mass] (including shared draws)
    mass: dict[str, list[float]] = {}
    notes: dict[str, str] = {}
    asked: dict[str, str] = {}
    borrowed = np.zeros(n, np.float64)  # shared-negative weight drawn by each balanced group
    for g in groups:
        m = members(g)
        g_pos, g_neg = m & pos, m & ~pos & ~shared
        ratio = ratios.get(g, ratios.get("*")) if ratios else None
        if g == NONE:
            g_neg = np.zeros(n, bool)  # uncategorised negatives are the shared pool
        if ratio is None or not g_pos.any():
            if ratios:
                weights[g_pos | g_neg] = 1.0
            mass[g] = [float(g_pos.sum()), float(g_neg.sum())]
            asked[g] = "natural" if ratio is None else str(ratio)
            if ratio is not None:
                notes[g] = "no positives: natural weights"
            continue
        asked[g] = str(ratio)
        weights[g_pos] = 1.0
        neg_mass = g_pos.sum() * ratio.neg / ratio.pos
        pool = g_neg | shared
        if neg_mass > 0 and not pool.any():
            notes[g] = "no negatives available"
            neg_mass = 0.0
        if neg_mass > 0:
            share = neg_mass / pool.sum()
            weights[g_neg] += share
            borrowed[shared] += share
        mass[g] = [float(g_pos.sum()), float(neg_mass)]

    shared_natural = False
    if ratios:
        if shared.any() and borrowed.sum() == 0:
            weights[shared] = 1.0
            shared_natural = True
        else:
            weights[shared] += borrowed[shared]
    elif shared.any():
        shared_natural = True

    total = float(weights.sum())
    if total <= 0 or not math.isfinite(total):
        raise DDError("the balance gives every training sample weight 0", hint="check --balance")
    rows = []
    for g in groups:
        m = members(g)
        rows.append(
            CategoryBalance(
                category=g,
                positives=int((m & pos).sum()),
                negatives=int((m & ~pos & ~shared).sum()),
                ratio=asked[g],
                pos_share=mass[g][0] / total,
                neg_share=mass[g][1] / total,
                note=notes.get(g, ""),
            )
        )
    if shared.any():
        rows.append(
            CategoryBalance(
                category=SHARED,
                positives=0,
                negatives=int(shared.sum()),
                ratio="natural" if shared_natural else "shared",
                pos_share=0.0,
                neg_share=float(shared.sum()) / total if shared_natural else 0.0,
                note=(
                    "natural frequency"
                    if shared_natural
                    else f"{float(borrowed[shared].sum()) / total:.1%} of draws, as the "
                    "categories' negatives"
                ),
            )
        )
    return weights, rows


def balance_table(rows: Sequence[CategoryBalance], length: int, title: str):
    """A rich table of :func:`balance_weights` rows (counts before, expected draws after)."""
    from rich.table import Table

    table = Table(title=title)
    for col in ("category", "pos", "neg", "asked", "pos draws", "neg draws", "pos:neg"):
        table.add_column(col, justify="left" if col == "category" else "right")
    table.add_column("note")
    for r in rows:
        table.add_row(
            r.category,
            str(r.positives),
            str(r.negatives),
            r.ratio,
            f"{r.pos_share:.1%} ({r.pos_share * length:.0f})",
            f"{r.neg_share:.1%} ({r.neg_share * length:.0f})",
            r.effective if r.category != SHARED else "-",
            r.note,
        )
    return table


def rows_to_json(rows: Sequence[CategoryBalance]) -> list[dict[str, Any]]:
    """The report rows as JSON-able dicts (with the effective ratio)."""
    return [{**asdict(r), "effective": r.effective} for r in rows]


def epoch_generator(seed: int, epoch: int, stream: int = 0) -> torch.Generator:
    """A CPU generator seeded by ``(seed, epoch, stream)`` alone (no global state)."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, stream, 0xDD]).generate_state(
        2, np.uint32
    )
    g = torch.Generator()
    g.manual_seed(int(state[0]) << 32 | int(state[1]))
    return g


class EpochSampler(Sampler[tuple[int, int]]):
    """Yields ``(sample index, augmentation seed)`` for one epoch, from position ``start``.

    The order of an epoch is a pure function of ``(seed, epoch)``: a permutation of all
    samples (``weights`` None) or ``length`` draws with replacement proportional to
    ``weights``. ``length`` is cut down to a multiple of ``multiple`` (the global batch) so
    every process gets whole, equal batches. Set ``epoch`` and ``start`` (a multiple of
    ``multiple``) before iterating; each item's augmentation seed depends on its position
    only, so resuming mid-epoch reproduces the uninterrupted run exactly.
    """

    def __init__(
        self,
        num_samples: int,
        seed: int,
        *,
        weights: np.ndarray | None = None,
        length: int | None = None,
        multiple: int = 1,
    ):
        super().__init__()
        length = num_samples if length is None else length
        self.length = (length // multiple) * multiple
        if self.length == 0:
            raise DDError(
                f"{length} samples per epoch make no full batch of {multiple}",
                hint="lower --batch-size (the global batch is batch size x processes) or "
                "add training samples",
            )
        if weights is not None and len(weights) != num_samples:
            raise DDError(f"{len(weights)} weights for {num_samples} samples")
        self.num_samples = num_samples
        self.seed = seed
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        self.multiple = multiple
        self.epoch = 0
        self.start = 0

    def order(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(indices, augmentation seeds)`` of the whole epoch."""
        g = epoch_generator(self.seed, epoch)
        if self.weights is None:
            idx = torch.randperm(self.num_samples, generator=g)[: self.length]
        else:
            idx = torch.multinomial(self.weights, self.length, replacement=True, generator=g)
        seeds = torch.randint(0, 2**62, (self.length,), generator=g, dtype=torch.int64)
        return idx, seeds

    def __iter__(self) -> Iterator[tuple[int, int]]:
        idx, seeds = self.order(self.epoch)
        for i in range(self.start, self.length):
            yield int(idx[i]), int(seeds[i])

    def __len__(self) -> int:
        return self.length - self.start


def epoch_loader(
    dataset: torch.utils.data.Dataset,
    sampler: EpochSampler,
    *,
    batch_size: int,
    workers: int,
    seed: int,
    collate_fn: Any = None,
) -> torch.utils.data.DataLoader:
    """The training loader over ``sampler``'s epoch: whole batches of ``batch_size`` (the
    sampler's length is a multiple of the global batch), decoded by ``workers`` processes.

    Under ``accelerate`` the prepared loader hands batch ``b`` of the epoch to process
    ``b % world``, and each process's loader gives its batches to its workers in turn, so an
    epoch without ``--balance`` reads each sample exactly once across processes x workers
    (tested with 2 x 2 on shards); only ``length mod global batch`` samples, a different few
    each epoch, wait for a later one. Shard members are read by offset
    (:func:`dd.data.shards.read_member`), so the order can be any permutation."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=workers,
        collate_fn=collate_fn,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=False,
    )
