"""The reader API: a dataset split as arrays aligned to manifest rows.

    data = load_split(store, "demo", "train", {"text": "minilm"})
    data.features["text"]   # [N, 384] float32, zeros where the item has no row
    data.masks["text"]      # [N] bool: which items have a row
    data.label, data.labels # targets as strings, in manifest order

Every head takes features as `dict modality -> array` plus masks, so any subset of
modalities trains and predicts the same way.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

from .backbones.base import MODALITIES
from .datasets import Dataset, get_dataset
from .errors import ConfigError
from .features import FeatureSet, resolve_features
from .store import Store

__all__ = ["SplitData", "load_split", "parse_feature_refs", "resolve_refs"]


@dataclasses.dataclass
class SplitData:
    """One split of one dataset, aligned to its manifest rows."""

    dataset: str
    split: str
    item_ids: np.ndarray
    features: dict[str, np.ndarray]
    masks: dict[str, np.ndarray]
    fingerprints: dict[str, str]
    label: np.ndarray  # object array of str or None
    labels: list[list[str]]  # multi-label targets ([] where none)
    valence: np.ndarray  # float64, NaN where unknown
    arousal: np.ndarray
    groups: np.ndarray
    manifest_hash: str
    keys: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    sequences: dict[str, list] = dataclasses.field(default_factory=dict)
    va: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # modality -> [N, 2], NaN unknown
    va_sources: dict[str, str] = dataclasses.field(default_factory=dict)  # modality -> VA scorer source
    folds: np.ndarray | None = None  # official fold per item (object: str or None); None: no fold column

    def __len__(self) -> int:
        return len(self.item_ids)

    @property
    def modalities(self) -> list[str]:
        return list(self.features)


def parse_feature_refs(spec: str | Mapping[str, str], store: Store | None = None) -> dict[str, str]:
    """`"text=minilm,image=clip-image"` -> `{"text": "minilm", "image": "clip-image"}`.

    The one `--features` syntax: comma-separated `MODALITY=NAME_OR_FINGERPRINT`, where NAME is a
    backbone name (resolved per dataset, see `featurestore.features.resolve_features`). The modality
    may be left out when the name is unambiguous: a fingerprint, or a backbone whose features in
    `store` (or, without features yet, whose registered modality) is one modality.
    """
    if isinstance(spec, Mapping):
        out = {}
        for mod, ref in spec.items():
            if mod not in MODALITIES:
                raise ConfigError(f"features {mod}={ref}: {mod!r} is not a modality; use one of {list(MODALITIES)}")
            out[mod] = str(ref)
        return out
    out = {}
    for part in filter(None, (p.strip() for p in str(spec).split(","))):
        mod, sep, ref = part.partition("=")
        mod, ref = mod.strip(), ref.strip()
        if not sep:
            mod, ref = _modality_of(part, store), part
        if mod not in MODALITIES or not ref:
            raise ConfigError(f"features {part!r} should be [MODALITY=]BACKBONE_OR_FINGERPRINT with a modality "
                              f"in {list(MODALITIES)}, e.g. text=minilm")
        if mod in out:
            raise ConfigError(f"features name {mod} twice ({out[mod]}, {ref}); give one feature set per modality")
        out[mod] = ref
    if not out:
        raise ConfigError("no features given; use e.g. --features text=minilm")
    return out


def _modality_of(ref: str, store: Store | None) -> str:
    """The modality of a bare `--features` entry, or a ConfigError asking for MODALITY=."""
    from .features import feature_modalities

    mods = feature_modalities(store, ref) if store is not None else []
    if not mods:
        from . import backbones

        if ref in backbones.REGISTRY:
            mods = [backbones.get(ref).modality]
    if len(mods) == 1:
        return mods[0]
    if len(mods) > 1:
        raise ConfigError(f"features {ref!r} exist for {', '.join(mods)}; say which: "
                          + " or ".join(f"{m}={ref}" for m in mods))
    raise ConfigError(f"features {ref!r}: no fingerprint or backbone of that name"
                      f"{' in ' + str(store.root) if store is not None else ''} (fs ls, fs backbones list); "
                      "give MODALITY=BACKBONE_OR_FINGERPRINT, e.g. text=minilm")


def resolve_refs(store: Store, dataset: str | Dataset, features: str | Mapping[str, str]) -> dict[str, str]:
    """`--features` for one dataset -> modality: fingerprint (each name resolved for that dataset)."""
    ds = dataset if isinstance(dataset, Dataset) else get_dataset(store, dataset)
    return {m: resolve_features(store, r, modality=m, dataset=ds).fingerprint
            for m, r in parse_feature_refs(features, store).items()}


def load_split(store: Store, dataset: str | Dataset, split: str, features: str | Mapping[str, str], *,
               sequences: bool = False, dtype=np.float32, allow_empty: bool = False,
               va: bool | Mapping[str, str] = False) -> SplitData:
    """Read one split's features (by fingerprint or backbone name per modality) aligned to its rows.

    A backbone name means its fingerprint that covers this dataset (`resolve_features`), the same
    one for every split.

    `va=True` adds, per modality, the VA scores of the most recent VA source that covers
    the items; a mapping `{modality: source or scorer}` picks them (see featurestore.va.cache).
    """
    ds = dataset if isinstance(dataset, Dataset) else get_dataset(store, dataset)
    rows = ds.split(split)
    if not len(rows) and not allow_empty:
        ds.check_splits([split])
    refs = parse_feature_refs(features, store)
    feats, masks, fps, keys, seqs = {}, {}, {}, {}, {}
    for mod, ref in refs.items():
        fs: FeatureSet = resolve_features(store, ref, modality=mod, dataset=ds)
        k = rows[f"{mod}_key"].fill_null("").to_numpy().astype("S32")
        feats[mod], masks[mod] = fs.read_pooled(k, dtype=dtype)
        fps[mod], keys[mod] = fs.fingerprint, k
        if sequences:
            seqs[mod], _ = fs.read_sequences(k, dtype=dtype)
    va_values, va_sources = {}, {}
    if va:
        from .va.cache import split_va

        va_values, va_sources = split_va(store, rows, va)
    return SplitData(
        dataset=ds.name, split=split, item_ids=rows["item_id"].to_numpy().astype(str),
        features=feats, masks=masks, fingerprints=fps,
        label=rows["label"].to_numpy().astype(object),
        labels=[list(v) if v is not None else [] for v in rows["labels"].to_list()],
        valence=rows["valence"].fill_null(np.nan).to_numpy().astype(np.float64),
        arousal=rows["arousal"].fill_null(np.nan).to_numpy().astype(np.float64),
        groups=rows["group"].to_numpy().astype(object), manifest_hash=ds.manifest_hash,
        keys=keys, sequences=seqs, va=va_values, va_sources=va_sources,
        folds=rows["fold"].to_numpy().astype(object) if "fold" in rows.columns else None,
    )
