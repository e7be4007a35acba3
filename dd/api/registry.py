"""Name -> class registries filled by plugins, with provenance and clash detection."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from dd.errors import DDError

T = TypeVar("T")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")


@dataclass
class Entry(Generic[T]):
    name: str
    obj: T
    plugin: str
    aliases: tuple[str, ...] = ()
    description: str = ""


@dataclass
class Registry(Generic[T]):
    """Holds what plugins registered of one kind (``detector``, ``backbone``)."""

    kind: str
    base: type
    entries: dict[str, Entry[T]] = field(default_factory=dict)
    _alias: dict[str, str] = field(default_factory=dict)

    def register(
        self,
        obj: Any,
        name: str | None = None,
        aliases: tuple[str, ...] | list[str] = (),
        *,
        plugin: str,
    ) -> None:
        if not (isinstance(obj, type) and issubclass(obj, self.base)):
            raise DDError(
                f"plugin {plugin!r} registered {obj!r} as a {self.kind}, "
                f"but it is not a subclass of {self.base.__module__}.{self.base.__qualname__}",
                hint=f"register a {self.base.__qualname__} subclass",
            )
        name = name or getattr(obj, "name", None)
        if not isinstance(name, str) or not _NAME.match(name):
            raise DDError(
                f"plugin {plugin!r} registered a {self.kind} with an invalid name {name!r}",
                hint="names are lower-case letters, digits, '-', '_' or '.'",
            )
        for key in (name, *aliases):
            if key in self._alias:
                other = self.entries[self._alias[key]]
                raise DDError(
                    f"{self.kind} name clash: {key!r} is registered by plugin {other.plugin!r} "
                    f"and again by plugin {plugin!r}",
                    hint="uninstall one of them, or limit loading with DD_LOAD_PLUGINS",
                )
        doc = (obj.__doc__ or "").strip().splitlines()
        description = getattr(obj, "description", "") or (doc[0] if doc else "")
        self.entries[name] = Entry(name, obj, plugin, tuple(aliases), description)
        for key in (name, *aliases):
            self._alias[key] = name

    def get(self, name: str) -> T:
        return self.entry(name).obj

    def entry(self, name: str) -> Entry[T]:
        if name not in self._alias:
            known = ", ".join(sorted(self.entries)) or "none"
            raise DDError(
                f"unknown {self.kind} {name!r} (installed: {known})",
                hint="`dd plugins` lists what is installed",
            )
        return self.entries[self._alias[name]]

    def names(self) -> list[str]:
        return sorted(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self._alias

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(self.entries[n] for n in self.names())

    def __len__(self) -> int:
        return len(self.entries)
