"""Stable Diffusion XL: a UNet with two CLIP text encoders, pooled embeddings and size
micro-conditioning.

Loaded as a diffusers ``StableDiffusionXLPipeline``. Everything shared with SD1.5 (DDIM
sampling from the pipeline's own betas instead of its Euler scheduler, classifier-free
guidance with row-aligned negative embeddings, the VAE's scale both ways) comes from
:class:`dd_plugins.sd15.UNetBackbone`. SDXL adds:

* the UNet's ``added_cond_kwargs``: the pooled embedding of the second text encoder and
  ``add_time_ids`` from (original size, crop top-left, target size), computed by the
  pipeline's own ``_get_add_time_ids`` exactly as ``__call__`` does by default
  (original = target = the generated size, crop (0, 0));
* with no negative prompt set, the negative embeddings are zeros (the pipeline's
  ``force_zeros_for_empty_prompt``);
* classifier-free guidance 5.0 by default, 30 DDIM steps, 1024 px (the UNet's native size);
* a VAE kept in fp32 when the model runs in fp16 and its config says ``force_upcast``
  (SDXL's VAE overflows in fp16), as the pipeline's decode does.

Unlike the pipeline's ``__call__`` (no-grad), gradients flow through sampling and decoding,
so SDXL LoRAs can be treated.
"""

from __future__ import annotations

from typing import Any

import torch

from dd.api.backbones import Conditioning
from dd.api.hookspecs import hookimpl
from dd_plugins.sd15 import UNetBackbone


class SDXLBackbone(UNetBackbone):
    """Stable Diffusion XL (``StableDiffusionXLPipeline``)."""

    name = "sdxl"
    pipeline_classes = ("StableDiffusionXLPipeline",)
    description = (
        "Stable Diffusion XL: UNet + 2 CLIP encoders, DDIM sampling "
        "(diffusers StableDiffusionXLPipeline)"
    )
    default_steps = 30
    default_guidance = 5.0
    default_resolution = 1024
    upcast_vae_in_fp16 = True

    def encode_prompts_uncached(self, prompts: list[str]) -> Conditioning:
        embeds, negative, pooled, negative_pooled = self.pipe.encode_prompt(
            prompt=prompts,
            device=self.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            negative_prompt=self._negative_prompts(len(prompts)),
        )
        return Conditioning(
            {
                "prompt_embeds": embeds,
                "negative_prompt_embeds": negative,
                "pooled_prompt_embeds": pooled,
                "negative_pooled_prompt_embeds": negative_pooled,
            }
        )

    def add_time_ids(self, height: int, width: int, pooled: torch.Tensor) -> torch.Tensor:
        """``(1, 6)`` micro-conditioning as ``StableDiffusionXLPipeline.__call__`` builds it
        by default: original size = target size = ``(height, width)``, crop ``(0, 0)``."""
        encoder_2 = self.pipe.text_encoder_2
        projection_dim = (
            int(pooled.shape[-1]) if encoder_2 is None else int(encoder_2.config.projection_dim)
        )
        size = (int(height), int(width))
        ids = self.pipe._get_add_time_ids(
            size, (0, 0), size, dtype=pooled.dtype, text_encoder_projection_dim=projection_dim
        )
        return ids.to(pooled.device)

    def unet_inputs(self, cond: Conditioning, cfg: bool, height: int, width: int) -> dict[str, Any]:
        embeds = self._rows(cond, "prompt_embeds", cfg)
        pooled = self._rows(cond, "pooled_prompt_embeds", cfg)
        time_ids = self.add_time_ids(height, width, pooled)
        return {
            "encoder_hidden_states": embeds,
            "added_cond_kwargs": {
                "text_embeds": pooled,
                "time_ids": time_ids.repeat(embeds.shape[0], 1),
            },
        }


@hookimpl
def dd_register_backbones(register):
    register(SDXLBackbone)
