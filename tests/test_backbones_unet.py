"""The UNet backbones ``sd15`` and ``sdxl`` on tiny pipelines of the real diffusers classes.

Parity with the pipelines' own ``__call__`` (DDIM, eta 0), truncated backprop proved with
gradient hooks, LoRA files diffusers loads whole, the VAE's scale both ways, and one-line
errors for a wrong model/backbone pairing.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
from dd_plugins.sd15 import SD15Backbone
from dd_plugins.sdxl import SDXLBackbone
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

from dd.api.backbones import LORA_WEIGHT_NAME, Conditioning
from dd.errors import DDError
from dd.testing.tiny import tiny_pipeline_path

FAMILIES = {
    "sd15": (SD15Backbone, StableDiffusionPipeline, 7.5),
    "sdxl": (SDXLBackbone, StableDiffusionXLPipeline, 5.0),
}
PROMPTS = ["a red cat in the park", "a photo of a dog at night"]
SEEDS = [0, 7]
SIZE = 64
SMALL = 32  # gradient and LoRA tests: smaller images keep backward passes fast on CPU
PARITY_TOL = 1e-4


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory) -> dict[str, Path]:
    return {name: tiny_pipeline_path(name, tmp_path_factory) for name in FAMILIES}


def _variant(src: Path, dst: Path, **scheduler: object) -> Path:
    """A copy of a tiny pipeline folder with scheduler config entries changed."""
    shutil.copytree(src, dst)
    cfg_file = dst / "scheduler" / "scheduler_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), **scheduler}))
    return dst


def _ddim_pipeline(family: str, path: Path):
    """The family's pipeline with DDIM (eta 0) from its own scheduler config. The real SD1.5
    and SDXL configs set ``clip_sample`` and ``set_alpha_to_one`` false; the tiny ones come
    from scheduler classes that do not store these keys, so they are passed here."""
    pipe = FAMILIES[family][1].from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DDIMScheduler.from_config(
        pipe.scheduler.config, clip_sample=False, set_alpha_to_one=False
    )
    return pipe


def _pipeline_images(
    pipe, guidance: float, *, n: int = len(PROMPTS), size: int = SIZE, **kwargs
) -> torch.Tensor:
    """One pipeline call per prompt with the per-image generator ``Backbone.generate`` uses."""
    images = [
        pipe(
            p,
            height=size,
            width=size,
            num_inference_steps=3,
            guidance_scale=guidance,
            eta=0.0,
            generator=torch.Generator("cpu").manual_seed(s),
            output_type="pt",
            **kwargs,
        ).images
        for p, s in zip(PROMPTS[:n], SEEDS[:n], strict=True)
    ]
    return torch.cat(images)


def _generate(bb, guidance: float, *, n: int = len(PROMPTS), size: int = SIZE) -> torch.Tensor:
    return bb.generate(
        PROMPTS[:n], seeds=SEEDS[:n], height=size, width=size, steps=3, guidance=guidance
    )


def _count_unet_batches(bb) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    batches: list[int] = []
    handle = bb.denoiser.register_forward_hook(lambda m, a, o: batches.append(a[0].shape[0]))
    return batches, handle


def _perturb_lora_b(bb, seed: int = 0) -> None:
    """Gaussian init leaves lora_B at zero (a no-op adapter): give it small random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in bb.denoiser.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _lora_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """LoRA parameters by name with the adapter name removed (ours: ``default``; a pipeline's
    ``load_lora_weights``: ``default_0``)."""
    return {
        re.sub(r"\.(lora_[AB])\.[^.]+\.", r".\1.", n): p.detach().clone()
        for n, p in module.named_parameters()
        if "lora_" in n
    }


# ---------------------------------------------------------------------- parity
@pytest.mark.parametrize("family", list(FAMILIES))
def test_generate_matches_pipeline_call(family, tiny_paths):
    cls, _, cfg_guidance = FAMILIES[family]
    bb = cls.from_pretrained(str(tiny_paths[family]))
    pipe = _ddim_pipeline(family, tiny_paths[family])
    assert bb.default_guidance == cfg_guidance
    assert bb.default_resolution == 16 * 4  # unet.sample_size * the tiny VAE's factor 4
    assert bb.prediction_type == "epsilon"

    batches, handle = _count_unet_batches(bb)
    diffs = {}
    images = {}
    for g in (1.0, cfg_guidance):
        batches.clear()
        images[g] = _generate(bb, g)
        # guidance <= 1: no unconditional pass; CFG: one batched call on [uncond, cond].
        assert batches == [len(PROMPTS) * (2 if g > 1 else 1)] * 3
        diffs[g] = (images[g] - _pipeline_images(pipe, g)).abs().max().item()
    handle.remove()
    assert images[1.0].shape == (2, 3, SIZE, SIZE)
    assert (images[1.0] - images[cfg_guidance]).abs().max() > 1e-2  # guidance matters

    neg = "blurry, ugly hands"
    bb_neg = cls.from_pretrained(str(tiny_paths[family]), negative_prompt=neg)
    ours_neg = _generate(bb_neg, cfg_guidance, n=1)
    ref_neg = _pipeline_images(pipe, cfg_guidance, n=1, negative_prompt=neg)
    diffs["negative"] = (ours_neg - ref_neg).abs().max().item()
    assert (ours_neg - images[cfg_guidance][:1]).abs().max() > 1e-3  # the negative prompt is used
    print(f"{family} parity max abs diff: {diffs}")
    assert max(diffs.values()) < PARITY_TOL, diffs


def test_sd15_v_prediction_matches_pipeline_call(tiny_paths, tmp_path):
    path = _variant(tiny_paths["sd15"], tmp_path / "v", prediction_type="v_prediction")
    bb = SD15Backbone.from_pretrained(str(path))
    assert bb.prediction_type == "v_prediction"
    ours = _generate(bb, 7.5, n=1)
    diff = (ours - _pipeline_images(_ddim_pipeline("sd15", path), 7.5, n=1)).abs().max().item()
    print(f"sd15 v-prediction parity max abs diff: {diff}")
    assert diff < PARITY_TOL

    bad = _variant(tiny_paths["sd15"], tmp_path / "sample", prediction_type="sample")
    with pytest.raises(DDError, match="prediction type 'sample'"):
        SD15Backbone.from_pretrained(str(bad))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_conditioning_rows_stay_aligned(family, tiny_paths):
    bb = FAMILIES[family][0].from_pretrained(str(tiny_paths[family]))
    both = bb.encode_prompts(PROMPTS)
    keys = [k for k, v in both.tensors.items() if v is not None]
    assert "negative_prompt_embeds" in keys
    if family == "sdxl":
        assert {"pooled_prompt_embeds", "negative_pooled_prompt_embeds"} <= set(keys)
        # no negative prompt: SDXL's force_zeros_for_empty_prompt
        assert both["negative_prompt_embeds"].abs().max() == 0
    second = bb.encode_prompts(PROMPTS[1:])
    swapped = Conditioning.cat([both.select([1]), both.select([0])])
    for k in keys:
        assert torch.equal(both.select([1])[k], second[k]), k
        assert torch.equal(swapped[k][0], both[k][1]), k

    bb.negative_prompt = "blurry"  # part of the cache key: re-encoded, not served stale
    with_neg = bb.encode_prompts(PROMPTS)
    assert torch.equal(with_neg["prompt_embeds"], both["prompt_embeds"])
    assert not torch.equal(with_neg["negative_prompt_embeds"], both["negative_prompt_embeds"])
    assert torch.equal(with_neg["negative_prompt_embeds"][0], with_neg["negative_prompt_embeds"][1])


# ---------------------------------------------------------------------- gradients
def _lora_grads(bb, cond, *, grad_steps: int, guidance: float, checkpointed: bool = False):
    for p in bb.lora_parameters():
        p.grad = None
    latents = bb.sample(
        cond,
        height=SMALL,
        width=SMALL,
        steps=4,
        guidance=guidance,
        generator=torch.Generator("cpu").manual_seed(3),
        grad_steps=grad_steps,
    )
    decode = bb.decode_maybe_checkpointed if checkpointed else bb.decode
    decode(latents, SMALL, SMALL).mean().backward()
    return [p.grad.clone() if p.grad is not None else None for p in bb.lora_parameters()]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_truncated_backprop_reaches_lora_only_through_last_steps(family, tiny_paths):
    cls, _, guidance = FAMILIES[family]
    bb = cls.from_pretrained(str(tiny_paths[family]))
    params = bb.add_lora(rank=4)
    _perturb_lora_b(bb)
    cond = bb.encode_prompts(PROMPTS[:1])

    calls: list[dict] = []

    def hook(module, args, output):
        out = output[0] if isinstance(output, tuple) else output.sample
        record = {"batch": out.shape[0], "requires_grad": out.requires_grad, "grad": False}
        if out.requires_grad:
            out.register_hook(lambda g, r=record: r.update(grad=bool(g.abs().sum() > 0)))
        calls.append(record)

    handle = bb.denoiser.register_forward_hook(hook)
    grads_by_k = {}
    for k in (1, 2):
        calls.clear()
        grads_by_k[k] = _lora_grads(bb, cond, grad_steps=k, guidance=guidance)
        # CFG: one batched UNet call per step on [uncond, cond]
        assert [c["batch"] for c in calls] == [2] * 4
        tracked = [i for i, c in enumerate(calls) if c["grad"]]
        assert tracked == list(range(4 - k, 4)), (k, calls)
        assert not any(c["requires_grad"] for c in calls[: 4 - k])
        assert all(g is not None and g.abs().sum() > 0 for g in grads_by_k[k])
    handle.remove()
    assert len(params) == len(grads_by_k[1])
    assert not all(torch.equal(a, b) for a, b in zip(grads_by_k[1], grads_by_k[2], strict=True))

    bb.enable_gradient_checkpointing()
    assert bb.denoiser.is_gradient_checkpointing
    checkpointed = _lora_grads(bb, cond, grad_steps=2, guidance=guidance, checkpointed=True)
    for a, b in zip(grads_by_k[2], checkpointed, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------- LoRA files
class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_lora_file_loads_whole_into_a_fresh_pipeline(family, tiny_paths, tmp_path):
    cls, _, guidance = FAMILIES[family]
    bb = cls.from_pretrained(str(tiny_paths[family]))
    bb.add_lora(rank=4, alpha=8)  # alpha != rank: the scale must survive the file too
    _perturb_lora_b(bb)
    ours = _generate(bb, guidance, n=1, size=SMALL)
    file = bb.save_lora(tmp_path / "lora")
    assert file == tmp_path / "lora" / LORA_WEIGHT_NAME and file.is_file()

    pipe = _ddim_pipeline(family, tiny_paths[family])
    base = _pipeline_images(pipe, guidance, n=1, size=SMALL)
    records = _Records()
    diffusers_logger = logging.getLogger("diffusers")
    diffusers_logger.addHandler(records)
    try:
        pipe.load_lora_weights(str(tmp_path / "lora"))
    finally:
        diffusers_logger.removeHandler(records)
    # diffusers' own check of the adapter against the state dict
    assert not [m for m in records.messages if "Loading adapter weights from state_dict" in m]
    loaded, trained = _lora_tensors(pipe.unet), _lora_tensors(bb.denoiser)
    assert trained and sorted(loaded) == sorted(trained)
    for name, value in trained.items():
        assert torch.equal(loaded[name], value), name
    theirs = _pipeline_images(pipe, guidance, n=1, size=SMALL)
    assert (theirs - ours).abs().max() < PARITY_TOL
    assert (base - ours).abs().max() > 1e-3

    other = cls.from_pretrained(str(tiny_paths[family]))
    other.load_lora(tmp_path / "lora")
    assert (_generate(other, guidance, n=1, size=SMALL) - ours).abs().max() < 1e-5
    assert other.lora_parameters() and all(p.requires_grad for p in other.lora_parameters())


# ---------------------------------------------------------------------- VAE scale
@pytest.mark.parametrize("family", list(FAMILIES))
def test_vae_scale_applied_and_removed(family, tiny_paths):
    bb = FAMILIES[family][0].from_pretrained(str(tiny_paths[family]))
    vae, scale = bb.vae, bb.vae.config.scaling_factor
    assert vae.config.shift_factor is None and scale != 1
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))

    z = bb.encode_images(images, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        dist = vae.encode(images * 2 - 1).latent_dist
        raw = dist.sample(generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(z, raw * scale, rtol=0, atol=0)
        round_trip = bb.decode(z, SIZE, SIZE)
        by_hand = (vae.decode(raw).sample / 2 + 0.5).clamp(0, 1)
        torch.testing.assert_close(round_trip, by_hand, rtol=0, atol=1e-5)
        unscaled = (vae.decode(z).sample / 2 + 0.5).clamp(0, 1)
        assert (unscaled - by_hand).abs().max() > 1e-2  # the scale is no no-op here
        # the mode path: the same decoder, scale removed consistently
        z_mode = dist.mode() * scale
        torch.testing.assert_close(
            bb.decode(z_mode, SIZE, SIZE), (vae.decode(dist.mode()).sample / 2 + 0.5).clamp(0, 1)
        )

    cond = bb.encode_prompts(PROMPTS)
    losses = [
        bb.diffusion_loss(images, cond, generator=torch.Generator().manual_seed(9), guidance=g)
        for g in (1.0, bb.default_guidance)
    ]
    assert torch.isfinite(losses[0]) and losses[0] > 0
    assert losses[0] == losses[1]  # the training loss uses no classifier-free guidance


def test_sdxl_vae_stays_fp32_in_fp16(tiny_paths):
    bb = SDXLBackbone.from_pretrained(str(tiny_paths["sdxl"]), dtype=torch.float16)
    assert bb.denoiser.dtype == torch.float16 and bb.vae.dtype == torch.float32
    bb.to("cpu", torch.float16)
    assert bb.vae.dtype == torch.float32
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)) * 40
    out = bb.decode(z.half(), SIZE, SIZE)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    sd15 = SD15Backbone.from_pretrained(str(tiny_paths["sd15"]), dtype=torch.float16)
    assert sd15.vae.dtype == torch.float16  # SD1.5's pipeline decodes in fp16


# ---------------------------------------------------------------------- errors
@pytest.mark.parametrize(("family", "other"), [("sd15", "sdxl"), ("sdxl", "sd15")])
def test_wrong_pairing_names_the_right_backbone(family, other, tiny_paths):
    with pytest.raises(DDError) as info:
        FAMILIES[other][0].from_pretrained(str(tiny_paths[family]))
    assert info.value.hint == f"use --backbone {family}"
    assert "\n" not in str(info.value)


def test_unknown_option_and_registration(tiny_paths):
    with pytest.raises(DDError, match="unknown option.*guidance_rescale"):
        SD15Backbone.from_pretrained(str(tiny_paths["sd15"]), guidance_rescale=0.7)
    from dd.api.plugins import get_backbone_class

    assert get_backbone_class("sd15") is SD15Backbone
    assert get_backbone_class("sdxl") is SDXLBackbone
    assert SD15Backbone.lora_layers_kwarg == SDXLBackbone.lora_layers_kwarg == "unet_lora_layers"
    assert (SD15Backbone.default_steps, SDXLBackbone.default_steps) == (25, 30)


@pytest.mark.filterwarnings("error")
def test_lora_of_the_other_family_is_refused(tiny_paths, tmp_path, caplog):
    """One line: no state-dict dump logged by diffusers, none in the message, no warning."""
    sd15 = SD15Backbone.from_pretrained(str(tiny_paths["sd15"]))
    sd15.add_lora(rank=4)
    sd15.save_lora(tmp_path / "sd15-lora")
    sdxl = SDXLBackbone.from_pretrained(str(tiny_paths["sdxl"]))
    caplog.clear()
    with pytest.raises(DDError) as info:
        sdxl.load_lora(tmp_path / "sd15-lora")
    assert "another architecture" in (info.value.hint or "")
    assert "\n" not in str(info.value) and "size mismatch(es)" in str(info.value)
    assert not [r for r in caplog.records if r.name.startswith("diffusers")], caplog.text


def test_generic_loader_passes_declared_options_and_pipeline_keywords(tiny_paths):
    """sd15 and sdxl load through Backbone.from_pretrained (no loader of their own): the
    declared option reaches the constructor, sd15's pipeline has no safety checker."""
    assert "from_pretrained" not in vars(SD15Backbone) and "from_pretrained" not in vars(
        SDXLBackbone
    )
    bb = SD15Backbone.from_pretrained(str(tiny_paths["sd15"]), negative_prompt="blurry")
    assert bb.negative_prompt == "blurry" and bb.pipe.safety_checker is None
    assert bb.source == str(tiny_paths["sd15"])
    from dd.api.plugin_options import declared_options

    assert declared_options(SDXLBackbone.from_pretrained) == (
        {"negative_prompt": str | None},
        False,
    )
