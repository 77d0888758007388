"""A registry per pluggable kind, keyed by the name users type on the CLI.

Entries may be dotted 'module:Attr' paths, imported on first use, so an optional heavy
dependency (xgboost, faiss-gpu) is only needed when its entry is used.
"""
from __future__ import annotations

import importlib
from typing import Generic, Mapping, TypeVar

from .errors import ConfigError, NotFoundError

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, builtin: Mapping[str, str], *, list_hint: str = ""):
        self.kind = kind
        self.list_hint = list_hint
        self._entries: dict[str, str | T] = dict(builtin)

    def register(self, name: str, target: str | T) -> None:
        """Add an entry; a name can be taken once."""
        if name in self._entries:
            raise ConfigError(f"{self.kind} {name!r} is already registered (as {self._entries[name]})")
        self._entries[name] = target

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def get(self, name: str) -> T:
        if name not in self._entries:
            hint = f" ({self.list_hint})" if self.list_hint else ""
            raise NotFoundError(f"{self.kind} {name!r} is not registered; known: "
                                f"{', '.join(self.names()) or 'none'}{hint}")
        target = self._entries[name]
        if isinstance(target, str):
            module, _, attr = target.partition(":")
            try:
                target = getattr(importlib.import_module(module), attr)
            except ImportError as exc:
                raise NotFoundError(f"{self.kind} {name!r} needs a package that is not installed: {exc}") from None
            self._entries[name] = target
        return target
