"""Memory estimates without memory: trace a computation on the meta device and count the
bytes it would allocate.

:class:`PeakTracker` is a ``TorchDispatchMode`` that adds the storage of every tensor an op
creates (views and in-place results share an input's storage and add nothing) and removes
it when that storage is freed (storages' Python objects live as long as the storage, so a
weak reference tells). Its ``peak`` is the peak of the bytes allocated inside the ``with``
block above what existed before, the figure ``dd bench treat`` measures with the profiler
on the CPU (:func:`peak_extra_memory`). On the meta device nothing is allocated and nothing
is computed, so a FLUX.1-dev step at 1024² is traced in seconds on any machine.

:func:`peak_extra_memory` measures a real call: the peak bytes it allocates above what was
allocated when it started. CUDA: the caching allocator's ``max_memory_allocated`` after
``reset_peak_memory_stats``, minus ``memory_allocated`` before (tensor memory only). CPU:
every allocation and free of torch's CPU allocator as ``torch.profiler`` records them
(``profile_memory=True``), replayed in time order; the peak of the running sum (all tensor
storage, including buffers native code allocates through torch; a block allocated before
the call and freed during it is not reported, so the figure can only err high). The
process's resident set is no substitute inside one long process: glibc serves new buffers
from heap memory that is already resident.

:func:`fused_attention` makes ``scaled_dot_product_attention`` take the fused (flash)
kernel while tracing: on the meta device PyTorch would pick the math path, which keeps the
attention matrix and overstates what a GPU (or the CPU's flash kernel) uses.
"""

from __future__ import annotations

import contextlib
import os
import sys
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["PeakTracker", "fused_attention", "peak_extra_memory", "sync", "tensor_bytes"]


class PeakTracker(TorchDispatchMode):
    """``with PeakTracker() as t: fn()`` then ``t.peak`` (bytes); ``t.live`` is what is
    still allocated at the end (e.g. gradients)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if _is_tensor(t)}
        for t in tree_leaves(out):
            if not _is_tensor(t):
                continue
            storage = t.untyped_storage()
            if storage._cdata in inputs or storage in self._seen:
                continue
            nbytes = int(storage.nbytes())
            self._seen[storage] = nbytes
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, nbytes)
        return out


def _is_tensor(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and not t.is_sparse


@contextlib.contextmanager
def fused_attention() -> Iterator[None]:
    """``F.scaled_dot_product_attention`` through the fused flash kernel (unmasked, no
    dropout; others as they are) while tracing on the meta device."""
    import torch.nn.functional as F

    real = F.scaled_dot_product_attention

    def flash(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
              enable_gqa=False):  # fmt: skip
        if attn_mask is None and dropout_p == 0.0 and not enable_gqa and query.is_meta:
            op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
            return op(query, key, value, dropout_p, is_causal, scale=scale)[0]
        return real(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                    is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)  # fmt: skip

    F.scaled_dot_product_attention = flash
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real


def tensor_bytes(tensors: Any) -> int:
    """Bytes of distinct storages among ``tensors`` (parameters, buffers, state)."""
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if not _is_tensor(t):
            continue
        key = t.untyped_storage()._cdata
        if key not in seen:
            seen.add(key)
            total += int(t.untyped_storage().nbytes())
    return total


# -- measuring a real call --------------------------------------------------------------
def sync(device: torch.device) -> None:
    """Wait for the device (CUDA) to finish its queued work; nothing elsewhere."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Point file descriptor 2 at /dev/null (restored after)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _allocator_peak(fn: Callable[[], object]) -> int:
    """Peak of the running sum of torch's CPU allocations and frees during ``fn()``.

    Runs with stderr silenced: kineto prints a line at every profiler start and stop, and
    torch logs a warning for every 1000th free of a block allocated before profiling. The
    benchmarks only measure calls they have already run unprofiled, whose warnings were shown.
    """
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():
        prof.start()
        try:
            fn()
        finally:
            prof.stop()
    events = [
        e
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")
    ]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def peak_extra_memory(fn: Callable[[], object], device: torch.device) -> tuple[int, int | None]:
    """``(extra, total)``: the peak bytes ``fn()`` allocates above what was allocated before
    it, and on CUDA the allocator's total at that peak (``None`` on CPU). See the module
    docstring for what is counted."""
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        total = torch.cuda.max_memory_allocated(device)
        return total - base, total
    return _allocator_peak(fn), None
