"""What a training run writes beside its checkpoints: ``metrics.jsonl`` (opened with one
rule for new and resumed runs) and ``curves.png``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dd.runtime.io import Journal, atomic_write_text

__all__ = ["TIMING_FIELDS", "Curve", "open_metrics", "plot_curves"]

#: ``metrics.jsonl`` fields that differ between runs with identical results.
TIMING_FIELDS = frozenset({"step_time_s", "eval_time_s"})


def open_metrics(out: Path, step: int, *, fresh: bool, rerun: tuple[str, ...] = ()) -> Journal:
    """``out/metrics.jsonl``: emptied for a new run (``fresh``); for a run resumed at
    checkpoint ``step``, without the lines of later steps (the killed run wrote them after
    its last checkpoint; the resumed run writes them again), without ``stop`` lines (they
    end an earlier session) and without the lines of types ``rerun`` at ``step`` (written
    before the step that follows the checkpoint: they are written again too)."""
    path = Path(out) / "metrics.jsonl"
    journal = Journal(path, fresh=fresh)

    def kept(r: dict[str, Any]) -> bool:
        at = r.get("step", 0)
        return r.get("type") != "stop" and (at < step or (at == step and r["type"] not in rerun))

    keep = [r for r in journal.records if kept(r)]
    if len(keep) != len(journal.records):
        journal.close()
        atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in keep))
        journal = Journal(path)
    return journal


#: A chart of ``curves.png``: (title, y label, {series label: (record type, key)}).
Curve = tuple[str, str, dict[str, tuple[str, str]]]


def plot_curves(
    records: Sequence[dict[str, Any]],
    path: Path,
    curves: Sequence[Curve],
    size: tuple[int, int] = (420, 280),
    *,
    colours: dict[str, tuple[int, int, int]] | None = None,
    extra: Sequence[Any] = (),
) -> None:
    """``curves.png``: one chart per ``curves`` entry, series read from ``metrics.jsonl``
    records against their step (``colours`` by series label), then the ``extra``
    :class:`dd.report.plot.Panel` charts."""
    from dd.report.plot import Panel, metric_points, plot_panels

    panels = [
        Panel(
            title,
            "step",
            ylabel,
            {label: metric_points(records, kind, key) for label, (kind, key) in series.items()},
            **({"colours": colours} if colours else {}),
        )
        for title, ylabel, series in curves
    ]
    plot_panels([*panels, *extra], path, size=size)
