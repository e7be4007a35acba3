"""The backbone API: a diffusion model family the engines can sample from and train.

The treat issue fills in the full contract (prompt encoding, sampling with a gradient
policy, decoding to [0, 1] pixels, the regularisation loss, scheduler operations). The
foundation fixes what every backbone has: a registered ``name``, a one-line
``description`` and a ``from_pretrained`` constructor taking a hub id, a local folder or a
single file.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar


class Backbone(abc.ABC):
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""

    @classmethod
    @abc.abstractmethod
    def from_pretrained(cls, model: str, **options: Any) -> Backbone:
        """Load the model from a hub id, a local diffusers folder or a single file."""
