"""The ``dd`` command line: one module per command (or sub-app), plugins add more.

``main()`` is the console-script entry point. Its contract, tested for every command:

* a usage mistake (unknown command or option, a value of the wrong type, a missing
  argument) prints click's short usage error and exits 2, never a traceback;
* a library error (:class:`dd.DDError`) prints one line ``Error: ... (hint: ...)`` and
  exits non-zero; ``DD_DEBUG=1`` shows the traceback instead; a
  :class:`dd.errors.UsageError` (a mistake only the values reveal) is a usage error;
* exit codes mean one thing each (``dd.errors.EXIT_*``, listed in the README);
* help is plain click text (no Rich boxes or markup), readable at any terminal width.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Any

import typer
from typer.core import TyperArgument, TyperGroup, TyperOption

from dd.errors import EXIT_INTERRUPTED, DDError


def _print_error(err: DDError) -> None:
    msg = f"Error: {err.message}"
    if err.hint:
        msg += f" (hint: {err.hint})"
    typer.echo(msg, err=True)


# Click-style placeholders for option values (typer's own are ``<str>``, ``<list[str]>``).
_METAVARS = {"int": "INTEGER", "float": "FLOAT", "path": "PATH", "bool": "BOOLEAN"}


class _PlainArgument(TyperArgument):
    """An argument whose help row is its name alone (typer adds ``<list[str]>``)."""

    def display_type_rich(self, ctx: Any) -> str | None:
        return None


def tidy_help(cmd: Any) -> None:
    """Plain help for ``cmd`` and every sub-command (plugins' too): no Rich markup, so
    ``[brackets]`` in help texts survive; placeholders ``TEXT``/``INTEGER``/``PATH`` instead
    of ``<str>``; arguments in upper case, as click writes them."""
    if getattr(cmd, "_dd_tidy", False):
        return
    cmd._dd_tidy = True
    if hasattr(cmd, "rich_markup_mode"):
        cmd.rich_markup_mode = None
    for param in getattr(cmd, "params", []):
        if param.metavar is not None:
            continue
        if isinstance(param, TyperArgument):
            param.metavar = param.name.upper()
            if type(param) is TyperArgument:
                param.__class__ = _PlainArgument
        elif isinstance(param, TyperOption) and not param.is_flag:
            desc = param.type_descriptor
            if desc.is_choice:
                continue
            kind = "path" if desc.is_path else param.bare_type()
            param.metavar = _METAVARS.get(kind, "TEXT")
    if getattr(cmd, "commands", None) is None:
        _wrap_leaf(cmd)
    for sub in getattr(cmd, "commands", {}).values():
        tidy_help(sub)


def _wrap_leaf(cmd: Any) -> None:
    """Gives the leaf command ``cmd`` the two parts of the contract that need its context:
    a :class:`dd.errors.UsageError` becomes click's usage error (usage line, message,
    ``Try ... --help``; exit 2), and Ctrl-C says ``rerun with --resume`` only where the
    command has a ``--resume``."""
    from dd.errors import UsageError

    # typer vendors its own click; its UsageError is the base of the exported BadParameter.
    click_usage_error = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")

    invoke = cmd.invoke
    hint = getattr(cmd.callback, "interrupt_hint", None)
    if hint is None and any(getattr(p, "name", None) == "resume" for p in cmd.params):
        hint = "finished work is kept; rerun the same command with --resume"

    def wrapped(ctx: Any) -> Any:
        try:
            return invoke(ctx)
        except UsageError as err:
            if os.environ.get("DD_DEBUG"):
                raise
            msg = err.message + (f" (hint: {err.hint})" if err.hint else "")
            raise click_usage_error(msg, ctx=ctx) from None
        except KeyboardInterrupt as err:
            err.dd_hint = hint  # read by DDGroup.invoke
            raise

    cmd.invoke = wrapped


_USER_ERRNOS = {
    errno.EACCES,
    errno.EPERM,
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EEXIST,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.EROFS,
}


class DDGroup(TyperGroup):
    """Root group: turns ``DDError`` into one line on stderr and the error's exit code."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        tidy_help(self)
        return super().main(*args, **kwargs)

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except DDError as err:
            if os.environ.get("DD_DEBUG"):
                raise
            _print_error(err)
            raise typer.Exit(err.exit_code) from None
        except OSError as err:
            # A file-system problem the user can fix (permissions, a full disk, a file where
            # a folder belongs): one line, like a DDError. Others are bugs: a traceback.
            if os.environ.get("DD_DEBUG") or err.errno not in _USER_ERRNOS:
                raise
            where = f": {err.filename}" if err.filename else ""
            _print_error(
                DDError(
                    f"{err.strerror or err}{where}",
                    hint="check the path and its permissions (DD_DEBUG=1 shows where)",
                )
            )
            raise typer.Exit(1) from None
        except KeyboardInterrupt as err:
            if os.environ.get("DD_DEBUG"):
                raise
            typer.echo(_interrupted(getattr(err, "dd_hint", None)), err=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None


def _interrupted(hint: str | None) -> str:
    """What Ctrl-C prints: true for the command that was running (its ``--resume``, or the
    hint it declared with :func:`dd.cli.options.interrupt_hint`)."""
    return f"Interrupted ({hint or 'rerun the command to start again'})."


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
        rich_markup_mode=None,
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
    from dd.cli import lora as lora_cli

    app.add_typer(lora_cli.app, name="lora")

    @app.callback(invoke_without_command=True)
    def _root(
        version: bool = typer.Option(False, "--version", help="Print the version and exit."),
    ) -> None:
        if version:
            from dd import __version__

            typer.echo(f"dd {__version__}")
            raise typer.Exit()

    if with_plugins:
        from dd.api.plugins import get_host

        get_host().add_commands(app)
    return app


def main(argv: list[str] | None = None) -> int:
    """Console entry point (``dd``)."""
    # transformers' notes (a missing torchvision for image processors dd never uses) are
    # noise on a command line; TRANSFORMERS_VERBOSITY=warning (or DD_DEBUG=1) brings them back.
    if not os.environ.get("DD_DEBUG"):
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
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
    except typer.Exit as e:
        return e.exit_code
    except typer.Abort:
        typer.echo("Aborted.", err=True)
        return 1
    except typer.TyperException as e:  # click's usage errors (typer ships its own click)
        show = getattr(e, "show", None)
        if show is not None:
            show()
        else:  # pragma: no cover - every click exception has show()
            typer.echo(f"Error: {e.format_message()}", err=True)
        return e.exit_code
    return rv if isinstance(rv, int) else 0


def run() -> None:  # pragma: no cover - used by python -m dd
    sys.exit(main())
