"""Latent diffusion (CompVis LDM): a VQ or KL autoencoder and a UNet, sampled with DDIM.

Loaded from a diffusers folder (or hub id) holding an ``LDMPipeline`` (unconditional:
``VQModel`` + ``UNet2DModel``, e.g. ``CompVis/ldm-celebahq-256``) or an
``LDMTextToImagePipeline`` (``VQModel`` or ``AutoencoderKL`` + ``UNet2DConditionModel`` +
LDMBert). It is the small model ``dd refine train`` fine-tunes in full on a late-step range
(seed 002); ``dd refine`` uses it like any other backbone.

* The autoencoder is the pipelines' ``vqvae`` component (a ``VQModel`` or ``AutoencoderKL``).
  Latents are ``(z - shift) * scaling_factor`` both ways, exactly as ``LDMPipeline``
  divides by ``vqvae.config.scaling_factor`` before decoding; a ``VQModel`` decode quantizes
  (as the pipeline does). Encoding a ``VQModel`` is deterministic.
* Sampling is deterministic DDIM (eta 0) from the pipeline's own betas
  (:func:`dd.api.backbones.ddim_schedule`); epsilon and v-prediction are read from the scheduler.
* Unconditional UNets ignore prompts (the conditioning only carries the batch size); the
  text-to-image UNet uses LDMBert with classifier-free guidance above 1 (negative prompt "").
"""

from __future__ import annotations

from typing import Any

import torch

from dd.api.backbones import Conditioning, DDIMBackbone, cfg_mix
from dd.api.hookspecs import hookimpl
from dd.errors import DDError


class LDMBackbone(DDIMBackbone):
    """CompVis latent diffusion (``LDMPipeline`` / ``LDMTextToImagePipeline``)."""

    name = "ldm"
    pipeline_classes = ("LDMPipeline", "LDMTextToImagePipeline")
    late_step_training = "full"
    description = (
        "Latent diffusion: VQModel/AutoencoderKL + UNet2DModel/UNet2DConditionModel, DDIM "
        "sampling (diffusers LDMPipeline, LDMTextToImagePipeline)"
    )
    lora_layers_kwarg = ""  # full fine-tuning only: the LDM pipelines cannot save LoRAs
    default_steps = 50
    default_guidance = None
    default_resolution = 256

    def __init__(self, pipe: Any, **kwargs: Any):
        prediction = self._prediction_type(pipe.scheduler.config)
        super().__init__(pipe, **kwargs)
        self.prediction_type = prediction
        self.conditional = getattr(pipe, "bert", None) is not None
        if self.conditional:
            self.default_guidance = 1.0
        self.default_resolution = int(self.denoiser.config.sample_size) * self.vae_scale_factor

    # Deliberate copy: the signature of the abstract Backbone.from_pretrained it overrides (the
    # keywords are the API); ldm picks one of two pipeline classes.
    @classmethod
    def from_pretrained(
        cls,
        model: str,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        **options: Any,
    ) -> LDMBackbone:
        """Load an ``LDMPipeline`` or ``LDMTextToImagePipeline`` folder or hub id."""
        import json
        from pathlib import Path

        from diffusers import LDMPipeline, LDMTextToImagePipeline

        if options:
            raise DDError(
                f"unknown option(s) for backbone ldm: {', '.join(sorted(options))}",
                hint="the ldm backbone takes no options",
            )
        pipeline_cls: type = LDMPipeline
        index = Path(model).expanduser() / "model_index.json"
        if index.is_file():
            try:
                found = json.loads(index.read_text()).get("_class_name")
            except ValueError:
                raise DDError(f"{index} is not valid JSON") from None
            if found == "LDMTextToImagePipeline":
                pipeline_cls = LDMTextToImagePipeline
        pipe = cls.load_pipe(pipeline_cls, model, device=device, dtype=dtype)
        return cls(pipe, device=device, dtype=dtype, source=str(model))

    # ------------------------------------------------------------------ components
    @property
    def vae(self) -> torch.nn.Module:
        return self.pipe.vqvae

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.pipe.vqvae.config.block_out_channels) - 1)

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this (VAE downsampling x the UNet's)."""
        return self.vae_scale_factor * 2 ** (len(self.denoiser.config.block_out_channels) - 1)

    def frozen_modules(self) -> list[torch.nn.Module]:
        names = ("bert", "vqvae", "unet")
        return [m for n in names if (m := getattr(self.pipe, n, None)) is not None]

    # ------------------------------------------------------------------ VAE
    @torch.no_grad()
    def vae_encode(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """[0, 1] pixels to latents: a ``VQModel``'s pre-quantization latents (deterministic)
        or a sample of an ``AutoencoderKL``'s posterior, with the VAE's shift and scale."""
        vae = self.vae
        x = images.to(self.device, vae.dtype) * 2 - 1
        enc = vae.encode(x)
        z = enc.latent_dist.sample(generator=generator) if hasattr(enc, "latent_dist") else enc[0]
        return ((z - self.vae_shift()) * vae.config.scaling_factor).to(self.dtype)

    # ------------------------------------------------------------------ prompts
    def encode_prompts_uncached(self, prompts: list[str]) -> Conditioning:
        n = len(prompts)
        if not self.conditional:
            # Unconditional: nothing to encode; a placeholder carries the batch size.
            return Conditioning({"batch": torch.zeros(n, 1, device=self.device)})
        tok = self.pipe.tokenizer

        def embed(texts: list[str]) -> torch.Tensor:
            ids = tok(texts, padding="max_length", max_length=77, truncation=True)
            ids = torch.as_tensor(ids["input_ids"], device=self.device)
            return self.pipe.bert(ids)[0]

        return Conditioning(
            {"prompt_embeds": embed(prompts), "negative_prompt_embeds": embed([""] * n)}
        )

    # ------------------------------------------------------------------ sampling
    def prepare_latents(
        self, batch_size: int, height: int, width: int, generator: torch.Generator | list | None
    ) -> torch.Tensor:
        m = self.size_multiple
        if int(height) % m or int(width) % m:
            raise DDError(
                f"ldm: size {width}x{height} is not a multiple of {m}",
                hint=f"pick a height and width divisible by {m}",
            )
        from diffusers.utils.torch_utils import randn_tensor

        f = self.vae_scale_factor
        shape = (batch_size, self.denoiser.config.in_channels, height // f, width // f)
        return randn_tensor(shape, generator=generator, device=self.device, dtype=self.dtype)

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
        if not self.conditional:
            return self.denoiser(latents, timestep, return_dict=False)[0]
        cfg = guidance is not None and float(guidance) > 1.0
        embeds = cond["prompt_embeds"]
        if cfg:
            embeds = torch.cat([cond["negative_prompt_embeds"], embeds])
            latents, timestep = torch.cat([latents, latents]), torch.cat([timestep, timestep])
        out = self.denoiser(latents, timestep, encoder_hidden_states=embeds, return_dict=False)[0]
        return cfg_mix(out, guidance) if cfg else out

    def load_lora(self, path: Any, *, trainable: bool = True, **kwargs: Any) -> None:
        raise DDError(
            f"the ldm backbone cannot load LoRA {path}",
            hint="ldm models are fine-tuned in full; pass the model folder instead",
        )


@hookimpl
def dd_register_backbones(register):
    register(LDMBackbone)
