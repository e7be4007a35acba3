"""TOML presets for ``dd treat`` and ``dd generate``: find, read, validate, merge, save.

A preset is a flat TOML file of settings, e.g. ``configs/flux-schnell.toml``::

    backbone = "flux"
    model = "black-forest-labs/FLUX.1-schnell"
    resolution = 1024   # paper Sec. 4.1 / released code: 1024 x 1024
    lora_rank = 16

``--config NAME`` looks for ``NAME.toml`` in ``./configs/`` and then in the presets shipped
with dd; ``--config PATH`` reads that file. Every key must be a field of the command's
configuration (a dataclass): an unknown key or a value of the wrong type is a one-line
error naming the file and the key. Precedence, lowest first: the dataclass defaults, the
preset, then only the flags the user actually typed (:func:`passed_flags`); the resolved
configuration is saved with the run (:func:`save_config`). TOML has no null: a key left out
means "the default", and :func:`save_config` writes unset (``None``) settings as comments.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import sys
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from dd.errors import DDError, UsageError
from dd.runtime.io import atomic_write_text

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    try:
        import tomli as tomllib
    except ModuleNotFoundError:
        tomllib = None  # type: ignore[assignment]

__all__ = [
    "PRESET_DIR",
    "find_preset",
    "list_presets",
    "load_preset",
    "load_toml",
    "passed_flags",
    "resolve",
    "save_config",
    "to_toml",
    "validate",
]


def _preset_dir() -> Path:
    """The presets shipped with dd: the installed package ``dd.presets`` (``configs/`` of
    the source tree, which is also where a source checkout finds them)."""
    try:
        from importlib.resources import files

        found = Path(str(files("dd.presets")))
        if found.is_dir():
            return found
    except (ModuleNotFoundError, TypeError):
        pass
    return Path(__file__).resolve().parents[2] / "configs"


#: The folder of the presets shipped with dd.
PRESET_DIR = _preset_dir()

T = TypeVar("T")
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


# ------------------------------------------------------------------------------------ finding
def _search_dirs() -> list[Path]:
    dirs = [Path.cwd() / "configs", PRESET_DIR]
    return list(dict.fromkeys(d.resolve() for d in dirs))


def list_presets() -> list[str]:
    """Names of the presets ``--config NAME`` finds (local ``configs/`` first)."""
    names: dict[str, None] = {}
    for d in _search_dirs():
        if d.is_dir():
            for p in sorted(d.glob("*.toml")):
                names.setdefault(p.stem, None)
    return list(names)


def find_preset(name_or_path: str | Path) -> Path:
    """A preset file: an existing path, else ``NAME.toml`` in the preset folders."""
    ref = str(name_or_path)
    path = Path(ref).expanduser()
    if path.is_file():
        return path
    if path.suffix == ".toml" or "/" in ref or "\\" in ref:
        raise DDError(f"config file not found: {ref}", hint="pass a .toml file or a preset name")
    for d in _search_dirs():
        cand = d / f"{ref}.toml"
        if cand.is_file():
            return cand
    known = list_presets()
    close = difflib.get_close_matches(ref, known, n=1)
    raise DDError(
        f"no preset named {ref!r}",
        hint=f"did you mean {close[0]!r}?"
        if close
        else f"presets: {', '.join(known) or 'none found'}; or pass a .toml path",
    )


# ------------------------------------------------------------------------------------ reading
def load_toml(path: str | Path) -> dict[str, Any]:
    """Parse a TOML file; syntax errors are one line naming the file and the position."""
    path = Path(path)
    if tomllib is None:  # pragma: no cover - Python 3.10 without tomli
        raise DDError(
            "reading TOML needs the tomli package on Python 3.10", hint="pip install tomli"
        )
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DDError(f"cannot read config {path}: {e.strerror or e}") from None
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise DDError(f"{path}: not UTF-8 text", hint="save the config as UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise DDError(f"{path}: invalid TOML: {e}", hint="check the syntax at that line") from None


def load_preset(
    name_or_path: str | Path, cls: type, *, others: Sequence[type] = ()
) -> tuple[dict[str, Any], Path]:
    """Find, parse and validate a preset against the dataclass ``cls``.

    A preset is one flat file for a model family that several commands read (``dd treat``,
    ``dd dreambooth``, ``dd generate``): with ``others`` (the settings classes of those
    other commands), a key that ``cls`` lacks but one of ``others`` has is left out instead
    of refused (:func:`preset_keys_for_others` lists them); a key no class knows is still
    an error (a typo)."""
    path = find_preset(name_or_path)
    data = load_toml(path)
    theirs = preset_keys_for_others(data, cls, others)
    mine = {k: v for k, v in data.items() if k not in theirs}
    return validate(mine, cls, source=str(path)), path


def preset_keys_for_others(data: Mapping[str, Any], cls: type, others: Sequence[type]) -> list[str]:
    """The keys of preset ``data`` that ``cls`` does not have but one of ``others`` does."""
    mine = {f.name for f in dataclasses.fields(cls)}
    theirs = {f.name for o in others for f in dataclasses.fields(o)}
    return sorted(k for k in data if k not in mine and k in theirs)


# --------------------------------------------------------------------------------- validating
def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin is dict or tp is dict:
        return "a table"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


class _Mismatch(Exception):
    pass


def _coerce(value: Any, tp: Any) -> Any:
    """``value`` as type ``tp`` (int -> float allowed; bool is never a number)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        args = typing.get_args(tp)
        items = [_coerce(v, args[0]) for v in value] if args else list(value)
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise _Mismatch
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    raise _Mismatch


def validate(data: Mapping[str, Any], cls: type, *, source: str) -> dict[str, Any]:
    """Check that every key of ``data`` is a field of ``cls`` with a value of its type.

    Returns the values coerced to the field types. Errors name ``source`` and the key.
    """
    fields = _field_types(cls)
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            if isinstance(value, Mapping):
                hint = "presets are flat: write the keys at the top level, without [tables]"
            else:
                close = difflib.get_close_matches(key, list(fields), n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"keys: {', '.join(fields)}"
            raise DDError(f"{source}: unknown key {key!r}", hint=hint)
        try:
            out[key] = _coerce(value, fields[key])
        except _Mismatch:
            raise DDError(
                f"{source}: key {key!r} must be {_type_name(fields[key])}, got {value!r}",
            ) from None
    return out


def resolve(
    cls: type[T],
    *,
    preset: Mapping[str, Any] | None = None,
    flags: Mapping[str, Any] | None = None,
    source: str = "command line",
) -> T:
    """``cls`` from its defaults, overridden by ``preset``, overridden by ``flags``."""
    merged: dict[str, Any] = dict(preset or {})
    merged.update(validate(flags or {}, cls, source=source))
    return cls(**merged)


def passed_flags(ctx: Any, values: Mapping[str, Any]) -> dict[str, Any]:
    """The subset of a command's ``values`` whose flags the user typed (or set through an
    environment variable), not the ones left at their defaults; ``ctx`` is the click
    context of the command."""
    # By name: typer may bring its own copy of click, with its own ParameterSource enum.
    given = {"COMMANDLINE", "ENVIRONMENT"}
    out = {}
    for key, value in values.items():
        source = ctx.get_parameter_source(key)
        if source is not None and source.name in given:
            out[key] = value
    return out


# ------------------------------------------------------------------------------------ writing
def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else _toml_string(key)


def _toml_string(s: str) -> str:
    out = ['"']
    for ch in s:
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return _toml_string(v)
    if isinstance(v, Path):
        return _toml_string(str(v))
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        items = [f"{_toml_key(str(k))} = {_toml_value(x)}" for k, x in v.items() if x is not None]
        return "{" + ", ".join(items) + "}"
    raise DDError(f"cannot write {type(v).__name__} value {v!r} to TOML")


def to_toml(data: Mapping[str, Any], *, header: Iterable[str] = ()) -> str:
    """A flat mapping as TOML; ``None`` values become ``# key = (unset)`` comments."""
    lines = [f"# {h}" if h else "#" for h in header]
    for key, value in data.items():
        if value is None:
            lines.append(f"# {key} = (unset)")
        else:
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def save_config(path: str | Path, data: Mapping[str, Any], *, header: Iterable[str] = ()) -> Path:
    """Write the resolved configuration atomically as TOML (readable as a preset)."""
    path = Path(path)
    atomic_write_text(path, to_toml(data, header=header))
    return path


# --------------------------------------------------------------------------------- checking
def check_settings(
    choices: Iterable[tuple[str, Any, Iterable[str]]] = (),
    positive: Mapping[str, int | None] | None = None,
    checks: Iterable[tuple[bool, str]] = (),
) -> None:
    """One-line errors for a command's settings, in this order: ``choices`` (flag, value,
    allowed values), ``positive`` (flag -> value that must be at least 1 when set), then
    ``checks`` (condition, the error when it is false). Flags are named without ``--``."""
    for name, value, allowed in choices:
        allowed = tuple(allowed)
        if value not in allowed:
            raise UsageError(f"unknown --{name} {value!r}", hint=f"one of {', '.join(allowed)}")
    for name, number in (positive or {}).items():
        if number is not None and number < 1:
            raise UsageError(f"--{name} must be at least 1, got {number}")
    for ok, msg in checks:
        if not ok:
            raise UsageError(msg)


def check_declared(config: Any) -> None:
    """One-line usage errors for the values of ``config`` (a dataclass of
    :func:`setting` fields) that break their declaration: first a value outside its
    ``choices``, then a number under its ``min`` (None counts as unset), in field order."""
    fields = [f for f in dataclasses.fields(config) if "help" in f.metadata]

    def flag(f: Any) -> str:
        return (f.metadata.get("flags") or (f"--{f.name.replace('_', '-')}",))[0]

    for f in fields:
        allowed = f.metadata.get("choices")
        value = getattr(config, f.name)
        if allowed is not None and value not in allowed:
            raise UsageError(
                f"unknown {flag(f)} {value!r}", hint=f"one of {', '.join(map(str, allowed))}"
            )
    for f in fields:
        bound = f.metadata.get("min")
        value = getattr(config, f.name)
        if bound is not None and value is not None and value < bound:
            raise UsageError(f"{flag(f)} must be at least {bound:g}, got {value}")
        top = f.metadata.get("max")
        if top is not None and value is not None and value > top:
            raise UsageError(f"{flag(f)} must be at most {top:g}, got {value}")


# ------------------------------------------------------------------------------- declaring
#: How the command line reads a setting that is not a plain str/int/float/bool.
TEXT_FORMS = ("options", "list", "seeds", "pair")


def setting(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    factory: Any = None,
    flags: tuple[str, ...] = (),
    min: float | None = None,
    text: str | None = None,
    cli: bool = True,
    choices: tuple[str, ...] | None = None,
    max: float | None = None,
) -> Any:
    """A config field declared once: its default, its help text and how the command line
    spells it. The dataclass is then the source of the CLI options
    (:func:`dd.cli.options.config_command`), of what a TOML preset may set and of the run
    record.

    ``flags``: the option's spellings (default ``--field-name``); ``min``: a lower bound the
    CLI enforces; ``text``: how the CLI reads it when it is no plain value: ``options``
    (repeatable ``KEY=VALUE`` into a dict), ``list`` (comma-separated into a list of str),
    ``seeds`` (``0,1``, a count ``N`` or a range ``A-B`` into a list of int), ``pair``
    (``LO,HI`` or one number into a tuple of two floats); ``cli=False``: not an option (the
    command takes it otherwise, e.g. as an argument, or only presets set it). A field
    without a default is a required option. ``choices``: the values allowed; ``max``: an
    upper bound. ``min``, ``max`` and ``choices`` are checked for any config, however made,
    by :func:`check_declared`.
    """
    if text is not None and text not in TEXT_FORMS:
        raise ValueError(f"text must be one of {TEXT_FORMS}, not {text!r}")
    meta = {"help": help, "flags": flags, "min": min, "text": text, "cli": cli}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if max is not None:
        meta["max"] = max
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)
