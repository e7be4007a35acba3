"""The backbone API: a diffusion model family the engines can sample from and train.

A backbone wraps a diffusers pipeline (loaded from a hub id, a local folder or a single
file) and offers what the engines need, written for *training*: gradients flow through
sampling, unlike the pipelines' ``__call__`` which runs under ``torch.no_grad``.

The base class implements everything that is the same for every family:

* :meth:`Backbone.sample`: the denoising loop with a **gradient policy**. Only the last
  ``grad_steps`` steps track gradients (truncated backprop, DiffDoctor Sec. 3.3); earlier
  steps run under ``torch.no_grad`` and their output is a leaf, so no gradient can reach
  them. Each tracked step can be gradient-checkpointed.
* the update rules: Euler for flow matching (FLUX, SD3: ``x += (sigma_next - sigma) * v``,
  exactly ``FlowMatchEulerDiscreteScheduler.step``) and deterministic DDIM (eta = 0) for
  epsilon / v-prediction models (SD1.5, SDXL), written as pure functions of the step index
  so a checkpointed step recomputes identically (diffusers schedulers keep a step counter).
* :meth:`Backbone.diffusion_loss`: the backbone's own training loss for regularisation
  (rectified flow for flow models, epsilon or v-prediction MSE otherwise) on latents that
  went through the VAE **with its shift and scale** (:meth:`encode_images`).
* :meth:`Backbone.add_noise` / :meth:`Backbone.denoise`: the scheduler operations
  ``dd refine`` needs.
* LoRA through peft (:meth:`add_lora`), saved in diffusers' format with the pipeline
  class's own ``save_lora_weights`` so ``pipe.load_lora_weights(DIR)`` loads it.

A family implements the abstract methods: loading, :meth:`encode_prompts`,
:meth:`prepare_latents`, :meth:`make_schedule` and :meth:`predict`; one whose latents are
not laid out as the VAE's (FLUX packs them) also overrides :meth:`decode` and
:meth:`encode_images` around :meth:`vae_decode` / :meth:`vae_encode`.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dd.errors import DDError
from dd.ops.attention import backend_for

FLOW = "flow"
EPSILON = "epsilon"
V_PREDICTION = "v_prediction"
PREDICTION_TYPES = (FLOW, EPSILON, V_PREDICTION)
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def _attention_processors(module: torch.nn.Module) -> list[Any]:
    """The attention processors of ``module``'s attention layers."""
    return [m.processor for m in module.modules() if getattr(m, "processor", None) is not None]


def _dispatch_processors(module: torch.nn.Module) -> bool:
    """Whether ``module``'s attention processors go through diffusers' attention dispatch
    (they carry ``_attention_backend``)."""
    found = _attention_processors(module)
    return bool(found) and all(hasattr(p, "_attention_backend") for p in found)


@dataclass
class Conditioning:
    """Encoded prompts: named tensors with the batch first (``None`` where unused)."""

    tensors: dict[str, torch.Tensor | None]
    #: Non-tensor settings that travel with the prompts (e.g. guidance scale).
    extras: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> torch.Tensor | None:
        return self.tensors.get(key)

    @property
    def batch_size(self) -> int:
        for t in self.tensors.values():
            if t is not None:
                return t.shape[0]
        return 0

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Conditioning:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device=device)

        return Conditioning({k: move(v) for k, v in self.tensors.items()}, dict(self.extras))

    def select(self, index: Sequence[int] | torch.Tensor) -> Conditioning:
        idx = torch.as_tensor(index, dtype=torch.long)
        return Conditioning(
            {k: (v[idx.to(v.device)] if v is not None else None) for k, v in self.tensors.items()},
            dict(self.extras),
        )

    @staticmethod
    def cat(items: Sequence[Conditioning]) -> Conditioning:
        keys = items[0].tensors.keys()
        out: dict[str, torch.Tensor | None] = {}
        for k in keys:
            vals = [c.tensors[k] for c in items]
            out[k] = None if any(v is None for v in vals) else torch.cat(vals)  # type: ignore[arg-type]
        return Conditioning(out, dict(items[0].extras))


@dataclass
class Schedule:
    """The discretisation of one sampling run.

    ``timesteps[i]`` is what the model is called with at step ``i`` (``N`` entries).
    Flow models also carry ``sigmas`` (``N + 1`` entries, the last one the end point);
    DDIM models carry ``alphas`` (``N + 1`` cumulative alphas: at each step's timestep, and
    at the end the "previous" alpha, 1 for a run that ends at t = 0).
    """

    timesteps: torch.Tensor
    sigmas: torch.Tensor | None = None
    alphas: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.timesteps.shape[0])

    def slice(self, start: int, end: int | None = None) -> Schedule:
        end = len(self) if end is None else end
        return Schedule(
            self.timesteps[start:end],
            None if self.sigmas is None else self.sigmas[start : end + 1],
            None if self.alphas is None else self.alphas[start : end + 1],
        )


#: Called as ``on_step(step_index, latents, tracked)`` after each denoising step.
StepCallback = Callable[[int, torch.Tensor, bool], None]


class _Prompts:
    """The prompt part of :class:`Backbone` (a mixin): embeddings from a bounded in-memory
    cache, an on-disk :class:`dd.runtime.embeddings.EmbeddingStore`, or the text encoders;
    embedding a whole prompt list once, and moving the encoders off the GPU afterwards."""

    #: How many prompt embeddings stay in memory (the least recently used go first; the
    #: store on disk keeps them all).
    prompt_memory: ClassVar[int] = 64
    #: Attribute names of the pipeline's text encoders.
    text_encoder_names: ClassVar[tuple[str, ...]] = (
        "text_encoder",
        "text_encoder_2",
        "text_encoder_3",
    )

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """Embed ``prompts`` (text encoders are frozen): each from memory, from the store
        on disk, or from the encoders (then stored)."""
        found: dict[str, Conditioning] = {}
        missing = []
        for p in dict.fromkeys(prompts):
            key = self._cache_key(p)
            cond = self._prompt_cache.get(key)
            if cond is None and self.prompt_store is not None:
                stored = self.prompt_store.get(key)
                cond = Conditioning(stored) if stored is not None else None
            if cond is None:
                missing.append(p)
            else:
                found[p] = self._remember(key, cond)
        if missing:
            if self.text_encoders_released:
                raise DDError(
                    f"the prompt {missing[0][:60]!r} was not embedded before the text "
                    "encoders left the GPU",
                    hint="embed every prompt first (Backbone.embed_prompts); this is a bug "
                    "in the command that trained",
                )
            with torch.no_grad():
                enc = self.encode_prompts_uncached(list(missing))
            enc = enc.to("cpu")
            for i, p in enumerate(missing):
                key, cond = self._cache_key(p), enc.select([i])
                if self.prompt_store is not None:
                    self.prompt_store.put(key, cond.tensors)
                found[p] = self._remember(key, cond)
        return Conditioning.cat([found[p] for p in prompts]).to(self.device, self.dtype)

    def _remember(self, key: str, cond: Conditioning) -> Conditioning:
        cache = self._prompt_cache
        cache[key] = cond
        cache.move_to_end(key)
        while len(cache) > self.prompt_memory:
            cache.popitem(last=False)
        return cond

    def _cache_key(self, prompt: str) -> str:
        return hashlib.sha1(prompt.encode()).hexdigest()

    def embedding_namespace(self) -> str:
        """A hash of what this backbone's prompt embeddings depend on: the family, the
        model (and, for a local folder, its text-encoder and tokenizer files), the dtype,
        the device type and the backbone's own settings (e.g. ``max_sequence_length``)."""
        import json

        skip = ("source", "gradient_checkpointing", "vae_checkpointing", "quantized")
        settings = {
            k: v
            for k, v in sorted(vars(self).items())
            if not k.startswith("_")
            and isinstance(v, (int, float, str, bool, type(None)))
            and k not in (*skip, "text_encoders_released")
        }
        files = []
        root = Path(self.source)
        if root.is_dir():
            for sub in sorted(root.iterdir()):
                if sub.is_dir() and sub.name.startswith(("text_encoder", "tokenizer")):
                    for f in sorted(sub.rglob("*")):
                        if f.is_file():
                            st = f.stat()
                            files.append([str(f.relative_to(root)), st.st_size, st.st_mtime_ns])
        ident = {
            "class": f"{type(self).__module__}.{type(self).__qualname__}",
            "source": str(root.resolve()) if root.exists() else self.source,
            "dtype": str(self.dtype),
            "device": self.device.type,
            "settings": settings,
            "files": files,
        }
        text = json.dumps(ident, sort_keys=True, default=str)
        return f"{self.name or 'backbone'}-{hashlib.sha1(text.encode()).hexdigest()[:16]}"

    def use_embedding_store(self, root: str | Path | None = None) -> Any:
        """Keep prompt embeddings in ``root`` (default:
        :func:`dd.runtime.embeddings.default_cache_root`); returns the store."""
        from dd.runtime.embeddings import EmbeddingStore, default_cache_root

        self.prompt_store = EmbeddingStore(root or default_cache_root(), self.embedding_namespace())
        return self.prompt_store

    def embed_prompts(
        self,
        prompts: Sequence[str],
        *,
        batch_size: int = 16,
        on_batch: Callable[[int], None] | None = None,
    ) -> int:
        """Embed every prompt not yet in the store (``batch_size`` at a time, without
        keeping them in memory); returns how many were computed. ``on_batch(n)`` is told
        after each batch."""
        if self.prompt_store is None:
            raise DDError("embed_prompts needs an embedding store", hint="use_embedding_store()")
        todo = [p for p in dict.fromkeys(prompts) if self._cache_key(p) not in self.prompt_store]
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            with torch.no_grad():
                enc = self.encode_prompts_uncached(chunk).to("cpu")
            for i, p in enumerate(chunk):
                self.prompt_store.put(self._cache_key(p), enc.select([i]).tensors)
            if on_batch is not None:
                on_batch(len(chunk))
        return len(todo)

    def release_text_encoders(self, *, free: bool = False) -> None:
        """After :meth:`embed_prompts`: move the text encoders to the CPU (``free``: drop
        them). Later prompts must come from memory or the store."""
        for name in self.text_encoder_names:
            enc = getattr(self.pipe, name, None)
            if enc is None:
                continue
            if free:
                setattr(self.pipe, name, None)
            else:
                enc.to("cpu")
        self.text_encoders_released = True
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class _Sampling:
    """The prompt and sampling part of :class:`Backbone` (prompt cache, scheduler steps,
    guidance, denoising with gradients through the last steps, generation). A mixin:
    ``Backbone`` supplies the model calls it uses."""

    # ------------------------------------------------------------------ sampling
    def step(
        self,
        latents: torch.Tensor,
        index: int,
        schedule: Schedule,
        cond: Conditioning,
        guidance: float | None,
        height: int,
        width: int,
    ) -> torch.Tensor:
        """One denoising step ``index`` of ``schedule`` (pure: safe to checkpoint)."""
        t = schedule.timesteps[index].expand(latents.shape[0]).to(latents.device)
        out = self.predict(latents, t, cond, guidance, height, width)
        return self.update(latents, out, index, schedule)

    def update(
        self, latents: torch.Tensor, out: torch.Tensor, index: int, schedule: Schedule
    ) -> torch.Tensor:
        """The latents after step ``index`` given the model output ``out`` at it."""
        if self.prediction_type == FLOW:
            assert schedule.sigmas is not None
            dt = (schedule.sigmas[index + 1] - schedule.sigmas[index]).to(latents.dtype)
            return (latents.float() + dt.float() * out.float()).to(latents.dtype)
        assert schedule.alphas is not None
        a_prev = schedule.alphas[index + 1].to(latents.device, torch.float32)
        x0, eps = self.clean_estimate(latents, out, index, schedule)
        return (a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps).to(latents.dtype)

    def clean_estimate(
        self, latents: torch.Tensor, out: torch.Tensor, index: int, schedule: Schedule
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x0, noise)`` estimated from the model output ``out`` at step ``index`` (float32):
        flow ``x0 = x_t - sigma v``, ``noise = x_t + (1 - sigma) v``; epsilon and
        v-prediction by the DDIM formulas. Differentiable (detector guidance uses it)."""
        x, o = latents.float(), out.float()
        if self.prediction_type == FLOW:
            assert schedule.sigmas is not None
            sigma = schedule.sigmas[index].to(x.device, torch.float32)
            return x - sigma * o, x + (1 - sigma) * o
        assert schedule.alphas is not None
        a_t = schedule.alphas[index].to(x.device, torch.float32)
        if self.prediction_type == EPSILON:
            return (x - (1 - a_t).sqrt() * o) / a_t.sqrt(), o
        if self.prediction_type == V_PREDICTION:
            return a_t.sqrt() * x - (1 - a_t).sqrt() * o, a_t.sqrt() * o + (1 - a_t).sqrt() * x
        raise DDError(f"unknown prediction type {self.prediction_type!r}")  # pragma: no cover

    def guided_step(
        self,
        latents: torch.Tensor,
        index: int,
        schedule: Schedule,
        cond: Conditioning,
        guidance: float | None,
        height: int,
        width: int,
        guide: Any,
    ) -> torch.Tensor:
        """Step ``index`` with detector guidance (see :mod:`dd.inference.guidance`): the
        ordinary step, then a push down the gradient of the artifact confidence of the clean image
        estimated at this step. The model's prediction is held fixed (no backward pass
        through the denoiser: only through the VAE decode and the detector)."""
        t = schedule.timesteps[index].expand(latents.shape[0]).to(latents.device)
        with torch.no_grad():
            out = self.predict(latents, t, cond, guidance, height, width)
            nxt = self.update(latents, out, index, schedule)
        with torch.enable_grad():
            x = latents.detach().float().requires_grad_(True)
            x0, _ = self.clean_estimate(x, out.detach(), index, schedule)
            images = self.decode_maybe_checkpointed(x0.to(latents.dtype), height, width)
            loss = guide.loss_of(images.float().clamp(0, 1)).sum()
            (grad,) = torch.autograd.grad(loss, x)
        return (nxt.float() - guide.shift(grad, index, len(schedule))).to(latents.dtype)

    def denoise(
        self,
        latents: torch.Tensor,
        schedule: Schedule,
        cond: Conditioning,
        *,
        guidance: float | None,
        height: int,
        width: int,
        grad_steps: int = 0,
        start: int = 0,
        end: int | None = None,
        on_step: StepCallback | None = None,
        guide: Any | None = None,
    ) -> torch.Tensor:
        """Run steps ``start .. end-1`` of ``schedule``; only the last ``grad_steps`` of the
        *whole* schedule track gradients (when grad mode is on). With ``guide``
        (:class:`dd.inference.guidance.Guide`) its active steps move the latents first."""
        n = len(schedule)
        end = n if end is None else end
        if not 0 <= start <= end <= n:
            raise DDError(f"bad step range {start}..{end} for a {n}-step schedule")
        if grad_steps < 0 or grad_steps > n:
            raise DDError(
                f"grad steps must be in 0..{n}, got {grad_steps}",
                hint="lower --grad-steps or raise the number of sampling steps",
            )
        first_tracked = n - grad_steps
        for i in range(start, end):
            tracked = torch.is_grad_enabled() and i >= first_tracked
            if guide is not None and guide.active(i, n) and not tracked:
                latents = self.guided_step(
                    latents, i, schedule, cond, guidance, height, width, guide
                )
            elif not tracked:
                with torch.no_grad():
                    latents = self.step(latents, i, schedule, cond, guidance, height, width)
            elif self.gradient_checkpointing:
                latents = checkpoint(
                    self.step,
                    latents,
                    i,
                    schedule,
                    cond,
                    guidance,
                    height,
                    width,
                    use_reentrant=False,
                )
            else:
                latents = self.step(latents, i, schedule, cond, guidance, height, width)
            if on_step is not None:
                on_step(i, latents, tracked)
        return latents

    def sample(
        self,
        cond: Conditioning,
        *,
        height: int,
        width: int,
        steps: int | None = None,
        guidance: float | None = None,
        generator: torch.Generator | list | None = None,
        latents: torch.Tensor | None = None,
        grad_steps: int = 0,
        on_step: StepCallback | None = None,
        guide: Any | None = None,
    ) -> torch.Tensor:
        """Generate latents from noise. Gradients flow only through the last
        ``grad_steps`` steps; with ``grad_steps=0`` (or grad mode off) none do. ``guide``:
        detector guidance (:mod:`dd.inference.guidance`)."""
        steps = steps or self.default_steps
        guidance = self.default_guidance if guidance is None else guidance
        if latents is None:
            latents = self.prepare_latents(cond.batch_size, height, width, generator)
        schedule = self.make_schedule(steps, height, width)
        return self.denoise(
            latents,
            schedule,
            cond,
            guidance=guidance,
            height=height,
            width=width,
            grad_steps=grad_steps,
            on_step=on_step,
            guide=guide,
        )

    def generate(
        self,
        prompts: Sequence[str],
        *,
        seeds: Sequence[int],
        height: int | None = None,
        width: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        grad_steps: int = 0,
        guide: Any | None = None,
    ) -> torch.Tensor:
        """Prompts and seeds (one each per image) to images in [0, 1]; ``guide``: detector
        guidance (:mod:`dd.inference.guidance`)."""
        if len(seeds) != len(prompts):
            raise DDError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        height = height or self.default_resolution
        width = width or self.default_resolution
        self.check_size(height, width)
        cond = self.encode_prompts(prompts)
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        lat = torch.cat([self.prepare_latents(1, height, width, g) for g in gens])
        lat = self.sample(
            cond,
            height=height,
            width=width,
            steps=steps,
            guidance=guidance,
            latents=lat,
            grad_steps=grad_steps,
            guide=guide,
        )
        return self.decode_maybe_checkpointed(lat, height, width)

    def decode_maybe_checkpointed(
        self, latents: torch.Tensor, height: int, width: int
    ) -> torch.Tensor:
        if self.vae_checkpointing and torch.is_grad_enabled() and latents.requires_grad:
            return checkpoint(self.decode, latents, height, width, use_reentrant=False)
        return self.decode(latents, height, width)


class _Training:
    """The training part of :class:`Backbone`: the forward process, training targets and
    timesteps, the diffusion loss and gradient checkpointing. A mixin of ``Backbone``."""

    # ------------------------------------------------------------------ noise / training
    @property
    def num_train_timesteps(self) -> int:
        return int(self.pipe.scheduler.config.get("num_train_timesteps", 1000))

    def alphas_cumprod(self) -> torch.Tensor:
        """DDPM cumulative alphas of the training schedule (epsilon / v models)."""
        sched = self.pipe.scheduler
        ac = getattr(sched, "alphas_cumprod", None)
        if ac is None:
            from diffusers import DDPMScheduler

            ac = DDPMScheduler.from_config(sched.config).alphas_cumprod
        return ac.to(torch.float32)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Noise clean latents to training timestep(s) ``t`` (B,) in [0, T)."""
        if self.prediction_type == FLOW:
            s = (t.float() / self.num_train_timesteps).view(-1, *[1] * (x0.ndim - 1))
            return ((1 - s) * x0.float() + s * noise.float()).to(x0.dtype)
        a = self.alphas_cumprod().to(x0.device)[t.long().cpu()].to(x0.device)
        a = a.view(-1, *[1] * (x0.ndim - 1))
        return (a.sqrt() * x0.float() + (1 - a).sqrt() * noise.float()).to(x0.dtype)

    def training_target(
        self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        if self.prediction_type == FLOW:
            return noise - x0
        if self.prediction_type == EPSILON:
            return noise
        a = self.alphas_cumprod().to(x0.device)[t.long().cpu()].to(x0.device)
        a = a.view(-1, *[1] * (x0.ndim - 1))
        return (a.sqrt() * noise.float() - (1 - a).sqrt() * x0.float()).to(x0.dtype)

    def training_shift(self) -> float:
        """The noise-level shift of training draws for flow models: the scheduler's static
        ``shift`` (SD3: 3.0, FLUX schnell: 1.0), 1.0 where it shifts by resolution at
        sampling time (FLUX dev), as diffusers' DreamBooth scripts and DiffDoctor's code
        train. ``dd treat``'s regulariser and ``dd dreambooth`` both draw through it."""
        sc = self.pipe.scheduler.config
        if sc.get("use_dynamic_shifting", False):
            return 1.0
        return float(sc.get("shift", 1.0))

    def sample_training_timesteps(
        self,
        batch: int,
        generator: torch.Generator | None = None,
        weighting: str = "logit_normal",
        shift: float | None = None,
    ) -> torch.Tensor:
        """Training timesteps in [0, T): for flow models a noise level ``s`` logit-normal
        (SD3 paper) or uniform, shifted like the scheduler (``shift * s / (1 + (shift - 1)
        s)``, ``shift`` defaulting to :meth:`training_shift`), times T; uniform integers for
        DDPM models."""
        T = self.num_train_timesteps
        if self.prediction_type == FLOW:
            if weighting == "logit_normal":
                u = torch.sigmoid(torch.randn(batch, generator=generator))
            else:
                u = torch.rand(batch, generator=generator)
            shift = self.training_shift() if shift is None else shift
            if shift != 1.0:
                u = shift * u / (1 + (shift - 1) * u)
            return (u * T).clamp(max=T - 1)
        return torch.randint(0, T, (batch,), generator=generator)

    def model_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """Training timestep -> what ``predict`` takes (identity; FLUX overrides nothing:
        its ``predict`` divides by 1000 itself)."""
        return t

    def diffusion_loss(
        self,
        images: torch.Tensor,
        cond: Conditioning,
        *,
        generator: torch.Generator | None = None,
        guidance: float | None = None,
        weighting: str = "logit_normal",
    ) -> torch.Tensor:
        """The backbone's own training loss on real images (DiffDoctor Eq. 3-4).

        Latents come from :meth:`encode_images`, which applies the VAE's shift and scale.
        """
        h, w = images.shape[-2:]
        x0 = self.encode_images(images, generator=generator).to(self.dtype)
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0)
        t = self.sample_training_timesteps(x0.shape[0], generator, weighting).to(x0.device)
        xt = self.add_noise(x0, noise, t)
        guidance = self.default_guidance if guidance is None else guidance
        pred = self.predict(xt, self.model_timestep(t), cond, guidance, h, w)
        return F.mse_loss(pred.float(), self.training_target(x0, noise, t).float())

    # ------------------------------------------------------------------ attention
    def set_attention(self, choice: str) -> str:
        """Choose the denoiser's attention kernel through diffusers' own mechanism; returns
        what was applied. ``auto`` and ``sdpa``: PyTorch's ``scaled_dot_product_attention``
        (diffusers' ``native`` backend; PyTorch picks its flash or memory-efficient kernel on
        a GPU), the default (``auto`` stays SDPA until a GPU measurement says otherwise,
        docs/performance.md); ``xformers``, ``flash``: diffusers' attention backends of those
        names (the ``xformers`` / ``flash-attn`` packages, never installed by dd).
        Denoisers whose attention processors predate diffusers' dispatch (the SD1.5/SDXL
        UNets, SD3's joint attention) take ``xformers`` through
        ``enable_xformers_memory_efficient_attention`` and refuse ``flash``."""
        backend = backend_for(choice)
        dispatch = _dispatch_processors(self.denoiser)
        try:
            if dispatch:
                import logging

                # diffusers warns on every call that the API is experimental
                log = logging.getLogger("diffusers.models.modeling_utils")
                level = log.level
                log.setLevel(logging.ERROR)
                try:
                    self.denoiser.set_attention_backend(backend)
                finally:
                    log.setLevel(level)
            elif backend == "native":
                # Undo an earlier xformers choice; their SDPA processors (AttnProcessor2_0,
                # SD3's JointAttnProcessor2_0) are the default and stay as they are.
                if any(
                    "XFormers" in type(p).__name__ for p in _attention_processors(self.denoiser)
                ):
                    self.denoiser.set_default_attn_processor()
            elif backend == "xformers":
                self.denoiser.enable_xformers_memory_efficient_attention()
            else:
                raise DDError(
                    f"--attention {choice}: the {self.name} denoiser's attention processors do "
                    "not use diffusers' attention dispatch",
                    hint="use sdpa (PyTorch picks its flash kernel on a GPU) or xformers",
                )
        except (ImportError, ModuleNotFoundError, RuntimeError, ValueError) as e:
            package = {"xformers": "xformers", "flash": "flash-attn"}.get(backend, backend)
            raise DDError(
                f"--attention {choice} is not usable here: {str(e).splitlines()[0][:200]}",
                hint=f"install {package} built for the installed torch (dd never installs it; "
                "pip would replace torch), or use --attention sdpa",
            ) from None
        self.attention = choice
        return backend

    # ------------------------------------------------------------------ memory
    def enable_vae_tiling(self) -> None:
        """Decode (and encode) in overlapping tiles, diffusers' ``enable_tiling``: the VAE's
        activation memory no longer grows with the image (1024² FLUX decodes in 512² tiles;
        the seams are blended)."""
        if not hasattr(self.vae, "enable_tiling"):
            raise DDError(f"the {self.name} VAE cannot decode in tiles", hint="drop --vae-tiling")
        self.vae.enable_tiling()

    def enable_gradient_checkpointing(
        self, *, steps: bool = True, blocks: bool = True, vae: bool = True
    ) -> None:
        """Checkpoint each tracked sampling step, the denoiser's blocks and the VAE decode."""
        self.gradient_checkpointing = steps
        self.vae_checkpointing = vae
        if blocks and hasattr(self.denoiser, "enable_gradient_checkpointing"):
            self.denoiser.enable_gradient_checkpointing()


class _LoRA:
    """The LoRA part of :class:`Backbone`: attach (PEFT), list, save in diffusers' format
    and load LoRA weights. A mixin of ``Backbone``."""

    # ------------------------------------------------------------------ LoRA
    def add_lora(
        self,
        *,
        rank: int = 16,
        alpha: float | None = None,
        targets: Sequence[str] | None = None,
        init: str = "gaussian",
        dropout: float = 0.0,
    ) -> list[torch.nn.Parameter]:
        """Attach a trainable LoRA adapter to the denoiser; returns its parameters."""
        from peft import LoraConfig

        targets = list(targets or self.default_lora_targets)
        config = LoraConfig(
            r=rank,
            lora_alpha=alpha if alpha is not None else rank,
            init_lora_weights=init if init != "gaussian" else "gaussian",
            target_modules=targets,
            lora_dropout=dropout,
        )
        try:
            self.denoiser.add_adapter(config)
        except ValueError as e:
            raise DDError(
                f"cannot add LoRA to {type(self.denoiser).__name__}: {e}",
                hint="check --lora-targets against the model's module names",
            ) from None
        return self.lora_parameters()

    def lora_parameters(self) -> list[torch.nn.Parameter]:
        params = [p for n, p in self.denoiser.named_parameters() if "lora_" in n]
        for p in params:
            p.requires_grad_(True)
        return params

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(self.denoiser)

    def save_lora(self, out_dir: str | Path, *, is_main_process: bool = True) -> Path:
        """Write ``pytorch_lora_weights.safetensors`` in diffusers' format."""
        import inspect

        from diffusers.utils import convert_state_dict_to_diffusers

        out_dir = Path(out_dir)
        layers = self.lora_state_dict()
        if self.lora_layers_kwarg == "unet_lora_layers":
            # UNet families: diffusers' SD/SDXL training scripts convert to its key names;
            # transformer families (FLUX, SD3) keep peft's lora_A/lora_B names, as diffusers'
            # own FLUX/SD3 scripts save them and other tools expect.
            layers = convert_state_dict_to_diffusers(layers)
        layers = {k: v.detach().to("cpu").contiguous() for k, v in layers.items()}
        save = type(self.pipe).save_lora_weights
        kwargs: dict[str, Any] = {self.lora_layers_kwarg: layers}
        # The adapter's config (alpha above all) goes into the file's metadata; without it
        # diffusers loads the LoRA with alpha = rank, a different model when alpha != rank.
        meta_kwarg = self.lora_layers_kwarg.replace("_lora_layers", "_lora_adapter_metadata")
        config = getattr(self.denoiser, "peft_config", {}).get("default")
        if config is not None and meta_kwarg in inspect.signature(save).parameters:
            kwargs[meta_kwarg] = config.to_dict()
        elif config is not None and config.lora_alpha != config.r:
            raise DDError(
                f"this diffusers cannot store LoRA alpha {config.lora_alpha} != rank {config.r}",
                hint="upgrade diffusers, or use --lora-alpha equal to the rank",
            )
        save(
            save_directory=str(out_dir),
            is_main_process=is_main_process,
            safe_serialization=True,
            **kwargs,
        )
        return out_dir / LORA_WEIGHT_NAME

    def load_lora(
        self, path: str | Path, *, trainable: bool = True, adapter_name: str = "default"
    ) -> None:
        """Load a diffusers-format LoRA (ours, a DreamBooth one, a hub one) into the
        denoiser as the adapter ``adapter_name`` (``default``); make it trainable to continue
        from it. Several adapters can be loaded under different names (``dd refine``)."""
        check_lora_source(path)
        try:
            with _lora_key_warnings() as problems:
                self.pipe.load_lora_weights(str(path), adapter_name=adapter_name)
        except (ValueError, KeyError, RuntimeError, OSError) as e:
            raise DDError(
                f"cannot load LoRA {path} into this {self.name} model: {_summarize_load_error(e)}",
                hint="is the LoRA for another architecture or base model?",
            ) from None
        if problems:
            raise DDError(
                f"LoRA {path} does not fit this {self.name} model: {_shorten(problems[0])}",
                hint="is the LoRA for another architecture or base model?",
            )
        if not any("lora_" in n for n, _ in self.denoiser.named_parameters()):
            raise DDError(
                f"LoRA {path} loaded nothing into the {self.name} denoiser",
                hint="the file holds no layers for this architecture",
            )
        if trainable:
            self.lora_parameters()


class Backbone(_Prompts, _Sampling, _Training, _LoRA, abc.ABC):
    """Base class of every backbone plugin (see the module docstring)."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: ``flow``, ``epsilon`` or ``v_prediction`` (a family may read it from the scheduler).
    prediction_type: str = FLOW
    #: Keyword of the pipeline class's ``save_lora_weights`` for the denoiser's layers.
    lora_layers_kwarg: ClassVar[str] = "transformer_lora_layers"
    default_lora_targets: ClassVar[tuple[str, ...]] = DEFAULT_LORA_TARGETS
    #: Family defaults, overridden by presets and flags.
    default_steps: ClassVar[int] = 28
    default_guidance: ClassVar[float | None] = None
    default_resolution: ClassVar[int] = 1024
    #: diffusers pipeline class names (``model_index.json`` ``_class_name``) this family
    #: loads: a folder of another family gets a hint naming the right ``--backbone``.
    pipeline_classes: ClassVar[tuple[str, ...]] = ()
    #: Options of :meth:`from_pretrained` besides ``device`` and ``dtype`` (``-B NAME=VALUE``),
    #: name -> type (:mod:`dd.api.plugin_options` converts and checks them); each is passed to the
    #: constructor as a keyword when given.
    load_options: ClassVar[dict[str, Any]] = {}
    #: Extra keywords for the pipeline class's ``from_pretrained`` (e.g. no safety checker).
    pipeline_load_kwargs: ClassVar[dict[str, Any]] = {}
    #: How ``dd refine train`` trains this family on a late-step range: ``"full"``
    #: (fine-tune the denoiser), ``"lora"``, or None (not supported).
    late_step_training: ClassVar[str | None] = None
    #: Whether the family is prompted (an unconditional LDM is not).
    conditional: bool = True

    @classmethod
    def build_tiny_pipeline(cls, seed: int = 0) -> Any:
        """A tiny pipeline of the family's real classes with seeded random weights, for
        offline tests (``python -m dd.testing.tiny NAME DIR`` saves it). Families without one
        return None."""
        return None

    @staticmethod
    def family_of(pipeline_class: str) -> str | None:
        """The ``--backbone`` name of the loaded family that declares ``pipeline_class``."""
        todo = list(Backbone.__subclasses__())
        while todo:
            cls = todo.pop()
            todo.extend(cls.__subclasses__())
            if pipeline_class in getattr(cls, "pipeline_classes", ()) and cls.name:
                return cls.name
        return None

    def __init__(
        self,
        pipe: Any,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        source: str = "",
    ):
        self.pipe = pipe
        self.device = torch.device(device)
        self.dtype = dtype
        self.source = source
        self.gradient_checkpointing = False
        self.vae_checkpointing = False
        self._prompt_cache: OrderedDict[str, Conditioning] = OrderedDict()
        self.prompt_store: Any = None  # see use_embedding_store()
        self.text_encoders_released = False
        self.quantized = "none"  # see quantize()
        self.attention = "auto"  # see set_attention()
        for module in self.frozen_modules():
            module.requires_grad_(False)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        model: str,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        **options: Any,
    ) -> Backbone:
        """Load the model from a hub id or a local diffusers folder as the family's first
        ``pipeline_classes`` entry (``pipeline_load_kwargs`` added), with the declared
        ``load_options``; an undeclared option is an error. A family whose loading differs
        (several pipeline classes, other components) overrides this."""
        import diffusers

        if not cls.pipeline_classes:
            raise DDError(f"backbone {cls.name} declares no pipeline class to load")
        pipeline_cls = getattr(diffusers, cls.pipeline_classes[0])
        return cls.load_with_options(
            pipeline_cls,
            model,
            device=device,
            dtype=dtype,
            options=options,
            allowed=tuple(cls.load_options),
            **cls.pipeline_load_kwargs,
        )

    # ------------------------------------------------------------------ components
    @property
    def denoiser(self) -> torch.nn.Module:
        """The transformer or UNet: what LoRA adapts and what ``predict`` calls."""
        return self.pipe.transformer if getattr(self.pipe, "transformer", None) else self.pipe.unet

    @property
    def vae(self) -> torch.nn.Module:
        return self.pipe.vae

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell (8 for the real models; the tiny test VAEs use 4)."""
        return int(self.pipe.vae_scale_factor)

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE's factor, times the patch size of
        a transformer denoiser (a UNet pads odd sizes itself, as diffusers' pipelines allow).
        A family that packs latents (FLUX) overrides it."""
        f = self.vae_scale_factor
        patch = getattr(self.denoiser.config, "patch_size", None)
        return f * int(patch) if patch else f

    def check_size(self, height: int, width: int, flag: str = "--resolution") -> None:
        """Refuse a size the model would silently change (FLUX turns 50 px into 48)."""
        m = self.size_multiple
        for side in (height, width):
            if side % m:
                lo, hi = max(m, side // m * m), (side // m + 1) * m
                raise DDError(
                    f"{flag} {side} is not a multiple of {m}, which {self.name} needs",
                    hint=f"use {lo} or {hi}",
                )

    def frozen_modules(self) -> list[torch.nn.Module]:
        """Everything but LoRA is frozen: text encoders, VAE and the base denoiser."""
        names = ("text_encoder", "text_encoder_2", "text_encoder_3", "vae", "transformer", "unet")
        return [m for n in names if (m := getattr(self.pipe, n, None)) is not None]

    # ------------------------------------------------------------------ family hooks
    @abc.abstractmethod
    def encode_prompts_uncached(self, prompts: list[str]) -> Conditioning:
        """Encode prompts with the frozen text encoders (no gradient)."""

    @abc.abstractmethod
    def prepare_latents(
        self, batch_size: int, height: int, width: int, generator: torch.Generator | list | None
    ) -> torch.Tensor:
        """Initial noise in the family's sampling layout (e.g. packed for FLUX)."""

    @abc.abstractmethod
    def make_schedule(self, steps: int, height: int, width: int) -> Schedule:
        """The full schedule from pure noise to t = 0 for this resolution."""

    @abc.abstractmethod
    def predict(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        cond: Conditioning,
        guidance: float | None,
        height: int,
        width: int,
    ) -> torch.Tensor:
        """The model output (velocity, epsilon or v) for ``latents`` at ``timestep`` (B,)."""

    def decode(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Latents (sampling layout) to images ``B x 3 x H x W`` in [0, 1], differentiable.

        The default suits families whose sampling layout is the VAE's (B x C x h x w); a
        family that packs latents (FLUX) unpacks and calls :meth:`vae_decode`.
        """
        return self.vae_decode(latents)

    def encode_images(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Images in [0, 1] to latents in the sampling layout (no gradient); see
        :meth:`vae_encode`."""
        return self.vae_encode(images, generator)

    # ------------------------------------------------------------------ VAE
    def vae_shift(self) -> float:
        """The VAE's ``shift_factor`` (FLUX, SD3), 0 where the config has none (SD, SDXL)."""
        shift = self.vae.config.get("shift_factor")
        return 0.0 if shift is None else float(shift)

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``B x C x h x w`` model latents to [0, 1] pixels, undoing the VAE's scale and
        shift: ``latents / scaling_factor + shift_factor`` (differentiable)."""
        vae = self.vae
        lat = latents / vae.config.scaling_factor + self.vae_shift()
        image = vae.decode(lat.to(vae.dtype), return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def vae_encode(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """[0, 1] pixels to ``B x C x h x w`` model latents with the VAE's shift and scale:
        ``(z - shift_factor) * scaling_factor`` (the released DiffDoctor code skipped it)."""
        vae = self.vae
        x = images.to(self.device, vae.dtype) * 2 - 1
        z = vae.encode(x).latent_dist.sample(generator=generator)
        return ((z - self.vae_shift()) * vae.config.scaling_factor).to(self.dtype)

    @classmethod
    def load_pipe(
        cls,
        pipeline_cls: type,
        model: str,
        *,
        device: torch.device | str,
        dtype: torch.dtype,
        **load_kwargs: Any,
    ) -> Any:
        """:func:`load_pipeline`, moved to ``device``, with diffusers' progress bar off."""
        with quiet_loading():
            pipe = load_pipeline(pipeline_cls, model, dtype=dtype, backbone=cls.name, **load_kwargs)
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @classmethod
    def load_with_options(
        cls,
        pipeline_cls: type,
        model: str,
        *,
        device: torch.device | str,
        dtype: torch.dtype,
        options: dict[str, Any],
        allowed: Sequence[str],
        **load_kwargs: Any,
    ) -> Any:
        """``cls(pipe, **options)`` for the pipeline at ``model``; an option not in
        ``allowed`` (a typo) is an error, not silently ignored."""
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise DDError(
                f"unknown option(s) for backbone {cls.name}: {', '.join(unknown)}",
                hint=f"options: {', '.join(allowed)}" if allowed else "it takes no options",
            )
        pipe = cls.load_pipe(pipeline_cls, model, device=device, dtype=dtype, **load_kwargs)
        return cls(pipe, device=device, dtype=dtype, source=str(model), **options)

    # ------------------------------------------------------------------ misc
    def quantize(self, mode: str) -> dict[str, int]:
        """Quantise the frozen denoiser's linear weights to ``mode`` (``int8``, ``fp8``,
        ``nf4``; see :mod:`dd.ops.quantize`) before a LoRA is attached; returns its parameter
        bytes ``before`` and ``after``. Afterwards :meth:`to` moves it between devices but
        never casts it."""
        from dd.ops.quantize import parameter_bytes, quantize_module

        if mode == "none":
            return {}
        if any("lora_" in n for n, _ in self.denoiser.named_parameters()):
            raise DDError(
                "quantise the denoiser before a LoRA is attached",
                hint="call quantize() right after loading",
            )
        before = parameter_bytes(self.denoiser)
        quantize_module(self.denoiser, mode)
        self.quantized = mode
        return {"before": before, "after": parameter_bytes(self.denoiser)}

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Backbone:
        self.device = torch.device(device) if device is not None else self.device
        self.dtype = dtype or self.dtype
        if self.quantized == "none":
            self.pipe.to(self.device, self.dtype)
            return self
        # A quantised denoiser moves but is never cast (quanto and bitsandbytes refuse it).
        for module in self.pipe.components.values():
            if module is self.denoiser:
                module.to(self.device)
            elif isinstance(module, torch.nn.Module):
                module.to(self.device, self.dtype)
        return self

    def describe(self) -> dict[str, Any]:
        return {
            "backbone": self.name,
            "model": self.source,
            "prediction_type": self.prediction_type,
        }


class DDIMBackbone(Backbone):
    """Base of the epsilon / v-prediction families (SD1.5, SDXL, LDM): deterministic DDIM
    sampling from the pipeline's own betas, trained with the epsilon / v MSE."""

    def _prediction_type(self, scheduler_config: Any) -> str:
        """The scheduler's prediction type; refuses what these families cannot sample."""
        prediction = scheduler_config.get("prediction_type", EPSILON)
        if prediction not in (EPSILON, V_PREDICTION):
            raise DDError(
                f"{self.name}: scheduler prediction type {prediction!r} is not supported",
                hint="dd samples epsilon and v_prediction models",
            )
        return prediction

    def make_schedule(self, steps: int, height: int, width: int) -> Schedule:
        return ddim_schedule(self.pipe.scheduler.config, steps, device=self.device)

    # Deliberate copy: the signature of the abstract Backbone.diffusion_loss it overrides
    # (the keywords are the API).

    def diffusion_loss(
        self,
        images: torch.Tensor,
        cond: Conditioning,
        *,
        generator: torch.Generator | None = None,
        guidance: float | None = None,
        weighting: str = "uniform",
    ) -> torch.Tensor:
        """The epsilon / v-prediction MSE the model was trained with: on the conditional
        prediction, without classifier-free guidance (``guidance`` is ignored)."""
        return super().diffusion_loss(
            images, cond, generator=generator, guidance=1.0, weighting=weighting
        )


def cfg_mix(out: torch.Tensor, guidance: float) -> torch.Tensor:
    """Classifier-free guidance of a batched ``[unconditional, conditional]`` model output:
    ``uncond + guidance * (cond - uncond)``."""
    uncond, text = out.chunk(2)
    return uncond + float(guidance) * (text - uncond)


def _shorten(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def _lora_key_warnings() -> Iterator[list[str]]:
    """Collect diffusers' warnings about unexpected or missing LoRA keys while loading a LoRA
    (diffusers only logs them: a LoRA of another architecture would load half-way, quietly).

    Its notes that a text encoder got no keys are dropped; other records pass through."""
    import logging

    problems: list[str] = []
    passed: list[logging.LogRecord] = []
    lib = logging.getLogger("diffusers")

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            msg = record.getMessage()
            if "unexpected keys" in msg or "missing keys" in msg:
                problems.append(msg.replace("\n", " ").strip())
            elif "No LoRA keys associated" not in msg:
                passed.append(record)

    handlers, level = list(lib.handlers), lib.level
    for h in handlers:
        lib.removeHandler(h)
    lib.addHandler(collect := Collect(logging.WARNING))
    lib.setLevel(min(level or logging.WARNING, logging.WARNING))
    others: list[warnings.WarningMessage] = []
    failed = True
    try:
        # peft reports keys it could not place as a Python warning, not a log record.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield problems
        for w in caught:
            msg = str(w.message)
            if "unexpected" in msg.lower() or "missing" in msg.lower():
                problems.append(msg.replace("\n", " ").strip())
            else:
                others.append(w)
        failed = bool(problems)
    finally:
        lib.removeHandler(collect)
        lib.setLevel(level)
        for h in handlers:
            lib.addHandler(h)
        # A LoRA that does not fit is one error line: what diffusers and peft said on the way
        # (a state-dict dump, an "inconsistency" warning) is dropped; after a clean load it
        # passes through.
        if not failed:
            for record in passed:
                lib.handle(record)
            for w in others:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """While a pipeline loads: no per-component "Loading weights" bars and no notes from
    transformers (e.g. that torchvision is absent: dd never uses their image processors).
    Errors still raise; ``DD_DEBUG=1`` keeps everything."""
    import os

    if os.environ.get("DD_DEBUG"):
        yield
        return
    from transformers.utils import logging as tlog

    level, bars = tlog.get_verbosity(), tlog.is_progress_bar_enabled()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        tlog.set_verbosity(level)
        if bars:
            tlog.enable_progress_bar()


def _summarize_load_error(e: BaseException) -> str:
    """torch's multi-line state-dict error as one line: its first line, how many size
    mismatches, and the first one."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    mismatches = [ln for ln in lines if ln.startswith("size mismatch")]
    if mismatches:
        first = _shorten(mismatches[0], 200)
        return f"{len(mismatches)} size mismatch(es), e.g. {first}"
    return _shorten(lines[0])


# ---------------------------------------------------------------------- schedule helpers
def ddim_schedule(
    scheduler_config: Any, steps: int, device: torch.device | str = "cpu"
) -> Schedule:
    """Deterministic DDIM discretisation, exactly as ``DDIMScheduler`` would step it.

    Uses the pipeline's training betas and its timestep spacing; ``alphas[i + 1]`` is the
    cumulative alpha of the next timestep, and after the last step ``final_alpha_cumprod``
    (1 with ``set_alpha_to_one``, as SD1.5/SDXL configure it).
    """
    from diffusers import DDIMScheduler

    cfg = dict(scheduler_config)
    cfg.setdefault("set_alpha_to_one", False)
    sched = DDIMScheduler.from_config(cfg)
    sched.set_timesteps(steps, device="cpu")
    ts = sched.timesteps.long()
    ac = sched.alphas_cumprod.to(torch.float32)
    alphas = [ac[t] for t in ts.tolist()]
    alphas.append(sched.final_alpha_cumprod.to(torch.float32))
    return Schedule(timesteps=ts.to(device), alphas=torch.stack(alphas).to(device))


def flow_schedule(
    scheduler: Any,
    steps: int,
    *,
    mu: float | None = None,
    sigmas: Sequence[float] | None = None,
    device: torch.device | str = "cpu",
) -> Schedule:
    """Flow-matching discretisation from the pipeline's ``FlowMatchEulerDiscreteScheduler``
    (static shift for SD3, resolution-dependent ``mu`` for FLUX), ending at sigma 0."""
    import copy

    import numpy as np

    sched = copy.deepcopy(scheduler)  # set_timesteps mutates; keep the pipeline's intact
    kwargs: dict[str, Any] = {}
    if mu is not None:
        kwargs["mu"] = mu
    if sigmas is not None:
        kwargs["sigmas"] = np.asarray(sigmas, dtype=np.float32)
        sched.set_timesteps(device="cpu", **kwargs)
    else:
        sched.set_timesteps(steps, device="cpu", **kwargs)
    return Schedule(
        timesteps=sched.timesteps.to(torch.float32).to(device),
        sigmas=sched.sigmas.to(torch.float32).to(device),
    )


# ---------------------------------------------------------------------- loading helpers
def load_pipeline(
    pipeline_cls: type,
    model: str,
    *,
    dtype: torch.dtype = torch.float32,
    backbone: str = "",
    **kwargs: Any,
) -> Any:
    """Load ``pipeline_cls`` from a local diffusers folder, a single checkpoint file or a
    hub id, with one-line errors for the usual mistakes (wrong family, offline, missing)."""
    import json
    import warnings

    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()  # dd shows its own progress
    warnings.filterwarnings(
        "ignore", message=".*torch_dtype.*is deprecated", category=FutureWarning
    )
    path = Path(model).expanduser()
    expected = pipeline_cls.__name__
    if path.is_file():
        if path.suffix not in (".safetensors", ".ckpt", ".pt", ".bin", ".gguf"):
            raise DDError(
                f"{path} is not a model checkpoint",
                hint="pass a diffusers folder, a .safetensors file or a hub id",
            )
        if not hasattr(pipeline_cls, "from_single_file"):
            raise DDError(
                f"{expected} cannot load single files like {path}",
                hint="pass a diffusers folder or hub id",
            )
        try:
            return pipeline_cls.from_single_file(str(path), torch_dtype=dtype, **kwargs)
        except Exception as e:  # diffusers raises many types here
            raise DDError(
                f"cannot load {path} as a {expected} single file: {type(e).__name__}: {e}",
                hint="single files need their base config; offline, pass a diffusers folder",
            ) from None
    if path.is_dir():
        index = path / "model_index.json"
        if not index.exists():
            raise DDError(
                f"{path} has no model_index.json: not a diffusers pipeline folder",
                hint="save the pipeline with save_pretrained, or pass a hub id",
            )
        try:
            found = json.loads(index.read_text()).get("_class_name", "?")
        except ValueError:
            raise DDError(f"{index} is not valid JSON") from None
        right = Backbone.family_of(found)
        if found != expected and right != backbone:
            raise DDError(
                f"{path} holds a {found}, not a {expected} (--backbone {backbone})",
                hint=f"use --backbone {right}" if right else "pick the matching --backbone",
            )
    elif not _looks_like_hub_id(model):
        raise DDError(
            f"model not found: {model}",
            hint="pass a local diffusers folder, a .safetensors file or a hub id",
        )
    try:
        return pipeline_cls.from_pretrained(
            str(path) if path.is_dir() else model, torch_dtype=dtype, **kwargs
        )
    except (OSError, ValueError) as e:
        offline = "HF_HUB_OFFLINE" in __import__("os").environ
        raise DDError(
            f"cannot load {model} as a {expected}: {str(e).splitlines()[0]}",
            hint="you are offline (HF_HUB_OFFLINE is set); pass a local folder"
            if offline
            else "check the hub id or path, and that you are logged in",
        ) from None


def check_lora_source(path: str | Path, flag: str = "LoRA") -> None:
    """A one-line "not found" for a LoRA that is neither a local path nor a hub id (checked
    before any model loads)."""
    if not Path(path).exists() and not _looks_like_hub_id(str(path)):
        raise DDError(
            f"{flag} not found: {path}",
            hint="pass a LoRA folder (e.g. RUN/best), a .safetensors file or a hub id",
        )


def _looks_like_hub_id(s: str) -> bool:
    parts = s.split("/")
    return len(parts) == 2 and all(parts) and not s.startswith((".", "~"))
