"""A small generic registry for the few real extension points (estimators, losses,
parsers, reward presets, policies). Duplicate names raise; unknown names list the known."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")

__all__ = ["Registry", "RegistryError"]


class RegistryError(KeyError):
    """An unknown name or a conflicting registration. ``str()`` is the plain message."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it readable
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """Name -> object, e.g. ``ESTIMATORS: Registry[Estimator] = Registry("advantage estimator")``.

    >>> r: Registry[int] = Registry("number")
    >>> r.register("one", 1)
    1
    >>> r.get("one")
    1
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None) -> T | Callable[[T], T]:
        """Register ``obj`` under ``name``; without ``obj`` this is a decorator.

        Registering the same object twice is a no-op (module reloads); another object
        under a taken name raises ``RegistryError``.
        """
        if not isinstance(name, str) or not name:
            raise RegistryError(f"{self.kind} name must be a non-empty string, got {name!r}")

        def _add(o: T) -> T:
            old = self._items.get(name)
            if old is not None and old is not o:
                raise RegistryError(f"{self.kind} {name!r} is already registered to {old!r}; pick another name")
            self._items[name] = o
            return o

        return _add(obj) if obj is not None else _add

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "(none)"
            raise RegistryError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def names(self) -> list[str]:
        return sorted(self._items)

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._items.items())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"
