"""The one exception type library code raises for problems a user can fix."""

from __future__ import annotations


class DDError(Exception):
    """A problem with the user's input or environment.

    ``message`` says what is wrong (and which file); ``hint`` says how to fix it.
    ``dd.cli.main`` prints both on one line and exits with ``exit_code``.
    """

    def __init__(self, message: str, hint: str | None = None, *, exit_code: int = 1):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.exit_code = exit_code

    def __str__(self) -> str:
        return f"{self.message} (hint: {self.hint})" if self.hint else self.message
