"""Hook specifications: the whole plugin API of dd.

Every hook is a ``register_*``-style function. A plugin module implements any of them with
``@dd.hookimpl`` and is announced through the ``dd`` entry-point group::

    [project.entry-points.dd]
    my_plugin = "my_package.my_module"

Each hook is documented under its exact signature in ``docs/plugins.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("dd")
hookimpl = pluggy.HookimplMarker("dd")


@hookspec
def dd_register_detectors(register: Callable[..., Any]) -> None:
    """Register artifact detectors.

    Call ``register(detector_class, name=None, aliases=())`` once per detector. The class
    must subclass :class:`dd.api.detectors.Detector`; ``name`` defaults to its ``name`` attribute.
    """


@hookspec
def dd_register_backbones(register: Callable[..., Any]) -> None:
    """Register diffusion backbones.

    Call ``register(backbone_class, name=None, aliases=())`` once per backbone. The class
    must subclass :class:`dd.api.backbones.Backbone`; ``name`` defaults to its ``name`` attribute.
    """


@hookspec
def dd_register_scorers(register: Callable[..., Any]) -> None:
    """Register quality scorers (what guards ``dd treat``'s ``best/`` against collapse).

    Call ``register(scorer_class, name=None, aliases=())`` once per scorer. The class must
    subclass :class:`dd.api.scorers.QualityScorer`; ``name`` defaults to its ``name`` attribute.
    """


@hookspec
def dd_register_commands(app: Any) -> None:
    """Add commands to the ``dd`` command line.

    ``app`` is the root :class:`typer.Typer`; add commands with ``@app.command()`` or
    sub-apps with ``app.add_typer(sub_app, name=...)``. A command name that already
    exists is an error naming both plugins.
    """
