"""`fs predict`: score new inputs with a saved run, as scikit-learn users expect of `predict`.

    from featurestore.jobs.predict import predict
    predict(store, "univa-demo-...", {"text": "what a lovely day"})
    # [{"input": {"text": ...}, "kind": "multi", "prediction": ["joy", "trust"],
    #   "scores": {"joy": 0.81, ...}, "threshold": 0.42, "cached": {"text": false}}]

For each modality the run was trained on, the input goes through the backbone its feature
fingerprint names (rebuilt from that fingerprint's `spec.json`: same weights, adapter, pooling,
storage dtype; a backbone that no longer gives that fingerprint is refused), or, when the input's
content key is already in that feature set, the cached row is read instead of running the model.
Fresh rows are rounded through the feature set's storage dtype, so an input scores exactly as the
same input extracted and read from the store would. Then the run's head predicts.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from featurestore import backbones
from featurestore._io import read_json, regular_file_bytes
from featurestore.backbones.base import MODALITIES, fingerprint_of
from featurestore.errors import BadItemError, ConfigError, FeatureStoreError, IntegrityError, NotFoundError
from featurestore.features import FeatureSet
from featurestore.hashing import content_key
from featurestore.store import Store
from featurestore.heads.base import Features

from .train_head import load_head, resolve_run_id, run_folder

__all__ = ["Predictor", "predict", "read_batch", "find_run", "backbone_for"]

BATCH = 32  # inputs per backbone forward pass


def find_run(store: Store, ref: str) -> tuple[str, Path]:
    """(run id, folder) of a run by its id, or by a prefix only one run has (e.g. `univa-demo`); one
    seed of a `--seeds` run is `RUN/seed-<s>`, one fold of a cross-validated run `RUN/fold-<k>`."""
    from .cv import fold_dirs

    run_id = resolve_run_id(store, ref)
    folder = run_folder(store, run_id)  # a --seeds run named whole: a ConfigError naming its seeds
    if not (folder / "config.json").is_file():  # a cross-validated run: one head per fold
        folds = ", ".join(f"{run_id}/{p.name}" for p in fold_dirs(folder)) or "none saved"
        raise ConfigError(f"run {run_id!r} is cross-validated: it holds one head per fold; predict with one "
                          f"({folds}), or train one run on all the data with `fs train-head` without --cv")
    return run_id, folder


def backbone_for(store: Store, fingerprint: str, *, device: str = "auto"):
    """The backbone that produced `fingerprint`, rebuilt from its spec.json and checked to give it again."""
    fs = FeatureSet(store, fingerprint)
    if not fs.exists():
        raise NotFoundError(f"feature set {fingerprint} is not in {store.root}; the run was trained on features "
                            "this store no longer has (fs ls)")
    spec = fs.spec
    if spec["backbone"] not in backbones.REGISTRY:
        raise ConfigError(f"features {fingerprint} were not made by a registered backbone ({spec['backbone']!r}, "
                          "e.g. derived SCL features); predict needs a run trained on backbone features")
    params = {k: v for k, v in spec.get("config", {}).items() if not k.startswith("_")}
    params.update({k: v for k, v in (spec.get("source") or {}).items() if k in ("model", "adapter") and v})
    bb = backbones.create(spec["backbone"], params, device=device).load()
    got = fingerprint_of(bb.name, bb.spec())
    if got != fingerprint:
        raise IntegrityError(f"backbone {bb.name!r} now gives features {got}, not {fingerprint} that the run was "
                             "trained on (its weights, adapter or preprocessing changed); re-extract and retrain")
    return bb


def _source(modality: str, value: Any) -> bytes | str:
    """The raw input as extraction reads it: text as given, files as bytes."""
    if modality == "text":
        if isinstance(value, bytes):
            return value
        return str(value)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    try:
        return regular_file_bytes(value)
    except OSError as exc:
        raise NotFoundError(f"cannot read {modality} file {str(value)!r}: {exc.strerror}") from None


class Predictor:
    """A saved run, its head and (lazily) its backbones, loaded once to score many inputs."""

    def __init__(self, store: Store, run: str, *, device: str = "auto"):
        self.store, self.device = store, device
        self.run, self.folder = find_run(store, run)
        fold = "/" in self.run and self.folder.name.startswith("fold-")  # its lineage is its cv run's
        self.lineage = read_json((self.folder.parent if fold else self.folder) / "lineage.json")
        self.head = load_head(self.folder)
        self.fingerprints: dict[str, str] = dict(self.lineage.get("fingerprints") or {})
        if not self.fingerprints:
            raise ConfigError(f"run {self.run!r} records no feature fingerprints (an scl or cross-validation "
                              "run?); predict with a run trained by `fs train-head` without --cv")
        self.kind = self.head.meta_["kind"]
        self.classes = list(self.head.meta_.get("classes", []))
        self.seq_dims = dict(self.head.meta_.get("seq_dims") or {})
        self._backbones: dict[str, Any] = {}

    @property
    def modalities(self) -> list[str]:
        return sorted(self.fingerprints)

    def backbone(self, modality: str):
        if modality not in self._backbones:
            self._backbones[modality] = backbone_for(self.store, self.fingerprints[modality], device=self.device)
        return self._backbones[modality]

    # ---- features --------------------------------------------------------------------
    def _modality_rows(self, modality: str, values: list) -> tuple[np.ndarray, np.ndarray, list, list, list]:
        """pooled [N, D], present mask, sequences (or None), cached flags, per-item errors for one modality."""
        fs = FeatureSet(self.store, self.fingerprints[modality])
        dim, n = fs.dim, len(values)
        pooled, present = np.zeros((n, dim), np.float32), np.zeros(n, bool)
        seqs: list = [None] * n
        cached, errors = [False] * n, [None] * n
        raws, keys = [None] * n, [None] * n
        for i, v in enumerate(values):
            if v is None:
                continue
            try:
                raws[i] = _source(modality, v)
                keys[i] = content_key(modality, raws[i])
            except FeatureStoreError as exc:
                errors[i] = str(exc)
        want = [i for i in range(n) if keys[i] is not None]
        if want:
            k = np.array([keys[i] for i in want], "S32")
            rows, hit = fs.read_pooled(k, dtype=np.float32)
            if modality in self.seq_dims:
                seq_rows, _ = fs.read_sequences(k, dtype=np.float32)
            for j, i in enumerate(want):
                if hit[j]:
                    pooled[i], present[i], cached[i] = rows[j], True, True
                    if modality in self.seq_dims:
                        seqs[i] = seq_rows[j]
        todo = [i for i in want if not present[i]]
        if todo:
            bb = self.backbone(modality)
            ready = []
            for i in todo:
                try:
                    ready.append((i, bb.prepare(raws[i])))
                except BadItemError as exc:
                    errors[i] = f"cannot encode this {modality}: {exc}"
            for start in range(0, len(ready), BATCH):
                chunk = ready[start:start + BATCH]
                enc = bb.encode([item for _, item in chunk])
                # the storage dtype's rounding: the same numbers as the row read back from the store
                out = np.asarray(enc.pooled, np.float32).astype(fs.dtype).astype(np.float32)
                for j, (i, _) in enumerate(chunk):
                    pooled[i], present[i] = out[j], True
                    if modality in self.seq_dims and enc.sequences is not None:
                        seqs[i] = np.asarray(enc.sequences[j], np.float32).astype(fs.dtype).astype(np.float32)
        return pooled, present, seqs, cached, errors

    def features(self, inputs: Sequence[Mapping[str, Any]]) -> tuple[Features, list[dict], list[str | None]]:
        """`Features` for the head, which modality of each input was cached, and per-input errors."""
        n = len(inputs)
        pooled, masks, sequences = {}, {}, {}
        cached = [{} for _ in range(n)]
        errors: list[str | None] = [None] * n
        for m in self.modalities:
            values = [inp.get(m) for inp in inputs]
            p, mask, seqs, hit, errs = self._modality_rows(m, values)
            pooled[m], masks[m] = p, mask
            if m in self.seq_dims:
                sequences[m] = seqs
            for i in range(n):
                if values[i] is not None:
                    cached[i][m] = hit[i]
                if errs[i] and errors[i] is None:
                    errors[i] = errs[i]
        return Features(pooled, masks, sequences), cached, errors

    # ---- answers ---------------------------------------------------------------------
    def _check_inputs(self, inp: Mapping[str, Any]) -> None:
        given = [k for k in inp if inp[k] is not None]
        unknown = sorted(set(given) - set(MODALITIES))
        if unknown:
            raise ConfigError(f"input keys {unknown} are not modalities; use {list(MODALITIES)}")
        usable = sorted(set(given) & set(self.fingerprints))
        if not usable:
            raise ConfigError(f"run {self.run!r} was trained on {', '.join(self.modalities)} features; "
                              f"this input gives {', '.join(given) or 'nothing'}")

    def answer(self, proba: np.ndarray) -> dict:
        """One input's scores -> its prediction, in the run's terms."""
        if self.kind == "va":
            trained = self.head.meta_.get("va_trained", {})  # absent (a run saved before it): both reported
            return {"prediction": {d: float(v) if trained.get(d, True) else None
                                   for d, v in zip(("valence", "arousal"), proba)}}
        scores = {c: float(p) for c, p in zip(self.classes, proba)}
        if self.kind == "multi":
            t = self.head.decision_threshold()
            chosen = self.head.decide(proba[None], "multi", t, bool(getattr(self.head, "force_top", False)))[0]
            labels = [c for c, on in zip(self.classes, chosen) if on]
            return {"prediction": sorted(labels, key=lambda c: -scores[c]), "scores": scores, "threshold": t}
        return {"prediction": self.classes[int(np.argmax(proba))], "scores": scores}

    def predict(self, inputs: Mapping[str, Any] | str | Iterable[Mapping[str, Any]]) -> list[dict]:
        """One result per input (a dict modality -> text or file path/bytes; a bare string is a text).

        An input that cannot be used gets `error` with the reason; the others are answered.
        """
        if isinstance(inputs, (str, Mapping)):
            inputs = [inputs]
        items = [{"text": i} if isinstance(i, str) else dict(i) for i in inputs]
        results: list[dict] = [{"input": _shown(i)} for i in items]
        ok = []
        for n, inp in enumerate(items):
            try:
                self._check_inputs(inp)
                ok.append(n)
            except FeatureStoreError as exc:
                results[n]["error"] = str(exc)
        if ok:
            X, cached, errors = self.features([items[n] for n in ok])
            good = [j for j, e in enumerate(errors) if e is None and any(X.masks[m][j] for m in X.masks)]
            for j, e in enumerate(errors):
                if e is not None:
                    results[ok[j]]["error"] = e
            if good:
                proba = np.asarray(self.head.predict_proba(X.take(np.array(good))))
                for row, j in zip(proba, good):
                    results[ok[j]].update({"kind": self.kind, **self.answer(row), "cached": cached[j]})
        return results


def _shown(inp: Mapping[str, Any]) -> dict:
    return {k: (v if isinstance(v, str) else f"<{len(v)} bytes>" if isinstance(v, (bytes, bytearray)) else str(v))
            for k, v in inp.items() if v is not None}


def read_batch(path: str | Path) -> list[dict | str]:
    """Inputs from a file: JSONL (one object per line with text / image / audio keys), or, for a `.txt`
    file, one text per line. A line that is not an object is kept as an error for that line."""
    path = Path(path)
    try:
        lines = regular_file_bytes(path).decode("utf-8").splitlines()  # a FIFO would block the read forever
    except OSError as exc:
        raise NotFoundError(f"cannot read batch file {str(path)!r}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"batch file {str(path)!r} is not UTF-8 (byte {exc.start}); save it as UTF-8") from None
    if path.suffix.lower() == ".txt":
        return [{"text": line} for line in lines if line.strip()]
    out: list = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            out.append(_BadLine(n, f"line {n} is not JSON ({exc.msg}); each line is one object such as "
                                   '{"text": "..."}'))
            continue
        if not isinstance(obj, dict) or not set(obj) & set(MODALITIES):
            out.append(_BadLine(n, f"line {n} needs one or more of {list(MODALITIES)}, got {line.strip()[:60]!r}"))
            continue
        out.append(obj)
    return out


@dataclasses.dataclass
class _BadLine:
    line: int
    error: str


def predict(store: Store, run: str, inputs, *, device: str = "auto") -> list[dict]:
    """Score `inputs` (a text, a dict modality -> text/path/bytes, or a list of those) with saved run `run`."""
    return Predictor(store, run, device=device).predict(inputs)


def run(store: Store, run_id: str, inputs: list, *, device: str = "auto") -> dict:
    """The job behind `fs predict`: inputs (possibly with unreadable batch lines) -> a JSON-able answer."""
    p = Predictor(store, run_id, device=device)
    good = [i for i in inputs if not isinstance(i, _BadLine)]
    answered = iter(p.predict(good) if good else [])
    results = [{"line": i.line, "error": i.error} if isinstance(i, _BadLine) else next(answered) for i in inputs]
    datasets = p.lineage.get("dataset") or ", ".join(s["dataset"] for s in p.lineage.get("sources", []))  # scl: several
    return {"run": p.run, "method": p.head.name, "dataset": datasets or None, "kind": p.kind,
            "fingerprints": p.fingerprints, "results": results}
