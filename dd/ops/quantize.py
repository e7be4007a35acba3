"""A quantised frozen denoiser and an 8-bit optimizer: training a LoRA on the GPUs users have.

FLUX.1's transformer holds 12B parameters, 24 GB in bf16 before one activation. As the LoRA
trainers people use on 24-48 GB cards do (QLoRA), ``--quantize`` stores the *frozen*
denoiser's linear weights in fewer bits after it is loaded and before the LoRA is attached;
the LoRA stays in float32 and gradients flow through the quantised layers into it.

====== ================ ===============================================================
mode   library          what it does
====== ================ ===============================================================
none                    the denoiser as loaded (``--dtype``)
int8   optimum-quanto   ``quantize(weights=qint8)`` + ``freeze``: int8 weights, per-channel
                        scales; about 0.5x bf16
fp8    optimum-quanto   ``quantize(weights=qfloat8)`` + ``freeze``: float8 e4m3 weights
nf4    bitsandbytes     every ``nn.Linear`` becomes ``Linear4bit(quant_type="nf4")`` (the
                        QLoRA format): about 0.27x bf16
====== ================ ===============================================================

Only the denoiser is quantised (the VAE and text encoders are frozen and run without
gradients, or once per prompt); embeddings and norms keep their dtype. A quantised
denoiser is never cast to another dtype afterwards (both libraries refuse or break on it):
:meth:`dd.api.backbones.Backbone.to` moves it between devices only.

``--optimizer adamw8bit`` is bitsandbytes' ``AdamW8bit`` (8-bit optimizer states).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import Any

import torch

from dd.errors import DDError

QUANTIZE_MODES = ("none", "int8", "fp8", "nf4")
OPTIMIZERS = ("adamw", "adamw8bit")
#: The help of ``--quantize`` and ``--optimizer`` on every training command.
QUANTIZE_HELP = (
    "none, or store the frozen denoiser's weights as int8 or fp8 (optimum-quanto) or nf4 "
    "(bitsandbytes, QLoRA) under the LoRA: about 0.5x / 0.5x / 0.27x its bf16 memory."
)
OPTIMIZER_HELP = "adamw, or adamw8bit (bitsandbytes: 8-bit optimizer states)."

#: mode -> (importable module, pip package)
_LIBRARIES = {
    "int8": ("optimum.quanto", "optimum-quanto"),
    "fp8": ("optimum.quanto", "optimum-quanto"),
    "nf4": ("bitsandbytes", "bitsandbytes"),
    "adamw8bit": ("bitsandbytes", "bitsandbytes"),
}


def _require(what: str, flag: str) -> Any:
    module, package = _LIBRARIES[what]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DDError(
            f"{flag} {what} needs the {package} package, which is not installed",
            hint=f"pip install {package}  (or pip install 'dd-doctor[quant]')",
        ) from None


def check_available(mode: str, optimizer: str = "adamw") -> None:
    """One-line errors for a mode or optimizer whose library is missing, checked before
    any model loads."""
    if mode != "none":
        _require(mode, "--quantize")
    if optimizer != "adamw":
        _require(optimizer, "--optimizer")


def quantize_module(module: torch.nn.Module, mode: str) -> torch.nn.Module:
    """Quantise the linear weights of ``module`` (frozen, in place) to ``mode``."""
    if mode == "none":
        return module
    if mode not in QUANTIZE_MODES:
        raise DDError(f"unknown --quantize {mode!r}", hint=f"one of {', '.join(QUANTIZE_MODES)}")
    module.requires_grad_(False)
    if mode in ("int8", "fp8"):
        quanto = _require(mode, "--quantize")
        weights = quanto.qint8 if mode == "int8" else quanto.qfloat8
        quanto.quantize(module, weights=weights)
        quanto.freeze(module)
    else:
        _swap_linear_nf4(module, _require(mode, "--quantize"))
    return module


def _swap_linear_nf4(module: torch.nn.Module, bnb: Any) -> None:
    """Every ``nn.Linear`` below ``module`` as a bitsandbytes ``Linear4bit`` (NF4, computing
    in the original weight's dtype), quantised on the weight's device."""
    for name, child in list(module.named_children()):
        if type(child) is torch.nn.Linear:
            w = child.weight
            new = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                compute_dtype=w.dtype,
                quant_type="nf4",
                device="meta",
            )
            new.weight = bnb.nn.Params4bit(w.data, requires_grad=False, quant_type="nf4")
            if child.bias is not None:
                new.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            # On CPUs with AVX512-BF16, bitsandbytes repacks the weight in place the first
            # time the layer runs in eval mode without grad (inference only, and only for
            # widths divisible by 64); a LoRA trainer alternates eval and training passes,
            # so keep the one format both use.
            new.support_avx512bf16_for_cpu = False
            setattr(module, name, new.to(w.device))  # .to() quantises the weight
        else:
            _swap_linear_nf4(child, bnb)


def quantized_mode(module: torch.nn.Module) -> str:
    """The mode ``module``'s linear layers are stored in (``none`` if unquantised)."""
    for m in module.modules():
        cls = type(m).__name__
        if cls == "Linear4bit":
            return "nf4"
        if cls == "QLinear":
            qtype = str(getattr(m, "weight_qtype", ""))
            return "fp8" if "float8" in qtype else "int8"
    return "none"


def parameter_bytes(module: torch.nn.Module) -> int:
    """Bytes the parameters and buffers of ``module`` hold, counting quantised weights by
    their stored data and scales (quanto) or packed data and block scales (bitsandbytes)."""
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        total += _tensor_bytes(t)
    return total


def _tensor_bytes(t: torch.Tensor) -> int:
    parts = [getattr(t, a, None) for a in ("_data", "_scale", "_shift")]
    if any(p is not None for p in parts):  # a quanto QTensor
        return sum(_tensor_bytes(p) for p in parts if isinstance(p, torch.Tensor))
    n = t.numel() * t.element_size()
    state = getattr(t, "quant_state", None)  # a bitsandbytes Params4bit
    if state is not None:
        for extra in (getattr(state, "absmax", None), getattr(state, "code", None)):
            if isinstance(extra, torch.Tensor):
                n += extra.numel() * extra.element_size()
    return n


def quantize_backbone(bb: Any, mode: str, log: Any | None = None) -> None:
    """The one step every training command takes after loading: quantise ``bb``'s frozen
    denoiser to ``mode`` (nothing for ``none``) and say what it saved through ``log``."""
    if mode == "none":
        return
    mem = bb.quantize(mode)
    if log is not None:
        log(
            f"--quantize {mode}: the frozen {type(bb.denoiser).__name__} holds "
            f"{_size(mem['after'])} of parameters ({mem['after'] / mem['before']:.2f}x "
            f"the {_size(mem['before'])} it was loaded with)"
        )


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 2**10:.1f} KiB"


def make_optimizer(
    name: str,
    params: Iterable[torch.nn.Parameter],
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """AdamW (torch) or AdamW8bit (bitsandbytes: 8-bit moments) over ``params``."""
    params = list(params)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)
    if name == "adamw8bit":
        bnb = _require(name, "--optimizer")
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)
    raise DDError(f"unknown --optimizer {name!r}", hint=f"one of {', '.join(OPTIMIZERS)}")
