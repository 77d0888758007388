"""Frozen dataclass configs: one per plug-in, with help per field, parsed from strings.

Backbones, VA scorers and heads each declare a `Config` dataclass whose fields carry a
`help` in their metadata. The CLI's `--param key=value` strings become typed values here,
and configs round-trip through sorted JSON beside every artifact they produced.
"""
from __future__ import annotations

import dataclasses
import json
import math
import typing
import warnings
from typing import Any, Mapping

from . import __version__
from .errors import ConfigError

__all__ = ["field", "parse_params", "from_strings", "from_dict", "to_dict", "describe", "coerce", "SEED_MAX"]

SEED_MAX = 2**32 - 1  # numpy's generators take seeds in [0, 2**32) (torch and xgboost do too)
_INT_LIMIT = 2**63  # what torch, numpy and xgboost hold in an int64


def field(default: Any, help: str, **kwargs) -> Any:  # noqa: A002 - mirrors argparse
    """A dataclass field with a help text (and a default; lists use default_factory)."""
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs)
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


def parse_params(items: typing.Iterable[str]) -> dict[str, str]:
    """`["lr=1e-3", "hidden=128"]` -> `{"lr": "1e-3", "hidden": "128"}`."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"parameter {item!r} is not of the form key=value")
        if key.strip() in out:  # -p lr=1e-3 ... -p lr=1e-2: which one was meant?
            raise ConfigError(f"parameter {key.strip()!r} is given twice ({out[key.strip()]!r} and {value.strip()!r}); "
                              "give it once")
        out[key.strip()] = value.strip()
    return out


def _fields(cls) -> dict[str, dataclasses.Field]:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for f in fields.values():
        f.type = hints.get(f.name, f.type)
    return fields


def coerce(value: Any, typ: Any, name: str) -> Any:
    """Turn a string (or JSON value) into the annotated type of a field."""
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin is typing.Union:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return coerce(value, inner[0], name)
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v for v in value.replace(";", ",").split(",") if v.strip()] if value else []
        elem = args[0] if args else str
        out = [coerce(v, elem, name) for v in value]
        return tuple(out) if origin is tuple else out
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{name}={value!r} is not one of {list(args)}")
        return value
    if not isinstance(value, str):
        if typ is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if typ is str and isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # a number where a number-or-word field (threshold=auto|0.3) takes text
        if typ in (int, float, str, bool) and not isinstance(value, typ):
            raise ConfigError(f"{name}={value!r} should be of type {typ.__name__}")
        return value
    try:
        if typ is bool:
            low = value.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if typ is int:
            return _in_range(int(float(value)) if "e" in value.lower() and float(value).is_integer() else int(value),
                             value, name)
        if typ is float:
            return _finite(float(value), value, name)
        if typ is str:
            return value
        if typ is dict:
            return json.loads(value)
    except ConfigError:
        raise
    except (ValueError, json.JSONDecodeError):
        raise ConfigError(f"{name}={value!r} is not a valid {getattr(typ, '__name__', typ)}") from None
    return value


def _in_range(number: int, value: str, name: str) -> int:
    """A whole number a library can hold: a seed in [0, SEED_MAX], anything else within int64."""
    if name == "seed" and not 0 <= number <= SEED_MAX:
        raise ConfigError(f"seed={value!r} must be a whole number from 0 to {SEED_MAX}")
    if abs(number) >= _INT_LIMIT:
        raise ConfigError(f"{name}={value!r} is too large; give a whole number below 2**63")
    return number


def _finite(number: float, value: str, name: str) -> float:
    """NaN and inf are no setting of any parameter (a NaN learning rate trains forever on NaN)."""
    if not math.isfinite(number):
        raise ConfigError(f"{name}={value!r} must be a finite number")
    return number


def from_strings(cls, params: Mapping[str, Any], *, what: str = "") -> Any:
    """Build config `cls` from `key -> string` pairs; unknown keys list the known ones."""
    fields = _fields(cls)
    unknown = sorted(set(params) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown parameter{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}"
            f"{' for ' + what if what else ''}; known: {', '.join(sorted(fields))}"
        )
    values = {k: coerce(v, fields[k].type, k) for k, v in params.items()}
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"invalid parameters{' for ' + what if what else ''}: {exc}") from None


def from_dict(cls, data: Mapping[str, Any], *, what: str = "") -> Any:
    """Load a config saved by `to_dict`, warning about (and dropping) keys from newer versions."""
    fields = _fields(cls)
    extra = sorted(set(data) - set(fields) - {"_version", "_type"})
    if extra:
        warnings.warn(f"ignoring unknown config keys {extra} in {what or cls.__name__} "
                      f"(written by featurestore {data.get('_version', '?')})", stacklevel=2)
    return cls(**{k: coerce(v, fields[k].type, k) for k, v in data.items() if k in fields})


def to_dict(config: Any) -> dict:
    out = dataclasses.asdict(config)
    out["_version"] = __version__
    out["_type"] = type(config).__name__
    return out


def describe(cls) -> list[tuple[str, str, Any, str]]:
    """(name, type, default, help) for each field: what `--help` and error messages show."""
    rows = []
    for f in _fields(cls).values():
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        tname = getattr(f.type, "__name__", str(f.type).replace("typing.", ""))
        rows.append((f.name, tname, default, f.metadata.get("help", "")))
    return rows
