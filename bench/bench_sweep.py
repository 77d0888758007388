"""Sweep benchmark: 64 `mlp` configurations trained as one stack vs alone vs one after another.

    python bench/bench_sweep.py [--n 50000] [--configs 64] [--epochs 2] [--sequential 8] [--cli 2]
                                [--univa 16] [--univa-n 5000] [--univa-only] [--device cpu|cuda]

Synthetic "cached" features: N x 384 float16 written to a .npy file, read back as float32 (as
the store reads them), 7 classes, a 10% validation set. 64 configurations = 4 learning rates x
4 weight decays x 4 dropouts, hidden 128, 2 hidden layers, batch 256, `epochs` each with
patience 0 (every configuration runs the same epochs). Prints:

1. the sweep's wall time / one configuration alone (target <= 4x);
2. 64 configurations one after another in one process (features loaded once) / the sweep
   (target >= 10x); `--sequential K` times K of them and extrapolates to 64;
3. the sweep's achieved FLOP rate / a bare torch GEMM loop of the same shapes (target >= 0.5);
4. an estimate for 64 separate `fs train-head` processes: a fresh interpreter importing torch +
   the heads (measured `--cli` times) + reading the features + one solo fit, times 64.
5. `univa` (heads._vmapped): `--univa` configurations (lr x lam x tau, default 16) on `--univa-n`
   synthetic items (text 384-d + audio 64-d pooled, per-modality VA, 7 multi-label classes,
   hidden 128, batch 64), 1 epoch each, as one vectorised stack / one configuration alone.
   `--univa 0` skips it; `--univa-only` runs only it.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

D, K, HIDDEN, LAYERS, BATCH = 384, 7, 128, 2, 256


def make_features(folder: Path, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, K, n)
    centres = rng.normal(size=(K, D)).astype(np.float32)
    x = (rng.normal(size=(n, D)).astype(np.float32) + 0.3 * centres[y]).astype(np.float16)
    np.save(folder / "x.npy", x)
    np.save(folder / "y.npy", y)


def load(folder: Path):
    from featurestore.heads import Features, Targets

    x = np.load(folder / "x.npy").astype(np.float32)  # float16 on disk -> float32, as the reader does
    y = np.load(folder / "y.npy")
    n_val = len(y) // 10
    classes = [f"c{i}" for i in range(K)]
    tr = Features({"text": x[n_val:]}, {}), Targets("single", y[n_val:], classes)
    va = Features({"text": x[:n_val]}, {}), Targets("single", y[:n_val], classes)
    return tr, va


def configs(n: int, epochs: int, device: str = "cpu") -> list[dict]:
    grid = [dict(lr=lr, weight_decay=wd, dropout=dr) for lr in (1e-4, 3e-4, 1e-3, 3e-3)
            for wd in (0.0, 1e-4, 1e-3, 1e-2) for dr in (0.0, 0.1, 0.3, 0.5)]
    base = dict(hidden=HIDDEN, layers=LAYERS, batch_size=BATCH, epochs=epochs, patience=0, seed=0, device=device)
    return [{**base, **g} for g in grid[:n]]


def train_flops(n_train: int, n_val: int, C: int, epochs: int) -> float:
    """FLOPs of the GEMMs a stacked step does (forward, weight gradients, input gradients past layer 1) + validation."""
    per_row = [D * HIDDEN] + [HIDDEN * HIDDEN] * (LAYERS - 1) + [HIDDEN * K]
    fwd = 2 * sum(per_row)
    bwd = 2 * sum(per_row) + 2 * sum(per_row[1:])
    return C * epochs * (n_train * (fwd + bwd) + n_val * fwd)


def bare_gemm_seconds(n_train: int, n_val: int, C: int, epochs: int, device: str = "cpu") -> float:
    """The same GEMMs as the stacked step, on random tensors, nothing else."""
    import torch

    with torch.device(device):
        return _bare_gemm_seconds(n_train, n_val, C, epochs, device)


def _bare_gemm_seconds(n_train: int, n_val: int, C: int, epochs: int, device: str) -> float:
    import torch

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    x = torch.randn(BATCH, D)
    W1 = torch.randn(D, C * HIDDEN)
    g1 = torch.randn(BATCH, C * HIDDEN)
    hs = [torch.randn(C, BATCH, HIDDEN) for _ in range(LAYERS)]
    Ws = [torch.randn(C, HIDDEN, HIDDEN) for _ in range(LAYERS - 1)] + [torch.randn(C, HIDDEN, K)]
    outs = [torch.randn(C, BATCH, HIDDEN) for _ in range(LAYERS - 1)] + [torch.randn(C, BATCH, K)]

    def step():
        x @ W1
        x.t() @ g1
        for h, W, o in zip(hs, Ws, outs):
            torch.bmm(h, W)
            torch.bmm(h.transpose(1, 2), o)
            torch.bmm(o, W.transpose(1, 2))

    xv = torch.randn(min(n_val, 8192), D)

    def val():
        xv @ W1
        for W in Ws:
            torch.bmm(torch.randn(C, len(xv), W.shape[1]), W)

    for _ in range(3):
        step()
    reps = 20
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        step()
    sync()
    per_step = (time.perf_counter() - t) / reps
    t = time.perf_counter()
    val()
    sync()
    per_val = time.perf_counter() - t
    steps = -(-n_train // BATCH)
    return epochs * (steps * per_step + per_val * n_val / len(xv))


def univa_data(n: int, seed: int = 0):
    from featurestore.heads import Features, Targets

    rng = np.random.default_rng(seed)
    cls = rng.integers(0, K, n)
    y = np.eye(K, dtype=np.float32)[cls]
    y[:, 0] = np.maximum(y[:, 0], rng.random(n) < 0.2)
    text = rng.normal(size=(n, D)).astype(np.float32)
    audio = rng.normal(size=(n, 64)).astype(np.float32)
    va = {m: rng.uniform(-1, 1, (n, 2)).astype(np.float32) for m in ("text", "audio")}
    X = Features({"text": text, "audio": audio}, {"audio": rng.random(n) > 0.2}, va=va)
    return X, Targets("multi", y, ["anger", "disgust", "fear", "happy", "neutral", "sad", "surprise"])


def bench_univa(n: int, C: int, device: str = "cpu") -> None:
    import featurestore.heads as heads
    from featurestore.heads._stacked import fit_heads

    (X, y), (Xv, yv) = univa_data(n, 0), univa_data(max(n // 10, 1), 1)
    grid = [dict(lr=lr, lam=lam, tau=tau) for lr in (1e-4, 3e-4, 1e-3, 3e-3) for lam in (0.2, 0.5)
            for tau in (0.3, 0.6)] * (-(-C // 16))
    base = dict(hidden=128, heads=4, batch_size=64, epochs=1, patience=0, seed=0, device=device)
    cfgs = [{**base, **g} for g in grid[:C]]
    heads.create("univa", **{**cfgs[0]}).fit(*univa_data(256, 2))  # first-call costs
    t = time.perf_counter()
    solo = heads.create("univa", **cfgs[0]).fit(X, y, eval_set=(Xv, yv))
    t_solo = time.perf_counter() - t
    t = time.perf_counter()
    fitted = fit_heads([heads.create("univa", **c) for c in cfgs], X, y, eval_set=(Xv, yv))
    t_sweep = time.perf_counter() - t
    same = np.abs(fitted[0].predict_proba(Xv) - solo.predict_proba(Xv)).max()
    print(f"univa, {n} items, 1 epoch: one config alone {t_solo:.2f}s; {C} configs as one stack {t_sweep:.2f}s "
          f"= {t_sweep / t_solo:.2f}x alone (one after another: ~{C}x)   [max |p_sweep - p_solo| = {same:.1e}]")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--configs", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--sequential", type=int, default=8, help="configurations timed one after another")
    ap.add_argument("--cli", type=int, default=2, help="fresh interpreters timed for the fs train-head estimate (>= 1)")
    ap.add_argument("--univa", type=int, default=16, help="univa configurations in one stack (0: skip)")
    ap.add_argument("--univa-n", type=int, default=5000, help="synthetic items for the univa line")
    ap.add_argument("--univa-only", action="store_true", help="run only the univa line")
    ap.add_argument("--device", default="cpu", help="cpu | cuda: where every head and the bare GEMMs run")
    args = ap.parse_args()
    if args.cli < 1:
        ap.error(f"--cli {args.cli}: time at least one fresh interpreter (the estimate needs it)")
    if args.univa_only:
        bench_univa(args.univa_n, args.univa, args.device)
        return

    import torch

    import featurestore.heads as heads
    from featurestore.heads import Features, Targets
    from featurestore.heads._stacked import fit_heads

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.n} x {D} float16 -> float32, "
          f"{args.configs} mlp configs (hidden {HIDDEN}, {LAYERS} layers, batch {BATCH}), {args.epochs} epochs each")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_features(folder, args.n)
        t = time.perf_counter()
        (X, y), (Xv, yv) = load(folder)
        t_load = time.perf_counter() - t
        cfgs = configs(args.configs, args.epochs, args.device)

        warm = Features({"text": X.pooled["text"][:2048]}, {}), Targets("single", y.y[:2048], y.classes)
        fit_heads([heads.create("mlp", **{**c, "epochs": 1}) for c in cfgs[:2]], *warm)  # first-call costs
        heads.create("mlp", **{**cfgs[0], "epochs": 1}).fit(*warm)
        t = time.perf_counter()
        solo = heads.create("mlp", **cfgs[len(cfgs) // 2]).fit(X, y, eval_set=(Xv, yv))
        t_solo = time.perf_counter() - t

        t = time.perf_counter()
        fitted = fit_heads([heads.create("mlp", **c) for c in cfgs], X, y, eval_set=(Xv, yv))
        t_sweep = time.perf_counter() - t
        assert all(h.history_["epochs_run"] == args.epochs for h in fitted)
        same = np.abs(fitted[len(cfgs) // 2].predict_proba(Xv) - solo.predict_proba(Xv)).max()

        k = min(args.sequential, len(cfgs))
        pick = np.linspace(0, len(cfgs) - 1, k).round().astype(int)
        t = time.perf_counter()
        for i in pick:
            heads.create("mlp", **cfgs[i]).fit(X, y, eval_set=(Xv, yv))
        t_seq_k = time.perf_counter() - t
        t_seq = t_seq_k / k * len(cfgs)

        n_train, n_val = len(y), len(yv)
        flops = train_flops(n_train, n_val, len(cfgs), args.epochs)
        t_gemm = bare_gemm_seconds(n_train, n_val, len(cfgs), args.epochs, args.device)

        t_proc = []
        for _ in range(args.cli):
            t = time.perf_counter()
            subprocess.run([sys.executable, "-c", "import torch, polars, heads, jobs.train_head, featurestore.cli"],
                           check=True, cwd=Path(__file__).resolve().parents[1])
            t_proc.append(time.perf_counter() - t)
        t_cli = len(cfgs) * (min(t_proc) + t_load + t_solo)

    print(f"features loaded once: {t_load:.2f}s")
    print(f"one config alone:            {t_solo:8.2f}s")
    print(f"{len(cfgs)} configs as a sweep:      {t_sweep:8.2f}s   sweep / alone = {t_sweep / t_solo:.2f}x "
          f"(target <= 4x)   [max |p_sweep - p_solo| = {same:.1e}]")
    print(f"{len(cfgs)} configs one after another: {t_seq:8.2f}s   (timed {k}, x{len(cfgs) / k:g})   "
          f"sequential / sweep = {t_seq / t_sweep:.1f}x (target >= 10x)")
    print(f"sweep FLOP rate {flops / t_sweep / 1e9:.1f} GFLOP/s, bare GEMMs of the same shapes "
          f"{flops / t_gemm / 1e9:.1f} GFLOP/s: ratio {t_gemm / t_sweep:.2f} (target >= 0.5)")
    print(f"{len(cfgs)} separate fs train-head runs (estimate: {min(t_proc):.1f}s interpreter+imports + load + "
          f"solo fit, each): {t_cli:.0f}s = {t_cli / t_sweep:.1f}x the sweep")
    if args.univa:
        bench_univa(args.univa_n, args.univa, args.device)


if __name__ == "__main__":
    main()
