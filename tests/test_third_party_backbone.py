"""A third-party backbone through its entry point only: the example plugin's AuraFlow.

`dd generate`, `dd treat` and `dd refine --late-steps` run on it, its tiny pipeline comes
from the plugin's own builder, and no file of dd's core or built-in plugins names it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_dist
from PIL import Image

from dd.api.plugins import reset_host

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "plugins" / "dd-example-plugin"
B = ["-B", "max_sequence_length=32"]


@pytest.fixture(autouse=True)
def installed(tmp_path_factory, monkeypatch):
    """The example package 'pip installed': a dist-info declaring its entry point."""
    site = tmp_path_factory.getbasetemp() / "example-site"
    if not site.is_dir():
        make_dist(site, "dd-example-plugin", "0.1.0", {"example": "dd_example_plugin"})
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.syspath_prepend(str(site))
    reset_host(None)
    yield
    reset_host(None)


@pytest.fixture
def tiny_aura(tmp_path_factory, installed):
    from dd.testing.tiny import tiny_pipeline_path

    return tiny_pipeline_path("auraflow", tmp_path_factory)


def test_registered_through_the_entry_point_only(cli):
    from dd.api.plugins import get_host

    entry = get_host().backbones.entry("auraflow")
    assert entry.plugin == "example"
    assert not get_host().records["example"].builtin
    for folder in (ROOT / "dd", ROOT / "plugins" / "dd_plugins"):
        for path in folder.rglob("*.py"):
            assert "auraflow" not in path.read_text(encoding="utf-8").lower(), path


def test_generate_equals_the_diffusers_pipeline(cli, tiny_aura, tmp_path):
    from diffusers import AuraFlowPipeline

    (tmp_path / "p.txt").write_text("a photo of a cat\n")
    res = cli("generate", "--backbone", "auraflow", "--model", tiny_aura, "--prompts",
              tmp_path / "p.txt", "--seeds", "0,1", "--resolution", "64", "--steps", "2",
              "--out", tmp_path / "g", *B)  # fmt: skip
    assert res.exit_code == 0, res.output
    pipe = AuraFlowPipeline.from_pretrained(str(tiny_aura))
    pipe.set_progress_bar_config(disable=True)
    for seed in (0, 1):
        want = pipe("a photo of a cat", height=64, width=64, num_inference_steps=2,
                    generator=torch.Generator().manual_seed(seed), output_type="np",
                    max_sequence_length=32).images[0]  # fmt: skip
        got = np.asarray(Image.open(tmp_path / "g" / f"0000-seed{seed}.png"), dtype=np.int16)
        assert np.abs(got - (want * 255).round().astype(np.int16)).max() <= 1


def test_treat_writes_a_lora_the_pipeline_loads(cli, tiny_aura, tmp_path):
    from diffusers import AuraFlowPipeline

    (tmp_path / "p.txt").write_text("a hand\na face\n")
    run = tmp_path / "run"
    res = cli("treat", "--backbone", "auraflow", "--model", tiny_aura, "--prompts",
              tmp_path / "p.txt", "--eval-prompts", tmp_path / "p.txt", "--resolution", "64",
              "--steps", "2", "--train-steps", "2", "--eval-every", "1", "--batch-size", "1",
              "--lr", "5e-2", "--lora-rank", "4", "--out", run, *B)  # fmt: skip
    assert res.exit_code == 0, res.output
    pipe = AuraFlowPipeline.from_pretrained(str(tiny_aura))
    pipe.set_progress_bar_config(disable=True)
    kw = dict(height=64, width=64, num_inference_steps=2, output_type="np", max_sequence_length=32)
    base = pipe("a hand", generator=torch.Generator().manual_seed(0), **kw).images[0]
    pipe.load_lora_weights(str(run))
    treated = pipe("a hand", generator=torch.Generator().manual_seed(0), **kw).images[0]
    assert not np.array_equal(treated, base)  # the LoRA loaded and changes the images
    from safetensors.torch import load_file

    lora = load_file(str(run / "pytorch_lora_weights.safetensors"))
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in lora.items())  # trained
    # dd's own sampling with the LoRA is the pipeline's with it
    res = cli("generate", "--backbone", "auraflow", "--model", tiny_aura, "--lora", run,
              "--prompts", tmp_path / "p.txt", "--seeds", "1", "--resolution", "64",
              "--steps", "2", "--out", tmp_path / "g", *B)  # fmt: skip
    assert res.exit_code == 0, res.output
    got = np.asarray(Image.open(tmp_path / "g" / "0000-seed0.png"), dtype=np.int16)
    assert np.abs(got - (treated * 255).round().astype(np.int16)).max() <= 1


def test_refine_late_steps(cli, tiny_aura, tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "in").mkdir()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "in/a.png")
    res = cli("refine", tmp_path / "in", "--backbone", "auraflow", "--model", tiny_aura,
              "--late-steps", "500-750", "--steps", "8", "--prompt", "a photo",
              "--out", tmp_path / "out", *B)  # fmt: skip
    assert res.exit_code == 0, res.output
    out = np.asarray(Image.open(next((tmp_path / "out").rglob("a.png"))))
    assert out.shape == (64, 64, 3)


def test_detector_guidance_on_the_plugin_backbone(cli, tiny_aura, tmp_path):
    """Guidance needs nothing from a backbone beyond the API (predict, the schedule, decode):
    the example plugin's AuraFlow is guided through the CLI like the built-ins."""
    import json

    (tmp_path / "p.txt").write_text("a photo of a cat\n")
    base = ["generate", "--backbone", "auraflow", "--model", tiny_aura, "--prompts",
            tmp_path / "p.txt", "--seeds", "0,1", "--resolution", "64", "--steps", "2",
            "-O", "variant=tiny", "-O", "input_size=64", "--detect", *B]  # fmt: skip
    res = cli(*base, "--out", tmp_path / "plain")
    assert res.exit_code == 0, res.output
    res = cli(*base, "--guide", "--out", tmp_path / "guided")
    assert res.exit_code == 0, res.output

    def rows(folder):
        return [json.loads(x) for x in (folder / "report.jsonl").read_text().splitlines()]

    plain, guided = rows(tmp_path / "plain"), rows(tmp_path / "guided")
    assert sum(r["mean"] for r in guided) < sum(r["mean"] for r in plain)
    res = cli(*base, "--guide", "--guide-scale", "0", "--out", tmp_path / "zero")
    assert res.exit_code == 0, res.output
    for seed in (0, 1):
        a = np.asarray(Image.open(tmp_path / "plain" / f"0000-seed{seed}.png"))
        b = np.asarray(Image.open(tmp_path / "zero" / f"0000-seed{seed}.png"))
        assert np.array_equal(a, b)
