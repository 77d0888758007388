"""From the store to what a head trains on: `Features`, `Targets`, and tensors sliced into batches.

A split is read from the store once (float16 on disk becomes float32 on read), turned into
tensors once, and every mini-batch is a slice of those tensors: no per-item Dataset objects.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from featurestore.errors import ConfigError, DatasetError

from .base import Features, Targets

__all__ = ["TARGETS", "target_kind", "encode_targets", "features_of", "usable", "carve_validation", "Prepared",
           "prepare", "align", "TensorSet", "pad_sequences"]

TARGETS = ("label", "labels", "va")
VAL_NAMES = ("val", "valid", "validation", "dev")


def target_kind(target: str, label_set: Sequence[str]) -> str:
    """`label` -> single (binary when the label set has two classes), `labels` -> multi, `va` -> va."""
    if target == "labels":
        return "multi"
    if target == "va":
        return "va"
    if target == "label":
        return "binary" if len(label_set) == 2 else "single"
    raise ConfigError(f"target {target!r} is not one of {list(TARGETS)}")


def encode_targets(data: Any, target: str, classes: Sequence[str], *,
                   label_va: np.ndarray | None = None) -> tuple[Targets, np.ndarray]:
    """Targets of a `SplitData` and which rows have one; labels outside `classes` are an error."""
    kind = target_kind(target, classes)
    where = f"dataset {data.dataset!r} split {data.split!r}"
    if kind == "va":
        y = np.stack([data.valence, data.arousal], 1).astype(np.float32)
        return Targets("va", y), np.isfinite(y).any(1)
    index = {c: i for i, c in enumerate(classes)}
    if kind == "multi":
        outside = sorted({c for row in data.labels for c in row if c not in index})
        _refuse_outside(outside, where, classes)
        y = np.zeros((len(data), len(classes)), np.float32)
        for i, row in enumerate(data.labels):
            y[i, [index[c] for c in row]] = 1.0
        return Targets("multi", y, list(classes), label_va), y.sum(1) > 0
    keep = np.array([lab is not None for lab in data.label], bool)
    outside = sorted({lab for lab in data.label[keep] if lab not in index})
    _refuse_outside(outside, where, classes)
    y = np.array([index[lab] if lab is not None else -1 for lab in data.label], np.int64)
    return Targets(kind, y, list(classes), label_va), keep


def _refuse_outside(outside: list, where: str, classes: Sequence[str]) -> None:
    if outside:
        raise DatasetError(f"{where} has labels {outside[:10]} outside the dataset's label set {list(classes)}; "
                           "re-register the dataset (fs datasets add --replace) so its label set is recomputed")


def features_of(data: Any, *, sequences: bool = False, va_from_labels: bool = True) -> Features:
    """`Features` of a `SplitData`; a modality with no cached VA scores takes the item's VA labels if asked."""
    X = Features.from_split(data, sequences=sequences)
    if sequences:  # a feature set without stored sequences reads as all-None: treat it as pooled only
        X.sequences = {m: s for m, s in X.sequences.items() if any(r is not None for r in s)}
    if va_from_labels:
        item_va = np.stack([data.valence, data.arousal], 1).astype(np.float32)
        for mod in X.pooled:
            if mod not in X.va or not np.isfinite(X.va[mod]).any():
                X.va[mod] = item_va
    return X


def carve_validation(n: int, *, fraction: float, seed: int, groups: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray, dict]:
    """Split train rows into (train, val) indices, by group when groups are given, seeded."""
    if not 0 < fraction < 1:
        raise ConfigError(f"validation fraction {fraction} must be between 0 and 1")
    rng = np.random.default_rng(seed)
    if groups is not None and any(g is not None for g in groups):
        keys = np.array([str(g) if g is not None else f"\0{i}" for i, g in enumerate(groups)], object)
        uniq, inverse = np.unique(keys, return_inverse=True)
        chosen = rng.permutation(len(uniq))[: max(1, int(round(fraction * len(uniq))))]
        is_val = np.isin(inverse, chosen)
        by = "group"
    else:
        is_val = np.zeros(n, bool)
        is_val[rng.permutation(n)[: max(1, int(round(fraction * n)))]] = True
        by = "item"
    if is_val.all() or not is_val.any():
        raise DatasetError(f"cannot carve a validation split from {n} training items")
    record = {"carved": True, "from": "train", "fraction": fraction, "seed": seed, "by": by,
              "n_train": int((~is_val).sum()), "n_val": int(is_val.sum())}
    return np.flatnonzero(~is_val), np.flatnonzero(is_val), record


def usable(data: Any, target: str, classes: Sequence[str], *, sequences: bool = False, va: bool = False,
           label_va: np.ndarray | None = None) -> tuple[Features, Targets, np.ndarray, int, int]:
    """The rows of a split that have a target and a cached row in at least one modality.

    Returns (features, targets, kept row indices, rows without a target, rows without features).
    """
    where = f"dataset {data.dataset!r} split {data.split!r}"
    X = features_of(data, sequences=sequences, va_from_labels=va)
    y, keep = encode_targets(data, target, classes, label_va=label_va)
    no_target = int((~keep).sum())
    if not keep.any():
        raise DatasetError(f"{where} has no items with a {target!r} target")
    cached = np.logical_or.reduce([X.masks[m] for m in X.pooled])
    no_features = int((keep & ~cached).sum())
    keep &= cached
    if not keep.any():
        raise DatasetError(f"{where} has no items with cached features {', '.join(f'{m}={fp}' for m, fp in data.fingerprints.items())}; "
                           f"extract them first (fs extract --dataset {data.dataset})")
    idx = np.flatnonzero(keep)
    return X.take(idx), y.take(idx), idx, no_target, no_features


@dataclasses.dataclass
class Prepared:
    """Every split a training run needs, plus what lineage.json records about them."""

    kind: str
    classes: list[str]
    splits: dict[str, tuple[Features, Targets]]
    fingerprints: dict[str, str]
    manifest_hash: str
    validation: dict
    dropped: dict[str, int]  # items without a target, per split
    no_features: dict[str, int]  # items with a target but no cached row in any modality, per split
    va_sources: dict[str, str]  # modality -> where its VA came from (heads that use VA)
    label_va_note: str = ""
    target: str = ""  # the target trained on (label | labels | va), after the default was applied


def _load(store, ds, split, features, *, sequences: bool, va: bool):
    from featurestore.reader import load_split

    kwargs: dict[str, Any] = {"sequences": sequences}
    if va and "va" in inspect.signature(load_split).parameters:
        kwargs["va"] = True
    return load_split(store, ds, split, features, **kwargs)


def _label_va(ds, target: str, classes: list[str], train: Any) -> tuple[np.ndarray | None, str]:
    from featurestore.va.labels import class_means, label_va_table

    if target == "va":
        return None, ""
    labels = train.labels if target == "labels" else list(train.label)
    try:
        means = class_means(labels, train.valence, train.arousal)
        return label_va_table(classes, overrides=ds.info.get("label_va"), label_means=means), ""
    except ConfigError as exc:
        return None, str(exc)


def prepare(store, dataset: str, features: str | Mapping[str, str], *, target: str = "",
            val_fraction: float = 0.1, seed: int = 0, sequences: bool = False, va: bool = False,
            eval_split: str = "test") -> Prepared:
    """Read train, validation (or carve one) and the evaluation split of `dataset` into features and targets.

    `target` "" takes the one target the dataset has (an error listing them when it has several)."""
    from featurestore.datasets import get_dataset

    ds = get_dataset(store, dataset)
    target = ds.check_target(target)  # "" -> the one target the dataset has
    classes = list(ds.multilabel_set if target == "labels" else ds.label_set if target == "label" else [])
    names = ds.splits()
    val_name = next((v for v in VAL_NAMES if names.get(v)), "val")
    if eval_split in (val_name, "val") or eval_split in VAL_NAMES:
        raise ConfigError(f"evaluation split {eval_split!r} is the validation split, which early stopping and "
                          f"thresholds are chosen on; evaluate on a held-out split (e.g. --eval-split test)")
    if eval_split == "train":
        raise ConfigError("evaluation split 'train' is what the head trains on; evaluate on a held-out split "
                          "(e.g. --eval-split test)")
    if not names.get("train"):
        ds.check_splits(["train"])
    from featurestore.reader import resolve_refs

    features = resolve_refs(store, ds, features)  # once, the same fingerprints for every split
    raw = {"train": _load(store, ds, "train", features, sequences=sequences, va=va)}
    label_va, note = _label_va(ds, target, classes, raw["train"])
    out, dropped, no_features = {}, {}, {}
    for split in ("train", val_name, eval_split):
        if split in out:
            continue
        if split != "train":
            if not names.get(split):
                if split == val_name:
                    continue
                ds.check_splits([split])
            raw[split] = _load(store, ds, split, features, sequences=sequences, va=va)
        X, y, keep_idx, dropped[split], no_features[split] = usable(
            raw[split], target, classes, sequences=sequences, va=va, label_va=label_va)
        out[split] = (X, y)
        raw[split].groups = raw[split].groups[keep_idx]
    if val_name in out:
        out["val"] = out[val_name]
        validation = {"carved": False, "split": val_name, "n_val": len(out["val"][1])}
    else:
        X, y = out["train"]
        tr, va_idx, validation = carve_validation(len(y), fraction=val_fraction, seed=seed,
                                                  groups=raw["train"].groups)
        out["train"], out["val"] = (X.take(tr), y.take(tr)), (X.take(va_idx), y.take(va_idx))
    va_sources = {}
    if va:
        va_sources = {m: raw["train"].va_sources.get(m) or "item VA labels" for m in raw["train"].features}
    return Prepared(target_kind(target, classes), classes, out, dict(raw["train"].fingerprints), ds.manifest_hash,
                    validation, dropped, no_features, va_sources, note, target)


# ---- tensors -----------------------------------------------------------------------
def align(X: Features, dims: Mapping[str, int]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per trained modality: (pooled float32 [N, D], presence mask); absent modalities are zeros, masked."""
    n = len(X) if X.pooled else len(next(iter(X.masks.values()), ()))
    out = {}
    for mod, d in sorted(dims.items()):
        if mod in X.pooled:
            arr = np.asarray(X.pooled[mod], np.float32)
            mask = np.asarray(X.masks[mod], bool)
            out[mod] = (np.where(mask[:, None], arr, 0).astype(np.float32, copy=False), mask)
        else:
            out[mod] = (np.zeros((n, d), np.float32), np.zeros(n, bool))
    return out


class TensorSet:
    """A split as tensors, built once; `batches` yields dicts of tensor slices."""

    def __init__(self, tensors: Mapping[str, Any], n: int):
        self.tensors = dict(tensors)
        self.n = n

    def __len__(self) -> int:
        return self.n

    def to(self, device: Any) -> "TensorSet":
        return TensorSet({k: v.to(device) for k, v in self.tensors.items()}, self.n)

    def batches(self, batch_size: int, *, shuffle: bool = False, generator: Any = None) -> Iterator[dict]:
        import torch

        if shuffle:
            order = torch.randperm(self.n, generator=generator).to(next(iter(self.tensors.values())).device)
            for i in range(0, self.n, batch_size):
                idx = order[i:i + batch_size]
                yield {k: v.index_select(0, idx) for k, v in self.tensors.items()}
        else:
            for i in range(0, self.n, batch_size):
                yield {k: v[i:i + batch_size] for k, v in self.tensors.items()}


def pad_sequences(seqs: Sequence, pooled: np.ndarray, mask: np.ndarray, dim: int, *, cap: int = 0,
                  what: str = "sequences") -> tuple[np.ndarray, np.ndarray]:
    """Ragged `[L_i, dim]` rows -> `[N, L, dim]` float32 + step mask, padded once.

    An item without a sequence uses its pooled row as one step; an absent item (mask false) has no steps.
    `cap` keeps at most that many steps (0: all). A row of another width is a `ConfigError` naming `what`.
    """
    rows = [s[:cap or None] if s is not None and len(s) else (pooled[i:i + 1] if mask[i] else None)
            for i, s in enumerate(seqs)]
    longest = max((len(r) for r, m in zip(rows, mask) if r is not None and m), default=1)
    x = np.zeros((len(rows), longest, dim), np.float32)
    steps = np.zeros((len(rows), longest), bool)
    for i, r in enumerate(rows):
        if r is not None and mask[i]:
            if r.shape[1] != dim:
                raise ConfigError(f"{what} are {r.shape[1]}-d but the head was trained on {dim}-d; "
                                  "use the feature set it was trained on")
            x[i, :len(r)], steps[i, :len(r)] = r, True
    return x, steps
