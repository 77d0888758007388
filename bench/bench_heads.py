"""Heads benchmarks: (a) one `mlp` epoch from the cache vs with MiniLM in the loop; (b) a `univa` epoch.

    python bench/bench_heads.py [--n 2000] [--univa-n 20000]

(a) builds a temporary store with the demo dataset's first N words, extracts MiniLM text
features once, then times one training epoch of the `mlp` head reading the cache (the read
included) against one epoch of the same MLP whose inputs come from running MiniLM on each
mini-batch (frozen backbone, no grad: the cheapest way to train without a cache).
(b) times one `univa` epoch on synthetic pooled features of three modalities.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np


def _sentences(df, words_per_item: int):
    """Items of `words_per_item` consecutive lexicon words (utterance-length text), labelled as
    their first word; 1 keeps the demo's single words."""
    import polars as pl

    if words_per_item <= 1:
        return df
    words = df["text"].to_list()
    texts = [" ".join(words[(i + j) % len(words)] for j in range(words_per_item)) for i in range(len(words))]
    return df.with_columns(text=pl.Series(texts))


def bench_cache_vs_backbone(n: int, batch_size: int, words_per_item: int = 1) -> dict:
    import torch

    import featurestore.heads as heads
    from featurestore.backbones import create as create_backbone
    from featurestore.datasets import add_dataset, build_demo
    from featurestore.reader import load_split
    from featurestore.store import open_store
    from featurestore.heads._data import encode_targets, features_of
    from featurestore.heads._torch import task_loss
    from featurestore.jobs.extract import ExtractConfig, run

    with tempfile.TemporaryDirectory() as root:
        store = open_store(root, create=True)
        df = _sentences(build_demo().head(n), words_per_item).with_columns(split=__import__("polars").lit("train"))
        ds = add_dataset(store, "bench", df, root=None, source="bench")
        run(ExtractConfig(dataset="bench", modality="text", backbone="minilm"), store)

        cached = float("inf")
        for _ in range(3):  # best of 3: the cheap arm is the one most disturbed by other load
            t0 = time.perf_counter()
            data = load_split(store, "bench", "train", {"text": "minilm"})
            X = features_of(data)
            y, _ = encode_targets(data, "label", ds.label_set)
            head = heads.create("mlp", epochs=1, batch_size=batch_size, patience=0).fit(X, y)
            cached = min(cached, time.perf_counter() - t0)

        bb = create_backbone("minilm", device="cpu")
        bb.load()
        net = head._network(X.pooled["text"].shape[1] + 1, len(ds.label_set))
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
        texts = [bb.prepare(t) for t in ds.split("train")["text"].to_list()]  # the rows load_split read
        labels = torch.as_tensor(y.y)
        t0 = time.perf_counter()
        for i in range(0, len(texts), batch_size):
            feats = torch.from_numpy(bb.encode(texts[i:i + batch_size]).pooled)
            x = torch.cat([feats, torch.ones(len(feats), 1)], 1)
            loss = task_loss(net(x), labels[i:i + batch_size], "single")
            opt.zero_grad()
            loss.backward()
            opt.step()
        in_loop = time.perf_counter() - t0
    return {"items": n, "words": words_per_item, "cache_epoch_s": cached, "backbone_epoch_s": in_loop,
            "speedup": in_loop / cached}


def bench_univa(n: int, batch_size: int) -> dict:
    import featurestore.heads as heads
    from featurestore.heads import Features, Targets

    rng = np.random.default_rng(0)
    dims = {"text": 384, "image": 512, "audio": 768}
    X = Features({m: rng.normal(size=(n, d)).astype(np.float32) for m, d in dims.items()},
                 {m: rng.random(n) > 0.1 for m in dims},
                 va={m: rng.uniform(-1, 1, (n, 2)).astype(np.float32) for m in dims})
    y = (rng.random((n, 7)) < 0.25).astype(np.float32)
    y[np.arange(n), rng.integers(0, 7, n)] = 1
    classes = ["happy", "sad", "anger", "surprise", "disgust", "fear", "neutral"]
    head = heads.create("univa", epochs=1, batch_size=batch_size, patience=0)
    t0 = time.perf_counter()
    head.fit(X, Targets("multi", y, classes))
    return {"items": n, "modalities": len(dims), "batch_size": batch_size, "epoch_s": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="demo words for the cache-vs-backbone comparison")
    ap.add_argument("--univa-n", type=int, default=20000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--words-per-item", type=int, nargs="+", default=[1, 20],
                    help="text length of the items for (a): 1 = the demo's single words; 20 = utterance-length")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads for both arms (0: torch's default)")
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"cuda={'yes' if torch.cuda.is_available() else 'no'}")
    for words in args.words_per_item:
        a = bench_cache_vs_backbone(args.n, args.batch_size, words)
        print(f"(a) mlp, one epoch over {a['items']} items of {words} word(s): from cache {a['cache_epoch_s']:.3f}s "
              f"(read included), MiniLM in the loop {a['backbone_epoch_s']:.2f}s -> {a['speedup']:.0f}x faster "
              "from the cache (target >= 50x)")
    b = bench_univa(args.univa_n, args.batch_size)
    print(f"(b) univa, one epoch over {b['items']} items, {b['modalities']} modalities, batch {b['batch_size']}: "
          f"{b['epoch_s']:.2f}s")


if __name__ == "__main__":
    main()
