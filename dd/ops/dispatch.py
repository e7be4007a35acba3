"""Kernel registry, the ``torch.library`` op, and dispatch of the artifact-confidence loss.

Kernels: ``reference`` (eager PyTorch, :mod:`dd.ops.reference`), ``cpp`` (the C++ CPU op in
``csrc/``), ``cuda`` (the CUDA op in ``csrc/``) and ``triton`` (:mod:`dd.ops.triton_kernels`).
The fused kernels run through one custom op, ``torch.ops.dd.artifact_confidence_loss``, with
a fake (meta) implementation and a registered autograd formula whose backward is a second
custom op, so the op composes with ``torch.compile``.

Choosing a kernel, per call:

- ``DD_KERNEL=reference|cpp|cuda|triton`` (or the ``kernel=`` argument) asks for one: if it
  cannot run this call (not built, wrong device, dtype or shape), a :class:`DDError` says
  why and how to fix it;
- unset or ``auto``: the first kernel of :data:`AUTO_ORDER` for the tensors' device whose
  checks pass; otherwise the reference, with one debug line per reason on the ``dd.ops``
  logger.

Policy: a kernel enters :data:`AUTO_ORDER` only after ``dd bench kernels`` showed it
faster or leaner than the reference on that device in a side-by-side run (the figures are in
``docs/performance.md``). So far the C++ op has, on CPU; the CUDA and Triton kernels have not
been measured on a GPU yet, so they run only when asked for.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from dd.errors import DDError
from dd.ops import build
from dd.ops.reference import artifact_confidence_loss_reference, check_args

log = logging.getLogger("dd.ops")

ENV_VAR = "DD_KERNEL"
KERNELS = ("reference", "cpp", "cuda", "triton")
#: Kernels the automatic choice may pick, per device type, in order (see the module doc).
AUTO_ORDER: dict[str, tuple[str, ...]] = {"cpu": ("cpp",), "cuda": ()}

_NATIVE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class Kernel:
    """One implementation: what it can run, and how to make it available."""

    name: str
    title: str
    dtypes: tuple[torch.dtype, ...]
    devices: Callable[[], tuple[str, ...]]
    unavailable: Callable[[bool], str | None]  # (may build) -> why it cannot run here
    hint: str


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _native_unavailable(build_now: bool) -> str | None:
    if build_now:
        state = build.load_native(build=True)
        return None if state.loaded else state.error
    ok, why = build.native_status()
    return None if ok else why


def _cuda_unavailable(build_now: bool) -> str | None:
    if not torch.cuda.is_available():
        return "torch has no CUDA device here"
    why = build.cuda_toolkit()
    if why is not None:
        return f"the CUDA op cannot be built: {why}"
    why = _native_unavailable(build_now)
    if why is not None:
        return why
    state = build.load_native(build=False)
    if state.loaded and not state.has_cuda:
        return f"the native op in {state.path} was built without its CUDA part"
    return None


def _triton_unavailable(build_now: bool) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'dd-doctor[gpu]')"
    if not torch.cuda.is_available() and not _triton_interpreting():
        return "no CUDA device (TRITON_INTERPRET=1 runs the kernels on CPU, slowly, for tests)"
    return None


REGISTRY: dict[str, Kernel] = {
    k.name: k
    for k in (
        Kernel(
            "reference",
            "reference (PyTorch)",
            (torch.float32, torch.float64, torch.float16, torch.bfloat16),
            lambda: ("cpu", "cuda", "mps", "xpu"),
            lambda build_now: None,
            "",
        ),
        Kernel(
            "cpp",
            "cpp (csrc, CPU)",
            _NATIVE_DTYPES,
            lambda: ("cpu",),
            _native_unavailable,
            build.BUILD_HINT,
        ),
        Kernel(
            "cuda",
            "cuda (csrc)",
            _NATIVE_DTYPES,
            lambda: ("cuda",),
            _cuda_unavailable,
            "needs a CUDA build of torch, a CUDA toolkit (nvcc) and a GPU; then "
            + build.BUILD_HINT,
        ),
        Kernel(
            "triton",
            "triton",
            _NATIVE_DTYPES,
            lambda: ("cuda", "cpu") if _triton_interpreting() else ("cuda",),
            _triton_unavailable,
            "install triton (pip install 'dd-doctor[gpu]') and run on a CUDA device",
        ),
    )
}


@dataclass(frozen=True)
class CallSignature:
    """What kernel selection looks at: plain values, so it can run at torch.compile time."""

    device: str
    dtype: torch.dtype
    pixels: int  # B * max(H * W, h * w)
    const_failure: str | None  # target or weight requiring grad


def _constraint_failure(kernel: Kernel, sig: CallSignature) -> str | None:
    """Why ``kernel`` cannot run a call (device, dtype, shape, constant inputs), or None."""
    if sig.device not in kernel.devices():
        return f"it runs on {'/'.join(kernel.devices())} tensors, not {sig.device}"
    if sig.dtype not in kernel.dtypes:
        return f"it does not take {sig.dtype} logits"
    if kernel.name == "reference":
        return None
    if sig.const_failure is not None:
        return sig.const_failure
    if kernel.name in ("cuda", "triton") and sig.pixels > _INT32_MAX:
        return "B * max(H * W, h * w) exceeds the 32-bit pixel index of the GPU kernels"
    return None


_logged: set[tuple[str, str]] = set()


def _log_fallback(name: str, why: str) -> None:
    if (name, why) not in _logged:
        _logged.add((name, why))
        log.debug(
            "artifact_confidence_loss: %s kernel not used (%s); using the reference", name, why
        )


def select_kernel(
    logits: torch.Tensor,
    out_size: Sequence[int],
    target: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    kernel: str | None = None,
) -> str:
    """The kernel a call with these tensors runs (``kernel`` overrides ``DD_KERNEL``).

    Under ``torch.compile`` the choice is made once, while tracing: a later change of
    ``DD_KERNEL`` applies to new compilations.
    """
    choice = (kernel or os.environ.get(ENV_VAR, "") or "auto").strip().lower()
    failure = None
    for name, t in (("target", target), ("weight", weight)):
        if t is not None and t.requires_grad:
            failure = f"it treats {name} as a constant, but {name} requires grad"
    # the GPU kernels index pixels of the input and of the output with 32-bit integers
    per_image = max(int(out_size[0]) * int(out_size[1]), int(logits.shape[2] * logits.shape[3]))
    pixels = int(logits.shape[0]) * per_image
    # plain values only: dynamo runs _select once while tracing and keeps its answer
    return _select(logits.device.type, logits.dtype, pixels, failure, choice, kernel is not None)


def _constant_under_compile(fn: Callable[..., str]) -> Callable[..., str]:
    """``torch.compiler.assume_constant_result`` without its import of ``torch._dynamo``
    (over a second at every ``import dd.ops``): that decorator only sets this attribute
    (torch 2.x); tests/test_ops.py compiles a call with ``fullgraph=True`` to hold it to it."""
    fn._dynamo_marked_constant = True  # type: ignore[attr-defined]
    return fn


@_constant_under_compile
def _select(
    device: str,
    dtype: torch.dtype,
    pixels: int,
    const_failure: str | None,
    choice: str,
    from_argument: bool,
) -> str:
    sig = CallSignature(device, dtype, pixels, const_failure)
    if choice not in (*KERNELS, "auto"):
        raise DDError(
            f"unknown kernel {choice!r} (from {'kernel=' if from_argument else ENV_VAR})",
            hint="use auto, " + ", ".join(KERNELS),
        )
    if choice == "reference":
        return choice
    if choice != "auto":
        k = REGISTRY[choice]
        why = k.unavailable(True)
        if why is not None:
            raise DDError(f"the {choice} kernel is not available: {why}", hint=k.hint)
        why = _constraint_failure(k, sig)
        if why is not None:
            raise DDError(
                f"the {choice} kernel cannot run this call: {why}",
                hint=f"unset {ENV_VAR} to let dd choose, or use {ENV_VAR}=reference",
            )
        return choice
    for name in AUTO_ORDER.get(sig.device, ()):
        k = REGISTRY[name]
        why = _constraint_failure(k, sig) or k.unavailable(True)
        if why is None:
            return name
        _log_fallback(name, why)
    return "reference"


def kernel_rows() -> list[dict[str, object]]:
    """``dd env`` rows: every kernel, whether it can run here and why not (compiles nothing)."""
    rows: list[dict[str, object]] = []
    for k in REGISTRY.values():
        why = k.unavailable(False)
        note = None
        if why is None and k.name == "cpp":
            note = build.native_status()[1]  # e.g. "compiles on first use into ..."
        auto = [dev for dev, names in AUTO_ORDER.items() if k.name in names]
        if k.name == "reference":
            auto = [dev for dev, names in AUTO_ORDER.items() if not names] + ["fallback"]
        rows.append(
            {
                "name": k.title,
                "available": why is None,
                "reason": why if why is not None else note,
                "default_on": auto,
            }
        )
    return rows


# --- the custom op -----------------------------------------------------------------------


def _fused_forward(
    kernel: str,
    logits: torch.Tensor,
    size: tuple[int, int],
    reduction: str,
    target: torch.Tensor | None,
    weight: torch.Tensor | None,
    threshold: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    if kernel in ("cpp", "cuda"):
        build.require_native()
        return torch.ops.dd_native.acl_forward(
            logits, size[0], size[1], reduction, target, weight, threshold
        )
    if kernel == "triton":
        from dd.ops import triton_kernels

        return triton_kernels.forward(logits, size, reduction, target, weight, threshold)
    raise DDError(f"no fused kernel named {kernel!r}", hint="use cpp, cuda or triton")


# Deliberate copy: the custom op's schema; its backward op below takes the same arguments plus the
# gradient.
@torch.library.custom_op("dd::artifact_confidence_loss", mutates_args=())
def fused_op(
    logits: torch.Tensor,
    out_size: Sequence[int],
    reduction: str,
    target: torch.Tensor | None,
    weight: torch.Tensor | None,
    threshold: float,
    kernel: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused loss: (per-image loss (B,), aux (B,) int64 = argmax for max, count for weighted)."""
    size = (int(out_size[0]), int(out_size[1]))
    return _fused_forward(kernel, logits, size, reduction, target, weight, threshold)


@fused_op.register_fake
def _fused_fake(logits, out_size, reduction, target, weight, threshold, kernel):
    b = logits.shape[0]
    return logits.new_empty((b,)), logits.new_empty((b,), dtype=torch.int64)


# Deliberate copy: the arguments of fused_op above (torch.library needs each op's schema
# spelled out).
@torch.library.custom_op("dd::artifact_confidence_loss_backward", mutates_args=())
def fused_backward_op(
    grad: torch.Tensor,
    logits: torch.Tensor,
    aux: torch.Tensor,
    out_size: Sequence[int],
    reduction: str,
    target: torch.Tensor | None,
    weight: torch.Tensor | None,
    threshold: float,
    kernel: str,
) -> torch.Tensor:
    """Gradient of ``sum(grad * loss)`` with respect to the logits (recomputes every pixel)."""
    size = (int(out_size[0]), int(out_size[1]))
    if kernel in ("cpp", "cuda"):
        build.require_native()
        return torch.ops.dd_native.acl_backward(
            grad, logits, aux, size[0], size[1], reduction, target, weight, threshold
        )
    if kernel == "triton":
        from dd.ops import triton_kernels

        return triton_kernels.backward(
            grad, logits, aux, size, reduction, target, weight, threshold
        )
    raise DDError(f"no fused kernel named {kernel!r}", hint="use cpp, cuda or triton")


@fused_backward_op.register_fake
def _fused_backward_fake(grad, logits, aux, out_size, reduction, target, weight, threshold, kernel):
    return torch.empty_like(logits)


def _setup_context(ctx, inputs, output) -> None:
    logits, out_size, reduction, target, weight, threshold, kernel = inputs
    ctx.save_for_backward(logits, output[1], target, weight)
    ctx.args = (list(out_size), reduction, threshold, kernel)


def _backward(ctx, grad_loss, grad_aux):
    logits, aux, target, weight = ctx.saved_tensors
    if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
        raise DDError(
            "the fused artifact_confidence_loss treats target and weight as constants",
            hint="detach them, or use DD_KERNEL=reference to differentiate through them",
        )
    grad = None
    if ctx.needs_input_grad[0]:
        out_size, reduction, threshold, kernel = ctx.args
        grad = fused_backward_op(
            grad_loss, logits, aux, out_size, reduction, target, weight, threshold, kernel
        )
    return grad, None, None, None, None, None, None


fused_op.register_autograd(_backward, setup_context=_setup_context)


# Deliberate copy: the public op keeps the reference's signature (dd/ops/reference.py) so either can
# stand in for the other.
def artifact_confidence_loss(
    logits: torch.Tensor,
    out_size: Sequence[int],
    reduction: str = "mean",
    target: torch.Tensor | None = None,
    threshold: float = 0.1,
    weight: torch.Tensor | None = None,
    *,
    kernel: str | None = None,
) -> torch.Tensor:
    """Per-image artifact-confidence loss (B,) from low-resolution detector logits.

    Bilinearly upsamples ``logits`` (B x 1 x h x w) to ``out_size`` = (H, W) exactly as
    ``F.interpolate(mode="bilinear", align_corners=False)``, applies the sigmoid and reduces
    each image: ``mean``, ``sum``, ``max`` or ``weighted`` (mean over pixels with
    p > ``threshold``, 0 if none) of p, or of (p - target)^2 when ``target`` (B x 1 x H x W)
    is given (``mean`` is then the MSE of detector training), each pixel times ``weight``
    when given. Returns one value per image; mean over the batch yourself.

    The fused kernels never store the full-resolution map: forward and backward recompute
    each output pixel from its four source logits. ``target`` and ``weight`` get no gradient
    from them. ``kernel`` (else ``DD_KERNEL``) picks reference/cpp/cuda/triton; see
    :mod:`dd.ops.dispatch` for the automatic choice. The reference
    (:func:`dd.ops.reference.artifact_confidence_loss_reference`) is the spec.
    """
    size = check_args(logits, out_size, reduction, target, weight)
    name = select_kernel(logits, size, target, weight, kernel)
    if name == "reference":
        return artifact_confidence_loss_reference(
            logits, size, reduction, target, threshold, weight
        )
    t = None if target is None else target.to(logits.dtype).contiguous()
    w = None if weight is None else weight.to(logits.dtype).contiguous()
    loss, _ = fused_op(logits.contiguous(), list(size), reduction, t, w, float(threshold), name)
    return loss
