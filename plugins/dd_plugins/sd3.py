"""Stable Diffusion 3 / 3.5: a flow-matching MMDiT with two CLIP encoders and T5.

Sampling follows ``StableDiffusion3Pipeline``: latents are *not* packed (``B x 16 x h x w``),
the scheduler's static shift (3.0 for SD3) gives the timesteps (``mu`` only where the
scheduler is configured for dynamic shifting), the transformer takes the scheduler timestep
(``sigma * 1000``), classifier-free guidance (default 7.0; a scale <= 1 disables it) mixes
the unconditional (empty prompt) and conditional predictions of one batched call, and the
VAE's ``shift_factor`` and ``scaling_factor`` are applied both ways.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from dd.api.backbones import FLOW, Backbone, Conditioning, Schedule, cfg_mix, flow_schedule
from dd.api.hookspecs import hookimpl
from dd.errors import DDError


class SD3Backbone(Backbone):
    """Stable Diffusion 3 / 3.5 (flow matching, classifier-free guidance)."""

    # Deliberate copy: each family declares its own class attributes (name, pipeline classes,
    # options, defaults).

    name = "sd3"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    load_options: ClassVar[dict[str, Any]] = {"max_sequence_length": int | None}
    description = "Stable Diffusion 3 / 3.5: flow-matching MMDiT (StableDiffusion3Pipeline)"
    prediction_type = FLOW
    lora_layers_kwarg = "transformer_lora_layers"
    default_steps = 28
    default_guidance = 7.0
    default_resolution = 1024
    #: T5 tokens of the prompt (the pipeline's default), clamped to the tokenizer's limit.
    default_max_sequence_length = 256

    def __init__(self, pipe: Any, *, max_sequence_length: int | None = None, **kwargs: Any):
        super().__init__(pipe, **kwargs)
        self.max_sequence_length = int(max_sequence_length or self.default_max_sequence_length)

    # ------------------------------------------------------------------ geometry
    @property
    def patch_size(self) -> int:
        return int(self.pipe.transformer.config.patch_size)

    def _latent_hw(self, height: int, width: int) -> tuple[int, int]:
        multiple = self.vae_scale_factor * self.patch_size
        if height % multiple or width % multiple:
            raise DDError(
                f"SD3 image size {width}x{height} is not a multiple of {multiple}",
                hint=f"choose a height and width divisible by {multiple}",
            )
        return height // self.vae_scale_factor, width // self.vae_scale_factor

    # ------------------------------------------------------------------ prompts
    def encode_prompts_uncached(self, prompts: list[str]) -> Conditioning:
        """Prompt and empty-prompt (unconditional) embeddings, as the pipeline computes them
        for classifier-free guidance."""
        tok = getattr(self.pipe, "tokenizer_3", None)
        limit = int(getattr(tok, "model_max_length", self.max_sequence_length) or 0)
        max_len = min(self.max_sequence_length, limit) if limit > 0 else self.max_sequence_length
        embeds, neg_embeds, pooled, neg_pooled = self.pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            do_classifier_free_guidance=True,
            max_sequence_length=max_len,
        )
        return Conditioning(
            {
                "prompt_embeds": embeds,
                "pooled_prompt_embeds": pooled,
                "negative_prompt_embeds": neg_embeds,
                "negative_pooled_prompt_embeds": neg_pooled,
            }
        )

    # ------------------------------------------------------------------ sampling
    def prepare_latents(
        self, batch_size: int, height: int, width: int, generator: torch.Generator | list | None
    ) -> torch.Tensor:
        self._latent_hw(height, width)
        return self.pipe.prepare_latents(
            batch_size,
            self.pipe.transformer.config.in_channels,
            height,
            width,
            self.dtype,
            self.device,
            generator,
        )

    def make_schedule(self, steps: int, height: int, width: int) -> Schedule:
        """The scheduler's own timesteps (static shift); ``mu`` from the image's token count
        only where the scheduler uses dynamic shifting, exactly as the pipeline does."""
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
            calculate_shift,
        )

        cfg = self.pipe.scheduler.config
        mu = None
        if cfg.get("use_dynamic_shifting", False):
            lh, lw = self._latent_hw(height, width)
            mu = calculate_shift(
                (lh // self.patch_size) * (lw // self.patch_size),
                cfg.get("base_image_seq_len", 256),
                cfg.get("max_image_seq_len", 4096),
                cfg.get("base_shift", 0.5),
                cfg.get("max_shift", 1.16),
            )
        return flow_schedule(self.pipe.scheduler, steps, mu=mu, device=self.device)

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
        """Velocity at ``timestep`` (scheduler scale, ``sigma * 1000``); with guidance > 1
        one batched call on ``[unconditional, conditional]``, mixed like the pipeline."""
        scale = self.default_guidance if guidance is None else float(guidance)
        embeds, pooled = cond["prompt_embeds"], cond["pooled_prompt_embeds"]
        cfg = scale > 1
        if cfg:
            neg, neg_pooled = cond["negative_prompt_embeds"], cond["negative_pooled_prompt_embeds"]
            if neg is None or neg_pooled is None:
                raise DDError(
                    "classifier-free guidance needs the unconditional prompt embeddings",
                    hint="encode prompts with encode_prompts, or pass guidance 1",
                )
            embeds, pooled = torch.cat([neg, embeds]), torch.cat([neg_pooled, pooled])
            latents, timestep = torch.cat([latents, latents]), torch.cat([timestep, timestep])
        out = self.denoiser(
            hidden_states=latents,
            timestep=timestep.to(latents.device),
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            return_dict=False,
        )[0]
        return cfg_mix(out, scale) if cfg else out

    # ------------------------------------------------------------------ training
    # Deliberate copy: the signature of the abstract Backbone.diffusion_loss it overrides (the
    # keywords are the API).
    def diffusion_loss(
        self,
        images: torch.Tensor,
        cond: Conditioning,
        *,
        generator: torch.Generator | None = None,
        guidance: float | None = None,
        weighting: str = "logit_normal",
    ) -> torch.Tensor:
        """SD3's rectified-flow loss on the conditional prediction.

        Classifier-free guidance mixes predictions at sampling time only; it is no part of
        the training objective, so ``guidance`` is accepted for the common signature and
        ignored.
        """
        return super().diffusion_loss(
            images, cond, generator=generator, guidance=1.0, weighting=weighting
        )


@hookimpl
def dd_register_backbones(register):
    register(SD3Backbone)
