"""Experiment trackers for the training commands: ``--report-to none|tensorboard|wandb``.

Every training run already writes ``metrics.jsonl`` and ``curves.png``; a tracker sends the
same records live to TensorBoard (``OUT/tensorboard/``) or Weights & Biases (offline with
``WANDB_MODE=offline``), through accelerate's tracker classes. One :class:`RunTracker` per
run, on the main process: ``record(rec)`` takes a ``metrics.jsonl`` record (``type`` train,
eval, val, ...; numbers become scalars ``TYPE/KEY``, a nested dict such as ``quality``
becomes ``KEY/NAME``), ``image(tag, array, step)`` an ``H x W x 3`` uint8 picture (the
before/after grids).
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path
from typing import Any

from dd.errors import DDError, UsageError

REPORT_TO = ("none", "tensorboard", "wandb")
REPORT_TO_HELP = (
    "Also send losses, learning rate, eval metrics and grids to tensorboard (OUT/tensorboard) "
    "or wandb (offline: WANDB_MODE=offline), through accelerate's trackers."
)
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}
#: Record fields that are not metrics.
_SKIP = {"type", "step", "best"}


def check_report_to(kind: str) -> None:
    """Usage and install errors for ``--report-to``, before anything loads."""
    if kind not in REPORT_TO:
        raise UsageError(f"unknown --report-to {kind!r}", hint=f"one of {', '.join(REPORT_TO)}")
    if kind != "none" and importlib.util.find_spec(_PACKAGES[kind]) is None:
        raise DDError(
            f"--report-to {kind} needs the {_PACKAGES[kind]} package, which is not installed",
            hint=f"pip install {_PACKAGES[kind]}",
        )


class RunTracker:
    """The run's tracker (a no-op for ``none`` and on processes other than the main one)."""

    def __init__(
        self, kind: str, out: str | os.PathLike, run_name: str, *, step: int = 0, main: bool = True
    ):
        self.kind = kind
        self._t: Any = None
        if kind == "none" or not main:
            return
        check_report_to(kind)
        from accelerate import PartialState
        from accelerate.tracking import TensorBoardTracker, WandBTracker

        PartialState()  # the trackers log through accelerate, which needs its state

        if kind == "tensorboard":
            # A resumed run drops what the killed one logged after its checkpoint.
            self._t = TensorBoardTracker(run_name, str(Path(out) / "tensorboard"),
                                         purge_step=step or None)  # fmt: skip
        else:
            self._t = WandBTracker(run_name, dir=str(out), resume="allow")
        self._t.start()

    @property
    def active(self) -> bool:
        return self._t is not None

    @property
    def logging_dir(self) -> Path | None:
        return Path(self._t.logging_dir) if self.kind == "tensorboard" and self._t else None

    def record(self, rec: dict[str, Any]) -> None:
        """Send one ``metrics.jsonl`` record's numbers (see the module docstring)."""
        if self._t is None or "step" not in rec:
            return
        kind = str(rec.get("type", "log"))
        values: dict[str, float] = {}
        for key, value in rec.items():
            if key in _SKIP:
                continue
            if isinstance(value, dict):
                for name, v in value.items():
                    if _number(v):
                        values[f"{key}/{name}"] = float(v)
            elif _number(value):
                values[f"{kind}/{key}"] = float(value)
        if values:
            self._t.log(values, step=int(rec["step"]))

    def image(self, tag: str, image: Any, step: int) -> None:
        """An ``H x W x 3`` uint8 picture."""
        if self._t is None:
            return
        import numpy as np

        array = np.asarray(image)
        if self.kind == "tensorboard":
            self._t.log_images({tag: array[None]}, step=step, dataformats="NHWC")
        else:
            self._t.log_images({tag: [array]}, step=step)

    def close(self) -> None:
        if self._t is not None:
            self._t.finish()
            self._t = None


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
