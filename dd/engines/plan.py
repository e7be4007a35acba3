"""``dd treat --plan``: will this treat configuration fit my GPU? Answered before loading
any weights.

The configured models are built on the meta device from their configurations (a local
diffusers folder, or a hub id whose configuration files are in the Hugging Face cache or can
be fetched: weights are never downloaded), with the configured LoRA and detector. One treat
step (sampling with gradients through the last ``K`` steps, decode, detector, confidence
loss, backward) is traced on the meta device by :class:`dd.runtime.memory.PeakTracker`,
which counts every byte the step would allocate, with the fused attention kernel a GPU
uses. The estimate is

* frozen weights (denoiser, VAE, detector) in the configured dtype; with ``--quantize`` the
  denoiser's linear weights at the quantised width (int8 and fp8: 1 byte per weight plus
  one scale per output channel; nf4: 0.5 byte plus a 4-byte absmax per 64 weights), the
  rest as they are, plus one dequantised layer in flight;
* the LoRA in float32, its gradients and the optimizer state (AdamW: two float32 moments;
  AdamW8bit: two 1-byte moments);
* the step's peak of activations (traced);
* the text encoders, only while the prompts are embedded (``--offload-text-encoders``,
  the default, moves them off the GPU before the first step; without it they stay).

Validated against measured CPU peaks of the ``dd bench treat`` models
(``tests/test_plan.py``, within 15%); the GPU check belongs to ``dd bench gpu``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dd.errors import DDError, UsageError

__all__ = ["MemoryPlan", "estimate_step", "parse_memory", "plan_treat"]

GIB = 2**30


def parse_memory(text: str) -> int:
    """``24GB``, ``24G``, ``24GiB``, ``22.5`` (GiB) -> bytes (GiB units, as GPUs are sold)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(g|gb|gib)?\s*", str(text), re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise UsageError(f"bad --max-memory {text!r}", hint="e.g. --max-memory 24GB")
    return int(float(m.group(1)) * GIB)


@dataclass
class MemoryPlan:
    """Bytes per part of one treat step's peak, the settings they assume, and what fits."""

    parts: dict[str, int]
    settings: dict[str, Any]
    #: Bytes on the GPU while the prompts are embedded (weights + text encoders); with
    #: ``--quantize`` the denoiser is still at its load dtype then (it is quantised after
    #: loading).
    embedding_phase: int = 0
    budget: int | None = None
    suggestions: list[dict[str, Any]] = field(default_factory=list)

    @property
    def step_total(self) -> int:
        return sum(v for k, v in self.parts.items() if k != "text encoders")

    @property
    def total(self) -> int:
        return max(self.step_total + self.parts.get("text encoders", 0), self.embedding_phase)

    @property
    def fits(self) -> bool | None:
        return None if self.budget is None else self.total <= self.budget

    def as_dict(self) -> dict[str, Any]:
        return {
            "parts_bytes": self.parts,
            "step_peak_bytes": self.step_total,
            "embedding_phase_bytes": self.embedding_phase,
            "peak_bytes": self.total,
            "budget_bytes": self.budget,
            "fits": self.fits,
            "settings": self.settings,
            "suggestions": self.suggestions,
        }


# ------------------------------------------------------------------------------------------
# Models on the meta device, from configurations
# ------------------------------------------------------------------------------------------
def _config_folder(model: str) -> Path:
    """A folder with the model's configuration files: ``model`` itself, or the hub snapshot
    of its JSON/tokenizer files (no weights)."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise DDError(
                f"{path} has no model_index.json",
                hint="--plan needs a diffusers pipeline folder (a single .safetensors file has "
                "no configuration)",
            )
        return path
    if str(model).startswith(("/", "./", "../", "~")) and not path.exists():
        raise DDError(f"model folder not found: {model}", hint="check --model")
    if path.suffix in (".safetensors", ".ckpt") or path.exists():
        raise DDError(
            f"--plan cannot read a configuration from {model}",
            hint="pass the diffusers folder or hub id of the model",
        )
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                model,
                allow_patterns=["*.json", "*.txt", "*.model", "tokenizer*/*", "*/spiece*"],
            )
        )
    except Exception as e:
        raise DDError(
            f"--plan needs the configuration files of {model}: {type(e).__name__}",
            hint="run once online (only the JSON and tokenizer files are fetched; a gated "
            "model needs `hf auth login`) or pass a local diffusers folder",
        ) from None


def meta_pipeline(model: str, dtype: torch.dtype) -> Any:
    """The diffusers pipeline of ``model`` with every network on the meta device (built
    from its configuration), tokenizers and scheduler as they are."""
    import diffusers
    import transformers

    folder = _config_folder(model)
    index = json.loads((folder / "model_index.json").read_text())
    components: dict[str, Any] = {}
    previous = torch.get_default_dtype()
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            if not name.startswith("_"):
                components[name] = None
            continue
        library, cls_name = spec
        lib = diffusers if library == "diffusers" else transformers
        cls = getattr(lib, cls_name, None)
        sub = folder / name
        if cls is None:
            raise DDError(f"--plan does not know {library}.{cls_name} ({name})")
        if isinstance(cls, type) and issubclass(cls, torch.nn.Module):
            torch.set_default_dtype(dtype)
            try:
                with torch.device("meta"):
                    if library == "diffusers":
                        components[name] = cls.from_config(cls.load_config(sub)).eval()
                    else:
                        config = transformers.AutoConfig.from_pretrained(sub)
                        components[name] = cls._from_config(config, dtype=dtype).eval()
            finally:
                torch.set_default_dtype(previous)
            components[name].requires_grad_(False)
        else:
            components[name] = cls.from_pretrained(sub)
    pipeline_cls = getattr(diffusers, index["_class_name"])
    return pipeline_cls(**components)


# ------------------------------------------------------------------------------------------
# The estimate
# ------------------------------------------------------------------------------------------
def _params(module: Any) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()] if module is not None else []


def _quantised_bytes(denoiser: torch.nn.Module, mode: str) -> tuple[int, int, int]:
    """(bytes of the frozen linear weights now, at ``mode``, the largest one in bf16)."""
    now = quant = largest = 0
    for module in denoiser.modules():
        if isinstance(module, torch.nn.Linear) and not module.weight.requires_grad:
            w = module.weight
            if "lora_" in str(type(module)).lower():
                continue
            n = w.numel()
            now += n * w.element_size()
            if mode in ("int8", "fp8"):
                quant += n + 4 * w.shape[0]
            elif mode == "nf4":
                quant += n // 2 + 4 * (n // 64)
            else:
                quant += n * w.element_size()
            largest = max(largest, 2 * n)
    return now, quant, largest


def estimate_step(
    setup: Any,
    *,
    resolution: int,
    grad_steps: int,
    checkpointing: bool,
    quantize: str = "none",
    optimizer: str = "adamw",
) -> dict[str, int]:
    """Bytes per part of one treat step of ``setup`` (a ``dd.engines.bench.TreatSetup`` on the meta
    device, or on the CPU: the trace then also runs the step)."""
    from dd.engines.bench import set_checkpointing, treat_step
    from dd.runtime.memory import PeakTracker, fused_attention, tensor_bytes

    bb, det = setup.backbone, setup.detector
    set_checkpointing(setup, "checkpointed" if checkpointing else "naive")
    lora = setup.lora
    parts = {
        "denoiser (frozen)": _frozen_bytes(setup),
        "VAE": tensor_bytes(_params(bb.vae)),
        "detector": tensor_bytes(_params(det)),
        "LoRA": tensor_bytes(lora),
        "optimizer state": sum(p.numel() for p in lora) * (2 if optimizer == "adamw8bit" else 8),
    }
    if quantize != "none":
        now, quant, largest = _quantised_bytes(bb.denoiser, quantize)
        parts["denoiser (frozen)"] += quant - now + largest
    latents = setup.latents(resolution)
    tracker = PeakTracker()
    with fused_attention(), tracker:
        treat_step(setup, resolution, grad_steps, latents)
    setup.zero_grad()
    parts["activations + LoRA gradients"] = tracker.peak
    return parts


def _text_encoder_bytes(pipe: Any) -> int:
    from dd.runtime.memory import tensor_bytes

    names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    return sum(tensor_bytes(_params(getattr(pipe, n, None))) for n in names)


def meta_treat_setup(
    backbone: str,
    model: str,
    *,
    dtype: torch.dtype,
    lora_rank: int,
    steps: int | None,
    batch: int,
    detector: Any,
    options: dict[str, Any],
) -> tuple[Any, int]:
    """``(setup, text encoder bytes)``: the backbone of ``model`` on the meta device with a
    rank-``lora_rank`` LoRA, ``detector`` moved there, and meta prompt embeddings."""
    from dd.api.plugins import get_host
    from dd.engines.bench import _add_lora, _finish_setup

    cls = get_host().backbones.get(backbone)
    pipe = meta_pipeline(model, dtype)
    meta = torch.device("meta")
    bb = cls(pipe, device=meta, dtype=dtype, source=str(model), **options)
    _add_lora(bb, lora_rank, 0)
    with torch.no_grad():
        cond = bb.encode_prompts_uncached(["a photo of a cat holding a cup"] * batch)
    text = _text_encoder_bytes(pipe)
    det = detector.to(meta)
    setup = _finish_setup(
        bb, det, cond.to(meta, dtype), lora_rank=lora_rank, steps=steps or bb.default_steps,
        guidance=bb.default_guidance, batch=batch, seed=0,
    )  # fmt: skip
    return setup, text


def plan_treat(cfg: Any, max_memory: str | None = None) -> MemoryPlan:
    """The memory plan of the treat configuration ``cfg`` (a ``TreatConfig``)."""
    from dd.api.plugins import load_detector
    from dd.runtime.device import resolve_dtype

    dtype = resolve_dtype(cfg.dtype)
    det = load_detector(cfg.detector, cfg.detector_weights, dict(cfg.detector_options), "cpu",
                        cfg.dtype)  # fmt: skip
    options = dict(cfg.backbone_options)
    setup, text = meta_treat_setup(
        cfg.backbone, cfg.model, dtype=dtype, lora_rank=cfg.lora_rank, steps=cfg.steps,
        batch=cfg.batch_size, detector=det, options=options,
    )  # fmt: skip
    bb = setup.backbone
    resolution = cfg.resolution or int(bb.default_resolution)
    k = cfg.grad_steps
    settings = {
        "backbone": cfg.backbone,
        "model": cfg.model,
        "dtype": cfg.dtype,
        "quantize": cfg.quantize,
        "optimizer": cfg.optimizer,
        "resolution": resolution,
        "grad_steps": k,
        "batch_size": cfg.batch_size,
        "lora_rank": cfg.lora_rank,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "steps": setup.steps,
    }
    parts = estimate_step(
        setup, resolution=resolution, grad_steps=k, checkpointing=cfg.gradient_checkpointing,
        quantize=cfg.quantize, optimizer=cfg.optimizer,
    )  # fmt: skip
    loaded = _frozen_bytes(setup)  # the denoiser as loaded, before --quantize
    weights = loaded + parts["VAE"] + parts["detector"]
    plan = MemoryPlan(parts, settings, embedding_phase=weights + text)
    if not cfg.offload_text_encoders:
        plan.parts["text encoders"] = text
    plan.budget = parse_memory(max_memory) if max_memory else None
    if plan.budget is not None and not plan.fits:
        plan.suggestions = _suggestions(setup, cfg, resolution, plan.budget, weights + text)
    return plan


def _frozen_bytes(setup: Any) -> int:
    from dd.runtime.memory import tensor_bytes

    lora = {id(p) for p in setup.lora}
    return tensor_bytes([t for t in _params(setup.backbone.denoiser) if id(t) not in lora])


def _suggestions(
    setup: Any, cfg: Any, resolution: int, budget: int, loading: int
) -> list[dict[str, Any]]:
    """Cheaper variants of the configuration, each estimated; the ones that fit first."""
    from dd.ops.quantize import QUANTIZE_MODES

    tries: list[tuple[str, dict[str, Any]]] = []
    if not cfg.gradient_checkpointing:
        tries.append(("--gradient-checkpointing", {"checkpointing": True}))
    if cfg.grad_steps > 1:
        tries.append(("--grad-steps 1", {"grad_steps": 1, "checkpointing": True}))
    for mode in QUANTIZE_MODES:
        if mode not in ("none", cfg.quantize):
            tries.append((f"--quantize {mode} --gradient-checkpointing",
                          {"quantize": mode, "checkpointing": True}))  # fmt: skip
    if resolution > 512:
        tries.append((f"--resolution {resolution // 2} --gradient-checkpointing",
                      {"resolution": resolution // 2, "checkpointing": True}))  # fmt: skip
    out = []
    for flags, change in tries:
        args = {
            "resolution": resolution,
            "grad_steps": cfg.grad_steps,
            "checkpointing": cfg.gradient_checkpointing,
            "quantize": cfg.quantize,
            "optimizer": cfg.optimizer,
            **change,
        }
        parts = estimate_step(setup, **args)
        step = sum(parts.values())
        text = loading - _frozen_bytes(setup) - parts["VAE"] - parts["detector"]
        peak = max(step + (0 if cfg.offload_text_encoders else text), loading)
        out.append({"flags": flags, "peak_bytes": peak, "fits": peak <= budget})
    out.sort(key=lambda r: (not r["fits"], r["peak_bytes"]))
    return out


def render(plan: MemoryPlan) -> list[str]:
    """The plan as text lines (GiB)."""

    def g(n: int) -> str:
        return f"{n / GIB:7.2f} GiB" if n >= GIB else f"{n / 2**20:7.1f} MiB"

    s = plan.settings
    lines = [
        f"memory plan: {s['backbone']} {s['model']}, {s['dtype']}"
        + (f" + {s['quantize']}" if s["quantize"] != "none" else "")
        + f", {s['resolution']}px, batch {s['batch_size']}, K={s['grad_steps']}, LoRA rank "
        f"{s['lora_rank']}, checkpointing {'on' if s['gradient_checkpointing'] else 'off'}",
    ]
    lines += [f"  {name:<30} {g(n)}" for name, n in plan.parts.items()]
    lines.append(f"  {'one treat step (peak)':<30} {g(plan.step_total)}")
    lines.append(f"  {'loading, embedding prompts':<30} {g(plan.embedding_phase)}  (weights as "
                 "loaded + text encoders, before the first step)")  # fmt: skip
    verdict = ""
    if plan.budget is not None:
        verdict = (
            f"  fits {plan.budget / GIB:.0f} GiB"
            if plan.fits
            else (f"  does NOT fit {plan.budget / GIB:.0f} GiB")
        )
    lines.append(f"  {'peak':<30} {g(plan.total)}{verdict}")
    if plan.suggestions:
        lines.append("options (estimated peak):")
        lines += [
            f"  {r['flags']:<50} {g(r['peak_bytes'])}  {'fits' if r['fits'] else 'too big'}"
            for r in plan.suggestions
        ]
    return lines
