"""Text in dd's PNG pictures: visible word gaps, captions that fit their cells."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from dd.report.grid import image_grid
from dd.report.plot import Panel, draw_text, fit_lines, plot_panels, text_width


def _ink_columns(img: Image.Image) -> np.ndarray:
    a = np.asarray(img.convert("L"))
    return (a < 128).any(axis=0)


def test_words_are_drawn_with_a_visible_gap():
    img = Image.new("RGB", (200, 20), "white")
    draw = ImageDraw.Draw(img)
    draw_text(draw, (2, 2), "eval artifact", (0, 0, 0))
    ink = _ink_columns(img)
    start = 2 + int(draw.textlength("eval"))
    # Pillow's own space is ~2 px: the gap between the words is at least 4 blank columns
    gap = 0
    for x in range(start - 1, start + 8):
        gap = gap + 1 if not ink[x] else gap
    assert gap >= 4


def test_plot_title_keeps_its_spaces_and_does_not_touch_the_axis_label(tmp_path):
    plot_panels(
        [Panel("eval artifact confidence", "step", "mean confidence", {"a": [(0, 1), (1, 2)]})],
        tmp_path / "p.png",
    )
    img = Image.open(tmp_path / "p.png")
    top = img.crop((0, 0, img.width, 20))  # the title's line holds the title alone
    ink = np.flatnonzero(_ink_columns(top))
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    assert ink.max() - ink.min() + 1 >= text_width(draw, "eval artifact confidence") - 2
    assert ink.min() > 60  # centred, not overlapping the y label on the left


def test_grid_captions_wrap_to_their_cells_at_64_px():
    rng = np.random.default_rng(0)
    cells = [(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), f"before max 0.81{i} mean 0.1")
             for i in range(3)]  # fmt: skip
    grid = image_grid([cells], col_titles=["input image", "refined segment 500-750", "mask"])
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    cw = (grid.width - 0) // 3 - 4
    for caption in [c for _, c in cells] + ["refined segment 500-750"]:
        for line in fit_lines(draw, caption, cw - 4):
            assert text_width(draw, line) <= cw - 4
    assert len(fit_lines(draw, "before max 0.812 mean 0.1", 60)) >= 2
