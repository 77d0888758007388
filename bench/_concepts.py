"""The concepts section of the results table: do SCL concepts name the emotion of a held-out word?

    from bench._concepts import concept_section
    section = concept_section(store, workdir=tmp)      # {"query_rows": [...], "head_rows": [...]}

**Task.** The words of `dataset` (the demo: NRC emotion lexicon, MiniLM features) that carry
exactly one emotion in `labels` (8 NRC emotions), as an 8-class single-label task: emotion words
are what users query. Train split to train, val split to choose, test split to report.
With several entries in `features`, SCL trains on all of them and the queries use the first.

**Per seed.** SCL (`SCL_PARAMS`) trains on the train words; its state is chosen by validation
log-loss. The replay memory is built from its train features exactly as `fs memory build` does
(`jobs.build_memory.exemplar_meta` and `assemble`: pools of the top 20% correct rows with a floor
of 8). Each test word's emotions are ranked as `fs query` ranks them (`ConceptBank.similarity`:
cosine to the eq. 6 concepts), and top-1 / top-2 accuracy is reported against

- `raw-feature centroid`: class means of the raw train features, cosine (the baseline);
- `scl-feature centroid`: class means of all SCL train features, cosine (concepts without pools).

`head_rows`: the `concept` head on that memory with its defaults and its ablations
(`mode=no_selectivity`, `mode=no_generalisation`, `lam=0`), and `mlp` and `linear`, all on the raw
features of the same split, early-stopped on validation, scored on test by `heads.metrics.evaluate`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["concept_section", "emotion_words", "SCL_PARAMS", "topk_accuracy"]

# the paper's optimiser settings (lr 1e-4, batch 64); 20 sequential epochs are plenty once the state
# is chosen on validation (the least log-loss comes after about ten on these 1,900 words)
SCL_PARAMS = {"joint_epochs": 2, "seq_epochs": 20, "device": "cpu"}
CONCEPT_ROWS = {"concept": {}, "concept (no_selectivity)": {"mode": "no_selectivity"},
                "concept (no_generalisation)": {"mode": "no_generalisation"}, "concept (lam=0)": {"lam": 0.0}}
TASK = "single-emotion words"


def emotion_words(store, dataset: str, features: dict) -> dict:
    """split -> (Features, Targets, item ids) of the items with exactly one emotion in `labels` and every modality."""
    from featurestore.errors import ConfigError
    from featurestore.reader import load_split
    from featurestore.heads.base import Features, Targets

    raw = {s: load_split(store, dataset, s, features) for s in ("train", "val", "test")}
    one = {s: [lab[0] if lab is not None and len(lab) == 1 else None for lab in d.labels] for s, d in raw.items()}
    classes = sorted({lab for lab in one["train"] if lab is not None})
    if len(classes) < 2:
        raise ConfigError(f"dataset {dataset!r} has {len(classes)} single-emotion training items' classes; "
                          "the concepts section needs a multi-label `labels` column with at least two emotions")
    out = {}
    for s, d in raw.items():
        every = np.logical_and.reduce([d.masks[m] for m in features])
        rows = np.flatnonzero(every & np.array([lab in classes for lab in one[s]]))
        y = np.array([classes.index(one[s][i]) for i in rows], np.int64)
        out[s] = (Features({m: d.features[m][rows] for m in features}, {m: np.ones(len(rows), bool) for m in features}),
                  Targets(kind="single", y=y, classes=classes), d.item_ids[rows].astype(str))
    return out


def topk_accuracy(scores: np.ndarray, y: np.ndarray, k: int) -> float:
    """Share of rows whose true class is among the k highest scores (NaN scores rank last)."""
    order = np.argsort(-np.nan_to_num(scores, nan=-np.inf), axis=1, kind="stable")[:, :k]
    return float((order == np.asarray(y)[:, None]).any(1).mean())


def _cosine_to_means(train: np.ndarray, y: np.ndarray, queries: np.ndarray, n_classes: int) -> np.ndarray:
    from featurestore.memory._index import normalise

    means = np.stack([train[y == c].mean(0) for c in range(n_classes)])
    return normalise(queries) @ normalise(means).T


def _memory(head, modality: str, emo: np.ndarray, y, item_ids, folder: Path):
    """The replay memory of the SCL train features, built as `fs memory build` builds one."""
    from featurestore.jobs.build_memory import BuildMemoryConfig, assemble, exemplar_meta

    config = BuildMemoryConfig(name=folder.name, run="bench")
    meta = exemplar_meta(head, modality, emo, y, item_id=item_ids, dataset="bench", split="train")
    spec = {"name": folder.name, "run": "bench", "classes": head.meta_["classes"], "coarse_map": head.coarse_map}
    mem, counts, _ = assemble(emo, meta, config, spec)
    mem.save(folder)
    return mem, counts


def _scalar_metrics(metrics: dict) -> dict:
    return {k: round(float(v), 4) for k, v in metrics.items() if isinstance(v, (int, float, np.floating))}


def concept_section(store, *, dataset: str = "demo", features: dict = {"text": "minilm"}, seeds=(0, 1, 2),
                    workdir) -> dict:
    """Nearest-concept top-1/top-2 on held-out words vs centroids, and the concept head vs mlp/linear."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small layers on a shared CPU: more threads only spin
    try:
        return _section(store, dataset, dict(features), seeds, Path(workdir))
    finally:
        torch.set_num_threads(threads)


def _section(store, dataset: str, features: dict, seeds, workdir: Path) -> dict:
    import featurestore.heads as heads
    from featurestore.heads.concept import fit_concept
    from featurestore.heads.concepts import ConceptBank
    from featurestore.heads.metrics import evaluate
    from featurestore.heads.scl import SCL

    split = emotion_words(store, dataset, features)
    (Xtr, ytr, ids_tr), (Xva, yva, _), (Xte, yte, _) = split["train"], split["val"], split["test"]
    modality = next(iter(features))
    n_cls = len(ytr.classes)
    query_rows, head_rows = [], []

    def query_row(row: str, seed: int, scores: np.ndarray, **extra) -> dict:
        return {"task": "concept query", "row": row, "seed": seed, "top1": round(topk_accuracy(scores, yte.y, 1), 4),
                "top2": round(topk_accuracy(scores, yte.y, 2), 4), **extra}

    raw_scores = _cosine_to_means(Xtr.pooled[modality], ytr.y, Xte.pooled[modality], n_cls)
    for seed in seeds:
        scl = SCL(**SCL_PARAMS, seed=seed).fit(Xtr, ytr, eval_set=(Xva, yva))
        emo_tr = scl.encode_modality(modality, Xtr.pooled[modality])
        emo_te = scl.encode_modality(modality, Xte.pooled[modality])
        folder = workdir / f"concepts-{dataset}-seed{seed}"
        mem, counts = _memory(scl, modality, emo_tr, ytr.y, ids_tr, folder)
        bank = ConceptBank.from_memory(mem, sorted(mem.meta["class"].unique().to_list()))
        order = [bank.classes.index(c) for c in ytr.classes]  # the bank's classes are the memory's, sorted
        query_rows.append(query_row("scl concepts (fs query)", seed, bank.similarity(emo_te)[:, order],
                                    pool_min=int(min(min(v.values()) for v in counts.values()))))
        query_rows.append(query_row("raw-feature centroid", seed, raw_scores))
        query_rows.append(query_row("scl-feature centroid", seed, _cosine_to_means(emo_tr, ytr.y, emo_te, n_cls)))

        concept_heads = [heads.create("concept", memory=str(folder), seed=seed, device="cpu", **p)
                         for p in CONCEPT_ROWS.values()]
        fit_concept(concept_heads, Xtr, ytr, eval_set=(Xva, yva))
        others = {name: heads.create(name, seed=seed, device="cpu").fit(Xtr, ytr, eval_set=(Xva, yva))
                  for name in ("mlp", "linear")}
        for row, head in [*zip(CONCEPT_ROWS, concept_heads), *others.items()]:
            head_rows.append({"task": TASK, "row": row, "seed": seed,
                              **_scalar_metrics(evaluate(yte, head.predict(Xte)))})
    return {"query_rows": query_rows, "head_rows": head_rows}


if __name__ == "__main__":
    import json
    import sys
    import tempfile
    import time

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from featurestore.store import open_store

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = concept_section(open_store(sys.argv[1] if len(sys.argv) > 1 else "store"), workdir=tmp)
    print(json.dumps(out, indent=1))
    print(f"{time.perf_counter() - t0:.1f}s", file=sys.stderr)
