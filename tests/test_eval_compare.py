"""``dd eval gen`` comparing the ways to fewer artifacts (issue 36): base, guided,
best-of-N, treated (a LoRA) and treated+guided at the same seeds, in one table and one grid,
with artifact confidence, quality scores, time per image and peak memory filled in."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_treat import detector_dir  # noqa: F401 - the redness detector

from dd.api.plugins import get_host
from dd.testing.tiny import tiny_pipeline_path

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROWS = ["base", "base+guide", "base+best-of-2", "lora", "lora+guide", "lora+best-of-2"]


def _lora(name, model, folder):
    """A LoRA with random (seeded, non-zero) weights in diffusers' format."""
    torch.manual_seed(0)
    opts = {"max_sequence_length": 32} if name == "flux" else {}
    bb = get_host().backbones.get(name).from_pretrained(str(model), **opts)
    with torch.no_grad():
        for p in bb.add_lora(rank=4):
            p.normal_(0, 0.2)
    bb.save_lora(folder)
    return folder


@pytest.mark.parametrize("name", ["flux", "sd15"])
def test_compare_base_guided_best_of_treated(name, cli, tmp_path, tmp_path_factory, detector_dir):  # noqa: F811
    model = tiny_pipeline_path(name, tmp_path_factory)
    lora = _lora(name, model, tmp_path / "lora")
    (tmp_path / "prompts.txt").write_text("a red cat\n")
    extra = ["-B", "max_sequence_length=32"] if name == "flux" else ["--guidance", "1"]
    args = [
        "eval", "gen", "--backbone", name, "--model", model, "--lora", lora,
        "--prompts", tmp_path / "prompts.txt", "--seeds", "0,1", "--resolution", "64",
        "--steps", "3", "--device", "cpu", "--weights", detector_dir, "-O", "input_size=64",
        "--guide", "--best-of", "2", "--quality", "detail,drift", "--out", tmp_path / "out",
        *extra,
    ]  # fmt: skip
    res = cli(*args)
    assert res.exit_code == 0, res.output
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    rows = {r["model"]: r for r in results["models"]}
    assert list(rows) == ROWS
    for key in ("mean_conf", "max_conf", "seconds_per_image", "peak_extra_mib",
                "quality:detail", "quality:drift"):  # fmt: skip
        assert all(rows[r][key] is not None for r in ROWS), key
    assert all(rows[r]["seconds_per_image"] > 0 and rows[r]["peak_extra_mib"] > 0 for r in ROWS)
    assert rows["base"]["quality:drift"] == 0.0  # the base against itself
    # best of 2 keeps, per image, the lower-confidence candidate (the seed itself is one)
    for model_row in ("base", "lora"):
        assert rows[f"{model_row}+best-of-2"]["mean_conf"] <= rows[model_row]["mean_conf"]
        guided = np.asarray(
            Image.open(tmp_path / "out" / "images" / f"{model_row}+guide" / "0000-seed0.png")
        )
        plain = np.asarray(Image.open(tmp_path / "out" / "images" / model_row / "0000-seed0.png"))
        assert not np.array_equal(guided, plain)
    md = (tmp_path / "out" / "results.md").read_text()
    for header in ("s / image", "peak extra MiB", "detail (quality)", "drift (quality)"):
        assert header in md
    for row in ROWS:
        assert f"| {row} |" in md
    # one grid: a column of 64-px images per row of the table, a row per seed
    grid = Image.open(tmp_path / "out" / "grids" / "prompt-0000.png")
    assert grid.width >= 6 * 64 and grid.height >= 2 * 64
    # a rerun reuses every image and the timing recorded with them
    again = cli(*args)
    assert again.exit_code == 0, again.output
    rerun = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["seconds_per_image"] for r in rerun["models"]] == [
        r["seconds_per_image"] for r in results["models"]
    ]


def test_compare_options_are_checked_before_loading(cli, tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n")
    base = ["eval", "gen", "--backbone", "flux", "--model", "nowhere", "--prompts",
            tmp_path / "p.txt", "--out", tmp_path / "o"]  # fmt: skip
    for bad, words in (
        (["--guide", "--guide-loss", "median"], "unknown --guide-loss"),
        (["--guide", "--guide-steps", "5-2"], "bad --guide-steps"),
        (["--quality", "detail=-1"], "--quality tolerance"),
        (["--best-of", "0"], "--best-of"),
        (["--quality", "sharpness"], "unknown quality scorer 'sharpness'"),
        (["--quality", "clip"], "needs its model's local weights"),
    ):
        r = cli(*base, *bad)
        assert r.exit_code == 2 and words in r.output, r.output
    # a weights folder that is not there: one line, before any model loads
    r = cli(*base, "--quality", "clip", "--quality-weights", f"clip={tmp_path / 'none'}")
    assert r.exit_code == 1 and "CLIP score needs local weights" in r.output
    assert not (tmp_path / "o").exists()
