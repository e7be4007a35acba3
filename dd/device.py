"""Device and dtype selection shared by every command."""

from __future__ import annotations

import torch

from dd.errors import DDError

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
        raise DDError(f"unknown device {name!r}", hint="use auto, cpu, cuda or cuda:N") from None
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
        raise DDError(f"unknown dtype {name!r}", hint="use fp32, bf16 or fp16") from None
