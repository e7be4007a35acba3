"""Detector guidance (``dd generate --guide``): no training, sampling steered by the detector.

The detector is the redness detector of the treat tests (a tiny SegFormer whose head is fit
to "redness"). Measured on this machine (4 steps, 64 px, prompts "a red cat", "a blue dog",
seeds 0 and 1, scale 12 at every step): mean confidence flux 0.515 -> 0.167, sd15 0.668 ->
0.353, sd3 0.442 -> 0.152, sdxl 0.676 -> 0.349. The tests ask for a drop of at least
``MARGIN`` (about a quarter of the smallest measured drop); scale 0 must reproduce unguided
sampling bit for bit.
"""

from __future__ import annotations

import json

import pytest
import torch
from test_treat import detector_dir, tiny_flux  # noqa: F401

from dd.api.plugins import get_host
from dd.inference.guidance import Guide, parse_guide_steps
from dd.testing.tiny import tiny_pipeline_path

MARGIN = 0.08
PROMPTS = ["a red cat", "a blue dog"]


#: Tiny models on a shared CPU run faster on one thread.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _load(name: str, tmp_path_factory):
    path = tiny_pipeline_path(name, tmp_path_factory)
    opts = {"max_sequence_length": 32} if name in ("flux", "sd3") else {}
    return get_host().backbones.get(name).from_pretrained(str(path), **opts)


def _detector(detector_dir):  # noqa: F811
    det = get_host().detectors.get("segformer").load(str(detector_dir), input_size=64)
    det.eval()
    det.requires_grad_(False)
    return det


def _generate(bb, guide, steps=4):
    with torch.no_grad():
        return bb.generate(PROMPTS, seeds=[0, 1], height=64, width=64, steps=steps,
                           guidance=1.0 if bb.name in ("sd15", "sdxl") else None,
                           guide=guide)  # fmt: skip


@pytest.mark.parametrize("name", ["flux", "sd15"])
def test_guidance_lowers_confidence_and_scale_0_is_unguided(name, tmp_path_factory, detector_dir):  # noqa: F811
    bb, det = _load(name, tmp_path_factory), _detector(detector_dir)
    plain = _generate(bb, None)
    assert torch.equal(_generate(bb, Guide(det, 0.0)), plain)  # bit for bit
    guided = _generate(bb, Guide(det, 12.0))
    with torch.no_grad():
        before, after = float(det(plain).mean()), float(det(guided).mean())
    assert before - after >= MARGIN, (before, after)


@pytest.mark.parametrize("name", ["sd3", "sdxl"])
def test_one_guided_step_runs_on_sd3_and_sdxl(name, tmp_path_factory, detector_dir):  # noqa: F811
    bb, det = _load(name, tmp_path_factory), _detector(detector_dir)
    plain = _generate(bb, None, steps=2)
    guided = _generate(bb, Guide(det, 12.0, steps=(0, 0)), steps=2)
    assert guided.shape == plain.shape and not torch.equal(guided, plain)
    with torch.no_grad():
        assert float(det(guided).mean()) < float(det(plain).mean())


def test_guide_schedule():
    g = Guide(None, 1.0, steps=(2, 6), every=2)
    assert [i for i in range(10) if g.active(i, 10)] == [2, 4, 6]
    assert [i for i in range(4) if Guide(None, 1.0).active(i, 4)] == [0, 1, 2, 3]
    assert not any(Guide(None, 0.0).active(i, 4) for i in range(4))
    assert parse_guide_steps("3-5") == (3, 5) and parse_guide_steps("2") == (2, 2)
    assert parse_guide_steps(None) is None


def test_cli_guide(cli, tiny_flux, detector_dir, tmp_path):  # noqa: F811
    (tmp_path / "p.txt").write_text("a red cat\n")
    base = ["generate", "--backbone", "flux", "--model", tiny_flux, "-B",
            "max_sequence_length=32", "--prompts", tmp_path / "p.txt", "--seeds", "2",
            "--steps", "3", "--resolution", "64", "--weights", detector_dir, "-O",
            "input_size=64", "--detect"]  # fmt: skip
    res = cli(*base, "--out", tmp_path / "plain")
    assert res.exit_code == 0, res.output
    res = cli(*base, "--guide", "--guide-steps", "0-1", "--out", tmp_path / "guided")
    assert res.exit_code == 0, res.output

    def mean(folder):
        rows = [json.loads(x) for x in (folder / "report.jsonl").read_text().splitlines()]
        return sum(r["mean"] for r in rows) / len(rows)

    assert mean(tmp_path / "plain") - mean(tmp_path / "guided") >= MARGIN
    record = json.loads((tmp_path / "guided" / ".dd" / "generate.json").read_text())
    assert record["guide"] == {"scale": 12.0, "steps": "0-1", "loss": "mean", "every": 1}
    for bad, words in ((["--guide-loss", "median"], "unknown --guide-loss"),
                       (["--guide-steps", "5-2"], "bad --guide-steps")):  # fmt: skip
        res = cli(*base, "--guide", *bad, "--out", tmp_path / "bad")
        assert res.exit_code == 2 and words in res.output, res.output
        assert not (tmp_path / "bad").exists()


def test_best_of_n_keeps_the_lowest_scoring_candidate(cli, tiny_flux, detector_dir, tmp_path):  # noqa: F811
    from dd.cli.generate import candidate_seeds

    (tmp_path / "p.txt").write_text("a red cat\na blue dog\n")
    base = ["generate", "--backbone", "flux", "--model", tiny_flux, "-B",
            "max_sequence_length=32", "--prompts", tmp_path / "p.txt", "--seeds", "2",
            "--steps", "2", "--resolution", "64", "--weights", detector_dir, "-O",
            "input_size=64"]  # fmt: skip
    res = cli(*base, "--best-of", "3", "--out", tmp_path / "best")
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in (tmp_path / "best" / "report.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    for r in rows:
        cands = r["candidates"]
        assert [c["seed"] for c in cands] == candidate_seeds(r["seed"], 3)
        best = min(cands, key=lambda c: c["mean"])
        assert r["chosen_seed"] == best["seed"] and r["mean"] == best["mean"]
    assert any(r["chosen_seed"] != r["seed"] for r in rows)  # a later candidate won somewhere
    # the kept image is that candidate: plain generation at the chosen seed gives it
    r = next(r for r in rows if r["chosen_seed"] != r["seed"])
    seed_arg = f"{r['chosen_seed']},"  # a list of one (one number alone is a count)
    (tmp_path / "one.txt").write_text(r["prompt"] + "\n")
    res = cli("generate", "--backbone", "flux", "--model", tiny_flux, "-B",
              "max_sequence_length=32", "--prompts", tmp_path / "one.txt", "--seeds", seed_arg,
              "--steps", "2", "--resolution", "64", "--out", tmp_path / "plain")  # fmt: skip
    assert res.exit_code == 0, res.output
    from PIL import Image

    kept = Image.open(tmp_path / "best" / r["image"])
    plain = Image.open(tmp_path / "plain" / f"0000-seed{r['chosen_seed']}.png")
    assert list(kept.getdata()) == list(plain.getdata())


def test_a_seed_typed_as_a_count_is_refused(cli, tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n")
    res = cli("generate", "--backbone", "flux", "--model", "m", "--prompts", tmp_path / "p.txt",
              "--seeds", "4294967297", "--out", tmp_path / "o")  # fmt: skip
    assert res.exit_code == 1 and "would make more than 100,000 seeds" in res.output
    assert "4294967297," in res.output


def test_guidance_composes_with_a_lora(cli, tiny_flux, detector_dir, tmp_path):  # noqa: F811
    bb = get_host().backbones.get("flux").from_pretrained(str(tiny_flux))
    torch.manual_seed(0)
    bb.add_lora(rank=2, init="gaussian")
    with torch.no_grad():  # a LoRA that changes the model
        for n, p in bb.denoiser.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    bb.save_lora(tmp_path / "lora")
    (tmp_path / "p.txt").write_text("a red cat\n")
    base = ["generate", "--backbone", "flux", "--model", tiny_flux, "-B",
            "max_sequence_length=32", "--prompts", tmp_path / "p.txt", "--seeds", "2",
            "--steps", "3", "--resolution", "64", "--weights", detector_dir, "-O",
            "input_size=64", "--detect", "--lora", tmp_path / "lora"]  # fmt: skip
    assert cli(*base, "--out", tmp_path / "plain").exit_code == 0
    res = cli(*base, "--guide", "--out", tmp_path / "guided")
    assert res.exit_code == 0, res.output

    def mean(folder):
        rows = [json.loads(x) for x in (folder / "report.jsonl").read_text().splitlines()]
        return sum(r["mean"] for r in rows) / len(rows)

    assert mean(tmp_path / "plain") - mean(tmp_path / "guided") >= MARGIN
