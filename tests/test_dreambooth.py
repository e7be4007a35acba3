"""`dd dreambooth` on the tiny pipelines of the real classes (32 px, CPU, a few steps)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dd.api.plugins import get_host
from dd.engines.dreambooth import (
    DreamBoothConfig,
    dreambooth,
    flow_sigmas,
    load_training_image,
)
from dd.errors import DDError
from dd.testing.tiny import tiny_pipeline_path
from tests.helpers import launch_dd_twice

SIZE = 32
PROMPT = "a photo of a red cat"
CLASS_PROMPT = "a photo of a cat"


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory) -> Path:
    return tiny_pipeline_path("sd3", tmp_path_factory)


@pytest.fixture(scope="session")
def instance_dir(tmp_path_factory) -> Path:
    """Three exemplars of one look (red with a blue left half), not square."""
    d = tmp_path_factory.mktemp("instance")
    for i in range(3):
        a = np.zeros((40, 36, 3), np.uint8)
        a[..., 0] = 210
        a[:, :18, 2] = 120 + 40 * i
        Image.fromarray(a).save(d / f"exemplar{i}.png")
    return d


def config(model: Path, instance: Path, out: Path, **kw) -> DreamBoothConfig:
    values = dict(
        backbone="sd3",
        model=str(model),
        backbone_options={"max_sequence_length": 32},
        instance_dir=str(instance),
        instance_prompt=PROMPT,
        out=str(out),
        resolution=SIZE,
        steps=2,
        lr=1e-2,
        lora_rank=8,
        train_steps=8,
        validation_every=8,
        validation_seeds=[0],
        save_every=4,
        seed=3,
    )
    values.update(kw)
    return DreamBoothConfig(**values)


@pytest.fixture(scope="module")
def prior_run(tiny_sd3, instance_dir, tmp_path_factory):
    """SD3 with prior preservation (the configuration peers' scripts crashed on)."""
    out = tmp_path_factory.mktemp("db") / "run"
    cfg = config(
        tiny_sd3,
        instance_dir,
        out,
        prior_preservation=True,
        class_prompt=CLASS_PROMPT,
        num_class_images=2,
        class_batch_size=2,
        random_flip=True,
    )
    return out, dreambooth(cfg)


def fixed_instance_loss(bb, instance_dir: Path) -> float:
    """The rectified-flow loss on the exemplars at fixed noise and sigma 0.3 / 0.7, computed
    here from the backbone API (independently of the engine)."""
    images = torch.stack([load_training_image(p, SIZE) for p in sorted(instance_dir.glob("*.png"))])
    g = torch.Generator().manual_seed(0)
    x0 = bb.encode_images(images, generator=g)
    cond = bb.encode_prompts([PROMPT] * len(images))
    total = 0.0
    for sigma in (0.3, 0.7):
        noise = torch.randn(x0.shape, generator=g)
        t = torch.full((len(images),), sigma * 1000)
        with torch.no_grad():
            pred = bb.predict(bb.add_noise(x0, noise, t), t, cond, 1.0, SIZE, SIZE)
        total += float(((pred - (noise - x0)) ** 2).mean())
    return total / 2


def test_prior_preservation_run_learns_the_exemplars(prior_run, tiny_sd3, instance_dir):
    out, result = prior_run
    assert result.step == 8
    assert result.n_class_images == 2
    assert sorted(p.name for p in (out / "class_images").iterdir()) == [
        "class-00000.png",
        "class-00001.png",
    ]
    # the engine's fixed-noise instance loss fell
    assert result.last_instance_loss < result.first_instance_loss - 0.02
    # ... and so does an independent one, with the saved LoRA loaded into a fresh backbone
    bb = get_host().backbones.get("sd3").from_pretrained(str(tiny_sd3), max_sequence_length=32)
    before = fixed_instance_loss(bb, instance_dir)
    bb.load_lora(out, trainable=False)
    after = fixed_instance_loss(bb, instance_dir)
    assert after < before - 0.02, (before, after)


def test_outputs_and_diffusers_loads_the_lora(prior_run, tiny_sd3):
    from diffusers import StableDiffusion3Pipeline

    out, _ = prior_run
    weights = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert weights and all(k.startswith("transformer.") for k in weights)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "validation"] == [0, 8]
    train = [r for r in records if r["type"] == "train"]
    assert len(train) == 8 and all(r["prior_loss"] is not None for r in train)
    for name in ("curves.png", "README.md", "config.toml"):
        assert (out / name).is_file(), name
    # the prompt embeddings are in the store on disk (issue 31), one file per prompt
    store = Path(os.environ["DD_CACHE_DIR"]) / "embeddings"
    assert len(list(store.glob("sd3-*/*/*.safetensors"))) >= 2
    assert (out / "validation" / "step-000008-seed0.png").is_file()
    assert (out / "checkpoints" / "step-4").is_dir() and (out / "checkpoints" / "last").is_dir()

    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny_sd3))
    pipe.set_progress_bar_config(disable=True)
    kw = dict(height=SIZE, width=SIZE, num_inference_steps=2, max_sequence_length=32)
    kw["output_type"] = "np"
    base = pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kw).images[0]
    pipe.load_lora_weights(str(out))
    tuned = pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kw).images[0]
    assert np.abs(tuned - base).mean() > 1e-3
    # the validation image of step 8 is what diffusers generates with the LoRA
    ours = np.asarray(Image.open(out / "validation" / "step-000008-seed0.png"), np.int16)
    assert np.abs(ours - (tuned * 255).round().astype(np.int16)).max() <= 2


def test_resume_equals_uninterrupted_run_and_reuses_class_images(
    prior_run, tiny_sd3, instance_dir, tmp_path
):
    out, _ = prior_run
    run = tmp_path / "resumed"
    # class images already there (copied) are reused; a deleted one is regenerated alike
    (run / "class_images").mkdir(parents=True)
    first = (out / "class_images" / "class-00000.png").read_bytes()
    (run / "class_images" / "class-00000.png").write_bytes(first)
    kw = dict(
        prior_preservation=True,
        class_prompt=CLASS_PROMPT,
        num_class_images=2,
        class_batch_size=2,
        random_flip=True,
    )
    r1 = dreambooth(config(tiny_sd3, instance_dir, run, stop_at=4, **kw))
    assert r1.step == 4
    assert (run / "class_images" / "class-00001.png").read_bytes() == (
        out / "class_images" / "class-00001.png"
    ).read_bytes()
    with pytest.raises(DDError, match="already holds a dreambooth run"):
        dreambooth(config(tiny_sd3, instance_dir, run, **kw))
    with pytest.raises(DDError, match="different settings"):
        dreambooth(config(tiny_sd3, instance_dir, run, resume=True, **{**kw, "lr": 1e-3}))
    r2 = dreambooth(config(tiny_sd3, instance_dir, run, resume=True, **kw))
    assert r2.step == 8
    a = load_file(str(out / "pytorch_lora_weights.safetensors"))
    b = load_file(str(run / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_bf16_mixed_precision_with_validation(tiny_sd3, instance_dir, tmp_path):
    """Validation under mixed precision must not crash (a known failure of peers)."""
    cfg = config(
        tiny_sd3, instance_dir, tmp_path / "bf16", dtype="bf16", train_steps=2,
        validation_every=1, save_every=2,
    )  # fmt: skip
    result = dreambooth(cfg)
    assert result.step == 2
    assert len(list((tmp_path / "bf16" / "validation").glob("step-*-seed0.png"))) == 3
    weights = load_file(str(result.lora))
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights.values())


def test_treat_continues_from_the_dreambooth_lora(prior_run, tiny_sd3, tmp_path):
    """`dd treat --init-lora OUT` starts from the DreamBooth LoRA (seed 000, Sec. 4.3)."""
    from test_treat import fit_redness_detector

    from dd.engines.treat import TreatConfig, treat

    out, _ = prior_run
    det = fit_redness_detector(tmp_path / "det")
    prompts = tmp_path / "p.txt"
    prompts.write_text(PROMPT + "\n")
    cfg = TreatConfig(
        backbone="sd3", model=str(tiny_sd3), backbone_options={"max_sequence_length": 32},
        detector_weights=str(det), detector_options={"input_size": 64}, prompts=str(prompts),
        eval_prompts=str(prompts), out=str(tmp_path / "treat"), resolution=SIZE, steps=2,
        guidance=1.0, train_steps=1, eval_every=1, eval_seeds=[0], init_lora=str(out),
    )  # fmt: skip
    result = treat(cfg)
    before = load_file(str(out / "pytorch_lora_weights.safetensors"))
    after = load_file(str(result.lora))
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_flow_sigmas():
    q = torch.tensor([0.5])
    assert flow_sigmas(q, 1, weighting="logit_normal").item() == pytest.approx(0.5, abs=1e-6)
    # shift 3 maps 0.5 to 3 * 0.5 / (1 + 2 * 0.5) = 0.75
    assert flow_sigmas(q, 1, weighting="uniform", shift=3.0).item() == pytest.approx(0.75)
    # the logit-normal quantile of N(0, 1) at 0.8413 is sigmoid(1)
    s = flow_sigmas(torch.tensor([0.841344746]), 1, weighting="logit_normal")
    assert s.item() == pytest.approx(1 / (1 + np.exp(-1.0)), abs=1e-5)
    # mode with scale 0 is uniform (reversed); drawn samples lie in (0, 1)
    assert flow_sigmas(torch.tensor([0.2]), 1, weighting="mode", mode_scale=0.0).item() == (
        pytest.approx(0.8)
    )
    g = torch.Generator().manual_seed(0)
    drawn = flow_sigmas(None, 4000, weighting="logit_normal", generator=g)
    assert drawn.min() > 0 and drawn.max() < 1
    assert float(drawn.median()) == pytest.approx(0.5, abs=0.03)
    with pytest.raises(DDError, match="weighting"):
        flow_sigmas(None, 1, weighting="cosmic")


def test_centre_crop_and_random_crop(tmp_path):
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :10] = 255  # white left quarter
    Image.fromarray(a).save(tmp_path / "x.png")
    x = load_training_image(tmp_path / "x.png", 10)
    assert x.shape == (3, 10, 10)
    assert float(x.max()) < 0.1  # the centre has no white (bicubic ringing aside)
    crops = {
        float(load_training_image(tmp_path / "x.png", 10, center_crop=False, rng=rng).mean())
        for rng in (np.random.default_rng(s) for s in range(8))
    }
    assert len(crops) > 1


def test_cli_errors_are_one_line(cli, tiny_sd3, instance_dir, tmp_path):
    base = ["dreambooth", "--backbone", "sd3", "--model", tiny_sd3, "--out", tmp_path / "o"]
    r = cli(*base, "--instance-dir", tmp_path / "missing", "--instance-prompt", PROMPT)
    assert r.exit_code == 1 and "instance-dir not found" in r.output
    r = cli(*base, "--instance-dir", instance_dir, "--instance-prompt", PROMPT,
            "--prior-preservation")  # fmt: skip
    assert r.exit_code == 2 and "--class-prompt" in r.output  # a usage mistake
    assert r.output.strip().splitlines()[-1].startswith("Error:") and "Traceback" not in r.output
    empty = tmp_path / "empty"
    empty.mkdir()
    r = cli(*base, "--instance-dir", empty, "--instance-prompt", PROMPT)
    assert r.exit_code == 1 and "no images" in r.output


def test_cli_runs_sd15(cli, tmp_path_factory, instance_dir, tmp_path):
    model = tiny_pipeline_path("sd15", tmp_path_factory)
    r = cli(
        "dreambooth", "--backbone", "sd15", "--model", model, "--instance-dir", instance_dir,
        "--instance-prompt", PROMPT, "--out", tmp_path / "o", "--resolution", SIZE,
        "--train-steps", 2, "--validation-every", 2, "--validation-seeds", "1", "--steps", 2,
        "--gradient-checkpointing", "--lr", "1e-3",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "instance loss" in r.output
    assert (tmp_path / "o" / "pytorch_lora_weights.safetensors").is_file()


def test_two_cpu_processes_share_class_images(tiny_sd3, instance_dir, tmp_path):
    """Under `accelerate launch` the processes split class-image generation between them and
    train with a batch of one per process."""
    run = tmp_path / "run"
    proc = launch_dd_twice([
        "dreambooth", "--backbone", "sd3",
        "--model", tiny_sd3, "-B", "max_sequence_length=32",
        "--instance-dir", instance_dir, "--instance-prompt", PROMPT,
        "--class-prompt", CLASS_PROMPT, "--prior-preservation", "--num-class-images", "3",
        "--class-batch-size", "1", "--out", run, "--resolution", SIZE,
        "--steps", "2", "--train-steps", "2", "--validation-every", "2",
        "--validation-seeds", "1", "--device", "cpu",
    ])  # fmt: skip
    assert "batch 1 x 2 x 1" in proc.stderr
    names = sorted(p.name for p in (run / "class_images").iterdir())
    assert names == ["class-00000.png", "class-00001.png", "class-00002.png"]
    trainer = json.loads((run / "checkpoints" / "last" / "trainer.json").read_text())
    assert trainer["world_size"] == 2 and trainer["state"]["position"] == 4
    assert (run / "pytorch_lora_weights.safetensors").is_file()
