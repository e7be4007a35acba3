"""The ``dd`` command line: one module per command (or sub-app), plugins add more.

``main()`` is the console-script entry point. Library errors (:class:`dd.DDError`) are
printed as one line with a hint and a non-zero exit; ``DD_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import click
import typer
from typer.core import TyperGroup

from dd.errors import DDError


def _print_error(err: DDError) -> None:
    msg = f"Error: {err.message}"
    if err.hint:
        msg += f" (hint: {err.hint})"
    click.echo(msg, err=True)


class DDGroup(TyperGroup):
    """Root group: turns ``DDError`` into one line on stderr and the error's exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except DDError as err:
            if os.environ.get("DD_DEBUG"):
                raise
            _print_error(err)
            raise click.exceptions.Exit(err.exit_code) from None
        except KeyboardInterrupt:
            if os.environ.get("DD_DEBUG"):
                raise
            click.echo("Interrupted (finished work is kept; rerun with --resume).", err=True)
            raise click.exceptions.Exit(130) from None


def build_app(*, with_plugins: bool = True) -> typer.Typer:
    """The root Typer app with the core commands and every plugin's commands."""
    from dd.cli import detect, env, plugins

    app = typer.Typer(
        cls=DDGroup,
        name="dd",
        help="Find, label, treat and repair artifacts of text-to-image diffusion models.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    app.command("detect")(detect.detect)
    app.command("plugins")(plugins.plugins)
    app.command("env")(env.env)
    from dd.cli import train_detector

    app.command("train-detector")(train_detector.train_detector)
    from dd.cli import synth

    app.command("synth")(synth.synth)
    from dd.cli import bench, dataset, eval_detector

    app.command("eval-detector")(eval_detector.eval_detector)
    app.add_typer(dataset.app, name="dataset")
    app.add_typer(bench.app, name="bench")
    from dd.cli import generate, treat

    app.command("treat")(treat.treat)
    app.command("generate")(generate.generate)

    from dd.cli import dreambooth as dreambooth_cli
    from dd.cli import eval as eval_cli

    app.command("dreambooth")(dreambooth_cli.dreambooth)
    app.add_typer(eval_cli.app, name="eval")

    from dd.cli import label as label_cli

    app.add_typer(label_cli.app, name="label")

    from dd.cli import refine as refine_cli

    app.add_typer(refine_cli.app, name="refine")

    @app.callback(invoke_without_command=True)
    def _root(
        version: bool = typer.Option(False, "--version", help="Print the version and exit."),
    ) -> None:
        if version:
            from dd import __version__

            typer.echo(f"dd {__version__}")
            raise typer.Exit()

    if with_plugins:
        from dd.plugins import get_host

        get_host().add_commands(app)
    return app


def main(argv: list[str] | None = None) -> int:
    """Console entry point (``dd``)."""
    try:
        app = build_app()
        cmd = typer.main.get_command(app)
    except DDError as err:  # plugin loading problems (e.g. a command name clash)
        if os.environ.get("DD_DEBUG"):
            raise
        _print_error(err)
        return err.exit_code
    try:
        rv = cmd.main(args=argv, prog_name="dd", standalone_mode=False)
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        return 1
    return rv if isinstance(rv, int) else 0


def run() -> None:  # pragma: no cover - used by python -m dd
    sys.exit(main())
