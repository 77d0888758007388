"""`fs lora train`: fine-tune a backbone with peft LoRA under a small head, store the adapter.

The backbone's LoRA matrices and a `linear` or `mlp` head train together on the dataset's
train split (inputs read and decoded per batch), the epoch with the least validation loss
is kept (early stopping with `patience`), and the adapter is saved in peft's own format
under `store/adapters/<hash>/` (featurestore.adapters) with its metrics and lineage.

Reproducibility (what a bare peft + torch loop must do to get the same adapter):
`torch.manual_seed(seed)`; `get_peft_model(base, LoraConfig(r, alpha, dropout, target_modules))`;
the head built next (`linear`: one `nn.Linear`; `mlp`: Linear-ReLU-Dropout(0.1)-Linear);
`AdamW([lora params (lr), head params (head_lr)], weight_decay)`; the model in train mode;
epoch `e` visits train items in `np.random.default_rng([seed, e]).permutation(n)` order,
in batches of `batch_size`; the loss is BCE-with-logits (labels), cross-entropy (label) or
MSE on the known VA dimensions (va).

After every epoch the whole training state (LoRA and head weights, AdamW moments, the best
epoch so far, torch's RNG) is written, atomically, to one safetensors file in
`store/adapters/.work/<key>/`; a killed run started again with the same options resumes
after the last finished epoch and ends with the adapter an uninterrupted run gives.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from featurestore import __version__, backbones
from featurestore._io import cleaned_on_failure, file_lock, publish, tmp_path
from featurestore.adapters import find_adapter, list_adapters, publish_adapter
from featurestore.config import field, from_strings, to_dict
from featurestore.datasets import get_dataset
from featurestore.errors import BadItemError, ConfigError, DatasetError, IntegrityError
from featurestore.hashing import spec_digest
from featurestore.store import Store, check_name, now_iso

__all__ = ["LoraSettings", "LoraTrainConfig", "LoraResult", "run", "default_targets", "linear_modules",
           "check_targets", "list_lora", "show_lora", "DEFAULT_TARGETS"]

# model_type (transformers config) -> LoRA target modules: the attention query and value
# projections, as in the LoRA paper; CLIP's text and vision towers are separate model types.
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "bert": ("query", "value"), "roberta": ("query", "value"), "xlm-roberta": ("query", "value"),
    "camembert": ("query", "value"), "electra": ("query", "value"), "mpnet": ("q", "v"),
    "distilbert": ("q_lin", "v_lin"), "deberta-v2": ("query_proj", "value_proj"),
    "clip_text_model": ("q_proj", "v_proj"), "clip_vision_model": ("q_proj", "v_proj"),
    "wav2vec2": ("q_proj", "v_proj"), "hubert": ("q_proj", "v_proj"), "wavlm": ("q_proj", "v_proj"),
    "clap_audio_model": ("query", "value"),
}
HEADS = ("linear", "mlp")


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    """The `-p key=value` options of `fs lora train` (and a refresh recipe's `[lora]` table)."""

    r: int = field(6, "LoRA rank (the supramodal-concept paper, section 4.1: 6)")
    alpha: float = field(36.0, "LoRA scaling alpha (paper: 36)")
    dropout: float = field(0.2, "dropout on the LoRA input (paper: 0.2)")
    target_modules: str = field("", "comma-separated module names to adapt (default: per architecture, "
                                    "the attention query and value projections)")
    head: str = field("mlp", "head trained with the adapter: linear | mlp")
    hidden: int = field(256, "mlp head: hidden width")
    lr: float = field(5e-4, "learning rate of the LoRA matrices")
    head_lr: float = field(1e-3, "learning rate of the head")
    weight_decay: float = field(0.0, "AdamW weight decay")
    epochs: int = field(4, "most epochs")
    patience: int = field(2, "stop after this many epochs without a lower validation loss")
    batch_size: int = field(32, "items per step")
    seed: int = field(0, "seed of LoRA init, head init, batch order and dropout")
    val_fraction: float = field(0.1, "fraction of train carved as validation when the dataset has no val split")
    max_train: int = field(0, "use at most this many train items (0: all), the first of a seeded shuffle")

    def __post_init__(self):
        if self.r < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise ConfigError(f"LoRA r={self.r}, alpha={self.alpha}, dropout={self.dropout}: need r >= 1, "
                              "alpha > 0, 0 <= dropout < 1")
        if self.head not in HEADS:
            raise ConfigError(f"head={self.head!r} must be one of {list(HEADS)}")
        if self.epochs < 1 or self.patience < 1 or self.batch_size < 1 or self.hidden < 1:
            raise ConfigError("epochs, patience, batch_size and hidden must be at least 1")
        if self.lr <= 0 or self.head_lr <= 0 or self.weight_decay < 0:
            raise ConfigError(f"lr={self.lr}, head_lr={self.head_lr} must be positive, weight_decay >= 0")
        if self.max_train < 0:
            raise ConfigError(f"max_train={self.max_train} must be 0 (all) or positive")

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.target_modules.split(",") if t.strip())


@dataclasses.dataclass(frozen=True)
class LoraTrainConfig:
    backbone: str = field("minilm", "registered backbone to fine-tune (fs backbones list)")
    params: dict = field({}, "backbone parameters (model, pooling, ...)")
    dataset: str = field("", "registered dataset whose train split trains the adapter")
    target: str = field("label", "label | labels | va")
    name: str = field("", "adapter name (fs lora list)")
    settings: LoraSettings = field(LoraSettings(), "LoRA and training settings")
    device: str = field("auto", "auto | cpu | cuda[:N]")
    threads: int = field(0, "CPU threads for torch (0: every core, as extraction uses)")

    def __post_init__(self):
        if self.threads < 0:
            raise ConfigError(f"threads={self.threads} must be 0 (every core) or positive")
        if not self.dataset:
            raise ConfigError("no dataset given; use --dataset NAME (fs datasets list)")
        if self.target not in ("label", "labels", "va"):
            raise ConfigError(f"target {self.target!r} is not one of label, labels, va")
        check_name(self.name or "x", "adapter")
        if self.params.get("adapter"):
            raise ConfigError("fs lora train fine-tunes the base model; do not pass an adapter")

    @classmethod
    def build(cls, *, settings: dict | LoraSettings | None = None, **kwargs) -> "LoraTrainConfig":
        if not isinstance(settings, LoraSettings):
            settings = from_strings(LoraSettings, dict(settings or {}), what="fs lora train")
        return cls(settings=settings, **kwargs)


@dataclasses.dataclass
class LoraResult:
    name: str
    hash: str
    folder: str
    metrics: dict
    resumed_from_epoch: int
    seconds: float
    train_items_per_s: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---- target modules ------------------------------------------------------------------
def linear_modules(model: Any) -> list[str]:
    """The distinct last names of the model's `nn.Linear` modules (what `target_modules` may name)."""
    import torch

    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and name})


def default_targets(model: Any) -> tuple[str, ...]:
    kind = getattr(model.config, "model_type", "")
    if kind not in DEFAULT_TARGETS:
        raise ConfigError(f"no default LoRA target modules for model type {kind!r}; pass -p target_modules=A,B "
                          f"with names among its linear modules: {', '.join(linear_modules(model))}")
    return DEFAULT_TARGETS[kind]


def check_targets(model: Any, targets: Sequence[str]) -> None:
    have = linear_modules(model)
    missing = [t for t in targets if t not in have]
    if missing:
        raise ConfigError(f"target module{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))} "
                          f"{'are' if len(missing) > 1 else 'is'} not a linear module of "
                          f"{type(model).__name__}; its linear modules: {', '.join(have)}")


# ---- data ------------------------------------------------------------------------------
@dataclasses.dataclass
class _Split:
    sources: list  # raw input (text, or a file path) per item
    keys: list
    y: np.ndarray


def _targets(df, target: str, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    if target == "va":
        y = np.stack([df["valence"].fill_null(np.nan).to_numpy(), df["arousal"].fill_null(np.nan).to_numpy()],
                     1).astype(np.float32)
        return y, np.isfinite(y).any(1)
    index = {c: i for i, c in enumerate(classes)}
    if target == "labels":
        y = np.zeros((len(df), len(classes)), np.float32)
        for i, row in enumerate(df["labels"].to_list()):
            y[i, [index[c] for c in (row or []) if c in index]] = 1.0
        return y, y.sum(1) > 0
    labels = df["label"].to_list()
    keep = np.array([lab in index for lab in labels], bool)
    return np.array([index.get(lab, -1) for lab in labels], np.int64), keep


def load_splits(store: Store, dataset: str, target: str, modality: str, s: LoraSettings):
    """(train, val, classes, validation record, manifest hash) of labelled items with this modality."""
    from featurestore.heads._data import VAL_NAMES, carve_validation

    ds = get_dataset(store, dataset)
    classes = list(ds.multilabel_set if target == "labels" else ds.label_set if target == "label" else [])
    if target in ("label", "labels") and not classes:
        raise DatasetError(f"dataset {dataset!r} has no {'multi-label ' if target == 'labels' else ''}labels for "
                           f"target {target!r}; choose another --target (label, labels, va)")
    df = ds.manifest.filter(ds.manifest[modality].is_not_null() & ds.manifest[f"{modality}_key"].is_not_null())

    def split(name):
        part = df.filter(df["split"] == name)
        y, keep = _targets(part, target, classes)
        idx = np.flatnonzero(keep)
        return _Split([part[modality][int(i)] for i in idx], [part[f"{modality}_key"][int(i)] for i in idx], y[idx])

    train = split("train")
    if not len(train.y):
        raise DatasetError(f"dataset {dataset!r} has no train items with {modality} input and a {target!r} target")
    val_name = next((v for v in VAL_NAMES if ds.splits().get(v)), None)
    if val_name:
        val, record = split(val_name), {"carved": False, "split": val_name}
    else:
        tr, va, record = carve_validation(len(train.y), fraction=s.val_fraction, seed=s.seed)
        val = _Split([train.sources[i] for i in va], [train.keys[i] for i in va], train.y[va])
        train = _Split([train.sources[i] for i in tr], [train.keys[i] for i in tr], train.y[tr])
    if s.max_train and len(train.y) > s.max_train:
        pick = np.sort(np.random.default_rng(s.seed).permutation(len(train.y))[: s.max_train])
        train = _Split([train.sources[i] for i in pick], [train.keys[i] for i in pick], train.y[pick])
    if not len(val.y):
        raise DatasetError(f"dataset {dataset!r} has no validation items with a {target!r} target")
    return train, val, classes, record, ds.manifest_hash


def _prepare(bb, modality: str, sources: Sequence, keys: Sequence) -> tuple[list, list[int], list[tuple]]:
    """Decode one batch: prepared inputs, their positions, and (position, reason) of the bad ones."""
    from featurestore.jobs.extract import _Item, _raw

    good, pos, bad = [], [], []
    for i, (src, key) in enumerate(zip(sources, keys)):
        try:
            good.append(bb.prepare(_raw(modality, _Item(key, "", src))))
            pos.append(i)
        except BadItemError as exc:
            bad.append((i, str(exc)))
    return good, pos, bad


# ---- the model -----------------------------------------------------------------------
def make_head(kind: str, dim: int, out: int, hidden: int):
    import torch

    if kind == "linear":
        return torch.nn.Linear(dim, out)
    return torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.ReLU(), torch.nn.Dropout(0.1),
                               torch.nn.Linear(hidden, out))


def loss_fn(target: str):
    import torch
    import torch.nn.functional as F

    if target == "labels":
        return lambda logits, y: F.binary_cross_entropy_with_logits(logits, y)
    if target == "label":
        return lambda logits, y: F.cross_entropy(logits, y)

    def va_loss(pred, y):
        known = torch.isfinite(y)
        return F.mse_loss(pred[known], y[known])
    return va_loss


def lora_config(s: LoraSettings, targets: Sequence[str]):
    from peft import LoraConfig

    return LoraConfig(r=s.r, lora_alpha=s.alpha, lora_dropout=s.dropout, target_modules=list(targets))


def _state(peft_model, head) -> dict:
    from peft import get_peft_model_state_dict

    out = {f"lora.{k}": v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}
    out.update({f"head.{k}": v.detach().clone() for k, v in head.state_dict().items()})
    return out


def _restore(peft_model, head, tensors: dict, prefix: str = "") -> None:
    from peft import set_peft_model_state_dict

    lora = {k[len(prefix) + 5:]: v for k, v in tensors.items() if k.startswith(prefix + "lora.")}
    set_peft_model_state_dict(peft_model, lora)
    head.load_state_dict({k[len(prefix) + 5:]: v for k, v in tensors.items() if k.startswith(prefix + "head.")})


# ---- checkpoints ---------------------------------------------------------------------
def _save_ckpt(path: Path, tensors: dict, opt, info: dict) -> None:
    import torch
    from safetensors.torch import save_file

    flat = {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}
    state = opt.state_dict()
    for i, st in state["state"].items():
        for k, v in st.items():
            flat[f"opt.{i}.{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).contiguous().cpu()
    flat["rng.torch"] = torch.get_rng_state()
    info = {**info, "param_groups": state["param_groups"]}
    tmp = tmp_path(path)
    with cleaned_on_failure(tmp, path):
        save_file(flat, str(tmp), metadata={"info": json.dumps(info), "sha256": _tensors_digest(flat, info)})
    publish(tmp, path)


def _tensors_digest(tensors: dict, info: dict) -> str:
    """SHA-256 over the checkpoint's tensors (name, dtype, shape, bytes) and its info: a flipped bit in
    the saved moments or weights would otherwise be resumed from without a word."""
    import hashlib

    import torch

    h = hashlib.sha256(json.dumps(info, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _load_ckpt(path: Path) -> tuple[dict, dict]:
    """The checkpoint's tensors and info; IntegrityError when it is damaged (unreadable, or not matching the
    SHA-256 recorded in it when it was written)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            info = json.loads(meta["info"])
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors, JSON and key errors of a damaged file
        raise IntegrityError(f"{path} cannot be read ({type(exc).__name__}: {' '.join(str(exc).split())[:120]})") from None
    if "sha256" in meta and meta["sha256"] != _tensors_digest(tensors, info):
        raise IntegrityError(f"{path} does not match the SHA-256 recorded in it")
    return tensors, info


def _restore_opt(opt, tensors: dict, info: dict) -> None:
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, i, name = k.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": info["param_groups"]})


# ---- the job -------------------------------------------------------------------------
def work_key(config: LoraTrainConfig, manifest_hash: str, model_ref: str) -> str:
    return spec_digest({"backbone": config.backbone, "model": model_ref, "params": config.params,
                        "dataset": config.dataset, "manifest_hash": manifest_hash, "target": config.target,
                        "settings": dataclasses.asdict(config.settings)}, 20)


def run(config: LoraTrainConfig, store: Store, *, progress: Callable[..., Any] | None = None,
        log: Callable[[str], None] = lambda s: None) -> LoraResult:
    """Fine-tune, early-stop on validation, publish the adapter (resuming a killed run with the same options)."""
    t0 = time.perf_counter()
    s = config.settings
    bb = backbones.create(config.backbone, {k: v for k, v in config.params.items() if k != "adapter"},
                          device=config.device)
    # everything that can be refused is refused before the model is loaded
    train, val, classes, validation, manifest_hash = load_splits(store, config.dataset, config.target,
                                                                 bb.modality, s)
    key = work_key(config, manifest_hash, bb.model_ref)
    work = store.adapters_dir() / ".work" / key
    with file_lock(store.adapters_dir() / ".work" / f"{key}.lock", f"LoRA training {config.name or key}"):
        result = _train(config, store, bb, train, val, classes, validation, manifest_hash, work, progress, log)
    shutil.rmtree(work, ignore_errors=True)
    result.seconds = round(time.perf_counter() - t0, 3)
    return result


def _train(config, store, bb, train, val, classes, validation, manifest_hash, work: Path, progress, log) -> LoraResult:
    import torch
    from peft import get_peft_model

    s = config.settings
    bb.load()
    if config.threads:  # a shared CPU: fewer threads than cores avoids oversubscription stalls
        torch.set_num_threads(config.threads)
    base_weights = bb.weights_hash()
    targets = s.targets or default_targets(bb.model)
    check_targets(bb.model, targets)
    torch.manual_seed(s.seed)
    with warnings.catch_warnings():  # transformers' deprecation notes from inside peft
        warnings.simplefilter("ignore", FutureWarning)
        model = get_peft_model(bb.model, lora_config(s, targets))
    bb.model = model
    out_dim = len(classes) if config.target != "va" else 2
    head = make_head(s.head, bb.dim, out_dim, s.hidden).to(bb.device)
    lora_params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": lora_params, "lr": s.lr}, {"params": list(head.parameters()), "lr": s.head_lr}],
                            weight_decay=s.weight_decay)
    ckpt = work / "checkpoint.safetensors"
    start, best, history, resumed = 0, {"epoch": -1, "val_loss": float("inf")}, [], 0
    best_state = None
    loaded = None
    if ckpt.is_file():
        try:
            loaded = _load_ckpt(ckpt)
        except IntegrityError as exc:  # only progress is lost: training again from the start gives the same adapter
            log(f"warning: the LoRA checkpoint is damaged ({exc}); training again from the first epoch")
            ckpt.unlink(missing_ok=True)
    if loaded is not None:
        tensors, info = loaded
        _restore(model, head, tensors)
        _restore_opt(opt, tensors, info)
        torch.set_rng_state(tensors["rng.torch"])
        best_state = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
        start, best, history, resumed = info["epoch"] + 1, info["best"], info["history"], info["epoch"] + 1
        log(f"resuming LoRA training from its checkpoint after epoch {resumed}")
    work.mkdir(parents=True, exist_ok=True)
    lossf = loss_fn(config.target)
    scaler = _scaler(bb.device)
    y_train = torch.as_tensor(train.y)
    bad_items: dict[str, str] = {}
    train_seconds, train_seen = 0.0, 0
    for epoch in range(start, s.epochs):
        if epoch - best["epoch"] > s.patience and best["epoch"] >= 0:
            break
        model.train()
        head.train()
        order = np.random.default_rng([s.seed, epoch]).permutation(len(train.y))
        bar = progress(total=len(order), desc=f"lora epoch {epoch + 1}/{s.epochs}", unit="item") if progress else None
        t = time.perf_counter()
        total, seen = 0.0, 0
        for i in range(0, len(order), s.batch_size):
            idx = order[i:i + s.batch_size]
            prepared, pos, bad = _prepare(bb, bb.modality, [train.sources[j] for j in idx], [train.keys[j] for j in idx])
            bad_items.update({train.keys[idx[p]]: reason for p, reason in bad})
            if prepared:
                yb = y_train[idx[pos]].to(bb.device)
                logits = head(bb.forward_pooled(prepared).float())
                loss = lossf(logits, yb)
                opt.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                else:
                    loss.backward()
                    opt.step()
                total += float(loss.detach()) * len(pos)
                seen += len(pos)
            if bar is not None:
                bar.update(len(idx))
                bar.set_postfix(loss=f"{total / max(seen, 1):.4f}", refresh=False)
        if bar is not None:
            bar.close()
        train_seconds += time.perf_counter() - t
        train_seen += seen
        val_loss, val_metric = evaluate_split(bb, head, val, config.target, classes, lossf, s.batch_size)
        history.append({"epoch": epoch + 1, "train_loss": total / max(seen, 1), "val_loss": val_loss,
                        "val_primary": val_metric})
        log(f"epoch {epoch + 1}: train loss {total / max(seen, 1):.4f}, val loss {val_loss:.4f}, "
            f"val {val_metric:.4f}")
        state = _state(model, head)
        if val_loss < best["val_loss"]:
            best = {"epoch": epoch, "val_loss": val_loss, "val_primary": val_metric}
            best_state = state
        _save_ckpt(ckpt, {**state, **{f"best.{k}": v for k, v in best_state.items()}}, opt,
                   {"epoch": epoch, "best": best, "history": history})
    if best_state is not None:
        _restore(model, head, best_state)
    meta = _meta(config, bb, base_weights, targets, classes, validation, manifest_hash, best, history, bad_items)
    staged = work / "adapter"
    shutil.rmtree(staged, ignore_errors=True)
    model.save_pretrained(str(staged))
    digest, folder = publish_adapter(store, staged, meta)
    log(f"adapter {config.name or digest} ({digest}): best epoch {best['epoch'] + 1}, val loss {best['val_loss']:.4f}")
    ips = train_seen / train_seconds if train_seconds > 0 else 0.0
    return LoraResult(config.name or digest, digest, str(folder), meta["metrics"], resumed, 0.0, round(ips, 2))


def _scaler(device: str):
    """fp16 autocast needs loss scaling; bf16 (and CPU float32) do not."""
    import torch

    if device.startswith("cuda") and not torch.cuda.is_bf16_supported():
        return torch.amp.GradScaler("cuda")
    return None


def evaluate_split(bb, head, split: _Split, target: str, classes, lossf, batch_size: int) -> tuple[float, float]:
    """(mean loss, primary metric) of the model on a split, in eval mode, without gradients."""
    import torch

    from featurestore.heads import metrics
    from featurestore.heads.base import Targets

    bb.model.eval()
    head.eval()
    outs, rows, total = [], [], 0.0
    with torch.no_grad():
        for i in range(0, len(split.y), batch_size):
            prepared, pos, _ = _prepare(bb, bb.modality, split.sources[i:i + batch_size], split.keys[i:i + batch_size])
            if not prepared:
                continue
            logits = head(bb.forward_pooled(prepared).float())
            yb = torch.as_tensor(split.y[i:i + batch_size][pos]).to(logits.device)
            total += float(lossf(logits, yb)) * len(pos)
            outs.append(logits.float().cpu().numpy())
            rows.extend(i + p for p in pos)
    if not rows:
        return float("nan"), float("nan")
    z, y = np.concatenate(outs), split.y[rows]
    kind = "multi" if target == "labels" else "va" if target == "va" else ("binary" if len(classes) == 2 else "single")
    if kind == "multi":
        pred = (z > 0).astype(np.float32)
    elif kind == "va":
        pred = z
    else:
        pred = z.argmax(1)
    return total / len(rows), float(metrics.primary(Targets(kind, y, list(classes)), pred))


def _meta(config, bb, base_weights, targets, classes, validation, manifest_hash, best, history, bad_items) -> dict:
    import peft
    import torch
    import transformers

    return {
        "name": config.name, "created_at": now_iso(precise=True), "backbone": config.backbone, "modality": bb.modality,
        "base": {"backbone": config.backbone, "model": bb.model_ref, "weights_hash": base_weights,
                 "params": config.params},
        "dataset": config.dataset, "manifest_hash": manifest_hash, "target": config.target, "classes": classes,
        "seed": config.settings.seed, "settings": {**dataclasses.asdict(config.settings),
                                                   "target_modules": list(targets)},
        "validation": validation,
        "metrics": {"best_epoch": best["epoch"] + 1, "val_loss": best["val_loss"],
                    "val_primary": best.get("val_primary"), "history": history, "bad_items": len(bad_items)},
        "bad_items": dict(list(bad_items.items())[:100]),
        "versions": {"peft": peft.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "featurestore": __version__},
        "device": bb.device,
    }


# ---- listing ---------------------------------------------------------------------------
def list_lora(store: Store) -> list[dict]:
    rows = []
    for a in list_adapters(store):
        m = a.get("metrics", {})
        rows.append({"name": a.get("name") or "-", "hash": a["hash"], "backbone": a.get("backbone"),
                     "dataset": a.get("dataset"), "target": a.get("target"), "r": a.get("settings", {}).get("r"),
                     "val_loss": m.get("val_loss"), "val_primary": m.get("val_primary"),
                     "peft": a.get("versions", {}).get("peft"), "created_at": a.get("created_at")})
    return rows


def show_lora(store: Store, ref: str) -> dict:
    from featurestore.adapters import adapter_config

    meta = find_adapter(store, ref)
    cfg = adapter_config(meta["folder"])
    return {**meta, "adapter_config": {k: cfg.get(k) for k in ("r", "lora_alpha", "lora_dropout", "target_modules",
                                                               "peft_version", "base_model_name_or_path")}}


def settings_dict(s: LoraSettings) -> dict:
    return {k: v for k, v in to_dict(s).items() if not k.startswith("_")}
