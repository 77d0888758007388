"""Helpers shared by the transformers-based backbones."""
from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BackboneError
from ..hashing import tree_digest

__all__ = ["from_pretrained", "load_backbone", "apply_adapter", "weights_digest", "autocast", "pool", "sequences", "to_numpy"]


def from_pretrained(loader: Any, ref: str, *, what: str, option: str = "--model PATH", **kwargs) -> Any:
    """`loader.from_pretrained(ref)` with an error that says what to do when it fails.

    `ref` is a local folder or a hub id. Nothing here forces a download: with no network
    (or HF_HUB_OFFLINE=1) a hub id loads only from the local hub cache. `option` is how the
    user passes the model, for the error message.
    """
    if not ref:
        raise BackboneError(f"{what}: no model given; pass {option} (a hub id or local folder)")
    from .hub import load_kwargs

    local = Path(ref).expanduser()
    target = str(local) if local.exists() else ref
    kwargs = {**load_kwargs(ref, what=what, option=option), **kwargs}  # no network: one clear error, at once
    try:
        return loader.from_pretrained(target, **kwargs)
    except Exception as exc:  # transformers raises OSError, ValueError, HF errors...
        hint = ("the folder exists but does not hold a loadable model" if local.exists() else
                "the local hub cache holds only part of it (an interrupted download?)"
                if kwargs.get("local_files_only") else "it is neither a local folder nor a model the hub has "
                "(check the id)")
        reason = " ".join(str(exc).split())[:240]
        raise BackboneError(f"{what}: could not load {ref!r}: {hint}; pass a local folder with {option}. "
                            f"({type(exc).__name__}: {reason})") from None


def apply_adapter(model: Any, adapter: str, *, what: str) -> Any:
    """Apply a peft adapter folder and merge it, so inference costs what the base model costs."""
    if not adapter:
        return model
    if not Path(adapter).is_dir():
        raise BackboneError(f"{what}: adapter folder {adapter!r} does not exist")
    from .._io import require_intact

    # a stored adapter's files against its checksums.json: flipped weights still load, and would be merged
    require_intact(Path(adapter), "train it again with `fs lora train` (`fs verify` lists every damaged file)")
    from peft import PeftModel

    from ..adapters import check_loadable

    import warnings

    try:
        with warnings.catch_warnings():  # transformers' deprecation notes from inside peft
            warnings.simplefilter("ignore", FutureWarning)
            peft_model = PeftModel.from_pretrained(model, adapter)
    except Exception as exc:
        raise BackboneError(f"{what}: {check_loadable(adapter, exc)}") from None
    return peft_model.merge_and_unload()


def load_backbone(bb: Any, processor_loader: Any, model_loader: Any, **processor_kwargs) -> tuple[Any, Any]:
    """(processor, model) of backbone `bb`: loaded from its model ref, weights hashed before the
    adapter is merged (`bb._weights`), moved to its device, in eval mode."""
    what = f"backbone {bb.name}"
    processor = from_pretrained(processor_loader, bb.model_ref, what=what, **processor_kwargs)
    model = from_pretrained(model_loader, bb.model_ref, what=what)
    bb._weights = weights_digest(bb.model_ref, model)
    from ..adapters import check_base

    check_base(bb.config.adapter, bb.name, bb._weights)  # before any work: an adapter of another model
    return processor, apply_adapter(model, bb.config.adapter, what=what).to(bb.device).eval()


def weights_digest(ref: str, model: Any) -> str:
    """Digest of the weight files of a local folder, or of the loaded tensors otherwise."""
    local = Path(ref).expanduser()
    if local.is_dir():
        return tree_digest(local)
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def autocast(device: str):
    """Mixed precision on CUDA; exact float32 on CPU (so CPU runs are bit-reproducible)."""
    import torch

    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    return contextlib.nullcontext()


def pool(states, mask, how: str):
    """Pool `[B, T, D]` states into `[B, D]`: masked mean, or the first position."""
    if how == "cls":
        return states[:, 0]
    m = mask.to(states.dtype).unsqueeze(-1)
    return (states * m).sum(1) / m.sum(1).clamp_min(1.0)


def sequences(states, mask, cap: int) -> list[np.ndarray] | None:
    """The unmasked positions of each item, at most `cap` of them (None when cap is 0)."""
    if cap <= 0:
        return None
    out = []
    states = states.float().cpu().numpy()
    lengths = mask.sum(1).cpu().numpy()
    for row, n in zip(states, lengths):
        out.append(np.ascontiguousarray(row[: min(int(n), cap)]))
    return out


def downsample(frames: np.ndarray, cap: int) -> np.ndarray:
    """Average `[T, D]` frames into at most `cap` evenly spaced bins (audio sequences)."""
    if cap <= 0 or len(frames) <= cap:
        return frames
    edges = np.linspace(0, len(frames), cap + 1).astype(int)
    return np.stack([frames[a:b].mean(0) for a, b in zip(edges[:-1], edges[1:])])


def to_numpy(t) -> np.ndarray:
    return t.detach().float().cpu().numpy()
