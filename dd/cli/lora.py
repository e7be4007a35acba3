"""``dd lora``: inspect a LoRA file (``info``) and export dd's LoRAs for other UIs
(``export --format kohya``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(
    help="LoRA files: `dd lora info FILE` (format, family, rank, targets); `dd lora export "
    "RUN --format kohya --out FILE` for AUTOMATIC1111, Forge and ComfyUI (SD1.5/SDXL).",
    no_args_is_help=True,
)


@app.command("info")
def info(
    path: Annotated[Path, typer.Argument(help="A LoRA .safetensors file or a run folder.")],
    best: Annotated[
        bool, typer.Option(help="A run's best/ LoRA instead of its final one.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Say what a LoRA file is: format (diffusers, kohya, peft), model family (sd15, sdxl,
    flux, sd3), rank, alpha, target modules, tensors and parameters."""
    from dd.engines.lora import lora_info

    result = lora_info(path, best=best)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    out = Console()
    for key, value in result.items():
        shown = ", ".join(map(str, value)) if isinstance(value, list) else value
        out.print(f"{key:<11} {shown}", highlight=False)


@app.command("export")
def export(
    path: Annotated[Path, typer.Argument(help="A run folder (dd treat, dd dreambooth) or file.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The .safetensors file to write.")],
    fmt: Annotated[
        str, typer.Option("--format", help="kohya: AUTOMATIC1111, Forge, ComfyUI (SD1.5/SDXL).")
    ] = "kohya",
    best: Annotated[bool, typer.Option(help="Export the run's best/ LoRA.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out file.")] = False,
) -> None:
    """Write dd's diffusers-format LoRA in another format (it loads back with
    `load_lora_weights` and gives the same images)."""
    from dd.engines.lora import FORMATS, export_kohya
    from dd.errors import UsageError

    if fmt not in FORMATS:
        raise UsageError(f"unknown --format {fmt!r}", hint=f"one of {', '.join(FORMATS)}")
    written = export_kohya(path, out, best=best, overwrite=overwrite)
    Console().print(f"wrote {written}", highlight=False)
