"""`dd generate`: images per prompt and seed equal to the diffusers pipeline's, a grid, scores."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dd.api.plugins import get_host
from dd.testing.tiny import tiny_pipeline_path
from tests.helpers import seeded_pipeline_images

PROMPTS = ["a red cat on a table", "a blue house"]
TINY = ["--resolution", "64", "--steps", "2", "-B", "max_sequence_length=32"]


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory) -> Path:
    return tiny_pipeline_path("flux", tmp_path_factory)


@pytest.fixture(scope="session")
def detector_dir(tmp_path_factory) -> Path:
    """A tiny random SegFormer saved as weights (so it is not flagged untrained)."""
    out = tmp_path_factory.mktemp("gen-detector") / "tiny"
    det = get_host().detectors.get("segformer").load(None, variant="tiny", input_size=64, seed=3)
    det.save_pretrained(out)
    return out


@pytest.fixture
def prompts(tmp_path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def pipeline_images(model: Path, prompt: str, seeds: list[int]) -> list[torch.Tensor]:
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(model))
    pipe.set_progress_bar_config(disable=True)
    return [img[0] for img in seeded_pipeline_images(pipe, prompt, seeds)]


def test_generate_with_detect(cli, tiny_flux, detector_dir, prompts, tmp_path):
    out = tmp_path / "out"
    res = cli(
        "generate", "--backbone", "flux", "--model", tiny_flux, "--prompts", prompts,
        "--seeds", "2", "--out", out, "--batch-size", "3", "--detect",
        "--weights", detector_dir, "-O", "input_size=64", *TINY,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        ".dd",  # marks the folder as a dd run (dd detect on a parent folder skips it)
        "0000-seed0.png",
        "0000-seed1.png",
        "0001-seed0.png",
        "0001-seed1.png",
        "grid.png",
        "report.jsonl",
    ]
    report = [json.loads(line) for line in (out / "report.jsonl").read_text().splitlines()]
    assert [(r["prompt_index"], r["seed"], r["image"]) for r in report] == [
        (0, 0, "0000-seed0.png"),
        (0, 1, "0000-seed1.png"),
        (1, 0, "0001-seed0.png"),
        (1, 1, "0001-seed1.png"),
    ]
    assert report[2]["prompt"] == PROMPTS[1]
    det = get_host().detectors.get("segformer").load(str(detector_dir), input_size=64)
    for rec, ref in zip(report[:2], pipeline_images(tiny_flux, PROMPTS[0], [0, 1]), strict=True):
        png = np.asarray(Image.open(out / rec["image"]), dtype=np.int16)
        assert np.abs(png - (ref.permute(1, 2, 0).numpy() * 255).round()).max() <= 1
        with torch.no_grad():
            p = det(ref[None])
        assert rec["mean"] == pytest.approx(float(p.mean()), abs=1e-5)
        assert rec["max"] == pytest.approx(float(p.max()), abs=1e-5)
        assert 0 <= rec["artifact_ratio"] <= 1
    grid = Image.open(out / "grid.png")
    assert grid.width >= 2 * 128 and grid.height >= 2 * 128
    assert "4 images (2 steps, 64px); artifact confidence mean" in res.output


def test_generate_reads_sampling_settings_from_a_preset(cli, tiny_flux, prompts, tmp_path):
    preset = tmp_path / "p.toml"
    # training keys (lr, train_steps) are valid preset keys and ignored by generate
    preset.write_text(
        f'backbone = "flux"\nmodel = "{tiny_flux}"\nresolution = 64\nsteps = 3\n'
        "lr = 1e-4\ntrain_steps = 10\nbackbone_options = { max_sequence_length = 32 }\n"
    )
    res = cli(
        "generate", "--config", preset, "--prompts", prompts, "--seeds", "7-7",
        "--steps", "2", "--out", tmp_path / "o",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "2 images (2 steps, 64px)" in res.output  # --steps beats the preset's 3
    assert sorted(p.name for p in (tmp_path / "o").glob("*.png"))[:2] == [
        "0000-seed7.png",
        "0001-seed7.png",
    ]
    ref = pipeline_images(tiny_flux, PROMPTS[1], [7])[0]
    png = np.asarray(Image.open(tmp_path / "o" / "0001-seed7.png"), dtype=np.int16)
    assert np.abs(png - (ref.permute(1, 2, 0).numpy() * 255).round()).max() <= 1


def test_generate_errors_are_one_line(cli, tiny_flux, prompts, tmp_path_factory, tmp_path):
    sd15 = tiny_pipeline_path("sd15", tmp_path_factory)
    res = cli("generate", "--backbone", "sdxl", "--model", sd15, "--prompts", prompts)
    assert res.exit_code == 1
    assert "holds a StableDiffusionPipeline" in res.output and "--backbone sd15" in res.output
    assert len(res.output.strip().splitlines()) == 1
    res = cli(
        "generate", "--backbone", "flux", "--model", tiny_flux, "--seeds", "x", "--prompts", prompts
    )
    assert res.exit_code == 1 and "bad seeds 'x'" in res.output
    res = cli("generate", "--backbone", "flux", "--model", tiny_flux)
    assert res.exit_code == 2 and "--prompts is required" in res.output
    assert "Usage: dd generate" in res.output
    res = cli("generate", "--backbone", "flux", "--model", tiny_flux, "--prompts", prompts,
              "--lora", "nothere", "--out", tmp_path / "nl")  # fmt: skip
    assert res.exit_code == 1 and "--lora not found: nothere" in res.output
    assert "offline" not in res.output and "weight_name" not in res.output
    assert not (tmp_path / "nl").exists()
    res = cli("generate", "--backbone", "flux", "--model", tiny_flux, "--prompts", prompts,
              "--device", "gpu", "--out", tmp_path / "ng")  # fmt: skip
    assert res.exit_code == 2 and "unknown device 'gpu'" in res.output
    # a LoRA of another architecture: a FLUX LoRA into SD1.5
    flux = get_host().backbones.get("flux").from_pretrained(str(tiny_flux))
    flux.add_lora(rank=4)
    lora_dir = tmp_path / "flux-lora"
    flux.save_lora(lora_dir)
    res = cli(
        "generate", "--backbone", "sd15", "--model", sd15, "--lora", lora_dir,
        "--prompts", prompts, "--resolution", "64", "--steps", "2", "--out", tmp_path / "o",
    )  # fmt: skip
    assert res.exit_code == 1, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and str(lora_dir) in lines[0] and "sd15" in lines[0]


def test_a_resolution_the_model_would_change_is_refused(cli, tiny_flux, tmp_path):
    """FLUX would silently turn 50 px into 48: refused, with the nearest sizes."""
    (tmp_path / "p.txt").write_text("a cat\n")
    res = cli("generate", "--backbone", "flux", "--model", tiny_flux,
              "--prompts", tmp_path / "p.txt", "--resolution", "50",
              "--out", tmp_path / "g", "-B", "max_sequence_length=32")  # fmt: skip
    assert res.exit_code == 1
    assert "--resolution 50 is not a multiple of 8, which flux needs" in res.output
    assert "use 48 or 56" in res.output
    assert not (tmp_path / "g").exists() or not any((tmp_path / "g").glob("*.png"))


def test_a_non_empty_out_is_refused_before_loading(cli, tiny_flux, prompts, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "0000-seed0.png").write_bytes(b"precious")
    args = ("generate", "--backbone", "flux", "--model", tiny_flux, "--prompts", prompts,
            "--resolution", "32", "--steps", "1", "--out", out,
            "-B", "max_sequence_length=32")  # fmt: skip
    res = cli(*args)
    assert res.exit_code == 1 and "is not empty" in res.output and "--overwrite" in res.output
    assert (out / "0000-seed0.png").read_bytes() == b"precious"
    res = cli(*args, "--overwrite")
    assert res.exit_code == 0, res.output
    assert (out / "0000-seed0.png").read_bytes() != b"precious"
