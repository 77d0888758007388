"""`fs scl train`: train the supramodal concept encoder over one or more datasets, then write its
emotion features back to the store as derived feature sets.

Each `--data` entry is `DATASET:MODALITY=FEATURES[,MODALITY=FEATURES]`, e.g.
`raf:image=clip-image` and `mosei:text=clip-text`: the datasets need no paired items. The run
lands in `heads/<run>/` (model.safetensors, config.json, metrics.json, lineage.json). For each
modality, every row of its source feature set is encoded and written under the fingerprint
`fingerprint_of("scl", spec)`, the spec naming the source fingerprint and the encoder hash, so
the derived rows are cached, verified and read like any backbone's (`load_split(..., {"text": FP})`).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from typing import Any, Callable

import numpy as np

from featurestore._io import read_json, require_intact, tmp_path, write_checksums
from featurestore.backbones.base import fingerprint_of
from featurestore.config import field, to_dict
from featurestore.errors import ConfigError, NotFoundError
from featurestore.features import POOLED, FeatureSet
from featurestore.memory import publish_folder
from featurestore.reader import SplitData, load_split, parse_feature_refs
from featurestore.store import FORMAT_VERSION, Store, check_name, now_iso
from featurestore.heads.base import Features, Targets
from featurestore.heads.scl import SCL
from featurestore.jobs.train_head import load_head

__all__ = ["TrainSCLConfig", "TrainSCLResult", "run", "parse_data", "derived_spec", "write_derived", "load_run"]

_CHUNK = 65536


@dataclasses.dataclass(frozen=True)
class TrainSCLConfig:
    data: tuple[str, ...] = field((), "DATASET:MODALITY=FEATURES[,MODALITY=FEATURES] entries, one per dataset")
    run: str = field("", "run name under heads/ (default: scl-<encoder hash>)")
    params: dict = field({}, "scl head parameters (fs heads info scl), as strings or values")
    split: str = field("train", "split the encoder trains on")
    val_split: str = field("val", "split that chooses the encoder's state (least log-loss) and is reported in "
                                  "metrics.json, where a dataset has it")
    write_features: bool = field(True, "write the emotion features back as derived feature sets")
    replace: bool = field(False, "overwrite an existing run of the same name")

    def __post_init__(self):
        if not self.data:
            raise ConfigError("scl train needs at least one --data DATASET:MODALITY=FEATURES")
        parse_data(self.data)
        if self.run:
            check_name(self.run, "run")


@dataclasses.dataclass
class TrainSCLResult:
    run: str
    folder: str
    encoder_hash: str
    derived: dict  # modality -> derived fingerprint
    written: dict  # modality -> rows written now
    metrics: dict
    seconds: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def parse_data(entries, store: Store | None = None) -> list[tuple[str, dict[str, str] | str]]:
    """`DATASET:[MOD=]FEATURES[,...]` entries -> (dataset, features); the features are parsed (the modality
    found from the store when left out) only when `store` is given."""
    out = []
    for entry in entries:
        ds, sep, refs = str(entry).partition(":")
        if not sep or not ds or not refs.strip():
            raise ConfigError(f"--data {entry!r} should be DATASET:MODALITY=FEATURES, e.g. demo:text=minilm")
        if any(ds == seen for seen, _ in out):  # its rows would be stacked twice, weighing it double
            raise ConfigError(f"--data names dataset {ds!r} twice; give each dataset once, with all its modalities: "
                              f"--data {ds}:text=...,image=...")
        out.append((ds, parse_feature_refs(refs, store) if store is not None else refs))
    return out


def _stack(splits: list[SplitData], classes: list[str]) -> tuple[Features, Targets, list[dict]]:
    """Rows of several datasets, one after another; a modality a dataset lacks is masked out."""
    dims: dict[str, int] = {}
    for s in splits:
        for m, arr in s.features.items():
            if dims.setdefault(m, arr.shape[1]) != arr.shape[1]:
                raise ConfigError(f"{m} features of dataset {s.dataset!r} are {arr.shape[1]}-d, others "
                                  f"{dims[m]}-d; use one feature set per modality")
    pooled = {m: np.concatenate([s.features.get(m, np.zeros((len(s), d), np.float32)) for s in splits])
              for m, d in dims.items()}
    masks = {m: np.concatenate([s.masks.get(m, np.zeros(len(s), bool)) for s in splits]) for m in dims}
    index = {c: i for i, c in enumerate(classes)}
    y = np.concatenate([[index.get(lab, -1) if lab is not None else -1 for lab in s.label] for s in splits])
    rows = [{"dataset": s.dataset, "item_id": i} for s in splits for i in s.item_ids]
    return Features(pooled, masks), Targets(kind="single", y=y.astype(np.int64), classes=classes), rows


def _fingerprints(splits: list[SplitData]) -> dict[str, str]:
    fps: dict[str, str] = {}
    for s in splits:
        for m, fp in s.fingerprints.items():
            if fps.setdefault(m, fp) != fp:
                raise ConfigError(f"{m} features come from two fingerprints ({fps[m]}, {fp}); SCL projects "
                                  "each modality once, so give every dataset the same feature set for a modality")
    return fps


def _accuracy(head: SCL, s: SplitData, classes: list[str]) -> dict[str, float]:
    out = {}
    for m in set(s.features) & set(head.meta_["modalities"]):
        rows = np.flatnonzero(s.masks[m] & np.array([lab in classes for lab in s.label]))
        if len(rows):
            y = np.array([classes.index(lab) for lab in s.label[rows]])
            proba = head.proba_of(m, head.encode_modality(m, s.features[m][rows]))
            out[m] = round(float((proba.argmax(1) == y).mean()), 4)
    return out


def _refuse_existing(store: Store, name: str, replace: bool):
    folder = store.heads_dir() / check_name(name, "run")
    if folder.exists() and not replace:
        raise ConfigError(f"run {name!r} already exists in {store.heads_dir()}; pass --replace or another --run")
    return folder


def run(config: TrainSCLConfig, store: Store, *, log: Callable[[str], None] = lambda s: None,
        progress: Callable[..., Any] | None = None) -> TrainSCLResult:
    t0 = time.perf_counter()
    if config.run:  # a named run that exists is refused before any training (the default name needs the weights)
        _refuse_existing(store, config.run, config.replace)
    entries = parse_data(config.data, store)
    train = [load_split(store, ds, config.split, refs) for ds, refs in entries]
    fps = _fingerprints(train)
    classes = sorted({lab for s in train for lab in s.label if lab is not None})
    if len(classes) < 2:
        raise ConfigError(f"scl needs at least two labels over the --data datasets, found {classes}")
    X, y, _ = _stack(train, classes)
    vals = [load_split(store, ds, config.val_split, refs, allow_empty=True) for ds, refs in entries]
    vals = [v for v in vals if len(v)]
    eval_set = None
    if vals:
        Xv, yv, _ = _stack(vals, classes)
        eval_set = (Xv, yv) if (yv.y >= 0).any() else None
    params = dict(config.params)
    head = SCL(**params)
    log(f"scl: {len(y)} rows, modalities {', '.join(sorted(fps))}, {len(classes)} labels"
        + (f"; the state of least {config.val_split} log-loss is kept" if eval_set else ""))
    from ._progress import epoch_progress

    with epoch_progress(progress, "scl"):
        head.fit(X, y, eval_set=eval_set)
    h = head.encoder_hash()
    name = config.run or f"scl-{h[:8]}"
    folder = _refuse_existing(store, name, config.replace)
    metrics: dict[str, Any] = {"train": {s.dataset: _accuracy(head, s, classes) for s in train}, "val": {}}
    for val in vals:
        metrics["val"][val.dataset] = _accuracy(head, val, classes)
    derived = {m: fingerprint_of("scl", derived_spec(head, m, fp, store, name)) for m, fp in fps.items()}
    lineage = {"kind": "scl", "run": name, "encoder_hash": h, "created_at": now_iso(), "split": config.split,
               "sources": [{"dataset": s.dataset, "split": config.split, "modalities": sorted(s.fingerprints),
                            "manifest_hash": s.manifest_hash} for s in train],
               "fingerprints": fps, "derived": derived, "classes": classes, "config": to_dict(config)}
    written = {}
    if config.write_features:  # before the run is published: a run in heads/ always has all of its features
        for m, fp in fps.items():
            written[m] = write_derived(store, head, m, fp, name, progress=progress)
            log(f"scl: {m} features {derived[m]}: {written[m]} rows written")
    try:
        _save_run(head, folder, metrics, lineage, overwrite=config.replace)
    except FileExistsError:  # another `scl train --run` of the same name saved it while this one trained
        raise ConfigError(f"run {name!r} already exists in {store.heads_dir()} (another job saved it while this one "
                          "trained; it is kept); pass --replace or another --run") from None
    return TrainSCLResult(name, str(folder), h, derived, written, metrics, round(time.perf_counter() - t0, 3))


def _save_run(head: SCL, folder, metrics: dict, lineage: dict, *, overwrite: bool = True) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(folder)  # names this process: gc and verify leave a running job's folder alone
    try:
        head.save(tmp)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        (tmp / "lineage.json").write_text(json.dumps(lineage, indent=2, sort_keys=True) + "\n")
        write_checksums(tmp, [p.name for p in tmp.iterdir() if p.is_file()])  # checked by `fs verify`
        publish_folder(tmp, folder, overwrite=overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_run(store: Store, run: str) -> tuple[SCL, dict]:
    """A trained SCL run: the head and its lineage.json."""
    folder = store.heads_dir() / check_name(run, "run")
    lineage_path = folder / "lineage.json"
    if not lineage_path.is_file():
        raise NotFoundError(f"no scl run {run!r} in {store.heads_dir()} (train one with `fs scl train`)")
    require_intact(folder, f"run `fs verify`, then train it again (fs scl train --run {run} --replace)")
    lineage = read_json(lineage_path)
    if lineage.get("kind") != "scl":
        raise ConfigError(f"run {run!r} is a {lineage.get('kind')!r} run, not an scl run")
    head = load_head(folder, SCL.load)
    if head.encoder_hash() != lineage["encoder_hash"]:
        from featurestore.errors import IntegrityError
        raise IntegrityError(f"run {run!r}: weights hash {head.encoder_hash()} differs from lineage.json's "
                             f"{lineage['encoder_hash']}; the run folder was changed, retrain it")
    return head, lineage


def derived_spec(head: SCL, modality: str, source_fp: str, store: Store, run: str) -> dict:
    return {
        "backbone": "scl",
        "modality": modality,
        "source_fingerprint": source_fp,
        "encoder_hash": head.encoder_hash(),
        "dim": int(head.width),
        "config": {"dtype": "float16"},
        "preprocessing": {"features": "f_emo: output of the shared emotion encoder"},
        "store_format": FORMAT_VERSION,
        "source": {"run": run},  # informative: not part of the fingerprint
    }


def write_derived(store: Store, head: SCL, modality: str, source_fp: str, run: str, *,
                  progress: Callable[..., Any] | None = None) -> int:
    """Encode every row of the source feature set not yet in the derived one; returns rows written."""
    spec = derived_spec(head, modality, source_fp, store, run)
    src = FeatureSet(store, source_fp)
    out = FeatureSet(store, fingerprint_of("scl", spec))
    out.folder.mkdir(parents=True, exist_ok=True)
    written = 0
    with out.lock():
        out.ensure_spec(spec)
        keys = src.index().unique_keys()
        keys = keys[~out.has(keys)] if len(keys) else keys
        writer = out.segments.writer(dtypes={POOLED: "float16"}, shapes={POOLED: (int(spec["dim"]),)},
                                     attrs={"fingerprint": out.fingerprint, "backbone": "scl"})
        chunks = range(0, len(keys), _CHUNK)
        for s in (progress(chunks, desc=f"scl {modality}") if progress else chunks):
            part = keys[s:s + _CHUNK]
            pooled, present = src.read_pooled(part, dtype=np.float32)
            writer.add([k.decode() for k in part[present]], {POOLED: head.encode_modality(modality, pooled[present])})
            writer.flush()
            written += int(present.sum())
    return written
