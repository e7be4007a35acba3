"""Test helpers: fake installed distributions with dd entry points."""

from __future__ import annotations

from pathlib import Path


def make_dist(site: Path, name: str, version: str, entry_points: dict[str, str]) -> Path:
    """Create ``NAME-VERSION.dist-info`` in ``site`` declaring ``[dd]`` entry points.

    With ``site`` on ``sys.path`` (or PYTHONPATH), ``importlib.metadata`` sees an installed
    distribution, exactly as after ``pip install``.
    """
    d = site / f"{name.replace('-', '_')}-{version}.dist-info"
    d.mkdir(parents=True)
    (d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = "".join(f"{k} = {v}\n" for k, v in entry_points.items())
    (d / "entry_points.txt").write_text(f"[dd]\n{lines}")
    return d
