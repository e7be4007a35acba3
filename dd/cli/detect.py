"""``dd detect``: artifact maps, overlays, scores and reports for folders of images."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

import dd.cli.options as opt
from dd.engines.detect import DetectConfig
from dd.errors import EXIT_GATE, EXIT_SOME_INPUTS_FAILED

DOC = """Find artifacts in images: per image a map, an overlay, and how sure and where.

    Writes report.jsonl, report.csv, summary.json, index.html (a contact sheet), maps/ (8-bit
    PNGs at the detector's working size) and overlays/ (JPEG thumbnails) to --out;
    --full-size-outputs writes both as PNGs at each image's size. Scores always come from the
    full-size map.
    An image is flagged when its max confidence reaches the detector's image threshold
    (calibrated for the embedded default, docs/models.md; else 0.5).
    Exit codes: 0 all done; 4 some inputs failed; 3 --fail-above tripped (takes precedence).
"""


def _detect(ctx: typer.Context, values: dict, paths: list[str], as_json: bool) -> None:
    """Run dd detect with the settings given (see DetectConfig) and print the outcome."""
    from dd.engines.detect import detect_job
    from dd.runtime.progress import ConsoleReporter

    fail_above = _parse_fail_above(values["fail_above"])
    cfg = DetectConfig(**values)
    result = detect_job(paths, cfg, reporter=ConsoleReporter(Console(stderr=True)))
    out = cfg.out

    limit = result.flag_threshold if fail_above == "auto" else fail_above
    gate = limit is not None and any(r["max"] > limit for r in result.records)
    if as_json:
        typer.echo(
            json.dumps(
                {"summary": result.summary, "images": result.records, "failed": result.failures},
                indent=2,
            )
        )
    else:
        _print_summary(result, out, limit)
    if gate:
        raise typer.Exit(EXIT_GATE)
    if result.failures:
        raise typer.Exit(EXIT_SOME_INPUTS_FAILED)


def _parse_fail_above(value: str | None) -> float | str | None:
    if value is None or value == "auto":
        return value
    try:
        limit = float(value)
    except ValueError:
        raise typer.BadParameter(
            f"{value!r} is not a number in [0, 1] or 'auto'", param_hint="'--fail-above'"
        ) from None
    if not 0.0 <= limit <= 1.0:
        raise typer.BadParameter(f"{value} is not in [0, 1]", param_hint="'--fail-above'")
    return limit


def _print_summary(result, out: Path, fail_above: float | None, top: int = 20) -> None:
    console = Console()
    threshold = float(result.summary.get("image_threshold", 0.5))
    recs = sorted(result.records, key=lambda r: -r["max"])
    table = Table(title=f"artifacts (worst {min(top, len(recs))} of {len(recs)})")
    for col in ("image", "max", "mean", "weighted", "ratio", "peak x,y", "bbox x0 y0 x1 y1"):
        table.add_column(col, justify="left" if col == "image" else "right")
    for r in recs[:top]:
        hot = fail_above is not None and r["max"] > fail_above
        mx = f"[red]{r['max']:.3f}[/red]" if hot or r["max"] >= threshold else f"{r['max']:.3f}"
        table.add_row(
            r["key"],
            mx,
            f"{r['mean']:.3f}",
            f"{r['weighted']:.3f}",
            f"{r['artifact_ratio']:.2%}",
            f"{r['peak'][0]},{r['peak'][1]}",
            " ".join(map(str, r["bbox"])) if r.get("bbox") else "-",
        )
    console.print(table)
    s = result.summary
    calibrated = " (the detector's calibrated threshold)" if s.get("threshold_calibrated") else ""
    console.print(
        f"{s['images']} images ({result.resumed} resumed), {s['with_artifacts']} with max "
        f"confidence >= {threshold:.2f}{calibrated}, {s['failed']} failed. "
        f"Report: {out / 'index.html'}",
        highlight=False,
    )


# Every option comes from DetectConfig's declarations (one declaration per setting).
detect = opt.config_command(
    DetectConfig,
    _detect,
    name="detect",
    doc=DOC,
    leading=[
        opt.argument_parameter(
            "paths", "Image files, folders (recursive), globs, or .txt/.jsonl manifests."
        ),
        opt.json_parameter("Print a JSON report to stdout."),
    ],
)
