"""Line charts drawn with Pillow (no plotting dependency): benchmark plots and the
training curves of ``dd train-detector`` and ``dd treat``."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Panel:
    """One chart: ``series`` maps a label to its ``(x, y)`` points."""

    title: str
    xlabel: str
    ylabel: str
    series: dict[str, list[tuple[float, float]]]
    log_x: bool = False
    log_y: bool = False
    #: Fixed colours for some labels (others take the palette in series order).
    colours: dict[str, tuple[int, int, int]] = field(default_factory=dict)


PALETTE = (
    (31, 119, 180),
    (214, 39, 40),
    (44, 160, 44),
    (255, 127, 14),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)


def _axis(log: bool) -> Callable[[float], float]:
    return math.log10 if log else float


def plot_panels(
    panels: Sequence[Panel], path: str | os.PathLike, size: tuple[int, int] = (520, 360)
) -> None:
    """Draw line charts side by side into a PNG (written atomically); ``size`` is one
    panel's width and height in pixels."""
    from PIL import Image, ImageDraw

    from dd.runtime.io import save_image_atomic

    (pw, ph), left, bottom = size, 64, 52
    img = Image.new("RGB", (pw * max(1, len(panels)), ph), "white")
    draw = ImageDraw.Draw(img)
    for k, panel in enumerate(panels):
        # title centred on the first line, the y-axis label on the second, left
        x0, y0, x1, y1 = k * pw + left, 40, (k + 1) * pw - 16, ph - bottom
        draw.rectangle([x0, y0, x1, y1], outline=(0, 0, 0))
        title = fit_lines(draw, panel.title, pw - 8, 1)[0] if panel.title else ""
        draw_text(draw, (k * pw + (pw - text_width(draw, title)) / 2, 6), title, (0, 0, 0))
        draw_text(draw, (k * pw + 4, 22), panel.ylabel, (90, 90, 90))
        xl = panel.xlabel
        draw_text(draw, ((x0 + x1 - text_width(draw, xl)) / 2, ph - 18), xl, (0, 0, 0))
        fx = _axis(panel.log_x)
        fy = _axis(panel.log_y)
        pts = [
            (x, y)
            for s in panel.series.values()
            for x, y in s
            if (not panel.log_x or x > 0) and (not panel.log_y or y > 0)
        ]
        if not pts:
            draw_text(draw, (x0 + 8, y0 + 8), "no data", (90, 90, 90))
            continue
        xs, ys = [fx(p[0]) for p in pts], [fy(p[1]) for p in pts]
        xlo, xhi, ylo, yhi = min(xs), max(xs), min(ys), max(ys)
        if xhi == xlo:
            xlo, xhi = xlo - 1, xhi + 1
        pad = (yhi - ylo) * 0.08 or abs(yhi) * 0.1 or 1.0
        ylo, yhi = ylo - pad, yhi + pad

        def px(x: float, y: float, b=(x0, y0, x1, y1), lim=(xlo, xhi, ylo, yhi), fx=fx, fy=fy):
            return (
                b[0] + (fx(x) - lim[0]) / (lim[1] - lim[0]) * (b[2] - b[0]),
                b[3] - (fy(y) - lim[2]) / (lim[3] - lim[2]) * (b[3] - b[1]),
            )

        ticks_x = sorted({p[0] for p in pts})
        if len(ticks_x) > 8:
            ticks_x = [ticks_x[0], ticks_x[-1]]
        for tx in ticks_x:
            cx, _ = px(tx, pts[0][1])
            draw.line([(cx, y1), (cx, y1 + 4)], fill=(0, 0, 0))
            draw.text((cx - 10, y1 + 6), f"{tx:.3g}", fill=(0, 0, 0))
        for frac in (0.0, 0.5, 1.0):
            v = ylo + pad + frac * (yhi - ylo - 2 * pad)
            shown = 10**v if panel.log_y else v
            _, cy = px(pts[0][0], shown)
            draw.line([(x0 - 4, cy), (x0, cy)], fill=(0, 0, 0))
            draw.text((k * pw + 4, cy - 6), f"{shown:.3g}", fill=(0, 0, 0))
        for j, (label, series) in enumerate(panel.series.items()):
            colour = panel.colours.get(label, PALETTE[j % len(PALETTE)])
            coords = [
                px(x, y)
                for x, y in sorted(series)
                if (not panel.log_x or x > 0) and (not panel.log_y or y > 0)
            ]
            if not coords:
                continue
            if len(coords) > 1:
                draw.line(coords, fill=colour, width=2)
            for cx, cy in coords:
                draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=colour)
            width = text_width(draw, label)  # legend at the top right
            draw_text(draw, (x1 - 8 - width, y0 + 6 + 12 * j), label, colour)
    save_image_atomic(img, path)


def metric_points(records: Sequence[dict], kind: str, key: str) -> list[tuple[float, float]]:
    """``(step, value)`` of the ``metrics.jsonl`` records of ``type`` ``kind`` that hold a
    finite number under ``key``."""
    return [
        (r["step"], r[key])
        for r in records
        if r.get("type") == kind and isinstance(r.get(key), (int, float)) and math.isfinite(r[key])
    ]


# ------------------------------------------------------------------------------------------
# Text. Pillow's built-in font draws a space 2 px wide: words run together ("eval artifact
# confidence" reads "evalartifactconfidence"). Every label is drawn word by word instead.
# ------------------------------------------------------------------------------------------
WORD_GAP = 4


def text_width(draw: Any, text: str) -> float:
    words = text.split(" ")
    return sum(draw.textlength(w) for w in words) + WORD_GAP * (len(words) - 1)


def draw_text(draw: Any, xy: tuple[float, float], text: str, fill: Any) -> None:
    """``draw.text`` with visible gaps between words."""
    x, y = xy
    for word in text.split(" "):
        if word:
            draw.text((x, y), word, fill=fill)
            x += draw.textlength(word)
        x += WORD_GAP


def fit_lines(draw: Any, text: str, width: float, max_lines: int = 3) -> list[str]:
    """``text`` wrapped at spaces into lines at most ``width`` px wide (a word longer than
    that is cut with an ellipsis); at most ``max_lines``, the last one ellipsised."""
    lines: list[str] = []
    for word in text.split():
        if lines and text_width(draw, f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    fitted = []
    for line in lines:
        while len(line) > 1 and text_width(draw, line) > width:
            line = line[:-2] + "…"
        fitted.append(line)
    if len(fitted) > max_lines:
        last = fitted[max_lines - 1]
        while len(last) > 1 and text_width(draw, last + "…") > width:
            last = last[:-1]
        fitted = [*fitted[: max_lines - 1], last + "…"]
    return fitted
