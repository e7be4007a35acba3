"""Triton kernels of the fused artifact-confidence op (forward and backward).

Same algorithm as the CUDA op in ``csrc/``: each program handles ``BLOCK`` output pixels of
one image, samples them from their four source logits (``F.interpolate`` bilinear,
``align_corners=False``, edge clamping), applies the sigmoid and reduces; the forward writes
one partial per program, combined per image on the host in a fixed order; the backward
recomputes each pixel and scatters its gradient to the four source logits with atomic adds.

Importing this module needs ``triton``. With ``TRITON_INTERPRET=1`` set before the first
import, the kernels run on CPU tensors through Triton's interpreter (used by the tests).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

REDUCTION_CODES = {"mean": 0, "max": 1, "sum": 2, "weighted": 3}
BLOCK = 1024


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Reductions use tl.reduce with combine functions of this module rather than tl.sum / tl.max /
# tl.argmax: those are jit functions fixed when triton itself is imported (torch imports it
# early), so they only run under the interpreter if TRITON_INTERPRET=1 was set before that.
@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _max_first(v1, i1, v2, i2):
    """The larger value; on a tie the smaller index (the first pixel in row-major order)."""
    take1 = (v1 > v2) | ((v1 == v2) & (i1 < i2))
    return tl.where(take1, v1, v2), tl.where(take1, i1, i2)


@triton.jit
def _taps(o, in_size, out_size, ACC: tl.constexpr):
    """Source taps and weights of output indices ``o`` along one axis (ATen's rule)."""
    scale = in_size.to(ACC) / out_size.to(ACC)
    src = (o.to(ACC) + 0.5) * scale - 0.5
    src = tl.maximum(src, 0.0)
    i0 = tl.minimum(src.to(tl.int32), in_size - 1)  # src >= 0: truncation is floor
    lam = tl.minimum(tl.maximum(src - i0.to(ACC), 0.0), 1.0)
    i1 = i0 + (i0 < in_size - 1).to(tl.int32)
    same = in_size == out_size  # equal sizes copy
    i0 = tl.where(same, o, i0)
    i1 = tl.where(same, o, i1)
    lam = tl.where(same, 0.0, lam)
    return i0, i1, 1.0 - lam, lam


@triton.jit
def _sample(x_ptr, offs, valid, h, w, H, W, ACC: tl.constexpr):
    i = offs // W
    j = offs % W
    r0, r1, la, lc = _taps(i, h, H, ACC)
    c0, c1, l0, l1 = _taps(j, w, W, ACC)
    x00 = tl.load(x_ptr + r0 * w + c0, mask=valid, other=0.0).to(ACC)
    x01 = tl.load(x_ptr + r0 * w + c1, mask=valid, other=0.0).to(ACC)
    x10 = tl.load(x_ptr + r1 * w + c0, mask=valid, other=0.0).to(ACC)
    x11 = tl.load(x_ptr + r1 * w + c1, mask=valid, other=0.0).to(ACC)
    v = la * (l0 * x00 + l1 * x01) + lc * (l0 * x10 + l1 * x11)
    p = 1.0 / (1.0 + tl.exp(-v))
    return p, r0, r1, c0, c1, la, lc, l0, l1


# Sizes are never specialised: Triton would turn a size of 1 into a constant.
@triton.jit(do_not_specialize=["h", "w", "H", "W", "nblocks"])
def _forward_kernel(
    x_ptr,
    t_ptr,
    w_ptr,
    psum_ptr,
    pcnt_ptr,
    parg_ptr,
    h,
    w,
    H,
    W,
    thr,
    nblocks,
    # Deliberate copy: one Triton kernel per pass (forward partials here, backward below) with the
    # same constexpr flags.
    HAS_T: tl.constexpr,
    HAS_W: tl.constexpr,
    RED: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1)
    npix = H * W
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    valid = offs < npix
    p, r0, r1, c0, c1, la, lc, l0, l1 = _sample(x_ptr + b * h * w, offs, valid, h, w, H, W, ACC)
    f = p
    if HAS_T:
        d = p - tl.load(t_ptr + b * npix + offs, mask=valid, other=0.0).to(ACC)
        f = d * d
    if HAS_W:
        f = f * tl.load(w_ptr + b * npix + offs, mask=valid, other=0.0).to(ACC)
    out = b * nblocks + pid
    if RED == 1:
        best, arg = tl.reduce((tl.where(valid, f, float("-inf")), offs), 0, _max_first)
        tl.store(psum_ptr + out, best)
        tl.store(parg_ptr + out, arg.to(tl.int64))
    elif RED == 3:
        m = valid & (p > thr)
        tl.store(psum_ptr + out, tl.reduce(tl.where(m, f, 0.0), 0, _add))
        tl.store(pcnt_ptr + out, tl.reduce(m.to(tl.int32), 0, _add))
    else:
        tl.store(psum_ptr + out, tl.reduce(tl.where(valid, f, 0.0), 0, _add))


@triton.jit(do_not_specialize=["h", "w", "H", "W"])
def _backward_kernel(
    x_ptr,
    t_ptr,
    w_ptr,
    g_ptr,
    aux_ptr,
    gx_ptr,
    h,
    w,
    H,
    W,
    thr,
    # Deliberate copy: the backward kernel's parameters mirror the forward's.
    HAS_T: tl.constexpr,
    HAS_W: tl.constexpr,
    RED: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1)
    npix = H * W
    lane = tl.arange(0, BLOCK)
    d = tl.load(g_ptr + b).to(ACC)
    if RED == 1:  # max: one program per image, its first lane is the argmax pixel
        offs = tl.load(aux_ptr + b).to(tl.int32) + lane
        valid = lane == 0
    else:
        offs = pid * BLOCK + lane
        valid = offs < npix
    p, r0, r1, c0, c1, la, lc, l0, l1 = _sample(x_ptr + b * h * w, offs, valid, h, w, H, W, ACC)
    if RED == 0:
        d = d / npix.to(ACC)
    if RED == 3:
        d = d / tl.maximum(tl.load(aux_ptr + b), 1).to(ACC)
        valid = valid & (p > thr)
    if HAS_W:
        d = d * tl.load(w_ptr + b * npix + offs, mask=valid, other=0.0).to(ACC)
    if HAS_T:
        d = d * (2.0 * (p - tl.load(t_ptr + b * npix + offs, mask=valid, other=0.0).to(ACC)))
    gp = tl.where(valid, d * (1.0 - p) * p, 0.0)
    base = gx_ptr + b * h * w
    tl.atomic_add(base + r0 * w + c0, la * l0 * gp, mask=valid)
    tl.atomic_add(base + r0 * w + c1, la * l1 * gp, mask=valid)
    tl.atomic_add(base + r1 * w + c0, lc * l0 * gp, mask=valid)
    tl.atomic_add(base + r1 * w + c1, lc * l1 * gp, mask=valid)


def _acc_dtype(dtype: torch.dtype) -> tuple[torch.dtype, tl.dtype]:
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


# Deliberate copy: every backend's forward takes the arguments of dispatch._fused_forward
# (the dispatch calls each backend the same way).
def forward(
    logits: torch.Tensor,
    out_size: tuple[int, int],
    reduction: str,
    target: torch.Tensor | None,
    weight: torch.Tensor | None,
    threshold: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image loss (B,) in the logits dtype, and aux (B,) int64 (argmax or count)."""
    B, _, h, w = logits.shape
    H, W = out_size
    red = REDUCTION_CODES[reduction]
    acc, tl_acc = _acc_dtype(logits.dtype)
    nblocks = triton.cdiv(H * W, BLOCK)
    psum = torch.empty(B, nblocks, dtype=acc, device=logits.device)
    pcnt = torch.zeros(B, nblocks, dtype=torch.int32, device=logits.device)
    parg = torch.zeros(B, nblocks, dtype=torch.int64, device=logits.device)
    if B > 0:
        _forward_kernel[(nblocks, B)](
            logits,
            target if target is not None else logits,
            weight if weight is not None else logits,
            psum,
            pcnt,
            parg,
            h,
            w,
            H,
            W,
            threshold,
            nblocks,
            HAS_T=target is not None,
            HAS_W=weight is not None,
            RED=red,
            ACC=tl_acc,
            BLOCK=BLOCK,
        )
    aux = torch.zeros(B, dtype=torch.int64, device=logits.device)
    if reduction == "max":
        best = torch.argmax(psum, dim=1, keepdim=True)  # first maximal block: smallest index
        loss = psum.gather(1, best).squeeze(1)
        aux = parg.gather(1, best).squeeze(1)
    elif reduction == "weighted":
        aux = pcnt.sum(dim=1, dtype=torch.int64)
        loss = psum.sum(dim=1, dtype=torch.float64) / aux.clamp_min(1)
    else:
        loss = psum.sum(dim=1, dtype=torch.float64)
        if reduction == "mean":
            loss = loss / (H * W)
    return loss.to(acc).to(logits.dtype), aux


def backward(
    grad: torch.Tensor,
    logits: torch.Tensor,
    aux: torch.Tensor,
    out_size: tuple[int, int],
    reduction: str,
    target: torch.Tensor | None,
    weight: torch.Tensor | None,
    threshold: float,
) -> torch.Tensor:
    """Gradient of ``sum(grad * loss)`` with respect to the logits."""
    B, _, h, w = logits.shape
    H, W = out_size
    red = REDUCTION_CODES[reduction]
    acc, tl_acc = _acc_dtype(logits.dtype)
    gx = torch.zeros(logits.shape, dtype=acc, device=logits.device)
    if B > 0:
        grid = (1 if red == 1 else triton.cdiv(H * W, BLOCK), B)
        _backward_kernel[grid](
            logits,
            target if target is not None else logits,
            weight if weight is not None else logits,
            grad.to(logits.dtype).contiguous(),
            aux.contiguous(),
            gx,
            h,
            w,
            H,
            W,
            threshold,
            HAS_T=target is not None,
            HAS_W=weight is not None,
            RED=red,
            ACC=tl_acc,
            BLOCK=BLOCK,
        )
    return gx.to(logits.dtype)
