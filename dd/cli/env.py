"""``dd env``: versions, devices and which native kernels are usable here."""

from __future__ import annotations

import json
import platform
from importlib import metadata
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

PACKAGES = (
    "torch",
    "diffusers",
    "transformers",
    "peft",
    "accelerate",
    "safetensors",
    "triton",
    "xformers",
    "pluggy",
    "typer",
)


def collect_env() -> dict[str, Any]:
    import torch

    from dd import __version__

    versions: dict[str, str | None] = {"dd": __version__, "python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    devices: list[dict[str, Any]] = [
        {"device": "cpu", "name": platform.processor() or "cpu", "threads": torch.get_num_threads()}
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            devices.append(
                {
                    "device": f"cuda:{i}",
                    "name": props.name,
                    "memory_gib": round(props.total_memory / 2**30, 1),
                    "capability": f"{props.major}.{props.minor}",
                }
            )
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append({"device": "mps", "name": "Apple MPS"})
    from dd.ops.kernels import kernel_status

    return {
        "versions": versions,
        "torch_cuda": torch.version.cuda,
        "devices": devices,
        "kernels": kernel_status(),
    }


def env(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Show versions of torch, diffusers, transformers, peft; devices; available kernels."""
    info = collect_env()
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    console = Console()
    t = Table(title="versions")
    t.add_column("package")
    t.add_column("version")
    for k, v in info["versions"].items():
        t.add_row(k, v or "[dim]not installed[/dim]")
    console.print(t)
    d = Table(title=f"devices (torch CUDA: {info['torch_cuda'] or 'none'})")
    d.add_column("device")
    d.add_column("details")
    for dev in info["devices"]:
        rest = ", ".join(f"{k}={v}" for k, v in dev.items() if k != "device")
        d.add_row(dev["device"], rest)
    console.print(d)
    k = Table(title="kernels (DD_KERNEL overrides the automatic choice)")
    for col in ("kernel", "available", "default on", "note"):
        k.add_column(col)
    for row in info["kernels"]:
        k.add_row(
            row["name"],
            "yes" if row["available"] else "no",
            ", ".join(row.get("default_on") or []) or "-",
            row.get("reason") or "",
        )
    console.print(k)
