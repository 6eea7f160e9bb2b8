"""One registry type for everything the toolkit looks up by name: stages, attribution methods, target kinds and
checkpoint formats. Adding an entry is one decorator (or call) in the entry's own module; the contract tests are
parametrised over the registries, so a new entry is tested with no test edit."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar, overload

from gestalt_xai.errors import ConfigError

__all__ = ["Registry"]

T = TypeVar("T")
_MISSING: Any = object()


class Registry(Mapping[str, T], Generic[T]):
    """Entries by name, in registration order (a read-only mapping with :meth:`add` and :meth:`remove`).

    ``load`` imports the modules of the built-in entries; it runs once, the first time a name is missing or the
    entries are listed, so importing the registry stays cheap. :meth:`add` never triggers it (an entry's module may
    be half imported when it registers).

    >>> fruit = Registry[type]("fruit")
    >>> fruit.add("apple", int)
    >>> fruit.get("apple"), fruit.names(), "apple" in fruit
    (<class 'int'>, ['apple'], True)
    >>> fruit.get("pear")
    Traceback (most recent call last):
    ...
    gestalt_xai.errors.ConfigError: unknown fruit 'pear'; available: apple
    >>> fruit.get("pear", None) is None
    True
    """

    def __init__(self, what: str, load: Callable[[], None] | None = None) -> None:
        self.what = what
        self._load = load
        self._entries: dict[str, T] = {}

    def _load_builtin(self) -> None:
        load, self._load = self._load, None
        if load is not None:
            load()

    def add(self, name: str, entry: T, same: Callable[[T, T], bool] | None = None) -> None:
        """Register ``entry`` as ``name``. A name taken by another entry is a :class:`ConfigError`, unless
        ``same(old, new)`` says the new one is the old one registered again (e.g. a reloaded module)."""
        old = self._entries.get(name, _MISSING)
        if old is not _MISSING and old is not entry and not (same is not None and same(old, entry)):
            raise ConfigError(f"{self.what} {name!r} is already registered ({old!r})")
        self._entries[name] = entry

    def remove(self, name: str) -> None:
        """Unregister ``name`` (plugins and tests that register entries for a while)."""
        self._entries.pop(name, None)

    @overload
    def get(self, name: str) -> T: ...

    @overload
    def get(self, name: str, default: Any) -> Any: ...

    def get(self, name: str, default: Any = _MISSING) -> Any:
        """The entry registered as ``name``; without ``default``, a :class:`ConfigError` listing the names."""
        if name not in self._entries:
            self._load_builtin()
        if name in self._entries:
            return self._entries[name]
        if default is not _MISSING:
            return default
        raise ConfigError(f"unknown {self.what} {name!r}; available: {', '.join(self.names())}")

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        return sorted(self)

    def __getitem__(self, name: str) -> T:
        if name not in self._entries:
            self._load_builtin()
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        self._load_builtin()
        return iter(list(self._entries))

    def __len__(self) -> int:
        self._load_builtin()
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        if name not in self._entries:
            self._load_builtin()
        return name in self._entries

    def __repr__(self) -> str:
        return f"Registry({self.what!r}, {list(self._entries)})"
