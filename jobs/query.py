"""Nearest-concept queries: raw input -> backbone -> SCL encoder -> emotions and exemplars.

    q = Querier(store, "affect")
    q.text("what a wonderful day")      # {"emotions": [{"emotion", "similarity"}...], "neighbours": [...]}
    q.item("demo:abandon")              # an item of a dataset in the store, from its cached features
    q.features("text", pooled, fingerprint=fp)   # precomputed backbone (or SCL) features
    q.batch(lines)                      # JSONL lines: {"text": ...} | {"image": PATH} | {"audio": PATH} | {"id": ...}

Emotions are ranked by `similarity`, the cosine between the query's emotion feature and each
class concept (eq. 6 over every pool member of the raw features, so the ranking is deterministic;
`ConceptBank.similarity`); `probability` is the SCL classifier's softmax for that class (0 for a
class the query's modality was not trained on). Neighbours are the k nearest memory rows. The
backbone is rebuilt from the source feature set's spec.json, and must give the fingerprint the
memory was built from, or the query fails naming both. Classes with an empty pool follow the
fallback of heads/concepts.py; their warnings are returned in `warnings`.
"""
from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from featurestore._io import regular_file_bytes
from featurestore import backbones
from featurestore.backbones.base import fingerprint_of
from featurestore.config import field
from featurestore.datasets import get_dataset
from featurestore.errors import ConfigError, FeatureStoreError, IntegrityError, NotFoundError
from featurestore.features import FeatureSet
from featurestore.hashing import content_key
from featurestore.memory import open_memory
from featurestore.memory._index import normalise
from featurestore.store import Store
from featurestore.heads.concepts import ConceptBank

from .train_scl import load_run

__all__ = ["QueryConfig", "Querier", "run", "INPUT_KINDS"]

INPUT_KINDS = ("text", "image", "audio", "id")


@dataclasses.dataclass(frozen=True)
class QueryConfig:
    memory: str = field("", "memory name (fs memory list) or folder")
    k: int = field(5, "nearest exemplars to return")
    device: str = field("auto", "backbone device: auto | cpu | cuda[:N]")

    def __post_init__(self):
        from featurestore.devices import check_device

        check_device(self.device, "--device")
        if self.k < 1:
            raise ConfigError(f"k={self.k} must be at least 1")


class Querier:
    """Loads the memory, its SCL run and (lazily) the backbones once; answers many queries."""

    def __init__(self, store: Store, memory: str, *, k: int = 5, device: str = "auto"):
        self.store, self.k, self.device = store, k, device
        self.memory = open_memory(store, memory)
        self.spec = self.memory.spec
        self.head, lineage = load_run(store, self.spec["run"])
        if lineage["encoder_hash"] != self.spec["encoder_hash"]:
            raise IntegrityError(f"memory {self.spec['name']!r} was built from scl run {self.spec['run']!r} with "
                                 f"encoder {self.spec['encoder_hash']}, but that run now holds encoder "
                                 f"{lineage['encoder_hash']}; rebuild the memory (fs memory build --replace)")
        self.classes = sorted(self.memory.meta["class"].drop_nulls().unique().to_list())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            bank = ConceptBank.from_memory(self.memory, self.classes)
        self.warnings = [str(w.message) for w in caught]
        self.bank = bank
        self._backbones: dict[str, Any] = {}

    # ---- inputs ----------------------------------------------------------------------
    def backbone(self, modality: str):
        """The source backbone of `modality`, rebuilt from its feature set's spec.json and checked."""
        if modality not in self._backbones:
            want = self._source_fp(modality)
            spec = FeatureSet(self.store, want).spec
            params = {k: v for k, v in spec.get("config", {}).items() if not k.startswith("_")}
            params.update({k: v for k, v in spec.get("source", {}).items() if k in ("model", "adapter") and v})
            bb = backbones.create(spec["backbone"], params, device=self.device).load()
            got = fingerprint_of(bb.name, bb.spec())
            if got != want:
                raise IntegrityError(f"memory {self.spec['name']!r} was built from {modality} features {want}, but "
                                     f"backbone {bb.name!r} now gives {got} (weights, adapter or preprocessing "
                                     "changed); re-extract, retrain scl and rebuild the memory")
            self._backbones[modality] = bb
        return self._backbones[modality]

    def _source_fp(self, modality: str) -> str:
        fps = self.spec["source_fingerprints"]
        if modality not in fps:
            raise ConfigError(f"memory {self.spec['name']!r} holds {sorted(fps)} features, not {modality}")
        return fps[modality]

    def raw(self, modality: str, raw: bytes | str) -> dict:
        bb = self.backbone(modality)
        pooled = bb.encode([bb.prepare(raw)]).pooled
        return self._answer(modality, self.head.encode_modality(modality, pooled))

    def text(self, text: str) -> dict:
        return self.raw("text", text)

    def file(self, modality: str, path: str | Path) -> dict:
        try:
            data = regular_file_bytes(path)
        except OSError as exc:
            raise NotFoundError(f"cannot read {modality} file {str(path)!r}: {exc.strerror}") from None
        return self.raw(modality, data)

    def features(self, modality: str, vectors: np.ndarray, *, fingerprint: str) -> dict:
        """Precomputed features: backbone features of the memory's source fingerprint, or its SCL features."""
        vectors = np.atleast_2d(np.asarray(vectors, np.float32))
        if fingerprint == self.spec["fingerprints"].get(modality):
            return self._answer(modality, vectors)
        if fingerprint != self._source_fp(modality):
            raise IntegrityError(f"query features are {fingerprint}, but memory {self.spec['name']!r} was built "
                                 f"from {modality} features {self._source_fp(modality)} (scl features "
                                 f"{self.spec['fingerprints'].get(modality)}); extract the query with that backbone")
        return self._answer(modality, self.head.encode_modality(modality, vectors))

    def item(self, ref: str) -> dict:
        """`DATASET:ITEM_ID`, or `ITEM_ID` looked up in the memory's datasets; from the cache when it can."""
        dataset, item_id = self._find_item(ref)
        rows = get_dataset(self.store, dataset).manifest.filter(item_id=item_id)
        if not len(rows):
            raise NotFoundError(f"dataset {dataset!r} has no item {item_id!r}")
        row = rows.row(0, named=True)
        for m in self.spec["fingerprints"]:
            source = row.get(m)
            if source is None:
                continue
            key = row.get(f"{m}_key") or (content_key(m, source) if m == "text" else None)
            for fp in (self.spec["fingerprints"][m], self.spec["source_fingerprints"][m]):
                fs = FeatureSet(self.store, fp)
                if key and fs.exists():
                    vec, present = fs.read_pooled([key], dtype=np.float32)
                    if present[0]:
                        return {**self.features(m, vec, fingerprint=fp), "item": f"{dataset}:{item_id}"}
            return {**(self.text(source) if m == "text" else self.file(m, source)), "item": f"{dataset}:{item_id}"}
        raise ConfigError(f"item {dataset}:{item_id} has none of the memory's modalities {sorted(self.spec['fingerprints'])}")

    def _find_item(self, ref: str) -> tuple[str, str]:
        datasets = sorted({s["dataset"] for s in self.spec["sources"]})
        dataset, sep, item_id = ref.partition(":")
        if sep and dataset in datasets:
            return dataset, item_id
        hits = [d for d in datasets if len(get_dataset(self.store, d).manifest.filter(item_id=ref))]
        if sep and not hits:
            try:
                get_dataset(self.store, dataset)
                if len(get_dataset(self.store, dataset).manifest.filter(item_id=item_id)):
                    return dataset, item_id
            except NotFoundError:
                pass
        if not hits:
            raise NotFoundError(f"item {ref!r} is in none of the memory's datasets {datasets}; "
                                "give DATASET:ITEM_ID")
        if len(hits) > 1:
            raise ConfigError(f"item {ref!r} is in several datasets {hits}; give DATASET:ITEM_ID")
        return hits[0], ref

    # ---- answers ---------------------------------------------------------------------
    def _answer(self, modality: str, emo: np.ndarray) -> dict:
        sims = self.bank.similarity(emo)[0]
        proba = dict(zip(self.head.meta_["classes"], self.head.proba_of(modality, emo)[0]))
        order = [i for i in np.argsort(-np.nan_to_num(sims, nan=-np.inf), kind="stable") if self.bank.valid[i]]
        emotions = [{"emotion": self.classes[i], "similarity": round(float(sims[i]), 4),
                     "probability": round(float(proba.get(self.classes[i], 0.0)), 4)} for i in order]
        scores, ids = self.memory.search(normalise(emo), self.k)
        neighbours = []
        for s, row in zip(scores[0], self.memory.rows(ids[0])):
            if row is not None:
                neighbours.append({"id": int(row["id"]), "item_id": row["item_id"], "dataset": row["dataset"],
                                   "modality": row["modality"], "label": row["class"],
                                   "similarity": round(float(s), 4)})
        return {"modality": modality, "emotions": emotions, "neighbours": neighbours}

    def one(self, kind: str, value: str) -> dict:
        if kind == "text":
            return self.text(value)
        if kind in ("image", "audio"):
            return self.file(kind, value)
        if kind == "id":
            return self.item(value)
        raise ConfigError(f"query input {kind!r} is not one of {list(INPUT_KINDS)}")

    def batch(self, lines: Iterable[str]) -> list[dict]:
        """One answer per non-blank JSONL line; a bad line gets `error` and the others are answered."""
        out = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                kind, value = _parse_line(line)
                out.append({"line": n, "input": {kind: value}, **self.one(kind, value)})
            except (FeatureStoreError, OSError, ValueError) as exc:
                out.append({"line": n, "error": str(exc)})
        return out


def _parse_line(line: str) -> tuple[str, str]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"not JSON ({exc.msg}); each line is one object such as {{\"text\": \"...\"}}") from None
    keys = sorted(set(obj) & set(INPUT_KINDS)) if isinstance(obj, dict) else []
    if len(keys) != 1 or not isinstance(obj[keys[0]], str):
        raise ConfigError(f"each line needs exactly one of {list(INPUT_KINDS)} with a string value, got {line.strip()[:80]!r}")
    return keys[0], obj[keys[0]]


def run(config: QueryConfig, store: Store, *, kind: str = "", value: str = "", batch_file: str = "") -> dict:
    """The job behind `fs query`: one input, or every line of a JSONL file."""
    if batch_file:  # read before the memory and models load
        try:
            lines = regular_file_bytes(batch_file).decode("utf-8").splitlines()  # a FIFO would block forever
        except OSError as exc:
            raise NotFoundError(f"cannot read batch file {batch_file!r}: {exc.strerror}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"batch file {batch_file!r} is not UTF-8 (byte {exc.start}); save it as UTF-8") from None
    q = Querier(store, config.memory, k=config.k, device=config.device)
    if batch_file:
        return {"memory": q.spec["name"], "results": q.batch(lines), "warnings": q.warnings}
    return {"memory": q.spec["name"], "results": [{"input": {kind: value}, **q.one(kind, value)}],
            "warnings": q.warnings}
