"""An example dd plugin: a detector, a backbone (AuraFlow) and a command, registered through
dd's hooks from this package's ``dd`` entry point."""

from __future__ import annotations

from typing import Any

import torch

from dd.api.detectors import Detector
from dd.api.hookspecs import hookimpl


class ClippingDetector(Detector):
    """Flags blown-out (near white) and crushed (near black) pixels."""

    name = "clipping"
    description = "Flags blown-out and crushed pixels (example plugin; no weights)."

    def __init__(self, low: float = 0.02, high: float = 0.98, sharpness: float = 200.0):
        super().__init__()
        self.low, self.high, self.sharpness = low, high, sharpness
        # A buffer gives the module a device and dtype like a real detector.
        self.register_buffer("luma", torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1))
        self.source = "built in (no weights)"

    @classmethod
    def load(cls, weights=None, *, device="cpu", dtype=torch.float32, **options: Any):
        return cls(**options).to(device=device, dtype=dtype).eval()

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        y = (images * self.luma.to(images.dtype)).sum(1, keepdim=True)
        hi = torch.sigmoid(self.sharpness * (y - self.high))
        lo = torch.sigmoid(self.sharpness * (self.low - y))
        p = (hi + lo).clamp(1e-6, 1 - 1e-6)
        return torch.log(p) - torch.log1p(-p)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "low": self.low, "high": self.high}


@hookimpl
def dd_register_detectors(register):
    register(ClippingDetector)


@hookimpl
def dd_register_backbones(register):
    from dd_example_plugin.auraflow import AuraFlowBackbone

    register(AuraFlowBackbone)


@hookimpl
def dd_register_commands(app):
    @app.command("clipping-info")
    def clipping_info() -> None:
        """Print the clipping detector's default thresholds."""
        d = ClippingDetector()
        print(f"clipping detector: low={d.low} high={d.high} sharpness={d.sharpness}")
