"""AuraFlow as a dd backbone: the worked example of a third-party family (docs/plugins.md).

AuraFlow (fal.ai) is a flow-matching MMDiT with one UMT5 text encoder, loaded by diffusers'
``AuraFlowPipeline``; dd's built-ins do not cover it. Everything dd needs comes from this
file, registered through the plugin's entry point: dd's core never names it.

Sampling follows ``AuraFlowPipeline``: latents are not packed (``B x 4 x h x w``), the
scheduler's own sigmas (static shift) give the timesteps, the transformer takes the
timestep divided by 1000 (``t = 1`` is noise), classifier-free guidance (default 3.5; a scale
<= 1 disables it) mixes the predictions of the empty and the real prompt from one batched
call, and the VAE's ``scaling_factor`` is applied both ways. What makes it a dd backbone:

* loading: ``pipeline_classes`` (the generic ``Backbone.from_pretrained`` loads the first)
  and ``load_options`` (the ``-B`` options and their types, passed to ``__init__``),
* ``encode_prompts_uncached``, ``prepare_latents``, ``make_schedule``, ``predict``,
* class attributes: ``name``, ``prediction_type``, ``lora_layers_kwarg`` (the keyword of the
  pipeline's ``save_lora_weights``, so ``dd treat`` writes a LoRA that
  ``AuraFlowPipeline.load_lora_weights`` reads), defaults,
* ``build_tiny_pipeline`` for offline tests (``python -m dd.testing.tiny auraflow DIR``).

Deliberate copy: the prompt and guidance code follows ``dd_plugins/sd3.py`` line
for line where the families agree; a third-party package depends on dd's public API
(``dd.api.backbones``), never on dd's built-in plugins.

Training (``dd treat``'s regularisation, DreamBooth), truncated backprop through the last
steps, decoding, LoRA save/load and ``dd refine``'s late-step repair come from
``dd.api.backbones.Backbone``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from dd.api.backbones import FLOW, Backbone, Conditioning, Schedule, cfg_mix, flow_schedule
from dd.errors import DDError


class AuraFlowBackbone(Backbone):
    """AuraFlow (flow matching, one UMT5 encoder, classifier-free guidance)."""

    name = "auraflow"
    description = "AuraFlow: flow-matching MMDiT with UMT5 (AuraFlowPipeline; example plugin)"
    prediction_type = FLOW
    lora_layers_kwarg = "transformer_lora_layers"
    pipeline_classes = ("AuraFlowPipeline",)
    load_options: ClassVar[dict[str, Any]] = {"max_sequence_length": int | None}
    default_steps = 50
    default_guidance = 3.5
    default_resolution = 1024
    default_max_sequence_length = 256

    def __init__(self, pipe: Any, *, max_sequence_length: int | None = None, **kwargs: Any):
        super().__init__(pipe, **kwargs)
        self.max_sequence_length = int(max_sequence_length or self.default_max_sequence_length)

    # ------------------------------------------------------------------ prompts
    def encode_prompts_uncached(self, prompts: list[str]) -> Conditioning:
        """Prompt and empty-prompt embeddings (padding masked out), as the pipeline makes
        them for classifier-free guidance."""
        limit = int(getattr(self.pipe.tokenizer, "model_max_length", 0) or 0)
        max_len = min(self.max_sequence_length, limit) if limit > 0 else self.max_sequence_length
        embeds, _, neg, _ = self.pipe.encode_prompt(
            prompts,
            negative_prompt="",
            do_classifier_free_guidance=True,
            device=self.device,
            max_sequence_length=max_len,
        )
        return Conditioning({"prompt_embeds": embeds, "negative_prompt_embeds": neg})

    # ------------------------------------------------------------------ sampling
    # Deliberate copy: follows dd_plugins/sd3.py (module docstring): a third-party plugin
    # depends on dd's API, never on dd's built-in plugins.
    def prepare_latents(
        self, batch_size: int, height: int, width: int, generator: torch.Generator | list | None
    ) -> torch.Tensor:
        self.check_size(height, width)
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
        return flow_schedule(self.pipe.scheduler, steps, device=self.device)

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
        """Velocity at ``timestep`` (scheduler scale; the transformer takes it / 1000)."""
        scale = self.default_guidance if guidance is None else float(guidance)
        embeds = cond["prompt_embeds"]
        guided = scale > 1
        if guided:
            neg = cond["negative_prompt_embeds"]
            if neg is None:
                raise DDError(
                    "classifier-free guidance needs the unconditional prompt embeddings",
                    hint="encode prompts with encode_prompts, or pass guidance 1",
                )
            embeds = torch.cat([neg, embeds])
            latents, timestep = torch.cat([latents, latents]), torch.cat([timestep, timestep])
        out = self.denoiser(
            hidden_states=latents,
            encoder_hidden_states=embeds,
            timestep=(timestep / 1000).to(latents.device, latents.dtype),
            return_dict=False,
        )[0]
        return cfg_mix(out, scale) if guided else out

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
        """The rectified-flow loss on the conditional prediction (guidance is a sampling
        device, not part of the objective)."""
        return super().diffusion_loss(
            images, cond, generator=generator, guidance=1.0, weighting=weighting
        )

    # ------------------------------------------------------------------ tests
    @classmethod
    def build_tiny_pipeline(cls, seed: int = 0) -> Any:
        """A tiny ``AuraFlowPipeline`` of the real classes (random seeded weights), with dd's
        offline T5 tokenizer: images up to 128 x 128 (multiples of 8)."""
        from diffusers import (
            AuraFlowPipeline,
            AuraFlowTransformer2DModel,
            FlowMatchEulerDiscreteScheduler,
        )
        from transformers import UMT5Config, UMT5EncoderModel

        from dd.testing.tiny import load_t5_tokenizer, tiny_vae

        # Deliberate copy: sizes in the style of dd.testing.tiny's builders (tiny real classes).
        tok = load_t5_tokenizer()
        torch.manual_seed(seed)
        encoder = UMT5EncoderModel(
            UMT5Config(
                vocab_size=len(tok),
                d_model=32,
                d_kv=8,
                d_ff=64,
                num_layers=2,
                num_heads=4,
                relative_attention_num_buckets=8,
                relative_attention_max_distance=32,
                feed_forward_proj="gated-gelu",
                is_encoder_decoder=False,
                use_cache=False,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
                decoder_start_token_id=tok.pad_token_id,
            )
        ).eval()
        # Deliberate copy: tiny sizes in the style of dd.testing.tiny's builders.
        transformer = AuraFlowTransformer2DModel(
            sample_size=16,
            patch_size=2,
            in_channels=4,
            num_mmdit_layers=1,
            num_single_dit_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            caption_projection_dim=32,
            out_channels=4,
            pos_embed_max_size=256,
        ).eval()
        vae = tiny_vae("sdxl", seed)  # AuraFlow decodes with SDXL's VAE
        return AuraFlowPipeline(
            tokenizer=tok,
            text_encoder=encoder,
            vae=vae,
            transformer=transformer,
            scheduler=FlowMatchEulerDiscreteScheduler(shift=1.73),
        )
