"""One registry style for everything that ``--NAME`` selects: models, defenses, engines.

A ``Registry`` maps names to objects (builder functions or classes) registered with the
``@registry.register(name, **meta)`` decorator; ``meta`` holds what a listing may filter on (a
model's ``task``, a description). Modules that register the built-in entries are named in
``builtins`` and imported on first lookup, so importing a package stays light and the registry's
module never imports its entries (no cycles).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Generic, List, Optional, Sequence, Tuple, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered object, its name and what was said about it at registration."""
    name: str
    obj: T
    meta: Dict[str, Any] = field(default_factory=dict)


class Registry(Generic[T]):
    """Named objects of one kind (``kind`` appears in error messages: "unknown model 'x'")."""

    def __init__(self, kind: str, builtins: Sequence[str] = ()) -> None:
        self.kind = kind
        self.builtins = tuple(builtins)
        self._entries: Dict[str, Entry[T]] = {}
        self._loaded = False

    def register(self, name: Optional[str] = None, **meta: Any) -> Callable[[T], T]:
        """Decorator: register the object under ``name`` (default: its ``name`` attribute or ``__name__``)."""
        def deco(obj: T) -> T:
            key = name or getattr(obj, "name", None) or getattr(obj, "__name__")
            old = self._entries.get(key)
            if old is not None and old.obj is not obj:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
            self._entries[key] = Entry(key, obj, dict(meta))
            return obj
        return deco

    def _load(self) -> None:
        if not self._loaded:
            for mod in self.builtins:
                importlib.import_module(mod)
            self._loaded = True

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def entry(self, name: str) -> Entry[T]:
        """The entry of ``name``; an unknown name is a KeyError listing the known ones."""
        self._load()
        if name not in self._entries:
            raise KeyError(f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}")
        return self._entries[name]

    def get(self, name: str) -> T:
        return self.entry(name).obj

    def _rank(self, name: str) -> Tuple[int, int]:
        """Built-ins in ``builtins`` order, then the others, each in registration order."""
        obj = self._entries[name].obj
        module = getattr(getattr(obj, "func", obj), "__module__", None)
        first = self.builtins.index(module) if module in self.builtins else len(self.builtins)
        return first, list(self._entries).index(name)

    def names(self, **where: Any) -> List[str]:
        """Registered names (built-ins first, in ``builtins`` order), optionally filtered on ``meta``."""
        self._load()
        names = [n for n, e in self._entries.items() if all(e.meta.get(k) == v for k, v in where.items())]
        return sorted(names, key=self._rank)


__all__ = ["Entry", "Registry"]
