"""The head contract: scikit-learn style estimators that train from cached features.

- `__init__(**params)` only stores hyperparameters (validated against the head's frozen
  `Config` dataclass); learned state lives in attributes ending in `_`.
- `fit(X, y, eval_set=None)` returns self; `predict`, `predict_proba`, `score`.
- `get_params()` / `set_params(**p)`, so sweeps and clones need no special case.
- `save(dir)` writes `model.safetensors` + `config.json`; `Head.load(dir)` restores.

Inputs are `Features`: per modality a pooled array `[N, D]` (and optionally ragged
sequences and per-modality VA), with a presence mask, so every head trains and predicts
with any subset of modalities in the same way. Targets are `Targets`.
"""
from __future__ import annotations

import abc
import dataclasses
import json
import math
from pathlib import Path
from typing import Any, ClassVar, Literal, Mapping

import numpy as np

from featurestore.config import field, from_dict, from_strings, to_dict
from featurestore.errors import ConfigError

__all__ = ["Features", "Targets", "Head", "TargetKind", "DecisionParams", "parse_threshold", "THRESHOLD_GRID"]

TargetKind = Literal["single", "multi", "binary", "va"]

THRESHOLD_GRID = np.round(np.arange(0.02, 0.99, 0.01), 2)  # candidates when a threshold is chosen on validation


def parse_threshold(value: Any, name: str = "threshold") -> float | None:
    """A multi-label threshold setting -> a probability in (0, 1), or None for `auto`."""
    text = str(value).strip().lower()
    if text == "auto":
        return None
    try:
        t = float(text)
    except ValueError:
        t = math.nan
    if not 0 < t < 1:
        raise ConfigError(f"{name}={value!r} must be a probability in (0, 1) or 'auto' (chosen on validation)")
    return t


@dataclasses.dataclass(frozen=True)
class DecisionParams:
    """How multi-label scores become labels; every head that trains multi-label targets has these."""

    threshold: str = field("auto", "multi-label: predict each label whose score is strictly above this; "
                                   "a probability in (0, 1), or auto (the best on validation)")
    force_top: bool = field(False, "multi-label: also predict the top label of an item that no score passes")

    def __post_init__(self):
        parse_threshold(self.threshold)


@dataclasses.dataclass
class Features:
    """What a head sees: per modality pooled rows, presence masks, optional sequences and VA."""

    pooled: dict[str, np.ndarray]
    masks: dict[str, np.ndarray]
    sequences: dict[str, list] = dataclasses.field(default_factory=dict)
    va: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # [N, 2], NaN where unknown

    def __post_init__(self):
        n = {len(v) for v in self.pooled.values()} | {len(v) for v in self.masks.values()}
        if len(n) > 1:
            raise ConfigError(f"features of different lengths per modality: {sorted(n)}")
        for mod, arr in self.pooled.items():
            if mod not in self.masks:
                self.masks[mod] = np.ones(len(arr), bool)
            if arr.ndim != 2:
                raise ConfigError(f"{mod} features must be [N, D], got shape {arr.shape}")
            present = arr[self.masks[mod]]
            if present.size and not np.isfinite(present).all():
                bad = int((~np.isfinite(present).all(1)).sum())
                raise ConfigError(f"{mod} features hold NaN or inf in {bad} rows; re-extract them "
                                  "(fs verify) or drop those items")

    def __len__(self) -> int:
        return len(next(iter(self.pooled.values()))) if self.pooled else 0

    @property
    def modalities(self) -> list[str]:
        return sorted(self.pooled)

    def dims(self) -> dict[str, int]:
        return {m: int(a.shape[1]) for m, a in sorted(self.pooled.items())}

    def take(self, idx: np.ndarray) -> "Features":
        return Features(
            pooled={m: a[idx] for m, a in self.pooled.items()},
            masks={m: a[idx] for m, a in self.masks.items()},
            sequences={m: [s[i] for i in idx] for m, s in self.sequences.items()},
            va={m: a[idx] for m, a in self.va.items()},
        )

    @classmethod
    def from_split(cls, data: Any, *, sequences: bool = False) -> "Features":
        """From a `featurestore.reader.SplitData`."""
        return cls(pooled=dict(data.features), masks=dict(data.masks),
                   sequences=dict(data.sequences) if sequences else {}, va=dict(getattr(data, "va", {})))


@dataclasses.dataclass
class Targets:
    """single/binary: int class indices [N]; multi: {0,1} float [N, C]; va: float [N, 2]."""

    kind: TargetKind
    y: np.ndarray
    classes: list[str] = dataclasses.field(default_factory=list)
    label_va: np.ndarray | None = None  # [C, 2] VA of each class on [-1, 1] (the label VA table), if known

    def __len__(self) -> int:
        return len(self.y)

    def take(self, idx: np.ndarray) -> "Targets":
        return Targets(self.kind, self.y[idx], list(self.classes), self.label_va)

    @property
    def n_outputs(self) -> int:
        return 2 if self.kind == "va" else len(self.classes)


class Head(abc.ABC):
    """Base class of every registered head."""

    name: ClassVar[str]
    Config: ClassVar[type]
    supports: ClassVar[frozenset[str]] = frozenset({"single", "multi", "binary"})
    description: ClassVar[str] = ""
    uses_sequences: ClassVar[bool] = False  # the job loads ragged sequences when the store has them
    uses_va: ClassVar[bool] = False  # the job loads per-modality VA scores for it
    requires: ClassVar[tuple[str, ...]] = ()  # parameters naming a resource it cannot train without (concept: memory)
    threshold_param: ClassVar[str] = "threshold"  # the parameter holding the multi-label threshold (univa: zeta)

    def __init__(self, **params: Any):
        config = from_strings(self.Config, params, what=f"head {self.name!r}") if params else self.Config()
        for key, value in dataclasses.asdict(config).items():
            setattr(self, key, value)

    # ---- parameters ------------------------------------------------------------------
    @classmethod
    def param_names(cls) -> list[str]:
        return sorted(f.name for f in dataclasses.fields(cls.Config))

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.param_names()}

    def set_params(self, **params: Any) -> "Head":
        merged = {**self.get_params(), **params}
        unknown = sorted(set(params) - set(self.param_names()))
        if unknown:
            raise ConfigError(f"unknown parameter(s) {unknown} for head {self.name!r}; known: {self.param_names()}")
        config = from_strings(self.Config, merged, what=f"head {self.name!r}")
        for key, value in dataclasses.asdict(config).items():
            setattr(self, key, value)
        return self

    @property
    def config(self) -> Any:
        return self.Config(**self.get_params())

    @classmethod
    def example_params(cls, workdir: Path) -> dict[str, Any]:
        """Parameters under which this head trains on small synthetic features (the contract tests).

        A head that needs a resource (a replay memory, a concept bank) builds a tiny one in
        `workdir` and returns the parameters naming it; most heads need nothing.
        """
        return {}

    # ---- to implement ----------------------------------------------------------------
    @abc.abstractmethod
    def fit(self, X: Features, y: Targets, *, eval_set: tuple[Features, Targets] | None = None) -> "Head":
        ...

    @abc.abstractmethod
    def predict_proba(self, X: Features) -> np.ndarray:
        """single/binary: [N, C] summing to 1; multi: [N, C] independent scores; va: [N, 2] values."""

    @abc.abstractmethod
    def _state(self) -> dict[str, np.ndarray]:
        """Learned tensors to save (names -> arrays)."""

    @abc.abstractmethod
    def _restore(self, state: Mapping[str, np.ndarray], meta: dict) -> None:
        """Rebuild learned state from `_state()` output and the saved meta."""

    def _save_files(self, folder: Path) -> None:
        """Write learned state that is not a tensor (e.g. a FAISS index) into the run folder; default none."""

    def _load_files(self, folder: Path) -> None:
        """Read back what `_save_files` wrote, after `_restore`; default none."""

    # ---- shared ----------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if not getattr(self, "meta_", None):
            from featurestore.errors import FeatureStoreError
            raise FeatureStoreError(f"head {self.name!r} is not fitted; call fit() first")

    def _check_features(self, X: Features) -> None:
        """A saved head refuses features whose modalities or widths differ from training."""
        self._check_fitted()
        want = self.meta_["dims"]
        got = X.dims()
        for mod, d in got.items():
            if mod in want and want[mod] != d:
                raise ConfigError(f"{mod} features are {d}-d but head {self.name!r} was trained on {want[mod]}-d "
                                  "features; use the same backbone fingerprint it was trained on")
        unknown = sorted(set(got) - set(want))
        if unknown:
            raise ConfigError(f"head {self.name!r} was trained on {sorted(want)}, not {unknown}")

    def _set_meta(self, X: Features, y: Targets, **extra: Any) -> None:
        self.meta_ = {"dims": X.dims(), "kind": y.kind, "classes": list(y.classes), **extra}
        if y.kind == "va":  # a dimension with no known training value has an untrained output: never reported
            known = np.isfinite(np.asarray(y.y, np.float64)).any(0)
            self.meta_["va_trained"] = {"valence": bool(known[0]), "arousal": bool(known[1])}

    # ---- decisions -------------------------------------------------------------------
    def configured_threshold(self) -> float | None:
        """The multi-label threshold this head was configured with; None when it is chosen on validation."""
        return parse_threshold(getattr(self, self.threshold_param, 0.5), self.threshold_param)

    def decision_threshold(self) -> float:
        """The threshold `predict` applies: the one chosen at fit time (meta), else the configured one."""
        chosen = getattr(self, "meta_", {}).get("threshold")
        if chosen is not None:
            return float(chosen)
        configured = self.configured_threshold()
        return 0.5 if configured is None else configured

    def predict(self, X: Features, *, threshold: float | None = None) -> np.ndarray:
        """single/binary: class indices; multi: {0,1} [N, C]; va: [N, 2]."""
        t = self.decision_threshold() if threshold is None else threshold
        return self.decide(self.predict_proba(X), self.meta_["kind"], t, bool(getattr(self, "force_top", False)))

    @staticmethod
    def decide(p: np.ndarray, kind: str, threshold: float = 0.5, force_top: bool = False) -> np.ndarray:
        """Scores from `predict_proba` -> predictions (multi: scores strictly above `threshold`, as UniVA
        decides; with `force_top` an item no score passes gets its top label)."""
        if kind == "multi":
            out = (p > threshold).astype(np.int64)
            if force_top and len(out):
                none = out.sum(1) == 0
                out[none, p[none].argmax(1)] = 1
            return out
        if kind == "va":
            return p
        return p.argmax(1)

    def settle_decision(self, eval_set: tuple[Features, Targets] | None) -> None:
        """After fit: fix the multi-label threshold (the configured one, or the best on validation) in meta_."""
        if self.meta_.get("kind") != "multi":
            return
        configured = self.configured_threshold()
        if configured is not None:
            self.meta_.update(threshold=configured, threshold_chosen_on="configured")
        elif eval_set is None or not len(eval_set[1]):
            self.meta_.update(threshold=0.5, threshold_chosen_on="default (no validation split)")
        else:
            Xv, yv = eval_set
            t, _ = best_threshold(self.predict_proba(Xv), yv, bool(getattr(self, "force_top", False)))
            self.meta_.update(threshold=t, threshold_chosen_on="validation")

    def score(self, X: Features, y: Targets) -> float:
        from . import metrics

        return metrics.primary(y, self.predict(X), self.predict_proba(X))

    def save(self, folder: str | Path) -> Path:
        from safetensors.numpy import save_file

        self._check_fitted()
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: np.ascontiguousarray(v) for k, v in self._state().items()}
        save_file(state, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps(
            {"head": self.name, "params": to_dict(self.config), "meta": self.meta_}, indent=2, sort_keys=True,
            default=_json_default) + "\n")
        self._save_files(folder)
        return folder

    @staticmethod
    def load(folder: str | Path) -> "Head":
        from safetensors.numpy import load_file

        from . import get

        folder = Path(folder)
        cfg = json.loads((folder / "config.json").read_text())
        cls = get(cfg["head"])
        params = dataclasses.asdict(from_dict(cls.Config, cfg["params"], what=str(folder / "config.json")))
        head = cls()
        for key, value in params.items():
            setattr(head, key, value)
        head.meta_ = cfg["meta"]
        head._restore(load_file(str(folder / "model.safetensors")), cfg["meta"])
        head._load_files(folder)
        return head

    def __repr__(self) -> str:
        changed = {k: v for k, v in self.get_params().items() if v != getattr(self.Config(), k)}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in changed.items())})"


def best_threshold(proba: np.ndarray, y: Targets, force_top: bool = False) -> tuple[float, float]:
    """The grid threshold with the best primary metric on (proba, y), and that metric (ties: the lowest)."""
    from . import metrics

    best_t, best_s = 0.5, -math.inf
    for t in THRESHOLD_GRID:
        s = metrics.primary(y, Head.decide(proba, "multi", float(t), force_top), proba)
        if s > best_s:
            best_t, best_s = float(t), s
    return best_t, best_s


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
