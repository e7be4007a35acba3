"""Option types and option parsing shared by commands.

The ``Annotated`` types below carry a flag's help text (and short names or bounds) for
options that several commands spell the same way; each command keeps its own default, e.g.
``device: Device = "auto"``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Annotated, Any

import typer

from dd.errors import DDError

# -- models and outputs ------------------------------------------------------------------------
Model = Annotated[
    str | None,
    typer.Option(help="Diffusers folder, single .safetensors file or hub id of the model."),
]
BackboneOption = Annotated[
    list[str] | None,
    typer.Option("--backbone-option", "-B", help="Backbone option KEY=VALUE."),
]
RunFolder = Annotated[str | None, typer.Option("--out", "-o", help="Run folder.")]
DetectorPlugin = Annotated[str, typer.Option(help="Detector plugin.")]

# -- detectors (dd detect, dd eval-detector) -----------------------------------------------------
DetectorName = Annotated[str, typer.Option(help="Detector plugin (see `dd plugins`).")]
DetectorWeights = Annotated[
    str | None,
    typer.Option(help="Detector weights: a .bin/.safetensors file, a folder or a hub id."),
]
DetectorOptions = Annotated[
    list[str] | None,
    typer.Option(
        "--option", "--detector-option", "-O", help="Detector option KEY=VALUE (e.g. variant=b5)."
    ),
]

# -- devices and sampling ------------------------------------------------------------------------
Device = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")]
Dtype = Annotated[str, typer.Option(help="fp32, bf16 or fp16.")]
Guidance = Annotated[float | None, typer.Option(help="Guidance scale.")]
BatchSize = Annotated[int, typer.Option(min=1, help="Images per model call.")]

# -- sampling (dd generate, dd eval gen) --------------------------------------------------------
PromptsFile = Annotated[
    str | None, typer.Option(help="Prompts: .txt (one per line), .jsonl or .json.")
]
Seeds = Annotated[
    str, typer.Option(help="Seeds per prompt: a list 0,1,2, a count N (0..N-1) or a range 5-7.")
]

GuideScale = Annotated[
    float,
    typer.Option(
        min=0.0,
        help="Guidance step size at the first step, falling to 1/12 of it by the last "
        "(DIAMOND's schedule; 0: unguided, bit for bit).",
    ),
]
GuideSteps = Annotated[
    str | None, typer.Option(help="Guided sampling steps A-B (0-based, inclusive; default: all).")
]
GuideLoss = Annotated[
    str, typer.Option(help="Per-image confidence to lower: mean, max or weighted.")
]
GuideEvery = Annotated[int, typer.Option(min=1, help="Guide every Nth step.")]

# -- training (dd treat, dd dreambooth, dd refine train) -----------------------------------------
TrainDevice = Annotated[str, typer.Option(help="auto, cpu or cuda.")]
TrainSteps = Annotated[int, typer.Option(min=1, help="Optimizer steps.")]
Lr = Annotated[float, typer.Option(help="AdamW learning rate.")]
WeightDecay = Annotated[float, typer.Option(help="AdamW weight decay.")]
LrSchedule = Annotated[str, typer.Option(help="constant or cosine.")]
WarmupSteps = Annotated[int, typer.Option(min=0, help="Linear warmup steps.")]
SaveEvery = Annotated[int, typer.Option(min=1, help="Checkpoint every N steps.")]
LogEvery = Annotated[int, typer.Option(min=1, help="Log the loss every N steps.")]
Resume = Annotated[bool, typer.Option(help="Continue the run in --out.")]
Overwrite = Annotated[
    bool,
    typer.Option(
        help="Replace the run in --out (its checkpoints, metrics and model) with a new one."
    ),
]


def interrupt_hint(text: str) -> Any:
    """Declares what Ctrl-C tells the user of a command without ``--resume`` (one that
    continues by itself when rerun, say); commands with ``--resume`` need none."""

    def mark(fn: Any) -> Any:
        fn.interrupt_hint = text
        return fn

    return mark


def parse_options(pairs: list[str] | None) -> dict[str, Any]:
    """``["variant=b5", "input_size=512"]`` -> ``{"variant": "b5", "input_size": 512}``.

    Values are read as JSON when they parse (numbers, true/false, lists), else as strings.
    """
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise DDError(f"bad option {pair!r}", hint="write options as KEY=VALUE")
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw
    return out


def parse_pair(text: str, name: str) -> tuple[float, float]:
    """``"0.2,0.8"`` or ``"0.2:0.8"`` -> ``(0.2, 0.8)``; one number ``x`` -> ``(x, x)``."""
    try:
        parts = [float(p) for p in text.replace(":", ",").split(",")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2:
        raise DDError(f"bad {name} {text!r}", hint="write one number or two: LO,HI")
    return parts[0], parts[1]


def split_list(text: str | None) -> list[str] | None:
    """``"to_q, to_k"`` -> ``["to_q", "to_k"]``; None for no text or no items."""
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    return items or None


def config_from_flags(
    ctx: typer.Context,
    cls: type,
    values: dict[str, Any],
    config: str | None,
    renamed: dict[str, str],
) -> tuple[Any, Any]:
    """``cls`` from the preset or TOML file ``config`` (if any), overridden by the flags
    of ``values`` the user typed; ``renamed`` maps a config field to its click parameter
    name where they differ. Returns the config and the preset's path (None without one)."""
    from dd.runtime.config import (
        find_preset,
        load_preset,
        load_toml,
        passed_flags,
        preset_keys_for_others,
        resolve,
    )

    given = passed_flags(ctx, {renamed.get(k, k): v for k, v in values.items()})
    flags = {k: v for k, v in values.items() if renamed.get(k, k) in given}
    if config is None:
        return resolve(cls, flags=flags), None
    others = [c for c in preset_classes() if c is not cls]
    preset, source = load_preset(config, cls, others=others)
    skipped = preset_keys_for_others(load_toml(find_preset(config)), cls, others)
    if skipped:
        from rich.console import Console

        Console(stderr=True).print(
            f"preset {source}: {', '.join(skipped)} are other commands' settings (not used here)",
            highlight=False,
        )
    return resolve(cls, preset=preset, flags=flags), source


def preset_classes() -> list[type]:
    """The settings classes of the commands that read presets (``--config``): a shipped
    preset serves each of them."""
    from dd.engines.dreambooth import DreamBoothConfig
    from dd.engines.treat import TreatConfig

    return [TreatConfig, DreamBoothConfig]


# -- commands built from a config dataclass (one declaration per setting) --------------------
def _field_default(f: Any) -> Any:
    import dataclasses

    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def config_parameters(cls: type) -> list[Any]:
    """One ``inspect.Parameter`` (a Typer option) per field of ``cls`` declared with
    :func:`dd.runtime.config.setting`, in field order."""
    import dataclasses
    import inspect
    import typing

    hints = typing.get_type_hints(cls)
    params = []
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not meta.get("cli"):
            continue
        flags = tuple(meta.get("flags") or ())  # none: typer's --name (--name/--no-name)
        extra = {k: meta[k] for k in ("min", "max") if meta.get(k) is not None}
        default = _field_default(f)
        text = meta.get("text")
        if text == "options":
            tp, default = list[str] | None, None
        elif text == "list":
            tp = str | None
            default = ",".join(default) if default else None
        elif text == "seeds":
            tp, default = str, ",".join(str(s) for s in default)
        elif text == "pair":
            tp, default = str, ",".join(f"{x:g}" for x in default)
        else:
            tp = hints[f.name]
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            default = inspect.Parameter.empty  # a required option
        option = typer.Option(*flags, help=meta["help"], **extra)
        params.append(
            inspect.Parameter(
                f.name,
                inspect.Parameter.POSITIONAL_OR_KEYWORD,
                default=default,
                annotation=Annotated[tp, option],
            )
        )
    return params


def read_config_values(cls: type, raw: dict[str, Any]) -> dict[str, Any]:
    """The command line's values of ``cls``'s settings, each read in its ``text`` form."""
    import dataclasses

    out = {}
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli") or f.name not in raw:
            continue
        value, text = raw[f.name], f.metadata.get("text")
        if text == "options":
            value = parse_options(value)
        elif text == "list":
            value = split_list(value)
        elif text == "seeds":
            from dd.data.prompts import parse_seeds

            value = parse_seeds(value)
        elif text == "pair":
            flag = (f.metadata.get("flags") or (f"--{f.name.replace('_', '-')}",))[0]
            value = parse_pair(value, flag)
        out[f.name] = value
    return out


def config_command(
    cls: type,
    body: Any,
    *,
    name: str,
    doc: str,
    leading: Sequence[Any] = (),
) -> Any:
    """A Typer command whose options are ``cls``'s settings (plus the ``leading``
    ``inspect.Parameter`` s, e.g. ``--config``); it calls ``body(ctx, values, **leading)``
    with the settings' values read from the command line."""
    import inspect

    lead = list(leading)
    ctx_param = inspect.Parameter(
        "ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context
    )

    def command(ctx: typer.Context, **kwargs: Any) -> Any:
        extras = {p.name: kwargs.pop(p.name) for p in lead}
        return body(ctx, read_config_values(cls, kwargs), **extras)

    command.__signature__ = inspect.Signature([ctx_param, *lead, *config_parameters(cls)])
    command.__doc__ = doc
    command.__name__ = command.__qualname__ = name.replace("-", "_")
    return command


def argument_parameter(name: str, help: str, annotation: Any = list[str]) -> Any:
    """A positional argument (``IMAGES...``) of a command built by :func:`config_command`,
    for its ``leading`` parameters."""
    import inspect

    return inspect.Parameter(
        name,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        annotation=Annotated[annotation, typer.Argument(help=help)],
    )


def json_parameter(help: str = "Print a JSON report to stdout.") -> Any:
    """The ``--json`` flag of a command built by :func:`config_command` (how it prints, not
    a setting of the job)."""
    import inspect

    return inspect.Parameter(
        "as_json",
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        default=False,
        annotation=Annotated[bool, typer.Option("--json", help=help)],
    )


def preset_parameter(family_help: str) -> Any:
    """The ``--config/-c`` option of a command whose settings a preset may give."""
    import inspect

    return inspect.Parameter(
        "config",
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        default=None,
        annotation=Annotated[str | None, typer.Option("--config", "-c", help=family_help)],
    )
