"""A command group with a default command: ``dd refine IMAGES...`` is ``dd refine run
IMAGES...`` and ``dd eval study A B`` is ``dd eval study create A B``.

The group's ``--help`` shows how to run the default form and that command's options, so a
user reading ``dd refine --help`` sees the options of the form they will type.
"""

from __future__ import annotations

from typing import Any

import typer
from typer.core import TyperGroup


class DefaultCommandGroup(TyperGroup):
    """Forwards anything that is not a subcommand name (or ``--help``) to
    ``default_command``; subclasses set it."""

    default_command = "run"

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        help_names = set(ctx.help_option_names or ["--help"])
        if args and args[0] not in self.commands and args[0] not in help_names:
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)

    def format_help(self, ctx: Any, formatter: Any) -> None:
        super().format_help(ctx, formatter)
        cmd = self.commands.get(self.default_command)
        if cmd is None:  # pragma: no cover - every subclass registers its default command
            return
        sub = type(ctx)(cmd, info_name=self.default_command, parent=ctx)
        args = [
            p.name.upper() + ("..." if p.nargs == -1 else "")
            for p in cmd.params
            if p.param_type_name == "argument"
        ]
        usage = " ".join([ctx.command_path, *args, "[OPTIONS]"])
        records = [r for r in (p.get_help_record(sub) for p in cmd.get_params(sub)) if r]
        heading = f"Without a command it runs `{self.default_command}`: {usage}"
        with formatter.section(heading):
            formatter.write_dl(records)
