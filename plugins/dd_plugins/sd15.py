"""Stable Diffusion 1.x / 2.x: a UNet (epsilon or v-prediction) with one CLIP text encoder.

Loaded as a diffusers ``StableDiffusionPipeline`` (SD1.5, and SD2-style v-prediction models:
the prediction type is read from the scheduler config). Sampling is deterministic DDIM
(eta 0) computed from the pipeline's own training betas and timestep spacing: the backbone
swaps the pipeline's scheduler (PNDM for SD1.5) for a ``DDIMScheduler`` with the same
configuration, so ``pipe.prepare_latents`` gives plain ``randn`` noise (DDIM's
``init_noise_sigma`` is 1) and ``pipe(...)`` samples exactly what :meth:`Backbone.sample`
computes.

Classifier-free guidance: default 7.5; a guidance scale <= 1 disables it and skips the
unconditional pass. The negative prompt is ``""`` (the pipeline's default) unless the
``negative_prompt`` option sets one; the negative embeddings travel row-aligned with the
positive ones in the :class:`~dd.api.backbones.Conditioning`. Generation defaults to 25 DDIM
steps at the UNet's native size (``unet.sample_size * vae_scale_factor``: 512 px for SD1.5,
768 for SD2-v). The VAE's scale (and shift, where its config sets one; SD VAEs set none) is
applied both ways.

:class:`UNetBackbone` holds what SD1.5 and SDXL share; :mod:`dd_plugins.sdxl` builds on it.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from dd.api.backbones import Backbone, Conditioning, DDIMBackbone, cfg_mix
from dd.api.hookspecs import hookimpl
from dd.errors import DDError


class UNetBackbone(DDIMBackbone):
    """Shared by the UNet families (SD1.5, SDXL): DDIM sampling from the pipeline's betas,
    classifier-free guidance with row-aligned negative embeddings, AutoencoderKL."""

    lora_layers_kwarg = "unet_lora_layers"
    load_options: ClassVar[dict[str, Any]] = {"negative_prompt": str | None}
    #: Decode (and encode) in fp32 when the model runs in fp16 and the VAE config says
    #: ``force_upcast`` (SDXL's VAE overflows in fp16).
    upcast_vae_in_fp16: ClassVar[bool] = False

    def __init__(self, pipe: Any, *, negative_prompt: str | None = None, **kwargs: Any):
        from diffusers import DDIMScheduler

        config = pipe.scheduler.config
        prediction = self._prediction_type(config)
        # Same betas, spacing and final alpha as the shipped scheduler; no x0 clipping
        # (latents are not in [-1, 1]): exactly the update rule of Backbone.step.
        pipe.scheduler = DDIMScheduler.from_config(
            config, clip_sample=False, set_alpha_to_one=config.get("set_alpha_to_one", False)
        )
        pipe.set_progress_bar_config(disable=True)
        super().__init__(pipe, **kwargs)
        self.prediction_type = prediction
        self.negative_prompt = negative_prompt
        self.default_resolution = int(pipe.unet.config.sample_size) * self.vae_scale_factor
        self._upcast_vae()

    # ------------------------------------------------------------------ prompts
    def _cache_key(self, prompt: str) -> str:
        return super()._cache_key(f"{prompt}\x00negative:{self.negative_prompt!r}")

    def _negative_prompts(self, n: int) -> list[str] | None:
        """``None`` keeps the pipeline's default (``""``; zeros for SDXL)."""
        return None if self.negative_prompt is None else [self.negative_prompt] * n

    # ------------------------------------------------------------------ sampling
    def prepare_latents(
        self, batch_size: int, height: int, width: int, generator: torch.Generator | list | None
    ) -> torch.Tensor:
        f = self.vae_scale_factor
        if int(height) % f or int(width) % f:
            raise DDError(
                f"{self.name}: size {width}x{height} is not a multiple of {f}",
                hint=f"pick a height and width divisible by {f}",
            )
        return self.pipe.prepare_latents(
            batch_size,
            self.denoiser.config.in_channels,
            height,
            width,
            self.dtype,
            self.device,
            generator,
        )

    def unet_inputs(self, cond: Conditioning, cfg: bool, height: int, width: int) -> dict[str, Any]:
        """UNet keyword inputs for ``cond`` (rows ``[negative, positive]`` when ``cfg``)."""
        return {"encoder_hidden_states": self._rows(cond, "prompt_embeds", cfg)}

    def _rows(self, cond: Conditioning, key: str, cfg: bool) -> torch.Tensor:
        positive = cond[key]
        if positive is None:
            raise DDError(f"{self.name}: the conditioning has no {key}")
        if not cfg:
            return positive
        negative = cond[f"negative_{key}"]
        if negative is None:
            raise DDError(
                f"{self.name}: classifier-free guidance needs negative_{key}",
                hint="encode prompts with this backbone, or pass guidance <= 1",
            )
        return torch.cat([negative, positive])

    # Deliberate copy: the signature of the abstract Backbone.predict it overrides (the keywords are
    # the API).
    def predict(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        cond: Conditioning,
        guidance: float | None,
        height: int,
        width: int,
    ) -> torch.Tensor:
        """The UNet output; with guidance > 1 one batched call on ``[uncond, cond]``, then
        ``uncond + g * (cond - uncond)``."""
        cfg = guidance is not None and float(guidance) > 1.0
        x = torch.cat([latents, latents]) if cfg else latents
        t = torch.cat([timestep, timestep]) if cfg else timestep
        out = self.denoiser(x, t, **self.unet_inputs(cond, cfg, height, width), return_dict=False)[
            0
        ]
        return cfg_mix(out, guidance) if cfg else out

    # ------------------------------------------------------------------ VAE
    def _upcast_vae(self) -> None:
        vae = self.vae
        if self.upcast_vae_in_fp16 and vae.dtype == torch.float16 and vae.config.force_upcast:
            vae.to(torch.float32)

    # ------------------------------------------------------------------ misc
    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Backbone:
        super().to(device, dtype)
        self._upcast_vae()
        return self

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "negative_prompt": self.negative_prompt}


class SD15Backbone(UNetBackbone):
    """Stable Diffusion 1.x / 2.x (``StableDiffusionPipeline``; epsilon or v-prediction)."""

    name = "sd15"
    pipeline_classes = ("StableDiffusionPipeline",)
    pipeline_load_kwargs: ClassVar[dict[str, Any]] = {
        "safety_checker": None,
        "requires_safety_checker": False,
    }
    late_step_training = "lora"
    description = (
        "Stable Diffusion 1.x/2.x: UNet + CLIP, epsilon or v-prediction, DDIM sampling "
        "(diffusers StableDiffusionPipeline)"
    )
    default_steps = 25
    default_guidance = 7.5
    default_resolution = 512

    def encode_prompts_uncached(self, prompts: list[str]) -> Conditioning:
        embeds, negative = self.pipe.encode_prompt(
            prompts,
            self.device,
            1,
            True,
            negative_prompt=self._negative_prompts(len(prompts)),
        )
        return Conditioning({"prompt_embeds": embeds, "negative_prompt_embeds": negative})


@hookimpl
def dd_register_backbones(register):
    register(SD15Backbone)
