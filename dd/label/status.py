"""``dd label status``: the class balance of a dataset, or the progress of a queue.

For a dataset (built on :func:`dd.data.datasets.read_dataset` and ``dd dataset info``'s
summary): counts by source (human, pseudo, real, synthetic) and by category, positives
(a mask) versus negatives, a category x source table, and how many samples carry a
``shrink_pad`` field. For a labelling queue: decisions per label and per category.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dd.data.datasets import SOURCES


def dataset_status(root: Path) -> dict[str, Any]:
    from dd.data.datasets import NO_CATEGORY as _NONE
    from dd.data.datasets import dataset_summary, read_dataset

    summary = dataset_summary(root)
    cross: dict[str, dict[str, dict[str, int]]] = {}
    shrink = 0
    for s in read_dataset(root):
        cat = s.category if s.category is not None else _NONE
        cell = cross.setdefault(cat, {}).setdefault(s.source, {"positives": 0, "negatives": 0})
        cell["positives" if s.positive else "negatives"] += 1
        shrink += bool(s.meta.get("shrink_pad"))
    summary["by_category_source"] = {k: cross[k] for k in summary["by_category"]}
    summary["shrink_pad"] = shrink
    summary["sources"] = [s for s in SOURCES if s in summary["by_source"]]
    return summary


def queue_status(root: Path) -> dict[str, Any]:
    from dd.label.queue import LABELS, Queue

    q = Queue.open(root)
    latest = q.latest_decisions()
    by_cat: dict[str, dict[str, int]] = {}
    for it in q.items:
        cat = it.get("category") or "(none)"
        row = by_cat.setdefault(cat, {"total": 0, "todo": 0, **{lab: 0 for lab in LABELS}})
        row["total"] += 1
        dec = latest.get(it["id"])
        row[dec["label"] if dec else "todo"] += 1
    annotators: dict[str, int] = {}
    for d in latest.values():
        annotators[d.get("annotator") or "?"] = annotators.get(d.get("annotator") or "?", 0) + 1
    return {
        "queue": str(root),
        **q.progress(),
        "by_category": {k: by_cat[k] for k in sorted(by_cat)},
        "annotators": annotators,
        "log_lines": len(q.decisions()),
    }


def status(path: Path) -> dict[str, Any]:
    from dd.label.queue import QUEUE_FILE

    path = Path(path)
    if (path / QUEUE_FILE).is_file():
        return {"kind": "queue", **queue_status(path)}
    return {"kind": "dataset", **dataset_status(path)}
