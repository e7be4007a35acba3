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


# The exit codes of every ``dd`` command (documented in the README).
EXIT_OK = 0
EXIT_ERROR = 1  # a library error: what is wrong and how to fix it, on one line
EXIT_USAGE = 2  # a usage mistake (click's, or a UsageError)
EXIT_GATE = 3  # dd detect --fail-above: some image scored above the threshold
EXIT_SOME_INPUTS_FAILED = 4  # the run finished, but some inputs could not be processed
EXIT_INTERRUPTED = 130  # Ctrl-C


class UsageError(DDError):
    """A mistake in how a command was called that only its values reveal: a required setting
    that a ``--config`` preset could have given, a choice outside its list, a malformed
    value. ``dd.cli`` shows it as click shows its own usage errors (usage line, the message,
    ``Try 'dd ... --help'``) and exits 2, the code of usage mistakes only."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message, hint, exit_code=EXIT_USAGE)
