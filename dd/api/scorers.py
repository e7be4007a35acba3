"""Quality scorers: what guards ``best/`` against collapse (DiffDoctor, Sec. 4.2).

Treating a model against an artifact detector can also lower the detector's confidence by
ruining the images (over-smoothed, washed out): the paper calls it collapse and stops early.
A quality scorer measures the eval images of each treat evaluation and the untreated
model's images at the same prompts and seeds; an evaluation whose quality left its tolerance
cannot become ``best/``, and ``--patience`` such evaluations in a row stop the run.

A scorer is a :class:`QualityScorer` subclass registered through the ``dd_register_scorers``
hook (built-ins: ``detail`` and ``drift`` in ``dd_plugins.scorers``; see docs/plugins.md).
``dd treat --quality NAME[=TOLERANCE]`` turns one on.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import numpy as np

from dd.errors import UsageError


class QualityScorer(abc.ABC):
    """Base class of every quality scorer plugin.

    ``score(images, base, prompts)`` returns one number for a set of eval images (``N x H x
    W x 3`` uint8) given the untreated model's images at the same prompts and seeds
    (``base``, same shape) and the prompts; it is called with ``images is base`` for the
    untreated model's own value. ``within(value, base_value, tolerance)`` says whether
    ``value`` is acceptable against the untreated value.
    """

    #: Registry name (``--quality NAME``).
    name: str = ""
    #: One line for ``dd plugins`` and the docs.
    description: str = ""
    #: Direction: True when larger values are better.
    higher_is_better: bool = True
    #: The tolerance used when ``--quality NAME`` gives none.
    default_tolerance: float = 0.25
    #: How the tolerance reads, for the run's README (e.g. "at least (1 - t) x untreated").
    tolerance_text: str = ""

    def __init__(self, weights: str | None = None, device: str = "cpu"):
        self.weights = weights
        self.device = device

    @abc.abstractmethod
    def score(self, images: np.ndarray, base: np.ndarray, prompts: list[str]) -> float:
        """One number for ``images`` (see the class docstring)."""

    def within(self, value: float, base_value: float, tolerance: float) -> bool:
        """Relative by default: at most ``tolerance`` (a fraction) worse than untreated."""
        if self.higher_is_better:
            return value >= base_value - tolerance * abs(base_value)
        return value <= base_value + tolerance * abs(base_value)

    def limit(self, base_value: float, tolerance: float) -> float:
        """The worst acceptable value (for reports)."""
        if self.higher_is_better:
            return base_value - tolerance * abs(base_value)
        return base_value + tolerance * abs(base_value)


@dataclass
class QualityGuard:
    """The scorers a run uses, with their tolerances."""

    scorers: list[tuple[QualityScorer, float]]

    def measure(self, images: np.ndarray, base: np.ndarray, prompts: list[str]) -> dict[str, float]:
        return {s.name: float(s.score(images, base, prompts)) for s, _ in self.scorers}

    def check(self, quality: dict[str, float], base_quality: dict[str, float]) -> list[str]:
        """The reasons this evaluation is out of tolerance (empty: it is within)."""
        out = []
        for s, tol in self.scorers:
            value, base = quality[s.name], base_quality[s.name]
            if not s.within(value, base, tol):
                word = "below" if s.higher_is_better else "above"
                out.append(
                    f"{s.name} {value:.4g} {word} its limit {s.limit(base, tol):.4g} "
                    f"(untreated {base:.4g}, tolerance {tol:g})"
                )
        return out

    def describe(self) -> list[str]:
        return [
            f"{s.name}: {s.tolerance_text or 'within'} (tolerance {tol:g})"
            for s, tol in self.scorers
        ]


def parse_quality(specs: list[str] | None) -> list[tuple[str, float | None]]:
    """``["detail", "drift=0.1"]`` -> ``[("detail", None), ("drift", 0.1)]``."""
    out: list[tuple[str, float | None]] = []
    for spec in specs or []:
        name, sep, tol = str(spec).partition("=")
        name = name.strip().lower()
        if not name:
            raise UsageError(
                f"bad --quality {spec!r}", hint="NAME or NAME=TOLERANCE, e.g. detail=0.3"
            )
        value = None
        if sep:
            try:
                value = float(tol)
            except ValueError:
                raise UsageError(
                    f"bad --quality tolerance {spec!r}", hint="a number, e.g. detail=0.3"
                ) from None
            if value < 0:
                raise UsageError(f"--quality tolerance must be 0 or more, got {spec!r}")
        if any(n == name for n, _ in out):
            raise UsageError(f"--quality names {name!r} twice")
        out.append((name, value))
    return out
