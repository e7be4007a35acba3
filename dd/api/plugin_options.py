"""Plugin options (``-O KEY=VALUE``, ``-B KEY=VALUE``) checked before a plugin sees them.

A plugin declares its options as the keyword parameters of its loader, with type
annotations: ``Detector.load(weights, *, device, dtype, variant: str | None = None, ...)``,
``Backbone.from_pretrained(model, *, device, dtype, max_sequence_length: int | None = None)``,
or, for a backbone on the generic loader, in ``load_options = {"max_sequence_length": int |
None}``.
dd reads those annotations and converts or refuses each value before calling the loader,
so a value that does not parse is one line (``Error: option seed='abc' of detector
segformer must be an integer``), not a ``TypeError`` from inside the plugin. A loader that
takes ``**options`` receives undeclared keys unchecked (and should refuse unknown ones
itself); one that does not gets an error naming the options it has.

Supported annotations: ``int``, ``float``, ``bool``, ``str``, ``None``, unions of these,
``list``/``tuple`` and ``Any`` (anything passes).
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

from dd.errors import DDError

#: Loader parameters dd itself passes; never user options.
RESERVED = frozenset({"self", "cls", "weights", "model", "device", "dtype"})

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "text"}


class _Reject(Exception):
    pass


def declared_options(loader: Callable[..., Any]) -> tuple[dict[str, Any], bool]:
    """``({name: annotation}, takes_var_kwargs)`` of a plugin loader."""
    sig = inspect.signature(loader)
    try:
        hints = typing.get_type_hints(loader)
    except Exception:  # unresolvable annotations: fall back to the raw ones
        hints = {}
    out: dict[str, Any] = {}
    var_kw = False
    for name, p in sig.parameters.items():
        if p.kind is p.VAR_KEYWORD:
            var_kw = True
        elif p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and name not in RESERVED:
            out[name] = hints.get(name, p.annotation)
    # A class method on a generic loader (``Backbone.from_pretrained``) whose class declares
    # ``load_options``: those are its options, and no others.
    owner = getattr(loader, "__self__", None)
    elsewhere = getattr(owner, "load_options", None) if isinstance(owner, type) else None
    if var_kw and isinstance(elsewhere, dict) and elsewhere:
        out.update(elsewhere)
        var_kw = False
    return out, var_kw


def check_options(
    kind: str, name: str, loader: Callable[..., Any], options: Mapping[str, Any]
) -> dict[str, Any]:
    """``options`` converted to the loader's declared types; a ``DDError`` for an unknown
    key (when the loader takes no ``**options``) or a value that does not fit."""
    declared, var_kw = declared_options(loader)
    flag = "-O" if kind == "detector" else "-B"
    out: dict[str, Any] = {}
    for key, value in options.items():
        if key not in declared:
            if var_kw:
                out[key] = value
                continue
            known = ", ".join(declared) or "none"
            raise DDError(
                f"unknown option {key!r} for {kind} {name}",
                hint=f"its options: {known}" if declared else f"{kind} {name} takes no options",
            )
        try:
            out[key] = _coerce(value, declared[key])
        except _Reject as e:
            raise DDError(
                f"option {key}={value!r} of {kind} {name} must be {e}",
                hint=f"write {flag} {key}=VALUE",
            ) from None
    return out


def _coerce(value: Any, tp: Any) -> Any:
    if tp is inspect.Parameter.empty or tp is Any or isinstance(tp, str):
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        members = typing.get_args(tp)
        # An exact type match wins (7 stays an int in ``int | str``), then conversions.
        for m in members:
            if _exact(value, m):
                return value
        for m in members:
            try:
                return _coerce(value, m)
            except _Reject:
                continue
        raise _Reject(" or ".join(_describe(m) for m in members))
    if tp is type(None):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        raise _Reject("none")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (str, int)) and str(value).lower() in _TRUE | _FALSE:
            return str(value).lower() in _TRUE
        raise _Reject(_NAMES[bool])
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _Reject(_NAMES[int])
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _Reject(_NAMES[float])
    if tp is str:
        if isinstance(value, (dict, list)):
            raise _Reject(_NAMES[str])
        return value if isinstance(value, str) else _json_text(value)
    if tp in (list, tuple) or origin in (list, tuple):
        if isinstance(value, list):
            return value if (tp is list or origin is list) else tuple(value)
        raise _Reject("a list, e.g. [1,2]")
    return value  # a type dd does not know: the plugin checks it


def _exact(value: Any, tp: Any) -> bool:
    if tp is type(None):
        return value is None
    if tp in (int, float, str, bool):
        return type(value) is tp
    return False


def _json_text(value: Any) -> str:
    """The text a user typed for a value JSON parsed (``-O name=7`` for a str option)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _describe(tp: Any) -> str:
    if tp is type(None):
        return "none"
    if tp in (list, tuple) or typing.get_origin(tp) in (list, tuple):
        return "a list, e.g. [1,2]"
    return _NAMES.get(tp, getattr(tp, "__name__", str(tp)))
