"""The search space of a sweep: grids, space files, random draws and Optuna suggestions, each value
checked against the head's parameters before any training."""
from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np

from featurestore._io import regular_file_bytes
from featurestore.config import from_strings
from featurestore.errors import ConfigError, NotFoundError

__all__ = ["parse_grid", "load_space", "check_space", "validate", "expand_grid", "sample_random", "suggest",
           "space_kind"]


def parse_grid(text: str | list[str] | tuple[str, ...]) -> dict[str, list[str]]:
    """`'lr=1e-4,3e-4 dropout=0.1,0.3'` (or several such strings) -> {param: [value strings]}."""
    items = [text] if isinstance(text, str) else list(text)
    out: dict[str, list[str]] = {}
    for item in " ".join(items).split():
        key, sep, values = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"grid entry {item!r} is not of the form param=v1,v2,...")
        vals = [v for v in values.split(",") if v.strip()]
        if not vals:
            raise ConfigError(f"grid entry {item!r} lists no values")
        if key in out:
            raise ConfigError(f"grid names {key!r} twice")
        out[key] = vals
    if not out:
        raise ConfigError("the grid is empty; give e.g. --grid 'lr=1e-4,1e-3 dropout=0.1,0.3'")
    return out


_JSON_TYPES = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


def load_space(path: str | Path) -> dict:
    """A JSON space file: per param a list of choices or {"low", "high", "log": bool, "type": "float|int"}."""
    try:
        space = json.loads(regular_file_bytes(path))  # a FIFO would block the read forever
    except FileNotFoundError:
        raise NotFoundError(f"space file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"space file {path} cannot be read: {exc.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"space file {path} is not valid JSON: {exc}") from None
    if not isinstance(space, dict) or not space:
        what = "no parameter" if space in ({}, []) else f"a JSON {_JSON_TYPES.get(type(space), 'value')}"
        raise ConfigError(f"space file {path} holds {what}; give one JSON object with per parameter a list of "
                          'choices or {"low", "high"}, e.g. {"lr": {"low": 1e-4, "high": 1e-2, "log": true}}')
    return space


def check_space(space: dict, cls, fixed: dict) -> dict:
    if not isinstance(space, dict) or not space:
        raise ConfigError("the search space is empty; give per parameter a list of choices or {low, high}")
    out = {}
    for name, spec in space.items():
        if isinstance(spec, list):
            if not spec:
                raise ConfigError(f"space: {name!r} lists no choices")
            for v in spec:
                validate(cls, {**fixed, name: v})
            out[name] = list(spec)
            continue
        if not isinstance(spec, dict) or not {"low", "high"} <= set(spec):
            raise ConfigError(f"space: {name!r} must be a list of choices or {{\"low\", \"high\", \"log\", \"type\"}}")
        extra = sorted(set(spec) - {"low", "high", "log", "type"})
        if extra:
            raise ConfigError(f"space: {name!r} has unknown keys {extra}; use low, high, log, type")
        typ = space_kind(spec)
        if typ not in ("float", "int"):
            raise ConfigError(f"space: {name!r} type {typ!r} is not float or int")
        low, high, log = spec["low"], spec["high"], bool(spec.get("log", False))
        if not isinstance(low, (int, float)) or not isinstance(high, (int, float)) or low > high:
            raise ConfigError(f"space: {name!r} needs numbers low <= high, got {low!r}, {high!r}")
        if log and low <= 0:
            raise ConfigError(f"space: {name!r} is log-scaled, so low must be > 0 (got {low})")
        for v in (low, high):
            validate(cls, {**fixed, name: int(v) if typ == "int" else float(v)})
        out[name] = {"low": low, "high": high, "log": log, "type": typ}
    return out


def space_kind(spec: dict) -> str:
    """A range's type: as given, else int when both bounds are ints."""
    return spec.get("type") or ("int" if all(isinstance(spec[k], int) and not isinstance(spec[k], bool)
                                             for k in ("low", "high")) else "float")


def validate(cls, params: dict) -> dict:
    """Typed values of `params` for head class `cls` (unknown names list its parameters)."""
    config = from_strings(cls.Config, params, what=f"head {cls.name!r}")
    return {k: getattr(config, k) for k in params}


def expand_grid(grid: dict[str, list]) -> list[dict]:
    names = list(grid)
    return [dict(zip(names, combo)) for combo in itertools.product(*(grid[n] for n in names))]


def sample_random(space: dict, n: int, seed: int) -> list[dict]:
    """The first n draws of a seeded sequence (so a larger n extends a smaller one)."""
    rng = np.random.default_rng([seed, 6])
    out = []
    for _ in range(n):
        cfg = {}
        for name, spec in space.items():
            if isinstance(spec, list):
                cfg[name] = spec[int(rng.integers(len(spec)))]
                continue
            lo, hi = float(spec["low"]), float(spec["high"])
            u = rng.random()
            val = math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo))) if spec.get("log") else lo + u * (hi - lo)
            cfg[name] = min(int(spec["high"]), max(int(spec["low"]), int(round(val)))) if space_kind(spec) == "int" \
                else val
        out.append(cfg)
    return out


def suggest(trial, space: dict) -> dict:
    cfg = {}
    for name, spec in space.items():
        if isinstance(spec, list):
            cfg[name] = trial.suggest_categorical(name, spec)
        elif spec["type"] == "int":
            cfg[name] = trial.suggest_int(name, int(spec["low"]), int(spec["high"]), log=spec["log"])
        else:
            cfg[name] = trial.suggest_float(name, float(spec["low"]), float(spec["high"]), log=spec["log"])
    return cfg
