"""FAISS index kinds of the replay memory, all cosine (inner product on L2-normalised rows).

- `flat`: `IndexIDMap2(IndexFlatIP)`, exact; used below the size threshold.
- `ivf`: `IndexIVFFlat` with a hash-table direct map, so ids can be removed and vectors read
  back; used above it. IVF rather than HNSW because FAISS's HNSW cannot remove ids, and
  `remove(ids)` is part of the memory contract. `nprobe` is tuned at build time until the
  measured recall@10 against exact search reaches the target.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["normalise", "make_flat", "make_ivf", "kind_of", "all_ids", "reconstruct", "exact_topk",
           "recall_at", "tune_nprobe", "default_nlist", "to_search_index"]


def normalise(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None]
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, 1e-12), dtype=np.float32)


def make_flat(dim: int):
    import faiss

    return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))


def default_nlist(n: int) -> int:
    """About 4 * sqrt(n) lists, and at least 39 training points per list."""
    return int(max(1, min(n // 39, 4 * math.sqrt(max(n, 1)))))


def make_ivf(vectors: np.ndarray, *, nlist: int = 0, seed: int = 0, niter: int = 10):
    """Train an IVF-Flat index on (a sample of) `vectors`; empty, ready for `add_with_ids`."""
    import faiss

    n, dim = vectors.shape
    nlist = nlist or default_nlist(n)
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.niter = niter
    index.cp.seed = seed
    index.cp.spherical = True  # centroids on the unit sphere, like the data
    sample = min(n, 64 * nlist)
    rows = np.random.default_rng(seed).choice(n, sample, replace=False) if sample < n else slice(None)
    index.train(np.ascontiguousarray(vectors[rows]))
    index.set_direct_map_type(faiss.DirectMap.Hashtable)
    return index


def kind_of(index) -> str:
    import faiss

    return "ivf" if isinstance(faiss.downcast_index(index), faiss.IndexIVF) else "flat"


def all_ids(index) -> np.ndarray:
    """Every id held by a flat or IVF index (order unspecified)."""
    import faiss

    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexIVF):
        inv = index.invlists
        parts = [faiss.rev_swig_ptr(inv.get_ids(i), inv.list_size(i)).copy()
                 for i in range(index.nlist) if inv.list_size(i)]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
    return faiss.vector_to_array(index.id_map).astype(np.int64)


def reconstruct(index, ids: np.ndarray) -> np.ndarray:
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if not len(ids):
        return np.zeros((0, index.d), np.float32)
    return index.reconstruct_batch(ids)


def exact_topk(base: np.ndarray, queries: np.ndarray, k: int, chunk: int = 256) -> np.ndarray:
    """Row indices of the k largest inner products, by numpy (the ground truth for recall)."""
    out = []
    for s in range(0, len(queries), chunk):
        sims = queries[s:s + chunk] @ base.T
        k_ = min(k, base.shape[0])
        part = np.argpartition(-sims, k_ - 1, axis=1)[:, :k_]
        order = np.take_along_axis(sims, part, 1).argsort(1)[:, ::-1]
        out.append(np.take_along_axis(part, order, 1))
    return np.concatenate(out)


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each true top-k found in the returned top-k (ids; -1 never matches)."""
    hits = [len(set(f[f >= 0].tolist()) & set(t.tolist())) / max(1, len(t)) for f, t in zip(found, truth)]
    return float(np.mean(hits)) if hits else 1.0


def tune_nprobe(index, vectors: np.ndarray, ids: np.ndarray, *, target: float = 0.95, k: int = 10,
                n_queries: int = 200, seed: int = 0) -> tuple[int, float]:
    """Smallest power-of-two nprobe whose recall@k, with stored vectors as queries (each one's own id
    left out of truth and answer), reaches `target`; returns (nprobe, measured recall)."""
    rng = np.random.default_rng(seed)
    q_rows = rng.choice(len(vectors), min(n_queries, len(vectors)), replace=False)
    queries = vectors[q_rows]
    truth_rows = exact_topk(vectors, queries, k + 1)
    truth = [ids[r[r != q]][:k] for r, q in zip(truth_rows, q_rows)]
    nprobe, recall = 1, 0.0
    while True:
        index.nprobe = nprobe
        _, found = index.search(queries, k + 1)
        found = [f[f != ids[q]][:k] for f, q in zip(found, q_rows)]
        recall = recall_at(np.array(found), np.array(truth))
        if recall >= target or nprobe >= index.nlist:
            return nprobe, recall
        nprobe = min(index.nlist, nprobe * 2)


def to_search_index(index, device: str, nprobe: int):
    """A GPU copy of `index` when asked for (or `auto`) and faiss sees a GPU; else `index` itself."""
    import faiss

    if device == "cpu" or not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
        if device == "gpu":
            from ..errors import ConfigError
            raise ConfigError("memory device 'gpu' was asked for but faiss sees no GPU "
                              "(install faiss-gpu: pip install featurestore[gpu]) or use device=auto")
        return index
    res = faiss.StandardGpuResources()
    gpu = faiss.index_cpu_to_gpu(res, 0, index)
    if kind_of(index) == "ivf":
        faiss.GpuParameterSpace().set_index_parameter(gpu, "nprobe", nprobe)
    gpu._fs_resources = res  # keep the resources alive as long as the index
    return gpu
