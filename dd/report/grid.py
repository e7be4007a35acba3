"""Image grids with captions, and tensors to uint8 images (for grids and PNGs)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from dd.errors import DDError

__all__ = ["image_grid", "to_uint8"]


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``B x 3 x H x W`` in [0, 1] -> ``B x H x W x 3`` uint8, rounded like diffusers."""
    x = images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def image_grid(
    rows: Sequence[Sequence[tuple[np.ndarray, str]]],
    *,
    row_titles: Sequence[str] = (),
    col_titles: Sequence[str] = (),
    cell: int = 256,
) -> Any:
    """A PIL image: ``rows`` of (HxWx3 uint8 image, caption) cells, captions under each cell,
    optional row titles (left) and column titles (top). Cells are fitted into ``cell`` px
    (small images are enlarged to at least 128 px so the captions fit)."""
    from PIL import Image, ImageDraw

    ncols = max((len(r) for r in rows), default=0)
    if not rows or ncols == 0:
        raise DDError("nothing to put in a grid")
    h0, w0 = rows[0][0][0].shape[:2]
    scale = min(cell / max(h0, w0), max(1.0, 128 / max(h0, w0)))
    cw, ch = max(1, round(w0 * scale)), max(1, round(h0 * scale))
    from dd.report.plot import draw_text, fit_lines

    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    # captions and titles wrap to the cell's width (at 64 px cells they used to overlap)
    caps = [[fit_lines(probe, c, cw - 4) for _, c in row] for row in rows]
    cap_lines = max((len(c) for row in caps for c in row), default=1)
    cap_h, title_w = 2 + 12 * max(1, cap_lines), 0
    if row_titles:
        title_w = min(240, max(int(probe.textlength(t)) for t in row_titles) + 16)
    heads = [fit_lines(probe, t, cw - 4, 2) for t in col_titles]
    top = 2 + 12 * max((len(h) for h in heads), default=0) if col_titles else 0
    grid = Image.new("RGB", (title_w + ncols * (cw + 4), top + len(rows) * (ch + cap_h + 4)))
    grid.paste((255, 255, 255), (0, 0, *grid.size))
    draw = ImageDraw.Draw(grid)
    for j, lines in enumerate(heads):
        for k, text in enumerate(lines):
            draw_text(draw, (title_w + j * (cw + 4) + 2, 1 + 12 * k), text, (0, 0, 0))
    for i, row in enumerate(rows):
        y = top + i * (ch + cap_h + 4)
        if i < len(row_titles):
            lines = fit_lines(draw, row_titles[i], title_w - 8, max(1, ch // 12))
            for k, text in enumerate(lines):
                draw_text(draw, (4, y + 2 + 12 * k), text, (0, 0, 0))
        for j, (img, _caption) in enumerate(row):
            x = title_w + j * (cw + 4)
            tile = Image.fromarray(img)
            if tile.size != (cw, ch):
                resample = Image.NEAREST if scale > 1 else Image.BILINEAR
                tile = tile.resize((cw, ch), resample)
            grid.paste(tile, (x, y))
            for k, text in enumerate(caps[i][j]):
                draw_text(draw, (x + 2, y + ch + 1 + 12 * k), text, (0, 0, 0))
    return grid
