"""FLUX.1 (schnell and dev): a flow-matching transformer with T5 + CLIP text encoders.

schnell (no guidance embedding): 4 steps, no guidance. dev (guidance embedding): guidance
3.5 passed to the transformer's guidance embedding, about 10 steps for treating. Latents are
*packed* 2 x 2 into tokens, as ``FluxPipeline`` does; the VAE's ``shift_factor`` and
``scaling_factor`` are applied both ways.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from dd.api.backbones import FLOW, Backbone, Conditioning, Schedule, flow_schedule
from dd.api.hookspecs import hookimpl


class FluxBackbone(Backbone):
    """FLUX.1 schnell / dev (flow matching, packed latents)."""

    # Deliberate copy: each family declares its own class attributes (name, pipeline classes,
    # options, defaults).

    name = "flux"
    pipeline_classes = ("FluxPipeline",)
    load_options: ClassVar[dict[str, Any]] = {"max_sequence_length": int | None}
    description = "FLUX.1 schnell / dev: flow-matching transformer (diffusers FluxPipeline)"
    prediction_type = FLOW
    lora_layers_kwarg = "transformer_lora_layers"
    default_resolution = 1024

    def __init__(self, pipe: Any, *, max_sequence_length: int | None = None, **kwargs: Any):
        super().__init__(pipe, **kwargs)
        self.guidance_embeds = bool(pipe.transformer.config.get("guidance_embeds", False))
        # schnell: 4 steps, no guidance; dev: guidance embedding 3.5, ~10 steps.
        self.default_steps = 10 if self.guidance_embeds else 4
        self.default_guidance = 3.5 if self.guidance_embeds else None
        # T5 tokens of the prompt (schnell 256, dev 512), clamped to the tokenizer's limit.
        self.max_sequence_length = int(
            max_sequence_length or (512 if self.guidance_embeds else 256)
        )

    def _latent_hw(self, height: int, width: int) -> tuple[int, int]:
        f = self.vae_scale_factor
        return 2 * (int(height) // (f * 2)), 2 * (int(width) // (f * 2))

    def encode_prompts_uncached(self, prompts: list[str]) -> Conditioning:
        tok = self.pipe.tokenizer_2
        max_len = min(self.max_sequence_length, int(getattr(tok, "model_max_length", 512)))
        embeds, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, device=self.device, max_sequence_length=max_len
        )
        return Conditioning({"prompt_embeds": embeds, "pooled_prompt_embeds": pooled})

    @property
    def size_multiple(self) -> int:
        """FLUX packs 2 x 2 latent cells into one token: sides are multiples of 2 x the VAE's."""
        return self.vae_scale_factor * 2

    def prepare_latents(
        self, batch_size: int, height: int, width: int, generator: torch.Generator | list | None
    ) -> torch.Tensor:
        channels = self.pipe.transformer.config.in_channels // 4
        latents, _ = self.pipe.prepare_latents(
            batch_size, channels, height, width, self.dtype, self.device, generator
        )
        return latents

    def make_schedule(self, steps: int, height: int, width: int) -> Schedule:
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        cfg = self.pipe.scheduler.config
        lh, lw = self._latent_hw(height, width)
        seq_len = (lh // 2) * (lw // 2)
        mu = None
        if cfg.get("use_dynamic_shifting", False):
            mu = calculate_shift(
                seq_len,
                cfg.get("base_image_seq_len", 256),
                cfg.get("max_image_seq_len", 4096),
                cfg.get("base_shift", 0.5),
                cfg.get("max_shift", 1.15),
            )
        sigmas = np.linspace(1.0, 1 / steps, steps)
        return flow_schedule(self.pipe.scheduler, steps, mu=mu, sigmas=sigmas, device=self.device)

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
        b = latents.shape[0]
        lh, lw = self._latent_hw(height, width)
        img_ids = self.pipe._prepare_latent_image_ids(
            b, lh // 2, lw // 2, latents.device, latents.dtype
        )
        embeds = cond["prompt_embeds"]
        txt_ids = torch.zeros(embeds.shape[1], 3, device=latents.device, dtype=latents.dtype)
        g = None
        if self.guidance_embeds:
            scale = self.default_guidance if guidance is None else guidance
            g = torch.full((b,), float(scale), device=latents.device, dtype=torch.float32)
        return self.denoiser(
            hidden_states=latents,
            timestep=(timestep.float() / 1000).to(latents.dtype),
            guidance=g,
            pooled_projections=cond["pooled_prompt_embeds"],
            encoder_hidden_states=embeds,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]

    def decode(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        lat = self.pipe._unpack_latents(latents, height, width, self.vae_scale_factor)
        return self.vae_decode(lat)

    def encode_images(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        z = self.vae_encode(images, generator)
        b, c, h, w = z.shape
        return self.pipe._pack_latents(z, b, c, h, w)


@hookimpl
def dd_register_backbones(register):
    register(FluxBackbone)
