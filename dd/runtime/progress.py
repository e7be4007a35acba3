"""The rich progress bar every engine and command shows while it works (one contract: a
``rich.progress.Progress`` on the console given, or None to stay quiet)."""

from __future__ import annotations

from typing import Any


def progress_bar(
    title: str,
    *fields: str,
    console: Any | None,
    unit: str = "items",
    transient: bool = False,
) -> Any:
    """``title | bar | done/total | fields... | time left`` on ``console``.

    ``title`` may be ``{task.description}`` (one bar per task, named by its description).
    ``fields`` are :class:`rich.progress.TextColumn` templates such as
    ``"loss {task.fields[loss]}"`` (the task then needs those fields). ``unit``: ``items``
    (done/total), ``bytes`` (sizes, for imports) or ``open`` (a spinner and the time
    elapsed, for streams of unknown length). Returns None when ``console`` is None (quiet
    runs, processes other than the main one).
    """
    if console is None:
        return None
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    head = TextColumn(title if "{task." in title else f"[bold]{title}")
    extra = [TextColumn(f) for f in fields]
    if unit == "open":
        columns = [SpinnerColumn(), head, *extra, TimeElapsedColumn()]
    else:
        count = DownloadColumn() if unit == "bytes" else MofNCompleteColumn()
        columns = [head, BarColumn(), count, *extra, TimeRemainingColumn()]
    return Progress(*columns, console=console, transient=transient)


class _Quiet:
    """A stand-in for a progress bar that shows nothing (``console`` None)."""

    def __enter__(self) -> _Quiet:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def add_task(self, *args: Any, **kwargs: Any) -> int:
        return 0

    def update(self, *args: Any, **kwargs: Any) -> None:
        return None

    def advance(self, *args: Any, **kwargs: Any) -> None:
        return None


def progress_or_quiet(title: str, *fields: str, console: Any | None, **kw: Any) -> Any:
    """:func:`progress_bar`, or an object with the same methods that shows nothing."""
    bar = progress_bar(title, *fields, console=console, **kw)
    return _Quiet() if bar is None else bar


class Reporter:
    """Where an engine tells the user what it does: ``message``, ``warning`` and
    ``progress`` bars. This base class shows nothing (quiet runs, processes other than the
    main one); the CLI passes a :class:`ConsoleReporter`. Engines take a reporter, never a
    console."""

    console: Any = None

    def message(self, text: str) -> None:
        """A line of progress news (rich markup allowed)."""

    def warning(self, text: str) -> None:
        """Something the user should know about that does not stop the run."""

    def progress(self, title: str, *fields: str, unit: str = "items", transient: bool = False):
        """A progress bar (see :func:`progress_bar`); a quiet stand-in when nothing shows."""
        return progress_or_quiet(
            title, *fields, console=self.console, unit=unit, transient=transient
        )


class ConsoleReporter(Reporter):
    """A :class:`Reporter` printing to a rich console (the CLI's: stderr)."""

    def __init__(self, console: Any | None = None):
        if console is None:
            from rich.console import Console

            console = Console(stderr=True)
        self.console = console

    def message(self, text: str) -> None:
        self.console.print(text, highlight=False)

    def warning(self, text: str) -> None:
        self.console.print(f"[yellow]warning:[/yellow] {text}", highlight=False)


#: The reporter that shows nothing.
QUIET = Reporter()


def as_reporter(reporter: Reporter | None) -> Reporter:
    """``reporter``, or :data:`QUIET` for None."""
    return QUIET if reporter is None else reporter
