"""Device and dtype selection shared by every command."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dd.errors import DDError, UsageError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; an explicit device must exist."""
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}", hint="use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DDError(
                "--device cuda was asked for, but this torch has no usable CUDA device",
                hint="use --device cpu, or install a CUDA build of torch",
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DDError(f"no such GPU: {name} ({torch.cuda.device_count()} visible)")
    if dev.type == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise DDError("--device mps was asked for, but MPS is not available here")
    return dev


def resolve_dtype(name: str = "fp32") -> torch.dtype:
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise UsageError(f"unknown dtype {name!r}", hint="use fp32, bf16 or fp16") from None


def fast_bf16(device: torch.device) -> bool:
    """True where bf16 inference is fast and native: a CUDA GPU that supports bf16, or a
    CPU with AMX-BF16 or AVX512-BF16 (there oneDNN runs bf16 convolutions and matmuls
    about twice as fast as fp32: docs/performance.md, "Detect throughput")."""
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


def resolve_inference_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 where :func:`fast_bf16`, else fp32; otherwise :func:`resolve_dtype`."""
    if (name or "").lower() == "auto":
        return torch.bfloat16 if fast_bf16(device) else torch.float32
    return resolve_dtype(name)


def check_training_device(device: str, dtype: str) -> None:
    """Refuses ``--dtype fp16`` on the CPU and ``--device cuda`` without CUDA (training)."""
    on_cpu = device == "cpu" or not torch.cuda.is_available()
    if dtype == "fp16" and on_cpu:
        raise DDError(
            "--dtype fp16 needs a GPU (CPU autocast supports bf16 only)",
            hint="use --dtype bf16 or fp32 on the CPU",
        )
    if device == "cuda" and not torch.cuda.is_available():
        raise DDError(
            "--device cuda was asked for, but this torch has no usable CUDA device",
            hint="use --device cpu, or install a CUDA build of torch",
        )


def make_accelerator(
    device: str, mixed_precision: str, grad_accum: int, hint: str | None = None
) -> Any:
    """An ``accelerate.Accelerator`` for a training engine (the engines seed and step the
    scheduler themselves); a setup error becomes a DDError with ``hint``."""
    from accelerate import Accelerator

    try:
        return Accelerator(
            cpu=device == "cpu",
            mixed_precision=mixed_precision,
            gradient_accumulation_steps=grad_accum,
            step_scheduler_with_optimizer=False,
            rng_types=[],
        )
    except (ValueError, RuntimeError) as e:
        raise DDError(f"cannot set up accelerate: {e}", hint=hint) from None


def run_accelerated(make_runner: Callable[[], Any]) -> Any:
    """``make_runner().run()`` for a training engine whose runner sets up accelerate (and
    has a ``world`` size). accelerate keeps its settings in process-wide singletons: a run
    that created them resets them afterwards (single process), so that the next run in this
    process may choose other settings."""
    from accelerate.state import AcceleratorState, GradientState

    ours = not AcceleratorState._shared_state
    runner = None
    try:
        runner = make_runner()
        return runner.run()
    finally:
        if ours and (runner is None or runner.world == 1):
            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()
