"""The plugin manager: loads built-in and third-party plugins from the ``dd`` entry points.

Built-in plugins (the ``dd_plugins`` package, shipped from ``plugins/``) are declared in
dd's own ``pyproject.toml`` under the same entry-point group a third party uses, so they
take exactly the same path. ``DD_LOAD_PLUGINS=a,b`` limits which *third-party* plugins load
(by entry-point or distribution name; an empty value loads none); built-ins always load.
"""

from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from dd.api import hookspecs
from dd.api.registry import Registry
from dd.errors import DDError, UsageError

GROUP = "dd"
DIST_NAME = "dd-doctor"
hookimpl = hookspecs.hookimpl


@dataclass
class PluginRecord:
    name: str
    module: str
    distribution: str | None = None
    version: str | None = None
    builtin: bool = False
    hooks: list[str] = field(default_factory=list)
    registered: dict[str, list[str]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "module": self.module,
            "distribution": self.distribution,
            "version": self.version,
            "builtin": self.builtin,
            "hooks": sorted(self.hooks),
            "registered": {k: sorted(v) for k, v in sorted(self.registered.items()) if v},
        }


class PluginHost:
    """Owns the pluggy manager, the registries and what each plugin contributed."""

    def __init__(self, *, load_entrypoints: bool = True):
        from dd.api.backbones import Backbone
        from dd.api.detectors import Detector
        from dd.api.scorers import QualityScorer

        self.pm = pluggy.PluginManager(GROUP)
        self.pm.add_hookspecs(hookspecs)
        self.records: dict[str, PluginRecord] = {}
        self.failed: dict[str, str] = {}
        self.detectors: Registry = Registry("detector", Detector)
        self.backbones: Registry = Registry("backbone", Backbone)
        self.scorers: Registry = Registry("quality scorer", QualityScorer)
        self._filled = False
        if load_entrypoints:
            self._load_entrypoints()

    # -- loading ---------------------------------------------------------------------------
    def _load_entrypoints(self) -> None:
        allowed = os.environ.get("DD_LOAD_PLUGINS")
        allow = None if allowed is None else {s.strip() for s in allowed.split(",") if s.strip()}
        eps = sorted(metadata.entry_points(group=GROUP), key=lambda e: e.name)
        seen: set[str] = set()
        for ep in eps:
            dist = ep.dist.name if ep.dist is not None else None
            builtin = dist is not None and _canon(dist) == _canon(DIST_NAME)
            if ep.name in seen:
                continue  # the same distribution can be visible twice (editable + site)
            if not builtin and allow is not None and not ({ep.name, dist or ""} & allow):
                continue
            seen.add(ep.name)
            try:
                module = ep.load()
            except Exception as exc:  # a broken plugin must not take dd down
                self.failed[ep.name] = f"{type(exc).__name__}: {exc}"
                print(
                    f"Warning: dd plugin {ep.name!r} ({ep.value}) failed to load: "
                    f"{type(exc).__name__}: {exc}",
                    file=sys.stderr,
                )
                continue
            self.add(
                module,
                name=ep.name,
                distribution=dist,
                version=ep.dist.version if ep.dist is not None else None,
                builtin=builtin,
            )

    def add(
        self,
        plugin: Any,
        *,
        name: str,
        distribution: str | None = None,
        version: str | None = None,
        builtin: bool = False,
    ) -> None:
        """Register a plugin object (module or instance with ``@hookimpl`` methods)."""
        if name in self.records:
            raise DDError(
                f"two plugins are named {name!r}",
                hint="rename one entry point in the [project.entry-points.dd] table",
            )
        self.pm.register(plugin, name=name)
        hooks = [h.name for h in self.pm.get_hookcallers(plugin) or []]
        self.records[name] = PluginRecord(
            name=name,
            module=getattr(plugin, "__name__", type(plugin).__name__),
            distribution=distribution,
            version=version,
            builtin=builtin,
            hooks=hooks,
        )
        self._filled = False

    # -- registries ------------------------------------------------------------------------
    def fill(self) -> None:
        """Call the registration hooks, one plugin at a time, so provenance is known."""
        if self._filled:
            return
        from dd.api.backbones import Backbone
        from dd.api.detectors import Detector
        from dd.api.scorers import QualityScorer

        self.detectors = Registry("detector", Detector)
        self.backbones = Registry("backbone", Backbone)
        self.scorers = Registry("quality scorer", QualityScorer)
        for rec in self.records.values():
            for key in ("detectors", "backbones", "scorers"):
                rec.registered.pop(key, None)
        for hook_name, registry, key in (
            ("dd_register_detectors", self.detectors, "detectors"),
            ("dd_register_backbones", self.backbones, "backbones"),
            ("dd_register_scorers", self.scorers, "scorers"),
        ):
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                rec = self.records[impl.plugin_name]

                def register(obj, name=None, aliases=(), _rec=rec, _reg=registry, _key=key):
                    _reg.register(obj, name, aliases, plugin=_rec.name)
                    added = name or obj.name
                    _rec.registered.setdefault(_key, []).append(added)

                impl.function(register=register)
        self._filled = True

    def add_commands(self, app: Any) -> None:
        """Let plugins add commands to the root Typer app, recording who added what."""
        owners: dict[str, str] = {_command_name(c): "dd" for c in app.registered_commands}
        owners.update({_group_name(g): "dd" for g in app.registered_groups})
        for impl in self.pm.hook.dd_register_commands.get_hookimpls():
            before_c, before_g = len(app.registered_commands), len(app.registered_groups)
            impl.function(app=app)
            new = [_command_name(c) for c in app.registered_commands[before_c:]]
            new += [_group_name(g) for g in app.registered_groups[before_g:]]
            for cmd in new:
                if cmd in owners:
                    del app.registered_commands[before_c:]
                    del app.registered_groups[before_g:]
                    raise DDError(
                        f"command name clash: `dd {cmd}` is defined by {owners[cmd]!r} "
                        f"and again by plugin {impl.plugin_name!r}",
                        hint="uninstall one of them, or limit loading with DD_LOAD_PLUGINS",
                    )
                owners[cmd] = impl.plugin_name
            self.records[impl.plugin_name].registered.setdefault("commands", []).extend(new)

    def info(self) -> list[dict[str, Any]]:
        self.fill()
        return [r.as_dict() for r in sorted(self.records.values(), key=lambda r: r.name)]


def _canon(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _command_name(info: Any) -> str:
    if info.name:
        return info.name
    return info.callback.__name__.lower().replace("_", "-")


def _group_name(info: Any) -> str:
    return info.name or (info.typer_instance.info.name if info.typer_instance else "?")


_host: PluginHost | None = None
_lock = threading.Lock()


def get_host() -> PluginHost:
    """The process-wide plugin host, created (and entry points loaded) on first use."""
    global _host
    with _lock:
        if _host is None:
            _host = PluginHost()
        _host.fill()
        return _host


def reset_host(host: PluginHost | None = None) -> None:
    """Forget the loaded plugins (tests use this; the next ``get_host`` reloads)."""
    global _host
    with _lock:
        _host = host


def get_detector_class(name: str):
    return get_host().detectors.get(name)


def get_backbone_class(name: str):
    return get_host().backbones.get(name)


def load_detector(
    name: str, weights: str | None, options: dict[str, Any], device: Any, dtype: Any
) -> Any:
    """The detector plugin ``name`` built with ``weights`` on ``device`` in ``dtype``
    (``"auto"``/``"fp32"`` strings or torch objects); ``options`` are checked against the
    types its ``load`` declares before it is called (:mod:`dd.api.plugin_options`)."""
    from dd.api.plugin_options import check_options
    from dd.runtime.device import resolve_device, resolve_inference_dtype

    cls = get_host().detectors.get(name)
    opts = check_options("detector", name, cls.load, options)
    dev = resolve_device(device) if isinstance(device, str) else device
    dt = resolve_inference_dtype(dtype, dev) if isinstance(dtype, str) else dtype
    return cls.load(weights, device=dev, dtype=dt, **opts)


def load_detector_warned(
    name: str,
    weights: str | None,
    options: dict[str, Any],
    device: Any,
    dtype: Any,
    reporter: Any = None,
    *,
    meaning: str = "its maps",
) -> Any:
    """:func:`load_detector`, and a warning through ``reporter`` (a
    :class:`dd.runtime.progress.Reporter`) when the detector has random weights: what a
    command computes with it (``meaning``) then means nothing."""
    from dd.runtime.progress import as_reporter

    det = load_detector(name, weights, options, device, dtype)
    if det.untrained:
        as_reporter(reporter).warning(
            f"[bold]the {name!r} detector is UNTRAINED (random weights): {meaning} mean "
            "nothing.[/bold] Pass --weights (see README)."
        )
    return det


@dataclass(frozen=True)
class DetectorRef:
    """Which detector a job runs (``--detector``, ``--weights``, ``-O``, ``--device``,
    ``--dtype``): engines take one and load it themselves (:meth:`load`), so a command's CLI
    never loads a model."""

    name: str = "segformer"
    weights: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    device: Any = "auto"
    dtype: Any = "fp32"

    @classmethod
    def of(cls, cfg: Any) -> DetectorRef:
        """The detector a job's config names (its ``detector``, ``weights``,
        ``detector_options``, ``device`` and ``dtype`` fields)."""
        return cls(cfg.detector, cfg.weights, cfg.detector_options, cfg.device, cfg.dtype)

    def load(self, reporter: Any = None, *, meaning: str = "its maps") -> Any:
        """The detector, with the untrained-weights warning through ``reporter``."""
        return load_detector_warned(
            self.name, self.weights, dict(self.options), self.device, self.dtype, reporter,
            meaning=meaning,
        )  # fmt: skip


def as_detector(detector: Any, reporter: Any = None, *, meaning: str = "its maps") -> Any:
    """A loaded detector for an engine given a :class:`DetectorRef` (loaded here, warning
    through ``reporter``) or an already loaded detector (returned as it is)."""
    if isinstance(detector, DetectorRef):
        return detector.load(reporter, meaning=meaning)
    return detector


def load_backbone(
    name: str, model: str, *, device: Any, dtype: Any, options: dict, attention: str = "auto"
) -> Any:
    """The backbone plugin ``name`` loaded from ``model`` (hub id, folder or file), with
    ``options`` checked against the types its ``from_pretrained`` declares, and its
    attention kernel set (``--attention``, :meth:`Backbone.set_attention`)."""
    from dd.api.plugin_options import check_options
    from dd.ops.attention import backend_for

    backend_for(attention)  # an unknown choice is a usage error before anything loads
    cls = get_host().backbones.get(name)
    opts = check_options("backbone", name, cls.from_pretrained, options)
    bb = cls.from_pretrained(str(model), device=device, dtype=dtype, **opts)
    bb.set_attention(attention)
    return bb


def backbone_from(cfg: Any, *, device: Any, dtype: Any, model: str | None = None) -> Any:
    """:func:`load_backbone` of a job's config (its ``backbone``, ``model`` unless ``model``
    is given, ``backbone_options`` and ``attention``)."""
    return load_backbone(
        cfg.backbone,
        model if model is not None else cfg.model,
        device=device,
        dtype=dtype,
        options=cfg.backbone_options,
        attention=getattr(cfg, "attention", "auto"),
    )


def load_quality_guard(
    specs: list[str] | None, *, device: str = "cpu", weights: dict[str, Any] | None = None
) -> Any:
    """The :class:`dd.api.scorers.QualityGuard` of ``--quality`` specs (None when there are
    none), its scorers looked up in the plugin registry; an unknown name is one line
    listing the registered ones."""
    from dd.api.scorers import QualityGuard, parse_quality

    parsed = parse_quality(specs)
    stray = sorted(set(weights or {}) - {name for name, _ in parsed})
    if stray:
        raise UsageError(
            f"--quality-weights names {', '.join(stray)}, which --quality does not turn on",
            hint=f"add --quality {stray[0]}, or drop its weights",
        )
    if not parsed:
        return None
    host = get_host()
    host.fill()
    scorers = []
    for name, tol in parsed:
        try:
            cls = host.scorers.get(name)
        except DDError:
            known = ", ".join(sorted(host.scorers.names())) or "none"
            raise UsageError(
                f"unknown quality scorer {name!r}", hint=f"registered: {known}"
            ) from None
        scorer = cls((weights or {}).get(name), device)
        scorers.append((scorer, cls.default_tolerance if tol is None else tol))
    return QualityGuard(scorers)
