"""``dd plugins``: what is installed and what each plugin registered."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.table import Table


def plugins(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List plugins, their versions, the hooks they implement and what they registered."""
    from dd.api.plugins import get_host

    host = get_host()
    info = host.info()
    if as_json:
        payload = {"plugins": info, "failed": host.failed}
        typer.echo(json.dumps(payload, indent=2))
        return
    # One hook per line and no box: full hook names fit 80 columns.
    table = Table(title="dd plugins", box=box.SIMPLE_HEAD)
    for col in ("plugin", "version", "hooks", "registered"):
        table.add_column(col, overflow="fold")
    for p in info:
        reg = "\n".join(f"{k}: {', '.join(v)}" for k, v in p["registered"].items()) or "-"
        name = p["name"] + ("\n(built-in)" if p["builtin"] else "")
        table.add_row(name, p["version"] or "-", "\n".join(p["hooks"]), reg)
    for name, err in host.failed.items():
        table.add_row(f"[red]{name}[/red]", "-", "-", f"[red]failed to load: {err}[/red]")
    Console().print(table)
