"""Replay-memory benchmark: single-query latency (p50, p99), recall@10 against exact search,
batched throughput, on N pooled vectors of width 256; and concept construction per batch.

    python bench/bench_memory.py              # 1M vectors (IVF build takes a few minutes on 2 cores)
    python bench/bench_memory.py --n 100000   # a quick run

Data: synthetic and clustered, like SCL emotion features (which cluster by class): 10 class
directions, 2,000 sub-clusters around them (offset 0.8 per coordinate), Gaussian noise of 1.2 per
coordinate per point (larger than the sub-cluster offsets, so neighbourhoods overlap), L2-normalised. Queries
are held out from the same distribution. `--data uniform` uses isotropic Gaussian noise instead
(the worst case for any approximate index). Targets: p50 <= 1 ms, recall@10 >= 0.95.
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def clustered(n: int, dim: int, rng: np.random.Generator, *, classes=10, subs=2000, args_noise=1.2) -> np.ndarray:
    class_dirs = rng.normal(size=(classes, dim)).astype(np.float32)
    sub_centres = class_dirs[rng.integers(0, classes, subs)] + 0.8 * rng.normal(size=(subs, dim)).astype(np.float32)
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        out[s:s + m] = sub_centres[rng.integers(0, subs, m)] + args_noise * rng.normal(size=(m, dim)).astype(np.float32)
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def bench_memory(args) -> None:
    from featurestore.memory import Memory, MemoryConfig
    from featurestore.memory._index import exact_topk, recall_at

    rng = np.random.default_rng(0)
    gen = clustered if args.data == "clustered" else (
        lambda n, d, r: (lambda x: x / np.linalg.norm(x, axis=1, keepdims=True))(r.normal(size=(n, d)).astype(np.float32)))
    data = gen(args.n + args.queries, args.dim, rng)
    base, queries = data[:args.n], data[args.n:]
    t = time.perf_counter()
    mem = Memory(args.dim, MemoryConfig(exact_max=args.exact_max, nlist=args.nlist, target_recall=args.target))
    mem.add(np.arange(args.n), base, {})
    build = time.perf_counter() - t
    info = mem.info()
    print(f"data={args.data} n={args.n} dim={args.dim}: built {info['kind']} in {build:.1f}s "
          f"(nlist={getattr(mem.index, 'nlist', '-')}, nprobe={info['nprobe']}, "
          f"build-time recall@10 on stored vectors={info['recall_at_10']})")
    t = time.perf_counter()
    truth = exact_topk(base, queries, 10)
    exact_s = time.perf_counter() - t
    lat = []
    found = np.empty((len(queries), 10), np.int64)
    for _ in range(min(20, len(queries))):  # warm-up
        mem.search(queries[:1], 10)
    for i in range(len(queries)):
        t = time.perf_counter()
        _, ids = mem.search(queries[i:i + 1], 10)
        lat.append(time.perf_counter() - t)
        found[i] = ids[0]
    lat = np.array(lat) * 1e3
    print(f"single query (Memory.search, k=10): p50 {np.percentile(lat, 50):.3f} ms, p99 "
          f"{np.percentile(lat, 99):.3f} ms over {len(queries)} held-out queries")
    print(f"recall@10 vs exact (numpy brute force): {recall_at(found, truth):.4f}")
    print(f"numpy exact search for comparison: {exact_s / len(queries) * 1e3:.3f} ms/query batched")
    for bs in (64, 1024):
        reps = max(1, len(queries) // bs)
        t = time.perf_counter()
        for r in range(reps):
            mem.search(queries[(r * bs) % len(queries):][:bs], 10)
        dt = time.perf_counter() - t
        print(f"batched queries of {bs}: {reps * bs / dt:,.0f} queries/s")


def bench_concepts(args) -> None:
    from featurestore.heads.concepts import ConceptBank

    rng = np.random.default_rng(1)
    classes = ["anger", "disgust", "fear", "happy", "neutral", "sad", "surprise"]
    groups = {(m, c): rng.normal(size=(args.pool, args.dim)).astype(np.float32)
              for m in ("image", "text", "audio") for c in classes}
    bank = ConceptBank.from_groups(classes, groups, args.dim)
    y = rng.integers(0, len(classes), 256)
    draw = np.random.default_rng(2)
    for _ in range(5):
        bank.sample(y, draw, k=8)
    reps = 200
    t = time.perf_counter()
    for _ in range(reps):
        bank.sample(y, draw, k=8)
    dt = (time.perf_counter() - t) / reps
    print(f"concepts: batch of 256 items, 3 modalities, k=8, pools of {args.pool} x {args.dim}: "
          f"{dt * 1e3:.3f} ms per batch")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000, help="vectors in the memory")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--data", choices=["clustered", "uniform"], default="clustered")
    ap.add_argument("--exact-max", type=int, default=50_000)
    ap.add_argument("--nlist", type=int, default=0, help="IVF lists (0: the memory's default)")
    ap.add_argument("--target", type=float, default=0.95, help="recall the build tunes nprobe to")
    ap.add_argument("--pool", type=int, default=2000, help="concept bench: rows per (modality, class) pool")
    ap.add_argument("--skip-memory", action="store_true")
    args = ap.parse_args()
    if not args.skip_memory:
        bench_memory(args)
    bench_concepts(args)


if __name__ == "__main__":
    main()
