"""Side-by-side benchmarks behind ``dd bench``: the fused loss kernels, the treat step and detect
throughput, each run beside its baseline in one process, with the ratios the targets are about.

* :func:`bench_kernels`: ``dd.ops.artifact_confidence_loss`` per kernel against the eager
  reference, forward + backward, across batch sizes, output sizes and reductions.
* :func:`bench_treat`: one treat step (sample with gradients through the last ``K`` denoising
  steps, decode, detector, loss, backward: what ``dd treat`` does per micro-batch) against
  ``K``, resolution and checkpointing mode. :func:`tiny_treat_setup` builds a small model of the
  real classes for CPUs, :func:`pretrained_treat_setup` loads a user's model and
  :func:`full_size_flux_setup` builds FLUX.1-dev's transformer (about 12B parameters), its VAE
  and a SegFormer MiT-b5 from their real configurations with random weights.
* :func:`bench_detect`: images per second of :func:`dd.engines.detect.run_detect` against
  :func:`released_detect`, the released DiffDoctor per-image loop, on the same images and
  weights.

What is measured
----------------
Time: wall clock of one call, the median of ``repeat`` calls after a warm-up call (CUDA is
synchronised before and after each).

Peak extra memory: the most memory allocated at any moment during a call above what was
allocated when it started (:func:`peak_extra_memory`):

* CUDA: the caching allocator's ``max_memory_allocated`` after ``reset_peak_memory_stats``,
  minus ``memory_allocated`` before: tensor memory only (not blocks the allocator caches
  while they are free, not the CUDA context).
* CPU: every allocation and free of torch's CPU allocator as ``torch.profiler`` records them
  (``profile_memory=True``), replayed in time order; the peak of the running sum. It counts
  all tensor storage, including buffers that native code (the C++ loss kernel, oneDNN)
  allocates through torch, and nothing else (no malloc'd scratch of other libraries, no
  Python objects). A block allocated before the call and freed during it is not reported by
  the profiler, so it is not subtracted: the figure can only err high, by at most such blocks
  (the benchmarks drop gradients before each call so there are few). The process's resident
  set is no substitute inside one long process: glibc serves new buffers from heap memory
  that is already resident, so it under-counts.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dd.errors import DDError, UsageError
from dd.report.plot import Panel
from dd.runtime.memory import peak_extra_memory, sync

#: ``on_progress(done, total)`` after each measured configuration.
Progress = Callable[[int, int], None]


# ------------------------------------------------------------------------------------------
# Measuring
# ------------------------------------------------------------------------------------------
def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one ``fn()`` takes (CUDA synchronised before and after)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def machine(device: torch.device) -> dict[str, Any]:
    """The machine a benchmark ran on: processor or GPU, CPUs, torch threads, load."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        m = re.search(r"model name\s*:\s*(.+)", cpuinfo.read_text())
        if m:
            cpu = m.group(1).strip()
    info: dict[str, Any] = {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
        "torch": torch.__version__,
        "device": str(device),
    }
    if hasattr(os, "getloadavg"):
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        total = torch.cuda.get_device_properties(device).total_memory
        info["gpu_memory_gib"] = round(total / 2**30, 1)
    return info


def describe_machine(info: dict[str, Any]) -> str:
    """One line for reports."""
    parts = [info.get("gpu") or info["cpu"]]
    parts.append(f"{info['logical_cpus']} logical CPUs, torch threads {info['torch_threads']}")
    if "load_average" in info:
        parts.append("load average " + " ".join(f"{x:g}" for x in info["load_average"]))
    parts.append(f"OMP_WAIT_POLICY={info['omp_wait_policy']}")
    parts.append(f"torch {info['torch']}")
    return "; ".join(parts)


def _run_info(device: torch.device) -> dict[str, Any]:
    return {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": machine(device),
        "device": str(device),
        "memory_method": {"cuda": "cuda allocator", "meta": "none (meta device)"}.get(
            device.type, "cpu allocator"
        ),
    }


def _target(name: str, value: float | None, limit: float, *, at_most: bool) -> dict[str, Any]:
    met = value is not None and (value <= limit if at_most else value >= limit)
    return {
        "name": name,
        "value": None if value is None else round(value, 3),
        "target": f"{'<=' if at_most else '>='} {limit:g}",
        "met": met,
    }


# ------------------------------------------------------------------------------------------
# Kernels: dd.ops.artifact_confidence_loss against its eager reference
# ------------------------------------------------------------------------------------------
KERNEL_REDUCTIONS = ("mean", "max", "sum", "weighted", "mse")


def available_kernels(
    device: torch.device, wanted: Sequence[str]
) -> tuple[list[str], dict[str, str]]:
    """``(["reference", *runnable], {kernel: why not})`` for ``wanted`` on ``device``; a
    name that is no kernel at all is an error (a known one this machine lacks is skipped)."""
    import dd.ops as ops
    from dd.ops.dispatch import KERNELS

    unknown = [k for k in wanted if k not in KERNELS]
    if unknown:
        raise DDError(
            f"unknown kernel(s) {', '.join(unknown)}", hint=f"choose from {', '.join(KERNELS)}"
        )
    kernels, skipped = ["reference"], {}
    for k in wanted:
        if k == "reference" or k in kernels:
            continue
        try:
            ops.select_kernel(torch.empty(1, 1, 1, 1, device=device), (1, 1), kernel=k)
        except DDError as e:
            skipped[k] = e.message
            continue
        kernels.append(k)
    return kernels, skipped


def _loss_step(
    kernel: str,
    logits: torch.Tensor,
    size: tuple[int, int],
    reduction: str,
    target: torch.Tensor | None,
) -> Callable[[], None]:
    import dd.ops as ops

    def step() -> None:
        x = logits.detach().requires_grad_()
        ops.artifact_confidence_loss(x, size, reduction, target, kernel=kernel).mean().backward()

    return step


def bench_kernels(
    *,
    device: torch.device,
    kernels: Sequence[str] = ("cpp", "cuda", "triton"),
    batches: Sequence[int] = (1, 4, 8),
    sizes: Sequence[int] = (512, 1024),
    logits_side: int = 128,
    reductions: Sequence[str] = ("mean", "max", "weighted", "mse"),
    repeat: int = 5,
    seed: int = 0,
    on_progress: Progress | None = None,
) -> dict[str, Any]:
    """Forward + backward of ``loss.mean()`` for each kernel beside the reference.

    For each batch size, output side (square) and reduction (``mse`` = ``mean`` against a
    target map), every kernel runs on the same logits (``logits_side``², N(0, 4)), timed
    interleaved with the reference so that load changes hit all alike; then the peak extra
    memory of one call each. Rows: ``ms`` (median), ``peak_mib``, ``speedup`` (reference time
    / kernel time) and ``mem_ratio`` (kernel peak / reference peak).
    """
    bad = sorted(set(reductions) - set(KERNEL_REDUCTIONS))
    if bad:
        raise DDError(
            f"unknown reduction(s) {', '.join(bad)}", hint=f"use {', '.join(KERNEL_REDUCTIONS)}"
        )
    names, skipped = available_kernels(device, kernels)
    gen = torch.Generator().manual_seed(seed)
    rows: list[dict[str, Any]] = []
    total, done = len(batches) * len(sizes) * len(reductions), 0
    for batch in batches:
        for side in sizes:
            size = (side, side)
            logits = (torch.randn(batch, 1, logits_side, logits_side, generator=gen) * 2).to(device)
            for reduction in reductions:
                red, target = reduction, None
                if reduction == "mse":
                    red = "mean"
                    target = torch.rand(batch, 1, *size, generator=gen).to(device)
                steps = {k: _loss_step(k, logits, size, red, target) for k in names}
                for step in steps.values():  # warm-up: builds, caches, allocator pools
                    step()
                times: dict[str, list[float]] = {k: [] for k in names}
                for _ in range(max(1, repeat)):
                    for k in names:
                        times[k].append(time_once(steps[k], device))
                mem = {k: peak_extra_memory(steps[k], device)[0] for k in names}
                ref_t = statistics.median(times["reference"])
                for k in names:
                    t = statistics.median(times[k])
                    rows.append(
                        {
                            "batch": batch,
                            "logits": logits_side,
                            "out": side,
                            "reduction": reduction,
                            "kernel": k,
                            "ms": round(t * 1e3, 3),
                            "peak_mib": round(mem[k] / 2**20, 2),
                            "speedup": round(ref_t / t, 2),
                            "mem_ratio": round(mem[k] / mem["reference"], 3)
                            if mem["reference"]
                            else None,
                        }
                    )
                done += 1
                if on_progress:
                    on_progress(done, total)
    result = {
        "benchmark": "kernels",
        **_run_info(device),
        "repeat": repeat,
        "kernels": names,
        "skipped": skipped,
        "rows": rows,
    }
    result["targets"] = kernel_targets(rows, device)
    return result


def kernel_targets(rows: list[dict[str, Any]], device: torch.device) -> list[dict[str, Any]]:
    """At the largest batch x output size measured: each kernel's extra memory at most 1/4 of
    the reference's, and (on CPU) its time no worse than the reference's."""
    if not rows:
        return []
    biggest = max(rows, key=lambda r: (r["batch"] * r["out"] ** 2, r["batch"]))
    b, out = biggest["batch"], biggest["out"]
    targets = []
    for r in rows:
        if r["kernel"] == "reference" or (r["batch"], r["out"]) != (b, out):
            continue
        where = f"{r['kernel']} {r['reduction']} at {b} x {out}²"
        targets.append(_target(f"{where}: memory / reference", r["mem_ratio"], 0.25, at_most=True))
        if device.type == "cpu":
            targets.append(_target(f"{where}: speedup", r["speedup"], 1.0, at_most=False))
    return targets


def kernels_markdown(result: dict[str, Any]) -> str:
    """One row per configuration: each kernel's time and peak memory, ratios to the reference."""
    configs: dict[tuple, dict[str, dict]] = {}
    for r in result["rows"]:
        key = (r["batch"], r["logits"], r["out"], r["reduction"])
        configs.setdefault(key, {})[r["kernel"]] = r
    others = [k for k in result["kernels"] if k != "reference"]
    head = ["B", "logits → out", "reduction", "reference ms"]
    head += [f"{k} ms (speedup)" for k in others] + ["reference MiB"]
    head += [f"{k} MiB (ratio)" for k in others]
    lines = [
        f"Machine: {describe_machine(result['machine'])}; device {result['device']}; "
        f"fwd+bwd, median of {result['repeat']} interleaved runs; peak extra memory "
        f"({result['memory_method']}).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for (batch, logits, out, reduction), by_kernel in configs.items():
        ref = by_kernel["reference"]
        cells = [str(batch), f"{logits}² → {out}²", reduction, f"{ref['ms']:.1f}"]
        cells += [f"{by_kernel[k]['ms']:.1f} ({by_kernel[k]['speedup']:.1f}×)" for k in others]
        cells.append(f"{ref['peak_mib']:.1f}")
        for k in others:
            ratio = by_kernel[k]["mem_ratio"]
            shown = f"{ratio:.3f}" if ratio is not None else "-"
            cells.append(f"{by_kernel[k]['peak_mib']:.2f} ({shown})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def kernels_panels(result: dict[str, Any]) -> list[Panel]:
    """Time and peak extra memory against output megapixels, per kernel and reduction."""
    time_s: dict[str, list[tuple[float, float]]] = {}
    mem_s: dict[str, list[tuple[float, float]]] = {}
    for r in result["rows"]:
        label = f"{r['kernel']} {r['reduction']}"
        mpx = r["batch"] * r["out"] ** 2 / 1e6
        time_s.setdefault(label, []).append((mpx, r["ms"]))
        mem_s.setdefault(label, []).append((mpx, r["peak_mib"]))
    return [
        Panel("fwd+bwd time", "output megapixels (B x H x W)", "ms", time_s, True, True),
        Panel("peak extra memory", "output megapixels (B x H x W)", "MiB", mem_s, True, True),
    ]


# ------------------------------------------------------------------------------------------
# Treat: one step of dd treat, naive versus checkpointed
# ------------------------------------------------------------------------------------------
#: ``naive``: no checkpointing; ``blocks``: the denoiser's blocks only (diffusers' own
#: option); ``checkpointed``: what dd treat does: each tracked denoising step, the denoiser's
#: blocks, the VAE decode and the detector's blocks.
TREAT_MODES = ("naive", "blocks", "checkpointed")

#: Denoiser settings of the CPU benchmark model, over dd.testing.tiny's unit-test pipelines
#: (whose text encoders, tokenizers, VAE and scheduler are kept): FLUX 4 double + 8 single
#: blocks of width 256 (17.8M parameters), so that the denoiser's activations outweigh the
#: VAE's and the detector's as at full size.
BENCH_DENOISERS: dict[str, dict[str, Any]] = {
    "flux": {
        "num_layers": 4,
        "num_single_layers": 8,
        "num_attention_heads": 4,
        "attention_head_dim": 64,
        "axes_dims_rope": (16, 24, 24),
    },
    "sd3": {
        "num_layers": 4,
        "num_attention_heads": 4,
        "attention_head_dim": 32,
        "caption_projection_dim": 128,
    },
    "sd15": {"block_out_channels": (64, 128), "layers_per_block": 2},
    "sdxl": {"block_out_channels": (64, 128), "layers_per_block": 2},
}

#: FLUX.1-dev's transformer (black-forest-labs/FLUX.1-dev, transformer/config.json).
FLUX_DEV_TRANSFORMER: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
#: FLUX.1's VAE (vae/config.json).
FLUX_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "force_upcast": True,
    "mid_block_add_attention": True,
}
#: FLUX.1-dev's scheduler (scheduler/scheduler_config.json).
FLUX_DEV_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
#: FLUX.1's text encoders' widths: T5-XXL tokens and CLIP-L's pooled output.
FLUX_T5_WIDTH, FLUX_POOLED_WIDTH = 4096, 768

#: Dense (no sparsity) bf16/fp16 tensor-core peaks in TFLOP/s from NVIDIA's datasheets, by a
#: substring of ``torch.cuda.get_device_name`` (first match wins; ``--peak-tflops`` overrides).
PEAK_TFLOPS_BF16: tuple[tuple[str, float], ...] = (
    ("H200 NVL", 835.5),
    ("H200", 989.4),
    ("H100 NVL", 835.5),
    ("H100 PCIe", 756.0),
    ("H100", 989.4),
    ("A100", 312.0),
    ("L40S", 362.1),
    ("RTX 4090", 165.2),
)


def peak_tflops_for(device_name: str, dtype: torch.dtype) -> float | None:
    """The device's dense bf16/fp16 peak from :data:`PEAK_TFLOPS_BF16` (None if unknown or
    another dtype)."""
    if dtype not in (torch.bfloat16, torch.float16):
        return None
    for key, tflops in PEAK_TFLOPS_BF16:
        if key.lower() in device_name.lower():
            return tflops
    return None


@dataclass
class TreatSetup:
    """A backbone with a LoRA, a detector and encoded prompts: everything one step needs."""

    backbone: Any
    detector: Any
    cond: Any
    steps: int
    guidance: float | None
    batch: int = 1
    seed: int = 0
    reduction: str = "mean"
    #: What was built, for reports (parameter counts, configurations).
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def lora(self) -> list[torch.nn.Parameter]:
        return [p for p in self.backbone.denoiser.parameters() if p.requires_grad]

    def zero_grad(self) -> None:
        for p in self.lora:
            p.grad = None

    def latents(self, resolution: int) -> torch.Tensor:
        gens = [torch.Generator("cpu").manual_seed(self.seed + i) for i in range(self.batch)]
        bb = self.backbone
        return torch.cat([bb.prepare_latents(1, resolution, resolution, g) for g in gens])


def treat_step(
    setup: TreatSetup, resolution: int, grad_steps: int, latents: torch.Tensor
) -> torch.Tensor:
    """One treat step as ``dd treat`` runs it per micro-batch, through the engine's own
    objective (:func:`dd.engines.treat.generated_confidence`: sample with gradients through
    the last ``grad_steps`` steps, decode, detector, fused confidence loss), then backward.
    Returns the loss (detached)."""
    from dd.engines.treat import generated_confidence

    loss = generated_confidence(
        setup.backbone,
        setup.detector,
        setup.cond,
        latents,
        height=resolution,
        width=resolution,
        steps=setup.steps,
        guidance=setup.guidance,
        grad_steps=grad_steps,
        reduction=setup.reduction,
    )
    loss.backward()
    return loss.detach()


def set_checkpointing(setup: TreatSetup, mode: str) -> None:
    """Switch ``setup`` to one of :data:`TREAT_MODES`."""
    if mode not in TREAT_MODES:
        raise DDError(f"unknown mode {mode!r}", hint=f"use {', '.join(TREAT_MODES)}")
    bb, det = setup.backbone, setup.detector
    if mode == "checkpointed":
        bb.enable_gradient_checkpointing()  # steps, denoiser blocks, VAE decode
        det.enable_gradient_checkpointing()
        return
    bb.gradient_checkpointing = False
    bb.vae_checkpointing = False
    det.disable_gradient_checkpointing()
    if mode == "blocks":
        bb.denoiser.enable_gradient_checkpointing()
    elif getattr(bb.denoiser, "is_gradient_checkpointing", False):
        bb.denoiser.disable_gradient_checkpointing()


def parse_grad_steps(spec: str | Sequence[int | str], steps: int) -> list[int]:
    """``"1,2,all"`` -> ``[1, 2, steps]`` (sorted, unique, each in 1..steps)."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: set[int] = set()
    for item in items:
        text = str(item).strip().lower()
        if not text:
            continue
        if text == "all":
            out.add(steps)
            continue
        try:
            k = int(text)
        except ValueError:
            raise DDError(
                f"bad grad steps {item!r}", hint="integers or 'all', e.g. 1,2,all"
            ) from None
        if not 1 <= k <= steps:
            raise DDError(
                f"grad steps {k} not in 1..{steps}", hint="raise --steps or lower --grad-steps"
            )
        out.add(k)
    if not out:
        raise DDError("no grad steps given", hint="e.g. --grad-steps 1,2,all")
    return sorted(out)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _finish_setup(bb: Any, det: Any, cond: Any, *, lora_rank: int, **kw: Any) -> TreatSetup:
    det.requires_grad_(False)
    setup = TreatSetup(bb, det, cond, **kw)
    setup.info.update(
        backbone=bb.name,
        denoiser=type(bb.denoiser).__name__,
        denoiser_params=_count(bb.denoiser) - sum(p.numel() for p in setup.lora),
        lora_rank=lora_rank,
        lora_params=sum(p.numel() for p in setup.lora),
        vae_params=_count(bb.vae),
        detector=f"segformer {det.variant} at {det.input_size[0]}x{det.input_size[1]}",
        detector_params=_count(det),
        dtype=str(bb.dtype).replace("torch.", ""),
        steps=kw["steps"],
        batch=kw.get("batch", 1),
    )
    return setup


def _add_lora(bb: Any, rank: int, seed: int) -> None:
    from diffusers.training_utils import cast_training_params

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        bb.add_lora(rank=rank, init="gaussian")
    cast_training_params(bb.denoiser, dtype=torch.float32)  # as dd treat keeps LoRA


def _detector(variant: str, size: int, device: torch.device, dtype: torch.dtype, seed: int):
    from dd.api.plugins import get_host

    return (
        get_host()
        .detectors.get("segformer")
        .load(None, variant=variant, input_size=size, device=device, dtype=dtype, seed=seed)
    )


def bench_backbone(
    backbone: str = "flux",
    *,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    denoiser: dict[str, Any] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """The CPU benchmark model without a LoRA: ``dd.testing.tiny``'s pipeline of ``backbone``
    with its denoiser rebuilt with :data:`BENCH_DENOISERS` (or ``denoiser``) settings, seeded
    random weights; ``(backbone, denoiser settings)``. ``bb.pipe.save_pretrained(DIR)``
    makes it a model folder any command loads (``scripts/compare_bench.py``)."""
    from dd.api.plugins import get_backbone_class
    from dd.testing.tiny import BACKBONES, build_tiny, tiny_defaults

    if backbone not in BENCH_DENOISERS or backbone not in BACKBONES:
        raise DDError(
            f"no benchmark model for backbone {backbone!r}",
            hint=f"use one of {', '.join(BENCH_DENOISERS)}, or --model PATH",
        )
    cls = get_backbone_class(backbone)
    defaults = tiny_defaults(backbone)
    options = {}
    if "max_sequence_length" in defaults:
        options["max_sequence_length"] = defaults["max_sequence_length"]
    settings = {**BENCH_DENOISERS[backbone], **(denoiser or {})}
    with _quiet_libraries(), tempfile.TemporaryDirectory(prefix="dd-bench-") as tmp:
        path = build_tiny(backbone, Path(tmp) / backbone, seed=seed)
        bb = cls.from_pretrained(str(path), device=device, dtype=dtype, **options)
        old = bb.denoiser
        with torch.random.fork_rng(devices=[]), _default_dtype(dtype):
            torch.manual_seed(seed)
            new = type(old).from_config({**dict(old.config), **settings})
    new = new.to(device).eval().requires_grad_(False)
    setattr(bb.pipe, "transformer" if getattr(bb.pipe, "transformer", None) else "unet", new)
    return bb, settings


def tiny_treat_setup(
    backbone: str = "flux",
    *,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    steps: int = 4,
    lora_rank: int = 16,
    detector_variant: str = "small",
    detector_size: int = 64,
    batch: int = 1,
    seed: int = 0,
    denoiser: dict[str, Any] | None = None,
) -> TreatSetup:
    """The CPU benchmark model (:func:`bench_backbone`) with a LoRA and a detector."""
    bb, settings = bench_backbone(
        backbone, device=device, dtype=dtype, seed=seed, denoiser=denoiser
    )
    _add_lora(bb, lora_rank, seed)
    det = _detector(detector_variant, detector_size, device, dtype, seed)
    cond = bb.encode_prompts(["a photo of a cat holding a cup"] * batch)
    setup = _finish_setup(
        bb, det, cond, lora_rank=lora_rank, steps=steps, guidance=None, batch=batch, seed=seed
    )
    setup.info["model"] = f"dd.testing.tiny {backbone} pipeline, denoiser {settings}"
    return setup


def pretrained_treat_setup(
    backbone: str,
    model: str,
    *,
    device: torch.device,
    dtype: torch.dtype,
    steps: int | None = None,
    lora_rank: int = 16,
    detector_variant: str = "b5",
    detector_size: int = 512,
    batch: int = 1,
    seed: int = 0,
) -> TreatSetup:
    """A user's model (folder, single file or hub id) through its backbone plugin, with a
    randomly initialised detector of ``detector_variant`` (weights do not change the cost)."""
    from dd.api.plugins import get_backbone_class

    with _quiet_libraries():
        bb = get_backbone_class(backbone).from_pretrained(model, device=device, dtype=dtype)
    _add_lora(bb, lora_rank, seed)
    det = _detector(detector_variant, detector_size, device, dtype, seed)
    cond = bb.encode_prompts(["a photo of a cat holding a cup"] * batch)
    setup = _finish_setup(
        bb,
        det,
        cond,
        lora_rank=lora_rank,
        steps=steps or bb.default_steps,
        guidance=None,
        batch=batch,
        seed=seed,
    )
    setup.info["model"] = model
    return setup


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """diffusers' and transformers' progress bars and warnings off while models are built."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    saved = [(lib, lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in (dlog, tlog)]
    for lib, _, _ in saved:
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, level, bar in saved:
            lib.set_verbosity(level)
            if bar:
                lib.enable_progress_bar()


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def materialize_(module: torch.nn.Module, device: torch.device, seed: int) -> torch.nn.Module:
    """Allocate a meta-device ``module`` on ``device`` and fill it with seeded random values:
    weights N(0, 1/fan_in), biases 0, one-dimensional weights (norms) 1, ``lora_B`` 0 and
    ``lora_A`` N(0, 1/rank) (peft's gaussian init), batch-norm statistics (0, 1)."""
    module.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if "lora_B" in name or leaf == "bias":
                p.zero_()
            elif "lora_A" in name:
                p.normal_(0.0, 1.0 / p.shape[0], generator=gen)
            elif p.ndim == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, (p[0].numel()) ** -0.5, generator=gen)
        for name, b in module.named_buffers():
            b.fill_(1 if name.endswith("running_var") else 0)
    return module


def full_size_flux_setup(
    *,
    device: torch.device,
    dtype: torch.dtype = torch.bfloat16,
    steps: int = 10,
    lora_rank: int = 16,
    max_sequence_length: int = 256,
    batch: int = 1,
    seed: int = 0,
    transformer: dict[str, Any] | None = None,
    vae: dict[str, Any] | None = None,
    detector_variant: str = "b5",
    detector_size: int = 512,
    quantize: str = "none",
) -> TreatSetup:
    """FLUX.1-dev at full size with random weights: its transformer (about 11.9B parameters)
    and VAE from their real configurations (``transformer``/``vae`` override fields, for tests)
    in ``dtype``, a rank-``lora_rank`` LoRA in float32 and a SegFormer ``detector_variant``.
    ``quantize`` (``int8``, ``fp8``, ``nf4``): the frozen transformer is quantised before the
    LoRA is added, as ``dd treat --quantize`` does (not on the meta device).

    Everything is built on the meta device first; on ``device="meta"`` it stays there (no
    memory: parameter counts and FLOPs only), elsewhere it is allocated there and filled by
    :func:`materialize_`. The text encoders are not built: ``dd treat`` encodes each prompt
    once and caches it, so a step sees only the embeddings, here random ones of FLUX.1-dev's
    shapes (``max_sequence_length`` T5 tokens as the flux-dev preset, pooled CLIP).
    """
    from dd.api.backbones import Conditioning
    from dd.api.plugins import get_host

    FluxBackbone = get_host().backbones.get("flux")  # noqa: N806 - a class
    with _quiet_libraries():  # importing diffusers' pipelines makes transformers warn
        from diffusers import (
            AutoencoderKL,
            FlowMatchEulerDiscreteScheduler,
            FluxPipeline,
            FluxTransformer2DModel,
        )

    t_cfg = {**FLUX_DEV_TRANSFORMER, **(transformer or {})}
    v_cfg = {**FLUX_VAE, **(vae or {})}
    meta = torch.device("meta")
    with meta, _default_dtype(dtype), _quiet_libraries():
        tr = FluxTransformer2DModel(**t_cfg).eval()
        autoencoder = AutoencoderKL(**v_cfg).eval()
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER),
        vae=autoencoder,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=tr,
    )
    bb = FluxBackbone(pipe, device=meta, dtype=dtype, max_sequence_length=max_sequence_length)
    if quantize != "none" and device.type == "meta":
        raise DDError("a quantised FLUX.1-dev needs real weights", hint="use a CUDA device")
    if quantize == "none":
        _add_lora(bb, lora_rank, seed)
    det = _detector(detector_variant, detector_size, meta, dtype, seed)
    if device.type != "meta":
        for i, module in enumerate((tr, autoencoder, det)):
            materialize_(module, device, seed + i)
        bb.device = device
    if quantize != "none":  # quantise the frozen weights, then attach the LoRA
        bb.quantize(quantize)
        _add_lora(bb, lora_rank, seed)
        bb.denoiser.to(device)
    gen = torch.Generator("cpu").manual_seed(seed)
    width = t_cfg["joint_attention_dim"]
    embeds = torch.randn(batch, max_sequence_length, width, generator=gen)
    pooled = torch.randn(batch, t_cfg["pooled_projection_dim"], generator=gen)
    cond = Conditioning({"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}).to(device, dtype)
    setup = _finish_setup(
        bb, det, cond, lora_rank=lora_rank, steps=steps, guidance=3.5, batch=batch, seed=seed
    )
    setup.info["model"] = (
        "FLUX.1-dev transformer and VAE from their real configurations, random weights"
        + (f"; overrides {transformer or {}} {vae or {}}" if transformer or vae else "")
    )
    setup.info["max_sequence_length"] = max_sequence_length
    return setup


def count_flops(fn: Callable[[], object]) -> int:
    """Floating-point operations of ``fn()`` as ``torch.utils.flop_counter`` counts them
    (matrix products, convolutions and attention, forward and backward; 2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def bench_treat(
    setup: TreatSetup,
    *,
    resolutions: Sequence[int],
    grad_steps: Sequence[int],
    modes: Sequence[str] = ("naive", "checkpointed"),
    repeat: int = 3,
    flops: bool = True,
    peak_tflops: float | None = None,
    on_progress: Progress | None = None,
) -> dict[str, Any]:
    """Peak extra memory, time and FLOPs of :func:`treat_step` per resolution, mode and K.

    For each configuration: one warm-up step, ``repeat`` timed steps (median), one step under
    :func:`peak_extra_memory`, one under :func:`count_flops`; LoRA gradients are dropped before
    each. On the meta device only FLOPs are counted. A step that runs out of GPU memory is
    recorded with ``status: "oom"``. ``flop_fraction`` = FLOPs / (time x peak), the peak from
    ``peak_tflops`` or :data:`PEAK_TFLOPS_BF16`.
    """
    bb = setup.backbone
    device = torch.device(bb.device)
    for m in modes:
        if m not in TREAT_MODES:
            raise DDError(f"unknown mode {m!r}", hint=f"use {', '.join(TREAT_MODES)}")
    if peak_tflops is None and device.type == "cuda":
        peak_tflops = peak_tflops_for(torch.cuda.get_device_name(device), bb.dtype)
    meta = device.type == "meta"
    rows: list[dict[str, Any]] = []
    total, done = len(resolutions) * len(modes) * len(grad_steps), 0
    for res in resolutions:
        latents = setup.latents(res)
        for mode in modes:
            set_checkpointing(setup, mode)
            for k in grad_steps:
                row: dict[str, Any] = {"resolution": res, "mode": mode, "grad_steps": k}
                row.update(status="ok", ms=None, peak_mib=None, total_peak_mib=None, flops=None)

                def step(k: int = k, res: int = res, lat: torch.Tensor = latents) -> torch.Tensor:
                    return treat_step(setup, res, k, lat)

                try:
                    if not meta:
                        setup.zero_grad()
                        step()  # warm-up
                        times = []
                        for _ in range(max(1, repeat)):
                            setup.zero_grad()
                            times.append(time_once(step, device))
                        row["ms"] = round(statistics.median(times) * 1e3, 2)
                        setup.zero_grad()
                        extra, peak_total = peak_extra_memory(step, device)
                        row["peak_mib"] = round(extra / 2**20, 2)
                        if peak_total is not None:
                            row["total_peak_mib"] = round(peak_total / 2**20, 1)
                    if flops:
                        setup.zero_grad()
                        row["flops"] = count_flops(step)
                except RuntimeError as err:
                    if not _is_oom(err):
                        raise
                    row["status"] = "oom"
                setup.zero_grad()
                if row["status"] == "oom":
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                if row["flops"] and row["ms"]:
                    achieved = row["flops"] / (row["ms"] / 1e3)
                    row["tflops_per_s"] = round(achieved / 1e12, 3)
                    row["flop_fraction"] = (
                        round(achieved / (peak_tflops * 1e12), 4) if peak_tflops else None
                    )
                rows.append(row)
                done += 1
                if on_progress:
                    on_progress(done, total)
    set_checkpointing(setup, "checkpointed")
    result = {
        "benchmark": "treat",
        **_run_info(device),
        "model": setup.info,
        "repeat": repeat,
        "peak_tflops": peak_tflops,
        "rows": rows,
    }
    result["growth"], result["targets"] = treat_summary(rows)
    return result


def treat_summary(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict]]:
    """Per resolution and mode: peak memory, time and FLOPs at the largest K over the smallest
    K, and the memory each further tracked step adds; target: checkpointed memory growth at
    most 1.15."""
    growth, targets = [], []
    groups: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["resolution"], r["mode"]), []).append(r)
    for (res, mode), rs in groups.items():
        lo, hi = min(rs, key=lambda r: r["grad_steps"]), max(rs, key=lambda r: r["grad_steps"])
        if lo is hi:
            continue

        def ratio(key: str, a: dict = hi, b: dict = lo) -> float | None:
            return round(a[key] / b[key], 3) if a.get(key) and b.get(key) else None

        entry = {
            "resolution": res,
            "mode": mode,
            "k_low": lo["grad_steps"],
            "k_high": hi["grad_steps"],
            "memory": ratio("peak_mib"),
            "time": ratio("ms"),
            "flops": ratio("flops"),
            "mib_per_step": round(
                (hi["peak_mib"] - lo["peak_mib"]) / (hi["grad_steps"] - lo["grad_steps"]), 3
            )
            if hi.get("peak_mib") is not None and lo.get("peak_mib") is not None
            else None,
        }
        growth.append(entry)
        measured = entry["memory"] is not None or "oom" in (lo["status"], hi["status"])
        if mode == "checkpointed" and measured:  # nothing is measured on the meta device
            name = f"{res}²: checkpointed peak memory K={hi['grad_steps']} / K={lo['grad_steps']}"
            targets.append(_target(name, entry["memory"], 1.15, at_most=True))
    return growth, targets


def treat_markdown(result: dict[str, Any]) -> str:
    info = result["model"]
    lines = [
        f"Machine: {describe_machine(result['machine'])}; device {result['device']}; "
        f"peak extra memory ({result['memory_method']}); median of {result['repeat']} steps.",
        f"Model: {info.get('model')}; {info.get('denoiser')} {info.get('denoiser_params', 0):,} "
        f"parameters + LoRA rank {info.get('lora_rank')} ({info.get('lora_params', 0):,}), VAE "
        f"{info.get('vae_params', 0):,}, detector {info.get('detector')} "
        f"({info.get('detector_params', 0):,}); {info.get('dtype')}; "
        f"{info.get('steps')} sampling steps, batch {info.get('batch')}.",
        "",
        "| resolution | mode | K | step ms | peak extra MiB | GFLOP | status |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        gflop = f"{r['flops'] / 1e9:,.1f}" if r.get("flops") else "-"
        ms = f"{r['ms']:.1f}" if r.get("ms") is not None else "-"
        mib = f"{r['peak_mib']:.2f}" if r.get("peak_mib") is not None else "-"
        status = r["status"]
        if r.get("flop_fraction") is not None:
            status += f", {r['flop_fraction']:.1%} of peak FLOP/s"
        lines.append(
            f"| {r['resolution']}² | {r['mode']} | {r['grad_steps']} | {ms} | {mib} | "
            f"{gflop} | {status} |"
        )
    if result["growth"]:
        lines += [
            "",
            "| resolution | mode | K | memory × | MiB per added K | time × | FLOPs × |",
        ]
        lines.append("|---|---|---|---|---|---|---|")
        for g in result["growth"]:
            keys = ("memory", "mib_per_step", "time", "flops")
            cells = [g[k] if g[k] is not None else "-" for k in keys]
            lines.append(
                f"| {g['resolution']}² | {g['mode']} | {g['k_low']} → {g['k_high']} | "
                + " | ".join(str(c) for c in cells)
                + " |"
            )
    return "\n".join(lines)


def treat_panels(result: dict[str, Any]) -> list[Panel]:
    mem: dict[str, list[tuple[float, float]]] = {}
    ms: dict[str, list[tuple[float, float]]] = {}
    for r in result["rows"]:
        label = f"{r['mode']} {r['resolution']}px"
        if r.get("peak_mib") is not None:
            mem.setdefault(label, []).append((r["grad_steps"], r["peak_mib"]))
        if r.get("ms") is not None:
            ms.setdefault(label, []).append((r["grad_steps"], r["ms"]))
    return [
        Panel("treat step: peak extra memory", "K (tracked denoising steps)", "MiB", mem),
        Panel("treat step: time", "K (tracked denoising steps)", "ms", ms),
    ]


# ------------------------------------------------------------------------------------------
# Detect: dd detect against the released per-image loop
# ------------------------------------------------------------------------------------------
def make_images(folder: Path, count: int, size: int, seed: int = 0) -> list[Path]:
    """``count`` seeded ``size``² PNGs in ``folder``: smooth colour fields with faint noise
    (sigma 1% of the range), about as compressible as generated images (~1.5 MB at 1024²)."""
    from PIL import Image

    from dd.runtime.io import save_image_atomic

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    paths = []
    for i in range(count):
        a, b, c = rng.uniform(0, 2 * np.pi, 3)
        base = np.stack(
            [np.sin(6 * xx + a), np.cos(5 * yy + b), np.sin(4 * (xx + yy) + c)], axis=-1
        )
        noise = rng.normal(0, 0.01, (size, size, 3))
        img = ((base * 0.4 + 0.5 + noise).clip(0, 1) * 255).astype(np.uint8)
        path = folder / f"img_{i:04d}.png"
        save_image_atomic(Image.fromarray(img), path)
        paths.append(path)
    return paths


def _released_processor(size: int):
    """``SegformerImageProcessor`` as nvidia/mit-b5 configures it, at ``size`` (without
    torchvision, transformers substitutes its PIL twin, as the released script's 4.x had)."""
    with _quiet_libraries():
        from transformers import SegformerImageProcessor
        from transformers.image_utils import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN
        from transformers.image_utils import IMAGENET_DEFAULT_STD as IMAGENET_STD

        return SegformerImageProcessor(
            do_resize=True,
            size={"height": size, "width": size},
            do_rescale=False,
            do_normalize=True,
            image_mean=list(IMAGENET_MEAN),
            image_std=list(IMAGENET_STD),
            do_reduce_labels=False,
        )


def released_detect(
    paths: Sequence[Path],
    model: torch.nn.Module,
    out: Path,
    *,
    device: torch.device,
    size: int = 512,
) -> list[Path]:
    """The released DiffDoctor detector demo, one image at a time in fp32: ``cv2.imread``,
    ``cv2.resize`` to ``size``² (bilinear), BGR to RGB, ``ToTensor`` (/255), the SegFormer
    image processor (ImageNet normalisation, ``do_rescale=False``), the model, bilinear
    upsampling of the logits to ``size``², sigmoid, a JET heat map blended 0.6 over the resized
    image, ``cv2.imwrite`` of ``result_<name>.png``. ``model`` is the HF SegFormer.

    Two deviations, neither in its favour nor against it: the processor is given the CPU
    tensor (the script moved it to the GPU first and the processor copied it back), and
    outputs go to ``out`` instead of ``asset/output``.
    """
    try:
        import cv2
    except ImportError:
        raise DDError(
            "the released detect loop needs OpenCV (cv2), which is not installed",
            hint="pip install opencv-python-headless (it is in dd's test extra)",
        ) from None

    processor = _released_processor(size)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in paths:
        image = cv2.imread(str(path))
        image = cv2.resize(image, (size, size))
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        shown = image.copy()
        with torch.no_grad():
            tensor = torch.from_numpy(image).permute(2, 0, 1).float().div(255)
            pixels = processor(tensor, return_tensors="pt", do_rescale=False)["pixel_values"]
            logits = model(pixels.to(device)).logits
            logits = torch.nn.functional.interpolate(
                logits, size=pixels.shape[-2:], mode="bilinear", align_corners=False
            )
            probs = torch.sigmoid(logits)
        mask = (probs[0].cpu().numpy().transpose(1, 2, 0) * 255).astype(np.uint8)
        heat = cv2.applyColorMap(mask, cv2.COLORMAP_JET)
        blended = cv2.addWeighted(heat, 0.6, shown, 0.4, 0)
        target = out / f"result_{path.stem}.png"
        cv2.imwrite(str(target), blended)
        written.append(target)
    return written


#: dd detect's default outputs against the released loop on a CPU (issue "dd detect faster
#: than the script it replaces": >= 1.5x with the small detector at 1024², >= 1.0x with b5).
DETECT_TARGET = 1.5


def bench_detect(
    detector: Any,
    *,
    images: int = 32,
    size: int = 1024,
    repeat: int = 3,
    batch_size: int = 8,
    workers: int = 4,
    overlays: bool = True,
    full_size_outputs: bool = False,
    dtype: str = "auto",
    seed: int = 0,
    on_progress: Progress | None = None,
) -> dict[str, Any]:
    """Images per second of ``run_detect`` as a user runs ``dd detect`` by default (working-size
    maps, overlay thumbnails, reports; ``dtype`` ``auto``: bf16 where the device has native
    bf16) and of :func:`released_detect` (fp32, as released) on the same ``images`` synthetic
    ``size``² PNGs and the same weights, alternating ``repeat`` rounds after a warm-up of both
    on two images. ``overlays=False`` leaves out dd's overlays, ``full_size_outputs=True``
    writes full-size PNG maps and overlays (to see what they cost)."""
    import copy

    from dd.data.images import collect_inputs
    from dd.engines.detect import DetectConfig, run_detect
    from dd.runtime.device import resolve_inference_dtype

    if images < 1:
        raise UsageError("--images must be at least 1")
    param = next(detector.parameters())
    device = param.device
    if param.dtype != torch.float32:
        raise DDError("the released approach runs in fp32", hint="load the detector in fp32")
    work = Path(tempfile.mkdtemp(prefix="dd-bench-detect-"))
    try:
        paths = make_images(work / "images", images, size, seed)
        items, _ = collect_inputs([str(work / "images")])
        side = detector.input_size[0]

        def released(tag: str, subset: Sequence[Path]) -> None:
            released_detect(subset, detector.model, work / tag, device=device, size=side)

        ours_dtype = resolve_inference_dtype(dtype, device)
        dd_detector = (
            detector if ours_dtype == param.dtype else copy.deepcopy(detector).to(dtype=ours_dtype)
        )

        def ours(tag: str, subset: list) -> None:
            cfg = DetectConfig(
                out=work / tag,
                batch_size=batch_size,
                workers=workers,
                save_overlays=overlays,
                full_size_outputs=full_size_outputs,
                overwrite=True,
            )
            result = run_detect(subset, dd_detector, cfg)
            if result.failures:
                raise DDError(f"dd detect failed on {result.failures[0]}")

        released("warm-released", paths[:2])
        ours("warm-ours", items[:2])
        runs = (("released", released, paths), ("dd detect", ours, items))
        rows: list[dict[str, Any]] = []
        for r in range(max(1, repeat)):
            for name, fn, subset in runs:
                tag = f"{name.split()[-1]}-{r}"
                seconds = time_once(lambda fn=fn, tag=tag, subset=subset: fn(tag, subset), device)
                rows.append(
                    {
                        "round": r,
                        "approach": name,
                        "seconds": round(seconds, 3),
                        "images_per_s": round(images / seconds, 3),
                    }
                )
                if on_progress:
                    on_progress(len(rows), 2 * max(1, repeat))
        outputs = {
            "released": len(list((work / "released-0").glob("result_*.png"))),
            "dd detect": len(list((work / "detect-0" / "maps").glob("*.png"))),
        }
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    med = {
        name: statistics.median(r["images_per_s"] for r in rows if r["approach"] == name)
        for name in ("released", "dd detect")
    }
    ratio = med["dd detect"] / med["released"]
    return {
        "benchmark": "detect",
        **_run_info(device),
        "detector": detector.describe(),
        "images": images,
        "size": size,
        "batch_size": batch_size,
        "workers": workers,
        "overlays": overlays,
        "full_size_outputs": full_size_outputs,
        "dd_dtype": str(ours_dtype).replace("torch.", ""),
        "repeat": repeat,
        "rows": rows,
        "outputs": outputs,
        "images_per_s": {k: round(v, 3) for k, v in med.items()},
        "speedup": round(ratio, 3),
        "targets": [
            _target("dd detect / released throughput", ratio, DETECT_TARGET, at_most=False)
        ],
    }


def detect_markdown(result: dict[str, Any]) -> str:
    det = result["detector"]
    ips = result["images_per_s"]
    return "\n".join(
        [
            f"Machine: {describe_machine(result['machine'])}; device {result['device']}.",
            f"Detector: segformer {det.get('variant')} at {det.get('input_size')} "
            f"({det.get('weights')}); {result['images']} images of {result['size']}²; "
            f"dd detect with batch {result['batch_size']}, {result['workers']} workers, "
            f"{result.get('dd_dtype', 'float32')}"
            f"{'' if result['overlays'] else ', no overlays'}"
            f"{', full-size outputs' if result.get('full_size_outputs') else ''}; "
            f"median of {result['repeat']} alternating rounds.",
            "",
            "| approach | images/s | speed-up |",
            "|---|---|---|",
            f"| released per-image loop (fp32) | {ips['released']:.2f} | 1.0× |",
            f"| dd detect | {ips['dd detect']:.2f} | {result['speedup']:.2f}× |",
        ]
    )


def detect_panels(result: dict[str, Any]) -> list[Panel]:
    series: dict[str, list[tuple[float, float]]] = {}
    for r in result["rows"]:
        series.setdefault(r["approach"], []).append((r["round"], r["images_per_s"]))
    return [Panel("detect throughput", "round", "images/s", series)]


# ------------------------------------------------------------------------------------------
# dd bench quantize: the frozen denoiser's parameter memory per --quantize mode
# ------------------------------------------------------------------------------------------
#: The mid-size FLUX transformer of ``dd bench quantize``: FLUX.1-dev's config (block
#: structure, joint width 4096) with fewer, narrower blocks (width 1024, 2 double + 4 single:
#: about 0.2B parameters, quantised in seconds on a CPU). Its linear layers hold the same
#: share of the parameters as at full size, which is what the ratios depend on.
QUANT_BENCH_FLUX: dict[str, Any] = {
    **FLUX_DEV_TRANSFORMER,
    "num_layers": 2,
    "num_single_layers": 4,
    "num_attention_heads": 8,
}
#: Targets of issue "Treat fits the GPUs users have": at most this fraction of bf16.
QUANT_TARGETS = {"int8": 0.55, "fp8": 0.55, "nf4": 0.30}
_QUANT_LIBRARIES = {"none": "-", "int8": "optimum-quanto", "fp8": "optimum-quanto",
                    "nf4": "bitsandbytes"}  # fmt: skip


def bench_quantize(
    modes: Sequence[str],
    *,
    config: dict[str, Any] | None = None,
    seed: int = 0,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Build the transformer of ``config`` (default :data:`QUANT_BENCH_FLUX`) in bf16, as
    users load it, and quantise a fresh copy per mode; each row has its parameter bytes
    (:func:`dd.ops.quantize.parameter_bytes`), the ratio to bf16 and the seconds it took."""
    import copy

    from diffusers import FluxTransformer2DModel

    from dd.ops.quantize import check_available, parameter_bytes, quantize_module

    for mode in modes:
        check_available(mode)
    cfg = {**QUANT_BENCH_FLUX, **(config or {})}
    torch.manual_seed(seed)
    with _default_dtype(torch.bfloat16):  # built in bf16, as from_pretrained(torch_dtype=...)
        base = FluxTransformer2DModel(**cfg).eval()
    base.requires_grad_(False)
    n_params = sum(p.numel() for p in base.parameters())
    bf16 = parameter_bytes(base)
    rows = []
    for i, mode in enumerate(modes):
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        quantize_module(model, mode)
        seconds = time.perf_counter() - t0
        size = parameter_bytes(model)
        rows.append(
            {
                "mode": mode,
                "library": _QUANT_LIBRARIES.get(mode, "?"),
                "bytes": size,
                "ratio_to_bf16": size / bf16,
                "seconds": seconds,
            }
        )
        del model
        if on_progress:
            on_progress(i + 1, len(modes))
    targets = [
        _target(
            f"{r['mode']} parameter memory vs bf16",
            round(r["ratio_to_bf16"], 3),
            QUANT_TARGETS[r["mode"]],
            at_most=True,
        )  # fmt: skip
        for r in rows
        if r["mode"] in QUANT_TARGETS
    ]
    return {
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
        "parameters": n_params,
        "bf16_bytes": bf16,
        "rows": rows,
        "targets": targets,
        "machine": _run_info(torch.device("cpu")),
    }


def quantize_markdown(result: dict[str, Any]) -> str:
    lines = [
        f"Frozen FLUX-structured transformer, {result['parameters'] / 1e6:.0f}M parameters "
        f"({result['bf16_bytes'] / 2**20:.0f} MiB in bf16):",
        "",
        "| --quantize | library | parameter memory | vs bf16 | quantise time |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['mode']} | {r['library']} | {r['bytes'] / 2**20:.1f} MiB | "
            f"{r['ratio_to_bf16']:.3f}x | {r['seconds']:.2f} s |"
        )
    return "\n".join(lines) + "\n"


def save_outputs(
    result: dict[str, Any], panels: list, *, json_out: Path | None, plot: Path | None
) -> None:
    """Write a benchmark's result as JSON (atomically) and its panels as a PNG plot, where
    asked (``--json-out``, ``--plot``)."""
    from dd.report.plot import plot_panels
    from dd.runtime.io import atomic_write_text

    if json_out is not None:
        atomic_write_text(json_out, json.dumps(result, indent=2) + "\n")
    if plot is not None:
        plot_panels(panels, plot)
