"""Every `dd ...` command line in the README, the guides and the examples parses against the
real CLI: a command, sub-command or option that does not exist fails the build.

Lines are taken from fenced code blocks (``` ... ```) and indented code, with ``\\``
continuations joined, comments dropped, and ``accelerate launch ... -m dd`` /
``torchrun ... -m dd`` / ``python -m dd`` prefixes understood. Placeholders (``IMAGES``,
``N``) are fine: values are not converted, only the command path and option names are
checked.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer

from dd.cli import build_app

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "examples" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
DOCS += sorted((ROOT / "examples").glob("*/README.md"))
_START = re.compile(r"^(?:\$\s+)?(?:.*\s-m\s+dd\s+|dd\s+)(?P<rest>.*)$")


def command_lines(path: Path) -> list[tuple[int, list[str]]]:
    out: list[tuple[int, list[str]]] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    in_fence = False
    i = 0
    while i < len(lines):
        raw = lines[i]
        if raw.lstrip().startswith("```"):
            in_fence = not in_fence
            i += 1
            continue
        code = in_fence or raw.startswith("    ")
        text = raw.strip()
        m = _START.match(text) if code else None
        if m is None or text.startswith("#") or "-m dd." in text:
            i += 1
            continue
        start = i
        joined = m.group("rest")
        while joined.rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
            joined = joined.rstrip()[:-1] + " " + lines[i].strip()
        joined = joined.split(" #", 1)[0]
        try:
            args = shlex.split(joined, comments=False)
        except ValueError:
            args = joined.split()
        args = [a for a in args if a not in ("|", "&&", ">", "2>&1")]
        out.append((start + 1, args))
        i += 1
    return out


CASES = [
    pytest.param(args, id=f"{p.relative_to(ROOT)}:{n}")
    for p in DOCS
    for n, args in command_lines(p)
]


@pytest.fixture(scope="module")
def root():
    return typer.main.get_command(build_app())


def test_the_docs_show_commands():
    assert len(CASES) > 30


@pytest.mark.parametrize(
    "args",
    [["detect", "imgs", "--batchsize", "2"], ["label", "mien", "x"], ["refine", "train", "--nope"]],
)
def test_a_wrong_line_fails(args, root):
    with pytest.raises(Exception, match="No such option|No such command"):
        test_documented_command_parses(args, root)


@pytest.mark.parametrize("args", CASES)
def test_documented_command_parses(args, root):
    cmd, name, rest = root, "dd", list(args)
    while getattr(cmd, "commands", None) is not None:
        if not rest or rest[0] in ("-h", "--help", "--version"):
            return  # help
        ctx = _parse(cmd, name, rest)
        remaining = [*getattr(ctx, "_protected_args", []), *ctx.args]
        sub, command, rest = cmd.resolve_command(ctx, remaining)
        cmd, name = command, f"{name} {sub}"
    _parse(cmd, name, rest)


def _parse(cmd, name, args):
    """Parse ``args``: an unknown option or command fails; a placeholder value (``N`` for
    an integer) or a left-out required option does not (the option names parsed first)."""
    try:
        return cmd.make_context(name, list(args))
    except typer.TyperException as e:
        if type(e).__name__ in ("NoSuchOption", "BadOptionUsage") or "No such command" in str(
            e.format_message()
        ):
            raise
        return cmd.make_context(name, list(args), resilient_parsing=True)
