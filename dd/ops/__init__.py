"""Fused ops with native (C++/CUDA) and Triton kernels, and the PyTorch reference they match.

``artifact_confidence_loss`` is the detector-map loss of the treat engine: upsample
low-resolution logits, sigmoid, reduce per image, in one pass forward and backward
(detector training computes its MSE/BCE on maps eagerly, in ``dd.engines.train_detector``).
See :mod:`dd.ops.dispatch` for how a kernel is chosen, :mod:`dd.ops.build` for how the
native op is built (``python -m dd.ops.build`` builds it now), and docs/performance.md
for the measurements behind the defaults.

Names are imported on first access, so ``python -m dd.ops.build`` runs without the op
registration of :mod:`dd.ops.dispatch` having happened first.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "KERNELS": "dd.ops.dispatch",
    "artifact_confidence_loss": "dd.ops.dispatch",
    "kernel_rows": "dd.ops.dispatch",
    "select_kernel": "dd.ops.dispatch",
    "REDUCTIONS": "dd.ops.reference",
    "artifact_confidence_loss_reference": "dd.ops.reference",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dd.ops' has no attribute {name!r}")
