"""Valence-arousal (VA): per-modality VA scores cached beside the embeddings, and label VA.

The VA scorer registry holds the names users type after `fs va score --scorer` and
`fs extract --va`. Entries are dotted paths, so a scorer's heavy imports (torch,
transformers) happen only when it is used. Adding a scorer is one module in this folder
(a `VAScorer` subclass, see base.py) plus one line in `_BUILTIN`.
"""
from __future__ import annotations

from typing import Any, Mapping

from ..config import from_strings
from ..registry import Registry
from .base import DIMENSIONS, ScorerConfig, VAScorer

__all__ = ["VAScorer", "ScorerConfig", "DIMENSIONS", "REGISTRY", "register", "get", "names", "create"]

_BUILTIN: dict[str, str] = {
    "lexicon": "featurestore.va.lexicon:LexiconScorer",
    "model": "featurestore.va.model:ModelScorer",
    "learned": "featurestore.va.learned:LearnedScorer",
}
REGISTRY: Registry[type[VAScorer]] = Registry("VA scorer", _BUILTIN, list_hint="fs va list")
register, get, names = REGISTRY.register, REGISTRY.get, REGISTRY.names


def create(name: str, params: Mapping[str, str] | None = None, *, device: str = "auto",
           store: Any = None) -> VAScorer:
    """Instantiate VA scorer `name` from string parameters (`--param key=value`)."""
    cls = get(name)
    config = from_strings(cls.Config, dict(params or {}), what=f"VA scorer {name!r}")
    return cls(config, device=device, store=store)
