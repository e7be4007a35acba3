"""A wheel, installed without the source tree, has everything a user needs: the presets
(`--config flux-schnell`), the embedded default detector and the built-in plugins."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_wheel_without_the_source_tree_runs_treat_with_a_preset(tmp_path_factory):
    from dd.testing.tiny import tiny_pipeline_path

    tmp = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(tmp / "dist"), str(ROOT)],
        check=True, cwd=tmp, capture_output=True,
    )  # fmt: skip
    (wheel,) = (tmp / "dist").glob("dd_doctor-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "dd/presets/flux-schnell.toml" in names and "dd/py.typed" in names
    assert any(n.startswith("dd_plugins/weights/dd-synth-small/") for n in names)
    site = tmp / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
         str(wheel)],
        check=True, cwd=tmp, capture_output=True,
    )  # fmt: skip
    model = tiny_pipeline_path("flux", tmp_path_factory)
    work = tmp / "work"  # no configs/ here: the preset must come from the wheel
    work.mkdir()
    (work / "p.txt").write_text("a photo of a hand\n")
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    code = (
        "import dd, dd.runtime.config, sys; from dd.cli import main; "
        f"assert dd.__file__.startswith({str(site)!r}), dd.__file__; "
        "assert 'flux-schnell' in dd.runtime.config.list_presets(); "
        "sys.exit(main(sys.argv[1:]))"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, "treat", "--config", "flux-schnell", "--model", str(model),
         "--prompts", "p.txt", "--eval-prompts", "p.txt", "--out", "run", "--resolution", "32",
         "--steps", "1", "--train-steps", "1", "--grad-accum", "1", "--eval-every", "1",
         "--dtype", "fp32", "--device", "cpu", "-B", "max_sequence_length=32"],
        cwd=work, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert (work / "run" / "pytorch_lora_weights.safetensors").is_file()
    assert 'model = "' in (work / "run" / "config.toml").read_text()
