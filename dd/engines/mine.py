"""Hard-case mining (seed 000, Sec. 3.2): find the categories a detector is biased on, and
pick the images people should label.

1. Every pool image gets a category: its manifest ``category`` field, else the first keyword
   rule matching its prompt (manifest ``prompt`` field, or a sidecar ``.txt`` beside the
   image), else ``other``.
2. The detector runs over the pool (:func:`dd.engines.detect.run_detect`: batched,
   resumable, maps written atomically).
3. Per category: the statistics of the images' max confidence. A category is *flagged* when
   its mean max confidence stands out from the rest of the pool: ``d = (mean_c - mean_rest)
   / std_rest >= flag_z`` (an effect size, so it does not flag tiny differences in huge
   pools), ``mean_c - mean_rest >= min_gap`` (so a pool of near-identical scores flags
   nothing) and at least ``min_count`` images. That is the paper's signal: prompts of hard
   categories (hands, text, people) rarely yield negatives, so a detector trained on such
   data over-detects them.
4. Candidates: images of flagged categories whose max confidence is at least ``high`` (likely
   false positives or real artifacts: both teach the detector), and images of any category in
   the uncertainty band ``[band_lo, band_hi]``. Within a category the two lists alternate
   (most confident first, then closest to the band's centre); categories take turns, so the
   ``budget`` is spread evenly and a category with few candidates leaves its share to others.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dd.errors import EXIT_SOME_INPUTS_FAILED, DDError, UsageError

OTHER = "other"

#: Keyword rules used when no ``--categories`` file is given (first match wins; words match
#: whole words, case-insensitive, with an optional plural ``s``).
_DEFAULT_WORDS = {
    "hand": "hand finger fist palm holding waving thumb grip",
    "text": "text sign letter word logo poster caption written label",
    "face": "face portrait smile eye selfie headshot close-up closeup",
    "person": "person man woman men women people child children boy girl player dancer crowd "
    "human body",
    "animal": "animal dog cat horse bird cow sheep lion tiger bear elephant fox rabbit deer "
    "monkey fish",
}
DEFAULT_RULES: dict[str, list[str]] = {k: v.split() for k, v in _DEFAULT_WORDS.items()}


@dataclass
class CategoryRules:
    rules: list[tuple[str, re.Pattern[str]]]

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Iterable[str]], where: str = "rules"):
        rules = []
        for name, words in mapping.items():
            if isinstance(words, str):
                words = [words]
            try:
                words = [str(w).strip().lower() for w in words if str(w).strip()]
            except TypeError:
                raise DDError(f"{where}: category {name!r} needs a list of keywords") from None
            if not words:
                raise DDError(f"{where}: category {name!r} has no keywords")
            alt = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
            rules.append((str(name), re.compile(rf"(?<![\w-])(?:{alt})(?:s|es)?(?![\w-])")))
        if not rules:
            raise DDError(f"{where}: no categories defined")
        return cls(rules)

    def match(self, prompt: str | None) -> str | None:
        if not prompt:
            return None
        text = prompt.lower()
        for name, pattern in self.rules:
            if pattern.search(text):
                return name
        return None


def load_rules(path: str | Path | None) -> CategoryRules:
    """Keyword rules from a TOML or JSON file: ``[categories]`` (or the top level) maps a
    category to its keywords, in priority order. ``None``: :data:`DEFAULT_RULES`."""
    if path is None:
        return CategoryRules.from_mapping(DEFAULT_RULES, "default rules")
    path = Path(path)
    if not path.is_file():
        raise DDError(f"categories file not found: {path}")
    if path.suffix.lower() == ".json":
        import json

        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise DDError(f"{path}: not a readable JSON file ({e})") from None
    else:
        from dd.runtime.config import load_toml

        data = load_toml(path)
    if isinstance(data, dict) and isinstance(data.get("categories"), dict):
        data = data["categories"]
    if not isinstance(data, dict):
        raise DDError(f"{path}: expected a table of category = [keywords]")
    return CategoryRules.from_mapping(data, str(path))


def item_prompt(path: Path, meta: Mapping[str, Any]) -> str | None:
    """The prompt of a pool image: manifest ``prompt``/``caption``, else a sidecar ``.txt``."""
    for key in ("prompt", "caption", "text"):
        if isinstance(meta.get(key), str) and meta[key].strip():
            return meta[key]
    side = path.with_suffix(".txt")
    if side.is_file():
        try:
            return side.read_text(encoding="utf-8", errors="replace").strip() or None
        except OSError:
            return None
    return None


def item_category(
    path: Path, meta: Mapping[str, Any], rules: CategoryRules
) -> tuple[str, str | None]:
    """``(category, prompt)`` of a pool image."""
    prompt = item_prompt(path, meta)
    cat = meta.get("category")
    if isinstance(cat, str) and cat.strip():
        return cat.strip(), prompt
    return rules.match(prompt) or OTHER, prompt


# -- statistics and selection ------------------------------------------------------------------
@dataclass
class MineConfig:
    budget: int = 2000
    high: float = 0.5
    band: tuple[float, float] = (0.35, 0.65)
    flag_z: float = 0.5
    min_gap: float = 0.05
    min_count: int = 5
    force_flag: tuple[str, ...] = ()

    def check(self) -> None:
        lo, hi = self.band
        if self.budget < 1:
            raise UsageError(f"--budget must be at least 1, got {self.budget}")
        if not (0.0 <= lo <= hi <= 1.0):
            raise UsageError(f"--band must be LO,HI with 0 <= LO <= HI <= 1, got {lo},{hi}")
        if not 0.0 <= self.high <= 1.0:
            raise UsageError(f"--high must be in [0, 1], got {self.high}")


def category_stats(records: list[dict[str, Any]], cfg: MineConfig) -> list[dict[str, Any]]:
    """Per category: n, mean/median/p90 of max confidence, share at or above ``high``, the
    effect size ``d`` against the rest of the pool, and whether it is flagged."""
    by_cat: dict[str, list[float]] = {}
    for r in records:
        by_cat.setdefault(r["category"], []).append(float(r["max"]))
    rows = []
    for cat in sorted(by_cat):
        vals = np.asarray(by_cat[cat], np.float64)
        rest = np.asarray([v for c, vs in by_cat.items() if c != cat for v in vs], np.float64)
        if rest.size >= 2:
            gap = float(vals.mean()) - float(rest.mean())
            d = gap / max(float(rest.std(ddof=1)), 1e-6)
        else:
            gap = d = float("nan")
        forced = cat in cfg.force_flag
        flagged = forced or (
            vals.size >= cfg.min_count
            and math.isfinite(d)
            and d >= cfg.flag_z
            and gap >= cfg.min_gap
        )
        rows.append(
            {
                "category": cat,
                "n": int(vals.size),
                "mean_max": float(vals.mean()),
                "median_max": float(np.median(vals)),
                "p90_max": float(np.quantile(vals, 0.9)),
                "high_share": float((vals >= cfg.high).mean()),
                "gap": gap if math.isfinite(gap) else None,
                "d": d if math.isfinite(d) else None,
                "flagged": bool(flagged),
                "forced": forced,
            }
        )
    return rows


def select_hard_cases(
    records: list[dict[str, Any]], flagged: set[str], cfg: MineConfig
) -> list[dict[str, Any]]:
    """Pick up to ``cfg.budget`` records (each gets a ``reason``), balanced over categories."""
    lo, hi = cfg.band
    centre = (lo + hi) / 2
    per_cat: dict[str, list[dict[str, Any]]] = {}
    for cat in sorted({r["category"] for r in records}):
        rs = [r for r in records if r["category"] == cat]
        high = (
            sorted((r for r in rs if r["max"] >= cfg.high), key=lambda r: (-r["max"], r["key"]))
            if cat in flagged
            else []
        )
        taken = {r["key"] for r in high}
        band = sorted(
            (r for r in rs if lo <= r["max"] <= hi and r["key"] not in taken),
            key=lambda r: (abs(r["max"] - centre), r["key"]),
        )
        merged: list[dict[str, Any]] = []
        for i in range(max(len(high), len(band))):
            if i < len(high):
                merged.append({**high[i], "reason": "flagged-high"})
            if i < len(band):
                merged.append({**band[i], "reason": "uncertain"})
        if merged:
            per_cat[cat] = merged
    picked: list[dict[str, Any]] = []
    depth = 0
    while len(picked) < cfg.budget and any(depth < len(v) for v in per_cat.values()):
        for cat in per_cat:
            if depth < len(per_cat[cat]) and len(picked) < cfg.budget:
                picked.append(per_cat[cat][depth])
        depth += 1
    return picked


@dataclass
class MineResult:
    stats: list[dict[str, Any]]
    selected: list[dict[str, Any]]
    pool: int
    failures: list[dict[str, str]] = field(default_factory=list)
    resumed: int = 0
    queue: Path | None = None


def check_mine_out(out: Path, *, resume: bool = False, overwrite: bool = False) -> None:
    """The rules for ``--out`` of ``dd label mine``, checked before the detector loads: a
    folder of other results is refused unless ``overwrite``; an existing queue is re-mined
    only with ``resume`` (its detector results reused) or ``overwrite``; people's decisions
    are never replaced (only ``resume`` keeps them and re-mines)."""
    from dd.label.queue import DECISIONS
    from dd.runtime.io import check_output_folder

    out = Path(out)
    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other", hint="pick one")
    check_output_folder(out, "label mine", overwrite=overwrite)
    if (out / DECISIONS).exists() and not resume:
        raise DDError(
            f"{out} already holds labelling decisions ({DECISIONS})",
            hint="use --resume to re-mine into it (decisions are kept), or a new --out",
        )
    if (out / "queue.jsonl").exists() and not (resume or overwrite):
        raise DDError(
            f"{out} already holds a labelling queue",
            hint="use --resume to re-mine it (reusing the detector results), --overwrite to "
            "replace it, or a new --out",
        )


def run_mine(
    specs: list[str],
    detector: Any,
    out: Path,
    cfg: MineConfig,
    *,
    rules: CategoryRules | None = None,
    batch_size: int = 8,
    workers: int = 4,
    resume: bool = False,
    overwrite: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
    reporter: Any = None,
) -> MineResult:
    """Run the detector over the pool and write the labelling queue to ``out`` (see
    :func:`check_mine_out` for an existing one). ``detector``: a
    :class:`dd.api.plugins.DetectorRef` (loaded here, once the pool is known) or a loaded
    detector; ``reporter`` shows its warning and a progress bar."""
    from dd.api.plugins import as_detector
    from dd.data.images import collect_inputs
    from dd.label.queue import write_queue
    from dd.runtime.progress import as_reporter
    from dd.runtime.web import now_iso

    cfg.check()
    out = Path(out)
    check_mine_out(out, resume=resume, overwrite=overwrite)
    rules = rules or load_rules(None)
    items, failures = collect_inputs(specs, exclude=[out])
    if not items:
        reasons = "; ".join(f"{p}: {r}" for p, r in failures) or ", ".join(specs)
        raise DDError(f"no images in the pool ({reasons})", exit_code=EXIT_SOME_INPUTS_FAILED)
    from dd.runtime.io import mark_run_folder

    rep = as_reporter(reporter)
    detector = as_detector(detector, rep, meaning="its confidences")
    mark_run_folder(out, "label mine")
    cats: dict[str, tuple[str, str | None]] = {
        it.key: item_category(it.path, it.meta, rules) for it in items
    }
    bar = rep.progress("mine")
    with bar:
        task = bar.add_task("mine", total=None)
        if on_progress is None:

            def on_progress(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total)

        res = _detect_pool(items, detector, out, batch_size, workers, resume, failures, on_progress)
    records = []
    for r in res.records:
        cat, prompt = cats[r["key"]]
        records.append({**r, "category": cat, "prompt": prompt})
    stats = category_stats(records, cfg)
    flagged = {s["category"] for s in stats if s["flagged"]}
    selected = select_hard_cases(records, flagged, cfg)
    for s in stats:
        s["selected"] = sum(r["category"] == s["category"] for r in selected)
    queue_items = []
    for r in selected:
        item = {
            "id": r["key"],
            "image": str(Path(r["image"]).resolve()),
            "width": r["width"],
            "height": r["height"],
            "category": r["category"],
            "reason": r["reason"],
            "max": round(float(r["max"]), 6),
            "mean": round(float(r["mean"]), 6),
            "prediction": f"detect/{r['map']}" if r.get("map") else None,
        }
        if r.get("prompt"):
            item["prompt"] = r["prompt"]
        queue_items.append(item)
    info = {
        "created": now_iso(),
        "detector": detector.describe(),
        "pool": len(records),
        "failed": len(res.failures),
        "budget": cfg.budget,
        "high": cfg.high,
        "band": list(cfg.band),
        "flag_z": cfg.flag_z,
        "min_gap": cfg.min_gap,
        "min_count": cfg.min_count,
        "flagged": sorted(flagged),
        "categories": stats,
        "selected": len(queue_items),
    }
    if queue_items:
        write_queue(out, queue_items, info)
    else:
        from dd.label.queue import INFO_FILE
        from dd.runtime.io import atomic_write_json

        atomic_write_json(out / INFO_FILE, info)
    return MineResult(stats, queue_items, len(records), res.failures, res.resumed, out)


def _detect_pool(items, detector, out, batch_size, workers, resume, failures, on_progress):
    """The detector pass of ``dd label mine`` (``OUT/detect``, full-size maps)."""
    from dd.engines.detect import DetectConfig, run_detect

    return run_detect(
        items,
        detector,
        DetectConfig(
            out=out / "detect",
            batch_size=batch_size,
            workers=workers,
            resume=resume,
            overwrite=True,  # decisions are guarded above; the detector pass is derived
            save_overlays=False,
            full_size_outputs=True,  # the labelling page paints over the image's own size
        ),
        failures=failures,
        on_progress=on_progress,
    )
