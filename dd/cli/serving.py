"""What the two page-serving commands (``dd label serve``, ``dd eval study serve``) share:
access tokens for a bind beyond loopback, and the links they print."""

from __future__ import annotations

from typing import Any

from rich.console import Console


def team_tokens(host: str, names: list[str]) -> dict[str, str | None] | None:
    """Access tokens for a bind beyond loopback: one per name, or one shared link."""
    from dd.runtime.web import is_loopback, make_tokens

    return None if is_loopback(host) else make_tokens(names)


def print_links(err: Console, server: Any, what: str) -> None:
    links = server.share_urls
    if server.tokens:
        err.print(
            f"{what} on {server.host}:{server.port}: only holders of a link below can open it "
            "(keep the links private). Ctrl+C stops.",
            highlight=False,
        )
        for name, url in links:
            label = name if name is not None else "shared link (names are typed in the page)"
            err.print(f"  {label}: {url}", highlight=False, soft_wrap=True)
    else:
        err.print(f"{what} at {links[0][1]} (Ctrl+C to stop)", highlight=False)
