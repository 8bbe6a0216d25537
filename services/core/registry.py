"""Implementations chosen by name: one small registry type for every kind of choice."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TypeVar

from services.core.errors import ConfigError

T = TypeVar("T")


class Registry(Mapping[str, T]):
    """Named implementations of one call signature; an unknown name is a clear ConfigError."""

    def __init__(self, kind: str, items: Mapping[str, T]) -> None:
        self.kind = kind
        self._items = dict(items)

    def __getitem__(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise ConfigError(
                f"unknown {self.kind} {name!r}; choose one of {', '.join(self._items)}"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def get(self, name: str, default: T | None = None) -> T | None:  # type: ignore[override]
        """The implementation, or default when the name is unknown."""
        return self._items.get(name, default)

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)
