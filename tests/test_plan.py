"""`dd treat --plan`: the memory estimate from configurations only, checked against the
measured CPU peak of the same treat step (the `dd bench treat` measurement), within 15%."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_treat import fit_redness_detector

from dd.engines.bench import (
    peak_extra_memory,
    pretrained_treat_setup,
    set_checkpointing,
    treat_step,
)
from dd.engines.plan import GIB, parse_memory, plan_treat
from dd.engines.treat import TreatConfig
from dd.errors import UsageError
from dd.runtime.memory import tensor_bytes
from dd.testing.tiny import tiny_pipeline_path


@pytest.fixture(scope="module")
def detector(tmp_path_factory) -> Path:
    return fit_redness_detector(tmp_path_factory.mktemp("det") / "redness")


def _cfg(backbone, model, detector, **kw) -> TreatConfig:
    values = dict(
        backbone=backbone, model=str(model), resolution=64, steps=2, lora_rank=16,
        detector_weights=str(detector), detector_options={"input_size": 64},
    )  # fmt: skip
    values.update(kw)
    return TreatConfig(**values)


@pytest.mark.parametrize(
    "backbone, checkpointing, k",
    [("flux", False, 1), ("flux", True, 2), ("sd15", False, 2), ("sd15", True, 1)],
)
def test_the_plan_is_within_15_percent_of_the_measured_peak(
    backbone, checkpointing, k, detector, tmp_path_factory
):
    model = tiny_pipeline_path(backbone, tmp_path_factory)
    cpu = torch.device("cpu")
    setup = pretrained_treat_setup(backbone, str(model), device=cpu, dtype=torch.float32,
                                   steps=2, lora_rank=16, detector_variant="tiny",
                                   detector_size=64)  # fmt: skip
    set_checkpointing(setup, "checkpointed" if checkpointing else "naive")
    latents = setup.latents(64)
    treat_step(setup, 64, k, latents)  # warm-up (lazy buffers)
    setup.zero_grad()
    measured, _ = peak_extra_memory(lambda: treat_step(setup, 64, k, latents), cpu)

    plan = plan_treat(
        _cfg(backbone, model, detector, grad_steps=k, gradient_checkpointing=checkpointing)
    )
    traced = plan.parts["activations + LoRA gradients"]
    assert 0.85 <= traced / measured <= 1.15, (traced, measured)
    frozen = [p for p in setup.backbone.denoiser.parameters() if not p.requires_grad]
    assert plan.parts["denoiser (frozen)"] == tensor_bytes(frozen)
    assert plan.parts["LoRA"] == tensor_bytes(setup.lora)
    assert plan.parts["optimizer state"] == 8 * sum(p.numel() for p in setup.lora)


def test_quantisation_and_the_budget(detector, tmp_path_factory):
    model = tiny_pipeline_path("flux", tmp_path_factory)
    base = plan_treat(_cfg("flux", model, detector))
    nf4 = plan_treat(_cfg("flux", model, detector, quantize="nf4"))
    assert nf4.parts["denoiser (frozen)"] < base.parts["denoiser (frozen)"]
    assert nf4.parts["activations + LoRA gradients"] == base.parts["activations + LoRA gradients"]
    tight = plan_treat(_cfg("flux", model, detector), max_memory=f"{base.total / GIB * 0.5}")
    assert tight.fits is False and tight.suggestions
    assert any(r["flags"].startswith("--quantize nf4") for r in tight.suggestions)
    roomy = plan_treat(_cfg("flux", model, detector), max_memory="80GB")
    assert roomy.fits is True and not roomy.suggestions


def test_parse_memory():
    assert parse_memory("24GB") == parse_memory("24 GiB") == parse_memory("24") == 24 * GIB
    for bad in ("", "lots", "-3GB", "0"):
        with pytest.raises(UsageError):
            parse_memory(bad)


def test_cli_plan_prints_the_breakdown_and_writes_nothing(detector, tmp_path_factory, tmp_path,
                                                           cli):  # fmt: skip
    model = tiny_pipeline_path("flux", tmp_path_factory)
    out = tmp_path / "run"
    res = cli("treat", "--plan", "--max-memory", "24GB", "--backbone", "flux", "--model", model,
              "--resolution", "64", "--steps", "2", "--detector-weights", detector,
              "-O", "input_size=64", "--out", out)  # fmt: skip
    assert res.exit_code == 0, res.output
    for part in ("denoiser (frozen)", "LoRA", "optimizer state", "activations", "fits 24 GiB"):
        assert part in res.output, part
    assert not out.exists()
    res = cli("treat", "--plan", "--backbone", "flux")
    assert res.exit_code == 2 and "--model is required" in res.output
    res = cli("treat", "--plan", "--backbone", "flux", "--model", model, "--max-memory", "lots")
    assert res.exit_code == 2 and "bad --max-memory" in res.output


@pytest.mark.parametrize("mode", ["naive", "checkpointed"])
def test_the_traced_step_of_the_bench_model_matches_its_measured_peak(mode):
    """`dd bench treat`'s CPU model (tiny FLUX pipeline, bench-sized transformer): the step
    traced on the meta device against the profiler's peak of the real step."""
    from dd.engines.bench import tiny_treat_setup
    from dd.engines.plan import estimate_step

    cpu = torch.device("cpu")
    setup = tiny_treat_setup("flux", device=cpu, steps=4, lora_rank=16, detector_size=64)
    set_checkpointing(setup, mode)
    latents = setup.latents(128)
    treat_step(setup, 128, 1, latents)
    setup.zero_grad()
    measured, _ = peak_extra_memory(lambda: treat_step(setup, 128, 1, latents), cpu)
    setup.zero_grad()
    meta = torch.device("meta")
    setup.backbone.pipe.to(meta)
    setup.detector.to(meta)
    setup.backbone.device = meta
    setup.cond = setup.cond.to(meta)
    parts = estimate_step(setup, resolution=128, grad_steps=1,
                          checkpointing=mode == "checkpointed")  # fmt: skip
    traced = parts["activations + LoRA gradients"]
    assert 0.85 <= traced / measured <= 1.15, (traced, measured)


def test_plan_refuses_what_has_no_configuration(tmp_path, cli):
    (tmp_path / "empty").mkdir()
    res = cli("treat", "--plan", "--backbone", "flux", "--model", tmp_path / "empty")
    assert res.exit_code == 1 and "has no model_index.json" in res.output
    (tmp_path / "m.safetensors").write_bytes(b"x")
    res = cli("treat", "--plan", "--backbone", "flux", "--model", tmp_path / "m.safetensors")
    assert res.exit_code == 1 and "cannot read a configuration" in res.output
    assert "Traceback" not in res.output
