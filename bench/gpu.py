"""The CUDA paths and the GPU figures the issues ask for, in one command (for the `device` tool's lent GPU).

    python bench/gpu.py [--out DIR] [--only heads,extract,...] [--quick]

Each section is isolated: an exception is recorded with its traceback and the next section runs.
Every result is one JSON line in DIR/gpu.jsonl; a short table is printed last.

  env      torch, CUDA and the GPU.
  heads    each head fitted on CUDA and on the CPU from the same synthetic three-modality data
           (pooled 64-d, per-modality VA; drkf on two of them) and the same seed; test WAR both ways
           (`concept`, which needs an SCL run and a memory, trains on univa's engine). A CUDA path that
           breaks or learns nothing shows here (the two need not agree to the digit: autocast, and
           nondeterministic kernels).
  extract  hf-text, a 2-layer BERT built from a config: `fs extract --device cuda` (autocast) against
           `--device cpu` (float32) on the same texts: cosine of each stored row; then BERT-base built
           from its config: `fs extract` items/s against a bare autocast loop on the same batches.
  image    clip-image with the ViT-B/32 architecture (from its config) on PNG files:
           `fs extract --modality image --device cuda` items/s and the GPU's mean utilisation.
  umbe     umbe training throughput at batch 256 (issue 13), at the default width (128) and at
           CLIP's 768, on three pooled 768-d modalities; items/s = items x extra epochs / extra time
           (a 6-epoch fit, 3 on the CPU, minus a 1-epoch fit, after an untimed one: set-up, warm-up and
           the FAISS index build cancel out; validation passes stay in). The CPU (an eighth of the
           items) for scale.
  drkf     drkf training throughput at the paper's width (hidden 1024, projection 1024; issue 14),
           two modalities of 50 x 1024 sequences, batch 32 (ours) and 4 (the paper's), a 4-epoch fit
           minus a 1-epoch fit;
           the CPU (64 items, batch 32) for scale.
  lora     `fs lora train` training items/s against a bare peft loop (issue 12), BERT-base built
           from its config with a vocabulary of the demo's words, autocast on CUDA.

Random weights throughout (speed does not depend on them; nothing downloads).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import traceback
from pathlib import Path

import _common  # noqa: F401  (sys.path, offline hub)
import numpy as np
import torch
from _common import GPUSampler

OUT: Path = Path(".")
GPU = "cuda" if torch.cuda.is_available() else "cpu"  # --quick on a machine with none: the CPU stands in
ROWS: list[dict] = []


def record(section: str, **fields) -> None:
    row = {"section": section, **fields}
    ROWS.append(row)
    with open(OUT / "gpu.jsonl", "a") as f:
        f.write(json.dumps(row, default=str) + "\n")
    print(json.dumps(row, default=str), flush=True)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ---- env -------------------------------------------------------------------------------
def env(args) -> None:
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "available": torch.cuda.is_available(),
            "cpu_cores": os.cpu_count()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, memory_gib=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count,
                    bf16=torch.cuda.is_bf16_supported())
    for mod in ("faiss", "xgboost", "polars", "transformers", "peft", "h5py"):
        try:
            m = __import__(mod)
            info[mod] = getattr(m, "__version__", "?")
        except ImportError as e:
            info[mod] = f"missing ({e})"
    try:
        import faiss
        info["faiss_gpus"] = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
        import xgboost
        info["xgboost_cuda_build"] = bool(xgboost.build_info().get("USE_CUDA"))
    except ImportError:
        pass
    record("env", **info)


# ---- heads -----------------------------------------------------------------------------
def three_modalities(n: int, seed: int, dim: int = 64, strength: float = 1.0):
    """umbe_check's task (classes c and c + 3 show in modality c % 3 only), with per-modality VA."""
    from umbe_check import three_modalities as task

    return task(n, seed, dim=dim, strength=strength, va=True)


def pick(X, mods):
    from featurestore.heads import Features

    return Features({m: X.pooled[m] for m in mods}, {m: X.masks[m] for m in mods},
                    va={m: X.va[m] for m in mods if m in X.va})


def heads_parity(args) -> None:
    import featurestore.heads as heads
    from featurestore.heads import metrics

    n = 600 if args.quick else 3000
    X, y = three_modalities(n, 0)
    Xv, yv = three_modalities(n // 5, 1)
    Xt, yt = three_modalities(n // 2, 2)
    quick = {"xgboost": {"n_estimators": 20}, "scl": {"joint_epochs": 2, "seq_epochs": 2}}
    # univa without its label-VA prior (synthetic classes have no VA table); drkf fuses two modalities.
    # concept needs an SCL run and a replay memory: it trains on univa's engine (heads._vmapped).
    fixed = {"univa": {"prior": "false"}}
    two = ("audio", "text")
    for method in args.methods.split(","):
        row = {"method": method, "n_train": n}
        sets = [pick(Z, two) if method == "drkf" else Z for Z in (X, Xv, Xt)]
        for device in (("cuda", "cpu") if torch.cuda.is_available() else ("cpu",)):
            try:
                params = {**fixed.get(method, {}),
                          **(quick.get(method, {"epochs": 3}) if args.quick else {})}
                t = time.perf_counter()
                head = heads.create(method, seed=0, device=device, **params).fit(sets[0], y, eval_set=(sets[1], yv))
                fit_s = time.perf_counter() - t
                m = metrics.evaluate(yt, head.predict(sets[2]))
                row[device] = {"test_war": round(m["war"], 4), "test_uar": round(m["uar"], 4), "fit_s": round(fit_s, 2)}
            except Exception as e:  # recorded, and the other device and heads still run
                row[device] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-1500:]}
        record("heads", **row)


# ---- extraction ------------------------------------------------------------------------
def words(n: int) -> list[str]:
    from featurestore.datasets.demo import nrc_lexicon

    return sorted(nrc_lexicon())[:n]


def bert_folder(folder: Path, vocab_words: list[str], base: bool) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab = ["[UNK]", "[PAD]", "[CLS]", "[SEP]", "[MASK]"] + vocab_words
    small = {} if base else {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                             "intermediate_size": 128}
    cfg = BertConfig(vocab_size=len(vocab), max_position_embeddings=512, **small)
    torch.manual_seed(0)
    BertModel(cfg).eval().save_pretrained(folder)
    BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}).save_pretrained(folder)
    return folder


def text_store(root: Path, texts: list[str]):
    import polars as pl

    from featurestore.datasets import add_dataset
    from featurestore.datasets.manifest import normalise
    from featurestore.store import open_store

    store = open_store(root, create=True)
    df = pl.DataFrame({"item_id": [f"t{i}" for i in range(len(texts))], "split": "train", "text": texts})
    add_dataset(store, "texts", normalise(df, source="bench"), root=None, source="bench")
    return store


def extract_parity(args) -> None:
    from featurestore import backbones
    from featurestore.jobs.extract import ExtractConfig, run
    from featurestore.reader import load_split

    vocab = words(2000)
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(vocab, rng.integers(3, 30))) for _ in range(256 if args.quick else 2048)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        small = bert_folder(tmp / "small", vocab, base=False)
        rows = {}
        for device in dict.fromkeys(("cpu", GPU)):
            store = text_store(tmp / f"s-{device}", texts)
            res = run(ExtractConfig(dataset="texts", backbone="hf-text", params={"model": str(small)}, batch_size=64,
                                    device=device), store)
            rows[device] = load_split(store, "texts", "train", {"text": res.fingerprint}).features["text"]
            fp = res.fingerprint
        a, b = rows["cpu"].astype(np.float64), rows[GPU].astype(np.float64)
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        record("extract", what="hf-text tiny BERT, cuda autocast vs cpu float32", items=len(texts), fingerprint=fp,
               cos_min=round(float(cos.min()), 5), cos_mean=round(float(cos.mean()), 5),
               rel_err=round(float(np.linalg.norm(a - b) / np.linalg.norm(a)), 5))

        base = bert_folder(tmp / "base", vocab, base=True)
        bb = backbones.create("hf-text", {"model": str(base)}, device=GPU).load()
        bs = 128
        bb.encode(texts[:bs])  # warm-up: kernels, autocast caches
        sync()
        t = time.perf_counter()
        for i in range(0, len(texts), bs):
            bb.encode(texts[i:i + bs])
        sync()
        bare = len(texts) / (time.perf_counter() - t)
        store = text_store(tmp / "s-base", texts)
        with GPUSampler(GPU) as gpu:
            t = time.perf_counter()
            res = run(ExtractConfig(dataset="texts", backbone="hf-text", params={"model": str(base)}, batch_size=bs,
                                    device=GPU), store, backbone=bb)
            job_s = time.perf_counter() - t
        record("extract", what="hf-text BERT-base (from config), fs extract vs bare encode loop, cuda", items=len(texts),
               batch_size=bs, job_items_per_s=round(res.computed / job_s, 1), bare_items_per_s=round(bare, 1),
               ratio=round(res.computed / job_s / bare, 3), gpu_util_mean=gpu.mean,
               model_share=round(res.model_seconds / job_s, 3))


def image_extract(args) -> None:
    from PIL import Image
    from bench_video import tiny_clip

    from featurestore.datasets import add_dataset, read_manifest_file
    from featurestore.jobs.extract import ExtractConfig, run
    from featurestore.store import open_store

    n = 64 if args.quick else 2048
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "img").mkdir()
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(tmp / "img" / f"i{i}.png")
        (tmp / "m.csv").write_text("id,split,image\n" + "".join(f"i{i},train,img/i{i}.png\n" for i in range(n)))
        tiny_clip(tmp / "vit", vit_b32=True)  # ViT-B/32 from its config, random weights, CLIP's processor
        for bs in (64, 256):
            store = open_store(tmp / f"s{bs}", create=True)
            add_dataset(store, "imgs", read_manifest_file(tmp / "m.csv"), root=tmp, source="bench")
            with GPUSampler(GPU) as gpu:
                t = time.perf_counter()
                res = run(ExtractConfig(dataset="imgs", modality="image", backbone="clip-image",
                                        params={"model": str(tmp / "vit")}, batch_size=bs, device=GPU), store)
                s = time.perf_counter() - t
            record("image", what="clip-image ViT-B/32 (from config), fs extract --modality image --device cuda",
                   items=res.computed, failed=res.failed_new, batch_size=bs, seconds=round(s, 2),
                   items_per_s=round(res.computed / s, 1), model_share=round(res.model_seconds / s, 3),
                   gpu_util_mean=gpu.mean, note="includes model load and PNG decoding on worker threads")


# ---- head throughput -------------------------------------------------------------------
def epochs_rate(method: str, X, y, Xv, yv, n: int, params: dict, device: str, long: int = 4) -> dict:
    """items/s of training epochs: a `long`-epoch fit minus a 1-epoch fit, after an untimed 1-epoch fit
    (CUDA context, kernels and allocator warm-up would otherwise land in the first)."""
    import featurestore.heads as heads

    times = {}
    for epochs in (1, 1, long):
        sync()
        t = time.perf_counter()
        heads.create(method, seed=0, device=device, epochs=epochs, patience=0, **params).fit(X, y, eval_set=(Xv, yv))
        sync()
        times[epochs] = time.perf_counter() - t
    return {"items_per_s": round(n * (long - 1) / max(times[long] - times[1], 1e-9), 1),
            "fit_1_epoch_s": round(times[1], 2), f"fit_{long}_epochs_s": round(times[long], 2)}


def umbe_rate(args) -> None:
    n = 2048 if args.quick else 20000
    dim = 768
    X, y = three_modalities(n, 0, dim=dim)
    Xv, yv = three_modalities(max(n // 10, 256), 1, dim=dim)
    for hidden, heads_ in ((128, 4), (768, 8)):
        for device in dict.fromkeys((GPU, "cpu")):
            m = n if device == GPU else n // 8
            Xd, yd = (X, y) if device == GPU else three_modalities(m, 0, dim=dim)
            r = epochs_rate("umbe", Xd, yd, Xv, yv, m, {"batch_size": 256, "hidden": hidden, "heads": heads_,
                                                        "stages": 1, "min_lr": 0.0}, device,
                             long=6 if device == "cuda" else 3)
            record("umbe", device=device, batch_size=256, hidden=hidden, items=m, modalities=3, dim=dim, **r)


def drkf_rate(args) -> None:
    from featurestore.heads import Features, Targets

    n, steps, dim = (256, 10, 1024) if args.quick else (1024, 50, 1024)
    rng = np.random.default_rng(0)

    def data(k):
        y = rng.integers(0, 4, k)
        seqs = {m: [rng.normal(size=(steps, dim)).astype(np.float32) + 0.3 * y[i] for i in range(k)]
                for m in ("audio", "text")}
        pooled = {m: np.stack([s.mean(0) for s in v]) for m, v in seqs.items()}
        return Features(pooled, {}, sequences=seqs), Targets("single", y, [f"c{i}" for i in range(4)])

    X, y = data(n)
    Xv, yv = data(n // 8)
    paper = {"hidden": 1024, "proj": 1024, "heads": 8, "ae_width": 256, "ae_blocks": 5}
    for bs in (32, 4):
        for device in dict.fromkeys((GPU, "cpu") if bs == 32 else (GPU,)):
            m = (n if bs >= 32 else n // 2) if device == GPU else 64
            Xd, yd = (X, y) if m == n else data(m)
            r = epochs_rate("drkf", Xd, yd, Xv, yv, m, {"batch_size": bs, **paper}, device)
            record("drkf", device=device, batch_size=bs, items=m, steps=steps, dim=dim, **paper, **r)


def lora_rate(args) -> None:
    import bench_lora

    from featurestore.datasets.demo import nrc_lexicon

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = bert_folder(tmp / "base", sorted(nrc_lexicon()), base=not args.quick)
        for bs in (32, 128):
            r = bench_lora.bench_throughput(tmp / f"b{bs}", 256 if args.quick else 2048, bs, GPU, repeat=args.lora_repeat,
                                            backbone="hf-text", params={"model": str(base)})
            record("lora", model="BERT-base (from config)" if not args.quick else "tiny BERT", **r)


SECTIONS = {"env": env, "umbe": umbe_rate, "extract": extract_parity, "image": image_extract, "drkf": drkf_rate,
            "lora": lora_rate, "heads": heads_parity}  # the asked-for figures first: a cut run keeps them


def main() -> None:
    global OUT
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    ap.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    ap.add_argument("--methods", default="linear,mlp,univa,scl,umbe,drkf,xgboost", help="heads: the heads to fit")
    ap.add_argument("--lora-repeat", type=int, default=4, help="lora: alternated runs of each loop")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run; the CPU stands in for CUDA)")
    args = ap.parse_args()
    OUT = Path(args.out)
    OUT.mkdir(parents=True, exist_ok=True)
    for name in args.only.split(","):
        t = time.perf_counter()
        try:
            SECTIONS[name](args)
        except Exception as e:
            record(name, error=f"{type(e).__name__}: {e}", trace=traceback.format_exc()[-3000:])
        print(f"-- {name}: {time.perf_counter() - t:.0f} s", flush=True)
    print("\nsummary")
    for row in ROWS:
        print(" ", {k: v for k, v in row.items() if k != "trace"})


if __name__ == "__main__":
    main()
