"""Self-contained HTML pages (open from disk, no server): the detect contact sheet."""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5rem;background:#fafafa;color:#222}
h1{font-size:1.4rem;margin:0 0 .3rem}
.meta{color:#555;margin-bottom:1rem}
.warn{background:#fff3cd;border:1px solid #e0b400;padding:.6rem 1rem;margin:1rem 0}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(260px,1fr));gap:1rem}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.5rem}
.card img{width:100%;height:auto;display:block;border-radius:3px;background:#eee}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:.3rem}
.name{font-family:monospace;font-size:.8rem;word-break:break-all;margin:.3rem 0}
table.s{font-size:.8rem;border-collapse:collapse;width:100%}
table.s td{padding:1px 4px}
.hi{color:#b00020;font-weight:600}
.failed{font-family:monospace;font-size:.85rem}
"""


def _href(out: Path, target: str | os.PathLike) -> str:
    target = Path(target)
    if not target.is_absolute():
        target = out / target
    try:
        rel = os.path.relpath(target.resolve(), out.resolve())
    except ValueError:  # another drive on Windows
        return target.resolve().as_uri()
    return quote(Path(rel).as_posix())


def contact_sheet(
    out: Path,
    records: list[dict[str, Any]],
    failures: list[dict[str, str]],
    summary: dict[str, Any],
) -> str:
    """A page of every image with its overlay and scores, worst (highest max) first."""
    e = html.escape
    rows = sorted(records, key=lambda r: -r["max"])
    threshold = float(summary.get("image_threshold", 0.5))
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        "<title>dd detect report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>dd detect</h1>",
        f"<div class='meta'>{summary.get('images', 0)} images, "
        f"{summary.get('with_artifacts', 0)} with max confidence &ge; {threshold:.2f}"
        f"{' (calibrated threshold)' if summary.get('threshold_calibrated') else ''}, "
        f"{summary.get('failed', 0)} failed &middot; detector "
        f"<code>{e(str(summary.get('detector')))}</code> weights "
        f"<code>{e(str(summary.get('weights')))}</code></div>",
    ]
    if summary.get("untrained"):
        parts.append(
            "<div class='warn'><b>Untrained detector.</b> These maps come from random "
            "weights and mean nothing; pass real weights with <code>--weights</code>.</div>"
        )
    parts.append("<div class='grid'>")
    for r in rows:
        img = _href(out, r["image"])
        ov = _href(out, r["overlay"]) if r.get("overlay") else img
        mp = _href(out, r["map"]) if r.get("map") else None
        cls = " class='hi'" if r["max"] >= threshold else ""
        bbox = " ".join(map(str, r["bbox"])) if r.get("bbox") else "-"
        parts.append(
            "<div class='card'><div class='pair'>"
            f"<a href='{img}'><img loading='lazy' src='{img}' alt='image'></a>"
            f"<a href='{ov}'><img loading='lazy' src='{ov}' alt='overlay'></a></div>"
            f"<div class='name'>{e(r['key'])}</div><table class='s'>"
            f"<tr><td>max</td><td{cls}>{r['max']:.3f}</td>"
            f"<td>mean</td><td>{r['mean']:.3f}</td></tr>"
            f"<tr><td>weighted</td><td>{r['weighted']:.3f}</td>"
            f"<td>ratio</td><td>{r['artifact_ratio']:.3%}</td></tr>"
            f"<tr><td>peak</td><td>{r['peak'][0]},{r['peak'][1]}</td>"
            f"<td>bbox</td><td>{bbox}</td></tr></table>"
            + (f"<a href='{mp}'>map</a>" if mp else "")
            + "</div>"
        )
    parts.append("</div>")
    if failures:
        parts.append(f"<h2>Failed ({len(failures)})</h2><ul class='failed'>")
        parts += [f"<li>{e(f['path'])}: {e(f['reason'])}</li>" for f in failures]
        parts.append("</ul>")
    parts.append("</body></html>\n")
    return "".join(parts)
