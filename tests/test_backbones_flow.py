"""The flow-matching backbones, FLUX.1 (schnell- and dev-like) and SD3, on tiny pipelines.

Each proves against the real diffusers pipeline: sampling parity with ``__call__``, the
truncated-backprop gradient policy (with gradient hooks), LoRA files that a fresh pipeline
loads and reproduces, regularisation latents with the VAE's shift and scale, and the
resolution-dependent schedule of FLUX dev.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from dd_plugins.flux import FluxBackbone
from dd_plugins.sd3 import SD3Backbone
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline
from safetensors.torch import load_file

from dd.api.backbones import LORA_WEIGHT_NAME, Backbone
from dd.api.plugins import get_backbone_class
from dd.errors import DDError
from dd.testing.tiny import tiny_pipeline_path

#: family -> (tiny backbone, tiny variants, backbone class, pipeline class)
FAMILIES = {
    "flux": ("flux", {}, FluxBackbone, FluxPipeline),
    "flux-dev": ("flux", {"guidance": True}, FluxBackbone, FluxPipeline),
    "sd3": ("sd3", {}, SD3Backbone, StableDiffusion3Pipeline),
}
SEQ_LEN = 32  # the tiny T5's prompt length (the pipelines default to 256 / 512)
SIZE = 64
PROMPTS = ["a red cat in the park", "a photo of a blue house at night"]
SEEDS = [1, 2]


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory):
    """``tiny_path(family)``: the tiny pipeline folder, built once per session."""

    def get(family: str) -> Path:
        backbone, variants, _, _ = FAMILIES[family]
        return tiny_pipeline_path(backbone, tmp_path_factory, **variants)

    return get


@pytest.fixture
def load(tiny_path):
    """``load(family)``: a fresh backbone (tests add LoRA to it)."""

    def get(family: str) -> Backbone:
        cls = FAMILIES[family][2]
        return cls.from_pretrained(str(tiny_path(family)), max_sequence_length=SEQ_LEN)

    return get


def pipeline(tiny_path, family: str):
    pipe = FAMILIES[family][3].from_pretrained(str(tiny_path(family)))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call_pipeline(pipe, *, steps: int, guidance: float | None = None, size: int = SIZE):
    kwargs = {} if guidance is None else {"guidance_scale": guidance}
    return pipe(
        PROMPTS,
        height=size,
        width=size,
        num_inference_steps=steps,
        output_type="pt",
        max_sequence_length=SEQ_LEN,
        generator=[torch.Generator("cpu").manual_seed(s) for s in SEEDS],
        **kwargs,
    ).images


def perturb_lora(bb: Backbone, seed: int = 0) -> None:
    """LoRA B matrices start at zero (an identity adapter); make them matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in bb.denoiser.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def lora_grads(bb: Backbone) -> list[torch.Tensor]:
    return [
        (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
        for n, p in bb.denoiser.named_parameters()
        if "lora_" in n
    ]


@contextmanager
def diffusers_warnings() -> Iterator[list[str]]:
    """Collect what diffusers logs at WARNING or above (its root logger does not propagate)."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logger = logging.getLogger("diffusers")
    handler = Collect(logging.WARNING)
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


def test_registered_as_plugins():
    assert get_backbone_class("flux") is FluxBackbone
    assert get_backbone_class("sd3") is SD3Backbone
    assert SD3Backbone.default_steps == 28 and SD3Backbone.default_guidance == 7.0
    assert SD3Backbone.default_resolution == 1024
    assert SD3Backbone.lora_layers_kwarg == "transformer_lora_layers"


@pytest.mark.parametrize(
    ("family", "guidance"),
    [("flux", None), ("flux-dev", None), ("sd3", 1.0), ("sd3", 7.0)],
)
def test_generate_matches_pipeline(load, family, guidance):
    bb = load(family)
    with torch.no_grad():
        ours = bb.generate(
            PROMPTS, seeds=SEEDS, height=SIZE, width=SIZE, steps=3, guidance=guidance
        )
    # The pipeline's own default guidance (FLUX dev 3.5, SD3 7.0) equals the backbone's.
    theirs = call_pipeline(bb.pipe, steps=3, guidance=guidance)
    assert ours.shape == theirs.shape == (2, 3, SIZE, SIZE)
    diff = (ours - theirs).abs().max().item()
    assert diff < 1e-4, diff
    assert ours[0].sub(ours[1]).abs().max() > 1e-3  # two prompts and seeds, two images


@pytest.mark.parametrize(("family", "guidance"), [("flux", None), ("flux-dev", None), ("sd3", 7.0)])
def test_gradients_reach_only_the_last_steps(load, family, guidance):
    bb = load(family)
    bb.add_lora(rank=4)
    perturb_lora(bb)
    received: list[bool] = []

    def record(module, args, kwargs, output):
        index = len(received)
        received.append(False)
        out = output[0]
        if out.requires_grad:

            def mark(grad):
                received[index] = bool(grad.abs().sum() > 0)

            out.register_hook(mark)

    handle = bb.denoiser.register_forward_hook(record, with_kwargs=True)
    steps = 4
    grads = {}
    for k in (1, 2):
        received.clear()
        bb.denoiser.zero_grad()
        images = bb.generate(
            PROMPTS[:1], seeds=SEEDS[:1], height=SIZE, width=SIZE, steps=steps, guidance=guidance,
            grad_steps=k,
        )  # fmt: skip
        images.mean().backward()
        # one denoiser call per step (SD3 batches the CFG halves into one call)
        assert received == [False] * (steps - k) + [True] * k, (k, received)
        grads[k] = lora_grads(bb)
        assert sum(g.abs().sum() for g in grads[k]) > 0
    handle.remove()

    received.clear()
    images = bb.generate(
        PROMPTS[:1], seeds=SEEDS[:1], height=SIZE, width=SIZE, steps=steps, guidance=guidance,
        grad_steps=0,
    )  # fmt: skip
    assert not images.requires_grad

    bb.enable_gradient_checkpointing()
    bb.denoiser.zero_grad()
    images = bb.generate(
        PROMPTS[:1], seeds=SEEDS[:1], height=SIZE, width=SIZE, steps=steps, guidance=guidance,
        grad_steps=2,
    )  # fmt: skip
    images.mean().backward()
    for a, b in zip(lora_grads(bb), grads[2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_lora_round_trip(load, tiny_path, tmp_path, family):
    bb = load(family)
    guidance = 7.0 if family == "sd3" else None
    bb.add_lora(rank=4, alpha=8)  # alpha != rank: the file must carry it
    perturb_lora(bb)
    kwargs = {"height": SIZE, "width": SIZE, "steps": 2, "guidance": guidance}
    with torch.no_grad():
        ours = bb.generate(PROMPTS, seeds=SEEDS, **kwargs)
    path = bb.save_lora(tmp_path / "lora")
    assert path == tmp_path / "lora" / LORA_WEIGHT_NAME and path.is_file()
    tensors = load_file(path)

    pipe = pipeline(tiny_path, family)
    base = call_pipeline(pipe, steps=2, guidance=guidance)
    with diffusers_warnings() as messages:
        pipe.load_lora_weights(str(tmp_path / "lora"))
    bad = [m for m in messages if "unexpected keys" in m or "missing keys" in m]
    assert not bad, bad
    loaded = [n for n, _ in pipe.transformer.named_parameters() if "lora_" in n]
    assert len(loaded) == len(tensors) > 0
    theirs = call_pipeline(pipe, steps=2, guidance=guidance)
    diff = (ours - theirs).abs().max().item()
    assert diff < 1e-4, diff
    assert (ours - base).abs().max().item() > 1e-2

    fresh = load(family)
    fresh.load_lora(tmp_path / "lora")
    with torch.no_grad():
        again = fresh.generate(PROMPTS, seeds=SEEDS, **kwargs)
    assert (ours - again).abs().max().item() < 1e-5
    assert all(p.requires_grad for p in fresh.lora_parameters())


@pytest.mark.filterwarnings("error")  # peft's warning on the way is dropped, not shown
@pytest.mark.parametrize(("source", "target"), [("sd3", "flux"), ("flux", "sd3")])
def test_lora_of_another_architecture_is_one_line_error(load, tmp_path, source, target):
    bb = load(source)
    bb.add_lora(rank=4)
    bb.save_lora(tmp_path / "lora")
    with pytest.raises(DDError) as info:
        load(target).load_lora(tmp_path / "lora")
    text = str(info.value)
    assert "\n" not in text and "does not fit this" in text and info.value.hint


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_regularisation_latents_use_vae_shift_and_scale(load, family):
    bb = load(family)
    vae = bb.vae
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    assert shift != 0 and scale != 1  # otherwise forgetting them would go unnoticed
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    ours = bb.encode_images(images, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        z = vae.encode(images * 2 - 1).latent_dist.sample(torch.Generator().manual_seed(5))
    by_hand = (z - shift) * scale
    if family == "flux":
        by_hand = bb.pipe._pack_latents(by_hand, *by_hand.shape)
    assert ours.shape == by_hand.shape
    torch.testing.assert_close(ours, by_hand, rtol=0, atol=1e-6)

    bb.add_lora(rank=4)
    cond = bb.encode_prompts(PROMPTS)
    loss = bb.diffusion_loss(images, cond, generator=torch.Generator().manual_seed(3))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert sum(g.abs().sum() for g in lora_grads(bb)) > 0
    with torch.no_grad():
        same = bb.diffusion_loss(images, cond, generator=torch.Generator().manual_seed(3))
        other = bb.diffusion_loss(images, cond, generator=torch.Generator().manual_seed(4))
    assert same.item() == loss.item()
    assert other.item() != loss.item()


@pytest.mark.parametrize(("family", "dynamic"), [("flux-dev", True), ("sd3", False), ("sd3", True)])
def test_schedule_matches_pipeline(load, family, dynamic):
    bb = load(family)
    if family == "sd3" and dynamic:  # SD3 configured for dynamic shifting: the pipeline's mu
        config = {**bb.pipe.scheduler.config, "use_dynamic_shifting": True}
        bb.pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    assert bb.pipe.scheduler.config.use_dynamic_shifting == dynamic
    steps = 3
    schedules = {}
    for size in (SIZE, 2 * SIZE):
        schedules[size] = bb.make_schedule(steps, size, size)
        call_pipeline(bb.pipe, steps=steps, size=size)
        torch.testing.assert_close(
            schedules[size].sigmas, bb.pipe.scheduler.sigmas.float(), rtol=0, atol=1e-6
        )
        torch.testing.assert_close(
            schedules[size].timesteps, bb.pipe.scheduler.timesteps.float(), rtol=0, atol=1e-4
        )
    change = (schedules[SIZE].sigmas - schedules[2 * SIZE].sigmas).abs().max().item()
    if dynamic:  # mu grows with the image's token count
        assert change > 1e-3, change
    else:  # the scheduler's static shift (SD3's 3.0), whatever the size
        assert change == 0


def test_wrong_pairing_names_the_right_backbone(tiny_path):
    with pytest.raises(DDError) as info:
        get_backbone_class("flux").from_pretrained(str(tiny_path("sd3")))
    assert "StableDiffusion3Pipeline" in info.value.message
    assert "sd3" in info.value.hint
    with pytest.raises(DDError) as info:
        SD3Backbone.from_pretrained(str(tiny_path("flux")))
    assert "flux" in info.value.hint


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_unknown_option_is_an_error_not_ignored(tiny_path, family):
    cls = FAMILIES[family][2]
    with pytest.raises(DDError, match="unknown option.*max_seq_len") as info:
        cls.from_pretrained(str(tiny_path(family)), max_seq_len=64)
    assert "max_sequence_length" in info.value.hint


def test_sd3_size_and_sequence_length(load):
    bb = load("sd3")
    with pytest.raises(DDError, match="multiple of 8"):
        bb.prepare_latents(1, 60, 64, None)
    cond = bb.encode_prompts(PROMPTS)
    clip_tokens = bb.pipe.tokenizer.model_max_length
    assert cond["prompt_embeds"].shape[1] == clip_tokens + SEQ_LEN
    long = SD3Backbone(bb.pipe, max_sequence_length=10_000)
    t5_limit = bb.pipe.tokenizer_3.model_max_length
    assert long.encode_prompts(PROMPTS[:1])["prompt_embeds"].shape[1] == clip_tokens + t5_limit
