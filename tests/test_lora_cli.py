"""`dd lora info` and `dd lora export --format kohya` (issue 33): the kohya file loads back
with diffusers' `load_lora_weights` and gives the same images as dd's own file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dd.api.plugins import load_backbone
from dd.testing.tiny import tiny_pipeline_path


def _lora(backbone: str, model: Path, folder: Path, rank: int = 4, alpha: float = 8.0) -> Path:
    options = {"max_sequence_length": 32} if backbone == "flux" else {}
    bb = load_backbone(backbone, str(model), device="cpu", dtype=torch.float32, options=options)
    torch.manual_seed(0)
    bb.add_lora(rank=rank, alpha=alpha, init="gaussian")
    with torch.no_grad():
        for p in bb.lora_parameters():
            p.normal_(0, 0.05)  # a LoRA that changes the images
    return bb.save_lora(folder)


def _images(pipeline_cls, model: Path, lora: Path) -> torch.Tensor:
    pipe = pipeline_cls.from_pretrained(str(model))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(lora))
    gen = torch.Generator().manual_seed(0)
    kw = dict(num_inference_steps=2, height=64, width=64, generator=gen, output_type="pt")
    return pipe("a red cat", **kw).images


@pytest.mark.parametrize("backbone", ["sd15", "sdxl"])
def test_kohya_export_round_trips_with_equal_images(backbone, tmp_path, tmp_path_factory, cli):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    model = tiny_pipeline_path(backbone, tmp_path_factory)
    run = tmp_path / "run"
    _lora(backbone, model, run, rank=4, alpha=8.0)  # alpha != rank: must survive
    out = tmp_path / "kohya.safetensors"
    res = cli("lora", "export", run, "--format", "kohya", "--out", out)
    assert res.exit_code == 0, res.output
    info = json.loads(cli("lora", "info", out, "--json").output)
    assert info["format"] == "kohya" and info["family"] == backbone
    assert info["rank"] == 4 and info["alpha"] == 8.0
    cls = StableDiffusionPipeline if backbone == "sd15" else StableDiffusionXLPipeline
    ours, theirs = _images(cls, model, run), _images(cls, model, out)
    plain = cls.from_pretrained(str(model))
    plain.set_progress_bar_config(disable=True)
    base = plain("a red cat", num_inference_steps=2, height=64, width=64,
                 generator=torch.Generator().manual_seed(0), output_type="pt").images  # fmt: skip
    assert not torch.equal(ours, base)  # the LoRA does something
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-6)
    # an existing --out is refused unless told
    res = cli("lora", "export", run, "--out", out)
    assert res.exit_code == 1 and "--overwrite" in res.output
    assert cli("lora", "export", run, "--out", out, "--overwrite").exit_code == 0


def test_info_of_dd_files_and_refusals(tmp_path, tmp_path_factory, cli):
    flux = tiny_pipeline_path("flux", tmp_path_factory)
    _lora("flux", flux, tmp_path / "flux", rank=2, alpha=2.0)
    info = json.loads(cli("lora", "info", tmp_path / "flux", "--json").output)
    assert (info["format"], info["family"], info["rank"]) == ("diffusers", "flux", 2)
    assert info["targets"] == sorted(["to_k", "to_out.0", "to_q", "to_v"])
    text = cli("lora", "info", tmp_path / "flux").output
    assert "family" in text and "flux" in text
    res = cli("lora", "export", tmp_path / "flux", "--out", tmp_path / "k.safetensors")
    assert res.exit_code == 1 and "SD1.5/SDXL" in res.output and "ComfyUI" in res.output
    res = cli("lora", "export", tmp_path / "flux", "--format", "a1111", "--out", tmp_path / "k")
    assert res.exit_code == 2 and "unknown --format" in res.output
    res = cli("lora", "info", tmp_path / "nothere")
    assert res.exit_code == 1 and "LoRA not found" in res.output
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    res = cli("lora", "info", tmp_path / "bad.safetensors")
    assert res.exit_code == 1 and "cannot read" in res.output


def test_export_best_takes_the_runs_best_lora(tmp_path, tmp_path_factory, cli):
    model = tiny_pipeline_path("sd15", tmp_path_factory)
    run = tmp_path / "run"
    _lora("sd15", model, run / "best", rank=2, alpha=2.0)
    out = tmp_path / "k.safetensors"
    res = cli("lora", "export", run, "--best", "--out", out)
    assert res.exit_code == 0, res.output
    assert json.loads(cli("lora", "info", out, "--json").output)["rank"] == 2
    res = cli("lora", "export", run, "--out", tmp_path / "k2.safetensors")  # no final LoRA
    assert res.exit_code == 1 and "LoRA not found" in res.output
    res = cli("lora", "export", run, "--best", "--out", tmp_path / "k.txt")
    assert res.exit_code == 2 and ".safetensors" in res.output
