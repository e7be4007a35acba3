"""The labelling queue: what ``dd label mine`` writes and ``dd label serve`` works through.

Layout of a queue folder::

    QUEUE/queue.jsonl       one item per line (order = labelling order):
                            id, image (absolute path, or relative to QUEUE), width, height,
                            category, prompt, reason (flagged-high | uncertain), max, mean,
                            prediction (the detector's 8-bit map, relative to QUEUE)
    QUEUE/queue.json        how it was made: detector, budget, thresholds, flagged
                            categories and the per-category statistics
    QUEUE/detect/           the detector run over the pool (maps/, report.jsonl, ...)
    QUEUE/masks/<id>.png    human masks (8-bit grayscale, 255 = artifact), written atomically
    QUEUE/decisions.jsonl   the decision log: one line per decision with item, label
                            (artifact | no_artifact | skip | uncertain), annotator, time

The latest decision of an item counts. A queue can also be written by hand: only ``id`` and
``image`` are required in ``queue.jsonl``.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from dd.errors import DDError
from dd.runtime.io import JsonlLog, atomic_write_json, atomic_write_text

QUEUE_FILE = "queue.jsonl"
INFO_FILE = "queue.json"
DECISIONS = "decisions.jsonl"
LABELS = ("artifact", "no_artifact", "skip", "uncertain")


def write_queue(out: Path, items: list[dict[str, Any]], info: dict[str, Any]) -> Path:
    """Write ``queue.jsonl`` and ``queue.json`` atomically."""
    out = Path(out)
    seen: set[str] = set()
    for it in items:
        if "id" not in it or "image" not in it:
            raise DDError("every queue item needs 'id' and 'image'")
        if it["id"] in seen:
            raise DDError(f"duplicate queue item id {it['id']!r}")
        seen.add(it["id"])
    atomic_write_text(
        out / QUEUE_FILE, "".join(json.dumps(it, sort_keys=True) + "\n" for it in items)
    )
    atomic_write_json(out / INFO_FILE, info)
    return out / QUEUE_FILE


class Queue:
    def __init__(self, root: Path, items: list[dict[str, Any]], info: dict[str, Any]):
        self.root = root
        self.items = items
        self.info = info
        self.by_id = {it["id"]: it for it in items}
        self.index_of = {it["id"]: i for i, it in enumerate(items)}
        self.log = JsonlLog(root / DECISIONS)

    @classmethod
    def open(cls, root: str | Path) -> Queue:
        root = Path(root)
        path = root / QUEUE_FILE
        if not path.is_file():
            raise DDError(
                f"{root} is not a labelling queue (no {QUEUE_FILE})",
                hint="make one with `dd label mine POOL --out QUEUE`",
            )
        items = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                it = json.loads(line)
                if not isinstance(it, dict) or not isinstance(it.get("image"), str):
                    raise ValueError("needs an 'image' string")
                it["id"] = str(it.get("id") or Path(it["image"]).stem)
            except (ValueError, TypeError) as e:
                raise DDError(f"{path}:{n}: bad queue line ({e})") from None
            _check_id(it["id"], f"{path}:{n}")
            items.append(it)
        if not items:
            raise DDError(f"{path} lists no items")
        if len({it["id"] for it in items}) != len(items):
            raise DDError(f"{path}: item ids are not unique")
        info: dict[str, Any] = {}
        if (root / INFO_FILE).is_file():
            try:
                info = json.loads((root / INFO_FILE).read_text(encoding="utf-8"))
            except ValueError as e:
                raise DDError(f"{root / INFO_FILE}: not JSON ({e})") from None
        return cls(root, items, info)

    # -- paths -----------------------------------------------------------------------------------
    def image_path(self, item: dict[str, Any]) -> Path:
        p = Path(item["image"])
        return p if p.is_absolute() else self.root / p

    def prediction_path(self, item: dict[str, Any]) -> Path | None:
        pred = item.get("prediction")
        return self.root / pred if pred else None

    def mask_path(self, item: dict[str, Any]) -> Path:
        return self.root / "masks" / f"{item['id']}.png"

    def size(self, item: dict[str, Any]) -> tuple[int, int]:
        """``(width, height)`` of the item's image."""
        if item.get("width") and item.get("height"):
            return int(item["width"]), int(item["height"])
        from dd.data.images import image_size

        w, h = image_size(self.image_path(item))
        item["width"], item["height"] = w, h
        return w, h

    # -- decisions -------------------------------------------------------------------------------
    def decisions(self) -> list[dict[str, Any]]:
        return self.log.read()

    def latest_decisions(self) -> dict[str, dict[str, Any]]:
        """Item id -> its latest decision, in queue order (items of this queue only)."""
        latest: dict[str, dict[str, Any]] = {}
        for d in self.decisions():
            if d.get("item") in self.by_id and d.get("label") in LABELS:
                latest[d["item"]] = d
        return {i: latest[i] for i in sorted(latest, key=self.index_of.__getitem__)}

    def progress(self) -> dict[str, Any]:
        latest = self.latest_decisions()
        counts = Counter(d["label"] for d in latest.values())
        return {
            "total": len(self.items),
            "done": len(latest),
            "counts": {lab: counts.get(lab, 0) for lab in LABELS},
        }


def _check_id(item_id: str, where: str) -> None:
    parts = item_id.split("/")
    if (
        not item_id
        or item_id.startswith("/")
        or "\\" in item_id
        or "\x00" in item_id
        or any(p in ("", ".", "..") for p in parts)
    ):
        raise DDError(f"{where}: unsafe item id {item_id!r}", hint="ids are relative names")
