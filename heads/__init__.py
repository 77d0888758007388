"""The head registry: the names users type after `--method`.

Adding a head is one module in this folder plus one line in `_BUILTIN` (CONTRIBUTING.md).
"""
from __future__ import annotations

from featurestore.registry import Registry

from .base import Features, Head, Targets

__all__ = ["Features", "Head", "Targets", "REGISTRY", "register", "get", "create", "names"]

_BUILTIN: dict[str, str] = {
    "concept": "featurestore.heads.concept:ConceptHead",
    "drkf": "featurestore.heads.drkf:DRKF",
    "scl": "featurestore.heads.scl:SCL",
    "linear": "featurestore.heads.linear:Linear",
    "mlp": "featurestore.heads.mlp:MLP",
    "umbe": "featurestore.heads.umbe:UMBE",
    "univa": "featurestore.heads.univa:UniVA",
    "xgboost": "featurestore.heads.xgb:XGBoost",
}
REGISTRY: Registry[type[Head]] = Registry("head", _BUILTIN, list_hint="fs heads list")
register, get, names = REGISTRY.register, REGISTRY.get, REGISTRY.names


def create(name: str, **params) -> Head:
    return get(name)(**params)
