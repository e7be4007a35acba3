"""The rich progress bar the engines and commands show while they work."""

from __future__ import annotations

from typing import Any


def progress_bar(title: str, *fields: str, console: Any | None) -> Any:
    """``title | bar | done/total | fields... | time left`` on ``console``.

    ``fields`` are :class:`rich.progress.TextColumn` templates such as
    ``"loss {task.fields[loss]}"`` (the task then needs those fields). Returns None when
    ``console`` is None (quiet runs, processes other than the main one).
    """
    if console is None:
        return None
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn(f"[bold]{title}"),
        BarColumn(),
        MofNCompleteColumn(),
        *(TextColumn(f) for f in fields),
        TimeRemainingColumn(),
        console=console,
    )
