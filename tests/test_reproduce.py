"""docs/reproduce.md cannot rot: every `dd` command on the page runs at tiny scale (tiny
pipelines of the real classes, two prompts, a fitted tiny detector), in the page's order."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_treat import fit_redness_detector

from dd.testing.tiny import tiny_pipeline_path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "reproduce.md"


def page_commands() -> list[str]:
    """The `dd ...` lines of the page's bash blocks, in order."""
    blocks = re.findall(r"```bash\n(.*?)```", PAGE.read_text(encoding="utf-8"), re.S)
    return [line.strip() for b in blocks for line in b.splitlines() if line.startswith("dd ")]


def test_the_page_has_the_commands_of_every_row():
    cmds = page_commands()
    assert sum(c.startswith("dd treat") for c in cmds) == 3
    assert sum(c.startswith("dd eval gen") for c in cmds) == 2
    assert any("--reg-data" in c for c in cmds)


def test_every_command_runs_at_tiny_scale(tmp_path, tmp_path_factory, cli):
    models = {b: tiny_pipeline_path(b, tmp_path_factory) for b in ("flux", "sd15")}
    det = fit_redness_detector(tmp_path / "det")
    (tmp_path / "prompts").mkdir()
    train = tmp_path / "prompts" / "train.txt"
    train.write_text("a photo of a red cat\na blue dog in the park\n")
    held = tmp_path / "prompts" / "heldout.txt"
    held.write_text("a dog in the snow\na girl with two hands\n")
    real = tmp_path / "real"
    real.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), np.uint8)).save(real / f"{i}.png")
        (real / f"{i}.txt").write_text(f"a photo number {i}")
    values = {"$PROMPTS": train, "$HELDOUT": held, "$DETECTOR": det, "$REAL": real}
    tiny = ["--resolution", "64", "--steps", "2", "--device", "cpu", "-O", "input_size=64"]
    for command in page_commands():
        for var, value in values.items():
            command = command.replace(var, str(value))
        args = shlex.split(command.replace("runs/", f"{tmp_path}/runs/"))[1:]
        backbone = "sd15" if any("sd15" in a for a in args) else "flux"
        extra = ["--model", str(models[backbone]), *tiny]
        if backbone == "flux":
            extra += ["-B", "max_sequence_length=32"]
        if args[0] == "treat":
            extra += ["--train-steps", "2", "--eval-every", "2", "--save-every", "2",
                      "--eval-seeds", "1", "--dtype", "fp32", "--grad-accum", "1",
                      "--batch-size", "1"]  # fmt: skip
        else:
            extra += ["--seeds", "1"]
        res = cli(*args, *extra)
        assert res.exit_code == 0, (command, res.output[-2000:])
    for table in ("table2-flux", "table2-sd15"):
        results = json.loads((tmp_path / "runs" / table / "results.json").read_text())
        assert (tmp_path / "runs" / table / "results.md").is_file()
        assert len(results["models"]) == (3 if table.endswith("flux") else 2), results.keys()


@pytest.mark.parametrize("preset, steps", [("flux-schnell", 4)])
def test_the_schnell_preset_samples_as_the_released_code(preset, steps):
    text = (ROOT / "configs" / f"{preset}.toml").read_text()
    assert re.search(rf"^steps = {steps}\b.*\[released\].*\[paper\] \"an inference step of 5\"",
                     text, re.M)  # fmt: skip
    assert "--steps 5" in PAGE.read_text()
