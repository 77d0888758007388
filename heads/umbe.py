"""`umbe`: UMBEnet (paper 001, section 3) trained from cached features.

Per modality an encoder makes one token (a pooled row through a linear map, or a stored
sequence through a small transformer and a masked mean). Adaptive fusion (eq. 2-3) runs a
transformer over the modality tokens with an additive mask for the modalities an item lacks,
then takes the masked mean and L2-normalises it: F_fusion, the query of the prompt pool.

The prompt pool (sec. 3.2, eq. 4, 8-9) holds `pool_size` keys and values (`prompt_length / 2`
tokens each, as the authors' code); each item selects its `top_k` keys by cosine similarity.
Sparse feature fusion (sec. 3.3, eq. 11-13) gates every value token with
sigmoid(W2 ReLU(W1 v + b1) + b2) and sums the selected values; the result is joined with the
inherent prompt tokens, and a small prompt encoder (a transformer decoder whose query is a
learned class token) gives one text feature per class. The logits are `scale` times the cosine
of F_fusion with each class's feature (eq. 5, 14); the loss is cross-entropy plus the L1 term
of eq. 13 plus a matching (pull) term that trains the keys towards their queries.

Training (sec. 3.4): stage 1 trains with each modality alone; the prompts stage 1 activates
(selection counts over the training split) move into a new pool and stage 2 trains with
modalities dropped at random per item. `stages=1` is the paper's one-stage ablation. Each stage
uses Adam at `lr`, ReduceLROnPlateau on the validation loss and stops when lr < `min_lr`.

During training the top-k selection runs in torch (the keys move every step). The trained keys
are kept as a FAISS inner-product index over the normalised keys (`prompt_keys.faiss` in the run
folder), and `predict_proba` selects with it.

Ours, not the paper's: single labels train with class-balanced cross-entropy, and the decisions
multiply the training prior back in (`shift=undo`, a logit adjustment run backwards); the epochs are
scored on those decisions. docs/heads.md ("umbe", "Undoing the weighting") has the measurements.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path
from typing import Literal, Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from featurestore.config import field
from featurestore.errors import ConfigError, FeatureStoreError

from .base import Features, Head, Targets
from ._data import TensorSet, align, pad_sequences
from ._torch import Plateau, TorchParams, _check_kind, pick_device, scores_from_outputs, seeded, train_loop, \
    validation_scorer

__all__ = ["UMBE", "UMBEConfig", "UMBENet", "umbe_loss", "unimodal_batch", "drop_modalities", "class_weights",
           "shift_curve", "choose_shift", "shifted_softmax", "INDEX_FILE"]

INDEX_FILE = "prompt_keys.faiss"


@dataclasses.dataclass(frozen=True)
class UMBEConfig(TorchParams):
    epochs: int = field(40, "maximum epochs per stage (the lr schedule usually stops a stage first)")
    batch_size: int = field(128, "items per mini-batch (the paper: 16; 128 chosen on the demo's validation split)")
    lr: float = field(2e-3, "Adam learning rate (the paper: 0.002)")
    weight_decay: float = field(0.0, "AdamW weight decay (0: plain Adam, as the paper)")
    patience: int = field(8, "also stop a stage after this many epochs without a better validation score (0: never)")
    hidden: int = field(128, "width of the modality tokens, F_fusion, the keys and the prompt tokens "
                             "(the paper: CLIP's 768)")
    heads: int = field(4, "attention heads of every transformer layer")
    fusion_layers: int = field(1, "transformer layers of the adaptive fusion over modality tokens (eq. 3)")
    seq_layers: int = field(1, "transformer layers over a modality's stored sequence")
    text_layers: int = field(1, "layers of the prompt encoder (the class token attends to the prompt tokens)")
    dropout: float = field(0.1, "dropout inside the transformer layers")
    pool_size: int = field(32, "prompts in the pool (the paper's Table 4: 32)")
    prompt_length: int = field(64, "prompt length: half selected value tokens, half inherent tokens (Table 4: 64)")
    top_k: int = field(5, "prompts each item selects (Table 4: 5)")
    match_weight: float = field(0.1, "weight of the key matching (pull) term: sum of 1 - cos(query, key) over "
                                     "the selected keys (L2P-style; the authors' code trains no key)")
    sff: Literal["mlp", "linear"] = field("mlp", "sparse feature fusion gate: mlp (eq. 11, L1 on W1) | linear "
                                                 "(the authors' code: sigmoid of one linear layer, L1 on it)")
    sff_hidden: int = field(16, "width of W1 in the SFF gate (sff=mlp)")
    l1: float = field(0.01, "lambda of eq. 13 (the authors' code: 0.01)")
    prompt_encoder: Literal["small", "clip"] = field(
        "small", "small: a trained transformer decoder reads the prompt tokens with a class token; clip: the "
                 "authors' dual stream, a frozen CLIP text tower reads [BOS; prompts; class name; EOS] (CoOp)")
    clip_text: str = field("", "prompt_encoder=clip: the CLIP text tower, a hub id or local folder (default: the "
                               "registered clip-text backbone's model); its weights are not saved with the run")
    class_weight: Literal["none", "balanced", "sqrt"] = field(
        "balanced", "cross-entropy class weights: balanced (n / (C x n_c) over the training split; chosen on the "
                    "demo's validation UAR) | sqrt (its square root) | none (the paper)")
    select: Literal["primary", "loss"] = field(
        "primary", "what keeps an epoch (and a stage): primary (the validation UAR for single labels, accuracy "
                   "for binary, of the decisions after a fixed shift) | loss (the "
                   "least validation loss, the quantity the paper's schedule watches)")
    scale: float = field(100.0, "logit scale of the cosine similarities (CLIP's 100, as the authors' code)")
    shift: str = field("undo", "post-hoc prior shift of single-label and binary probabilities, p x prior^-tau "
                               "renormalised (prior: the training split's class frequencies): undo: tau = minus "
                               "the class weighting's exponent (balanced -1, sqrt -0.5, none 0), the decisions of "
                               "the unweighted problem; auto: tau in -1..1 (steps of 0.25) chosen on the "
                               "validation split by the mean of UAR and WAR (single labels; binary: none); a "
                               "number: that tau; 0: none. A fixed tau (undo, a number) also scores the epochs "
                               "on validation")
    ema: float = field(0.0, "decay of an exponential moving average of the weights, which is what is validated "
                       "and kept (0: none, the paper's)")
    stop_train_acc: float = field(0.0, "end a stage once the training accuracy (all modalities, after the epoch, "
                                  "of the decisions after a fixed shift) exceeds this (the paper: 0.8, not in its "
                                  "code; 0: never)")
    stages: int = field(2, "2: two-stage training (sec. 3.4); 1: train on all modalities at once (the ablation)")
    drop_prob: float = field(0.3, "stage 2: chance to drop each present modality of an item (one always stays)")
    lr_factor: float = field(0.6, "ReduceLROnPlateau factor on the validation loss (the paper: 0.6)")
    lr_patience: int = field(3, "ReduceLROnPlateau patience in epochs (the paper: 3)")
    min_lr: float = field(1e-7, "a stage ends once the learning rate falls below this (the paper: 1e-7)")
    sequences: bool = field(True, "use stored sequences when the store has them (else pooled features)")
    max_len: int = field(0, "keep at most this many sequence steps per item (0: all)")

    def __post_init__(self):
        super().__post_init__()
        if self.hidden < 1 or self.heads < 1 or self.hidden % self.heads:
            raise ConfigError(f"hidden={self.hidden} must be a positive multiple of heads={self.heads}")
        for name in ("fusion_layers", "seq_layers", "text_layers", "pool_size", "top_k", "sff_hidden"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be at least 1")
        if self.top_k > self.pool_size:
            raise ConfigError(f"top_k={self.top_k} exceeds pool_size={self.pool_size}; choose top_k <= pool_size")
        if self.prompt_length < 2:
            raise ConfigError(f"prompt_length={self.prompt_length} must be at least 2 (half value, half inherent)")
        if not 0 <= self.stop_train_acc < 1:
            raise ConfigError(f"stop_train_acc={self.stop_train_acc} must be in [0, 1) (0: never; the paper: 0.8)")
        if not 0 <= self.ema < 1:
            raise ConfigError(f"ema={self.ema} must be in [0, 1) (0: no weight averaging)")
        if self.stages not in (1, 2):
            raise ConfigError(f"stages={self.stages} must be 1 (one-stage ablation) or 2 (two-stage training)")
        bad = [f"{n}={getattr(self, n)} must be in [0, 1)" for n in ("dropout", "drop_prob")
               if not 0 <= getattr(self, n) < 1]
        if bad:
            raise ConfigError("; ".join(bad))
        if not 0 < self.lr_factor < 1 or self.lr_patience < 0 or self.min_lr < 0:
            raise ConfigError(f"lr_factor={self.lr_factor} must be in (0, 1), lr_patience={self.lr_patience} "
                              f"and min_lr={self.min_lr} >= 0")
        if self.shift not in ("auto", "undo"):
            try:
                ok = math.isfinite(float(self.shift))
            except ValueError:
                ok = False
            if not ok:
                raise ConfigError(f"shift={self.shift!r} must be undo, auto or a finite number (0: no shift)")
        odd = [f"{n}={getattr(self, n)}" for n in ("l1", "match_weight", "scale", "min_lr")
               if not math.isfinite(getattr(self, n))]
        if odd:
            raise ConfigError(f"{', '.join(odd)}: give finite numbers")
        if self.l1 < 0 or self.match_weight < 0 or self.scale <= 0 or self.max_len < 0:
            raise ConfigError(f"l1={self.l1}, match_weight={self.match_weight}, max_len={self.max_len} must be "
                              f">= 0 and scale={self.scale} > 0")


# ---- the network ---------------------------------------------------------------------
def _full_precision(t: torch.Tensor):
    """Autocast off on `t`'s device for the block (a no-op on the CPU, where training runs in float32)."""
    return torch.autocast(t.device.type, enabled=False)


def _layer(cfg, decoder: bool = False):
    cls = nn.TransformerDecoderLayer if decoder else nn.TransformerEncoderLayer
    return cls(cfg.hidden, cfg.heads, 2 * cfg.hidden, cfg.dropout, activation="gelu", batch_first=True,
               norm_first=True)


def _sinusoid(steps: int, dim: int, device) -> torch.Tensor:
    pos = torch.arange(steps, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(1e4) / dim))
    out = torch.zeros(steps, dim, device=device)
    out[:, 0::2] = torch.sin(pos * freq)
    out[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
    return out


class Standardise(nn.Module):
    """(x - mean) / std per feature, with the training split's statistics (buffers, saved with the net)."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    @torch.no_grad()
    def fit(self, rows: torch.Tensor) -> None:
        if len(rows):
            self.mean.copy_(rows.mean(0))
            self.std.copy_(rows.std(0, unbiased=False) + 1e-6)

    def forward(self, x):
        return (x - self.mean) / self.std


class PooledEncoder(nn.Module):
    """A pooled row -> one modality token (the backbone already did the heavy encoding)."""

    def __init__(self, dim: int, cfg):
        super().__init__()
        self.norm = Standardise(dim)
        self.proj = nn.Linear(dim, cfg.hidden)

    def forward(self, x, steps=None):
        return self.proj(self.norm(x))


class SequenceEncoder(nn.Module):
    """Frames or tokens -> one modality token: projection, positions, self-attention, masked mean."""

    def __init__(self, dim: int, cfg):
        super().__init__()
        self.norm = Standardise(dim)
        self.proj = nn.Linear(dim, cfg.hidden)
        self.sat = nn.TransformerEncoder(_layer(cfg), cfg.seq_layers, enable_nested_tensor=False)

    def forward(self, x, steps):
        steps = steps.clone()
        steps[:, 0] |= ~steps.any(1)  # an absent item attends to one zero step, never to nothing
        h = self.proj(self.norm(x))
        h = self.sat(h + _sinusoid(h.shape[1], h.shape[2], h.device), src_key_padding_mask=~steps)
        w = steps.to(h.dtype)[..., None]
        return (h * w).sum(1) / w.sum(1)


class SparseGate(nn.Module):
    """SFF (eq. 11): sigmoid(W2 ReLU(W1 v + b1) + b2) per value token; `linear`: sigmoid(W v + b)."""

    def __init__(self, cfg):
        super().__init__()
        self.kind = cfg.sff
        width = cfg.sff_hidden if cfg.sff == "mlp" else 1
        self.first = nn.Linear(cfg.hidden, width)
        self.second = nn.Linear(width, 1) if cfg.sff == "mlp" else None

    def forward(self, v):
        h = self.first(v)
        if self.second is not None:
            h = self.second(torch.relu(h))
        return torch.sigmoid(h)

    def l1(self):
        """Sum of |W1| (eq. 13); the linear gate's only weight for `linear`."""
        return self.first.weight.abs().sum()


class ClipPromptEncoder(nn.Module):
    """The authors' second stream (CoOp-style): per item and class, `[BOS; prompt tokens; class-name
    tokens; EOS]` through a frozen CLIP text tower, pooled at EOS and projected into CLIP's joint space.

    The prompt tokens (`hidden` wide) reach CLIP's token width through a trained linear map; the
    class names are tokenised once (buffers saved with the net). The CLIP model is held outside the
    module tree, so its weights are neither trained nor saved: a run records its reference and
    weights hash and loads it again."""

    def __init__(self, tower, tokenizer, classes: list[str], hidden: int, n_prompt: int):
        super().__init__()
        object.__setattr__(self, "tower", tower)  # not a submodule: frozen, not in state_dict
        for p in tower.parameters():
            p.requires_grad_(False)
        cfg = tower.config
        self.joint_dim = int(cfg.projection_dim)
        self.to_tokens = nn.Linear(hidden, int(cfg.hidden_size))
        names = [tokenizer(c.replace("_", " "), add_special_tokens=False)["input_ids"] for c in classes]
        longest = max(1, max(len(n) for n in names))
        if 2 + n_prompt + longest > int(cfg.max_position_embeddings):
            raise ConfigError(f"prompt_encoder=clip: {n_prompt} prompt tokens + the longest class name "
                              f"({longest} tokens) + BOS/EOS exceed CLIP's {cfg.max_position_embeddings} positions; "
                              f"lower prompt_length")
        ids = torch.full((len(names), longest), int(cfg.eos_token_id), dtype=torch.long)
        for i, n in enumerate(names):
            ids[i, :len(n)] = torch.tensor(n, dtype=torch.long)
        self.register_buffer("name_ids", ids)
        self.register_buffer("name_len", torch.tensor([len(n) for n in names], dtype=torch.long))
        self.register_buffer("special", torch.tensor([int(cfg.bos_token_id), int(cfg.eos_token_id)]))

    def encode_embeds(self, embeds: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
        """CLIP's text transformer on token embeddings `[N, T, W]` (positions added, causal mask),
        final LayerNorm, the state at position `eos[n]`, the text projection: `[N, joint_dim]`."""
        from transformers.masking_utils import create_causal_mask

        tm = self.tower.text_model
        h = tm.embeddings(inputs_embeds=embeds)
        mask = create_causal_mask(config=tm.config, inputs_embeds=h, attention_mask=None, past_key_values=None)
        h = tm.encoder(inputs_embeds=h, attention_mask=mask, is_causal=True).last_hidden_state
        h = tm.final_layer_norm(h)
        return self.tower.text_projection(h[torch.arange(len(h), device=h.device), eos])

    def forward(self, memory: torch.Tensor) -> torch.Tensor:
        """Prompt tokens `[B, L, hidden]` -> class features `[B, C, joint_dim]`, L2-normalised."""
        table = self.tower.text_model.embeddings.token_embedding
        B, L, _ = memory.shape
        C, T = self.name_ids.shape
        prompts = self.to_tokens(memory)  # [B, L, W]
        bos, eos_tok = table(self.special).unbind(0)
        names = table(self.name_ids)  # [C, T, W]; padded with EOS tokens, after the real EOS
        seq = torch.cat([bos.expand(B, C, 1, -1), prompts[:, None].expand(B, C, L, -1),
                         names[None].expand(B, C, T, -1), eos_tok.expand(B, C, 1, -1)], 2)  # [B, C, 2+L+T, W]
        eos = 1 + L + self.name_len  # [C]: the first EOS, right after each name (the padding is EOS too)
        out = self.encode_embeds(seq.reshape(B * C, 2 + L + T, -1), eos.repeat(B))
        return F.normalize(out.float(), dim=-1).reshape(B, C, -1)


def load_clip_text(ref: str):
    """(CLIPTextModelWithProjection, tokenizer, reference, weights hash) of the registered clip-text backbone."""
    from featurestore import backbones

    bb = backbones.create("clip-text", {"model": ref} if ref else None, device="cpu").load()
    return bb.model.float().eval(), bb.tokenizer, bb.model_ref, bb.weights_hash()


class UMBENet(nn.Module):
    """Encoders, adaptive fusion, the prompt pool, SFF and the prompt encoder (the dual stream)."""

    def __init__(self, dims: Mapping[str, int], seq_dims: Mapping[str, int], n_classes: int, cfg,
                 clip: "ClipPromptEncoder | None" = None):
        super().__init__()
        self.mods = sorted(dims)
        self.top_k, self.scale = cfg.top_k, cfg.scale
        self.encoders = nn.ModuleDict({m: SequenceEncoder(seq_dims[m], cfg) if m in seq_dims
                                       else PooledEncoder(dims[m], cfg) for m in self.mods})
        self.modality = nn.Parameter(torch.randn(len(self.mods), cfg.hidden) * 0.02)  # which slot is which
        self.fusion = nn.TransformerEncoder(_layer(cfg), cfg.fusion_layers, enable_nested_tensor=False)
        n_tok = cfg.prompt_length // 2
        self.keys = nn.Parameter(torch.randn(cfg.pool_size, cfg.hidden) * 0.02)
        self.values = nn.Parameter(torch.randn(cfg.pool_size, n_tok, cfg.hidden) * 0.02)
        self.gate = SparseGate(cfg)
        self.inherent = nn.Parameter(torch.randn(cfg.prompt_length - n_tok, cfg.hidden) * 0.02)
        self.clip = clip
        if clip is None:
            self.class_tokens = nn.Parameter(torch.randn(n_classes, cfg.hidden) * 0.02)
            self.text = nn.TransformerDecoder(_layer(cfg, decoder=True), cfg.text_layers)
            self.text_out = nn.Sequential(nn.LayerNorm(cfg.hidden), nn.Linear(cfg.hidden, cfg.hidden, bias=False))
        else:  # the query moves into CLIP's joint space, where the class features are
            self.to_joint = nn.Linear(cfg.hidden, clip.joint_dim, bias=False)

    # -- stream 1: the fused query --
    def fuse(self, batch: Mapping[str, torch.Tensor], present: Mapping[str, torch.Tensor] | None = None):
        """F_fusion `[B, hidden]`, L2-normalised; `present[m]` (bool `[B]`) overrides the batch's masks."""
        tokens, have = [], []
        for i, m in enumerate(self.mods):
            on = present[m] if present is not None else batch[f"m.{m}"] > 0
            token = self.encoders[m](batch[f"x.{m}"], batch.get(f"s.{m}"))
            tokens.append(token * on[:, None].to(token.dtype) + self.modality[i])  # absent: content-free
            have.append(on)
        tokens, have = torch.stack(tokens, 1), torch.stack(have, 1)
        have = have.clone()
        have[:, 0] |= ~have.any(1)  # an item with no modality at all reads its first slot (no content)
        h = self.fusion(tokens, mask=None, src_key_padding_mask=~have)  # eq. 3: -inf where absent
        w = have.to(h.dtype)[..., None]
        return F.normalize(((h * w).sum(1) / w.sum(1)).float(), dim=-1)

    # -- the pool --
    def normalised_keys(self):
        return F.normalize(self.keys.float(), dim=-1)

    def select(self, q):
        """Indices `[B, top_k]` of the keys most cosine-similar to each item's own query (eq. 4, 8), in
        float32 also under CUDA's bfloat16 autocast, so training selects as the FAISS index will."""
        with _full_precision(q):
            return torch.topk(q.float() @ self.normalised_keys().T, self.top_k, dim=-1).indices

    def _picks(self, idx, dtype):
        """One-hot `[B, k, pool]` of the selections. Gathering rows by a matmul with it, not by indexing:
        the backward of indexing accumulates with threads in no fixed order on the CPU, so two runs with
        the same seed drifted apart (by 3e-5 in the logits after 3 epochs at 2 threads)."""
        return F.one_hot(idx, len(self.keys)).to(dtype)

    def match_loss(self, q, idx):
        """Mean over items of sum over its selected keys of 1 - cos(query, key); the query is held fixed."""
        with _full_precision(q):
            k = torch.einsum("bkp,ph->bkh", self._picks(idx, torch.float32), self.normalised_keys())  # [B, k, H]
            return (1 - (k * q.detach().float()[:, None]).sum(-1)).sum(1).mean()

    # -- stream 2: prompts -> one text feature per class --
    def class_features(self, idx):
        """`[B, C, hidden]` normalised: SFF over the selected values, + inherent tokens, encoded per class."""
        gated = self.gate(self.values) * self.values  # [P, L, H]: the gate of eq. 11 on every value token
        selected = torch.einsum("bp,plh->blh", self._picks(idx, gated.dtype).sum(1), gated)  # [B, L, H]: P' of
        # eq. 10, the gated selected prompts summed
        memory = torch.cat([selected, self.inherent.expand(len(idx), -1, -1).to(selected.dtype)], 1)
        if self.clip is not None:
            return self.clip(memory)
        n_cls = len(self.class_tokens)
        own = ~torch.eye(n_cls, dtype=torch.bool, device=idx.device)  # a class token sees only itself
        out = self.text(self.class_tokens.expand(len(idx), -1, -1).to(memory.dtype), memory, tgt_mask=own)
        return F.normalize(self.text_out(out).float(), dim=-1)

    def logits(self, q, idx):
        """Eq. 5/14: `scale` x cosine of F_fusion with each class's combined prompt feature."""
        if self.clip is not None:
            q = F.normalize(self.to_joint(q).float(), dim=-1)
        feats = self.class_features(idx)
        with _full_precision(q):  # scale 100 x a bfloat16 cosine would be off by up to 0.5
            return self.scale * torch.einsum("bh,bch->bc", q.float(), feats.float())

    def forward(self, batch, present=None, idx=None):
        q = self.fuse(batch, present)
        idx = self.select(q) if idx is None else idx
        return self.logits(q, idx), q, idx


def umbe_loss(net: UMBENet, batch: Mapping[str, torch.Tensor], *, l1: float, match_weight: float,
              present=None, weight: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Cross-entropy (class-`weight`ed if given) + l1 * sum|W1| (eq. 13) + match_weight * matching term;
    returns (total, parts)."""
    logits, q, idx = net(batch, present)
    parts = {"ce": F.cross_entropy(logits.float(), batch["y"], weight=weight), "l1": net.gate.l1(), "match": net.match_loss(q, idx)}
    return parts["ce"] + l1 * parts["l1"] + match_weight * parts["match"], parts


def unimodal_batch(batch: Mapping[str, torch.Tensor], mods: list[str]) -> dict:
    """Stage 1: every (item, present modality) pair as its own row with only that modality present."""
    parts = []
    for m in mods:
        rows = torch.nonzero(batch[f"m.{m}"] > 0).squeeze(1)
        if len(rows):
            sub = {k: v.index_select(0, rows) for k, v in batch.items()}
            for other in mods:
                sub[f"m.{other}"] = torch.full_like(sub[f"m.{other}"], float(other == m))
            parts.append(sub)
    if not parts:
        return dict(batch)
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def drop_modalities(batch: Mapping[str, torch.Tensor], mods: list[str], p: float) -> dict:
    """Stage 2: drop each present modality of each item with chance p; an item keeps at least one."""
    have = torch.stack([batch[f"m.{m}"] > 0 for m in mods], 1)
    keep = have & (torch.rand(have.shape, device=have.device) >= p)
    lost = ~keep.any(1) & have.any(1)
    if lost.any():  # restore one present modality, chosen uniformly
        pick = torch.argmax(torch.rand(have.shape, device=have.device) * have, 1)
        keep[lost] = F.one_hot(pick[lost], len(mods)).bool() & have[lost]
    out = dict(batch)
    for i, m in enumerate(mods):
        out[f"m.{m}"] = keep[:, i].to(batch[f"m.{m}"].dtype)
    return out


def class_weights(y: np.ndarray, n_classes: int, device=None) -> torch.Tensor:
    """n / (C * n_c) per class over the training labels (scikit-learn's "balanced"); 0 for an absent class."""
    counts = np.bincount(np.asarray(y, np.int64), minlength=n_classes).astype(np.float64)
    w = np.where(counts > 0, counts.sum() / (n_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(w, dtype=torch.float32, device=device)


SHIFTS = tuple(np.arange(-1.0, 1.001, 0.25).round(2).tolist())


def choose_shift(curve: Mapping[float, tuple[float, float]]) -> float:
    """`shift=auto`'s tau: the best mean of UAR and WAR on the curve; ties go to the smaller |tau|."""
    return max(curve, key=lambda t: (sum(curve[t]) / 2, -abs(t)))


def shift_curve(proba: np.ndarray, targets: Targets, prior) -> dict[float, tuple[float, float]]:
    """{tau: (UAR, WAR)} of the decisions argmax(p x prior^-tau) for each tau of SHIFTS."""
    from . import metrics

    out = {}
    for tau in SHIFTS:
        m = metrics.evaluate(targets, np.argmax(_shifted(proba, prior, tau), 1))
        out[tau] = (float(m["uar"]), float(m["war"]))
    return out


def _shifted(proba: np.ndarray, prior, tau: float) -> np.ndarray:
    """p x prior^-tau, renormalised per row: softmax(log p - tau log prior)."""
    return shifted_softmax(np.log(np.maximum(proba, 1e-300)), prior, tau)


def shifted_softmax(z: np.ndarray, prior, tau: float) -> np.ndarray:
    """softmax(z - tau log prior) per row, in float64 (a logit gap of 200, 100 x cosine, underflows float32)."""
    logits = np.asarray(z, np.float64) - tau * np.log(np.asarray(prior, np.float64))
    logits -= logits.max(1, keepdims=True)
    out = np.exp(logits)
    return out / out.sum(1, keepdims=True)


# ---- the head --------------------------------------------------------------------------
class UMBE(Head):
    name = "umbe"
    Config = UMBEConfig
    supports = frozenset({"single", "binary"})
    uses_sequences = True
    description = ("UMBEnet: adaptive modality fusion, a prompt pool with a FAISS key lookup, sparse feature "
                   "fusion, dual-stream cosine classifier, two-stage training for missing modalities")

    # ---- inputs --------------------------------------------------------------------
    def _tensors(self, X: Features, y: Targets | None = None) -> TensorSet:
        t = {}
        for mod, (arr, mask) in align(X, self.meta_["dims"]).items():
            t[f"m.{mod}"] = torch.from_numpy(mask.astype(np.float32))
            if mod in self.meta_["seq_dims"]:
                seqs = X.sequences.get(mod)
                if seqs is None and not mask.any():  # absent from every item: nothing to encode
                    seqs = [None] * len(X)
                if seqs is None:
                    raise ConfigError(f"head 'umbe' was trained on {mod} sequences; pass them (Features.sequences) "
                                      "or train with sequences=false")
                x, steps = pad_sequences(seqs, arr, mask, self.meta_["seq_dims"][mod], cap=self.max_len,
                                         what=f"{mod} sequences")
                t[f"x.{mod}"], t[f"s.{mod}"] = torch.from_numpy(x), torch.from_numpy(steps)
            else:
                t[f"x.{mod}"] = torch.from_numpy(arr)
        if y is not None:
            t["y"] = torch.as_tensor(np.asarray(y.y, np.int64))
        return TensorSet(t, len(X))

    def _network(self) -> UMBENet:
        clip = None
        if self.prompt_encoder == "clip":
            tower, tokenizer, ref, digest = load_clip_text(self.meta_.get("clip", {}).get("model") or self.clip_text)
            known = self.meta_.get("clip", {}).get("weights_hash")
            if known and known != digest:
                raise ConfigError(f"the CLIP text tower {ref} hashes to {digest}, not {known} as when this umbe run "
                                  "was trained; give the same weights (clip_text) or retrain")
            self.meta_["clip"] = {"model": ref, "weights_hash": digest}
            clip = ClipPromptEncoder(tower, tokenizer, list(self.meta_["classes"]), self.hidden,
                                     self.prompt_length)
        return UMBENet(self.meta_["dims"], self.meta_["seq_dims"], len(self.meta_["classes"]), self.config, clip)

    # ---- training ------------------------------------------------------------------
    def fit(self, X: Features, y: Targets, *, eval_set: tuple[Features, Targets] | None = None) -> "UMBE":
        _check_kind(self, y)
        if not len(y):
            raise ConfigError("head 'umbe': no training items")
        if eval_set is not None and not len(eval_set[1]):
            eval_set = None  # an empty validation split: train as without one
        seq_dims = {m: int(next(s.shape[1] for s in X.sequences[m] if s is not None)) for m in X.pooled
                    if self.sequences and any(s is not None for s in X.sequences.get(m, []))}
        self._set_meta(X, y, seq_dims=seq_dims)
        counts = np.bincount(np.asarray(y.y, np.int64), minlength=len(y.classes)).astype(np.float64)
        self.meta_["prior"] = (np.maximum(counts, 1.0) / max(counts.sum(), 1.0)).tolist()  # of the prior shift
        device = pick_device(self.device)
        host = self._tensors(X, y)
        self.class_weights_ = None if self.class_weight == "none" else \
            class_weights(y.y, len(y.classes), device) ** (0.5 if self.class_weight == "sqrt" else 1.0)
        val = None
        if eval_set is not None:
            self._check_features(eval_set[0])
            val = self._tensors(*eval_set).to(device)
        with seeded(self.seed, device):
            net = self._network()
            for m in net.mods:  # standardise with the training rows (steps) where the modality is present
                x, on = host.tensors[f"x.{m}"], host.tensors[f"m.{m}"] > 0
                net.encoders[m].norm.fit(x[on][host.tensors[f"s.{m}"][on]] if x.dim() == 3 else x[on])
            net = net.to(device)
            train = host.to(device)  # one copy on the device for every stage
            if net.clip is not None:
                net.clip.tower.to(device)
            hists, stages, best = [], {}, None
            for stage in range(1, self.stages + 1):
                if stage == 2:
                    stages = self._next_pool(net, train)
                hists.append(self._train_stage(net, train, val, eval_set, y.kind, stage, device))
                score = max(hists[-1]["val_score"], default=None)
                if best is None or score is None or score > best[1]:  # no validation: the last stage
                    best = (stage, score, copy.deepcopy(net.state_dict()))
            if best[0] != self.stages:  # stage 1 scored better on validation: keep its weights and pool
                net.load_state_dict(best[2])
        self.net_ = net.cpu().eval()
        if self.class_weights_ is not None:
            self.class_weights_ = self.class_weights_.cpu()
        if net.clip is not None:
            net.clip.tower.cpu()
        self.meta_["stages"] = {**stages, "chosen": best[0]} if stages else {}
        self.index_ = self._key_index()
        curve = self._choose_shift(y, eval_set)
        self.history_ = {**hists[best[0] - 1], "epochs_run": sum(h["epochs_run"] for h in hists),
                         "chosen_stage": best[0], "stage_histories": hists,
                         **({"stage1_counts": stages["counts"]} if stages else {}),
                         **({"shift_curve": curve} if curve else {})}
        return self

    def _choose_shift(self, y: Targets, eval_set) -> dict:
        """Fix tau of the post-hoc prior shift in meta_ (`shift`; fit sets `prior`); return the validation curve
        {tau: (UAR, WAR)} when tau was chosen on it. argmax(log p - tau log prior) moves the decisions
        along the model's UAR/WAR trade-off (tau 1: a full logit adjustment towards UAR, -1 towards
        WAR) without retraining; see docs/heads.md, "umbe", for why the operating point matters here."""
        self.meta_["shift"] = self._fixed_shift()
        if self.shift != "auto" or y.kind != "single" or eval_set is None or not len(eval_set[1]):
            return {}
        raw = shifted_softmax(self.logits(eval_set[0]), self.meta_["prior"], 0.0)  # float64 softmax
        curve = shift_curve(raw, eval_set[1], self.meta_["prior"])
        self.meta_["shift"] = choose_shift(curve)
        return {f"{t:g}": (round(u, 4), round(w, 4)) for t, (u, w) in curve.items()}

    def _fixed_shift(self) -> float:
        """tau when it is not chosen on validation: undo's minus the weighting exponent, or the number given
        (single labels and binary); 0 for auto (chosen after training)."""
        if self.shift == "auto" or self.meta_.get("kind") not in ("single", "binary"):
            return 0.0
        if self.shift == "undo":
            return {"none": 0.0, "sqrt": -0.5, "balanced": -1.0}[self.class_weight]
        return float(self.shift)

    def _stage_loss(self, stage: int):
        mods = self.meta_["dims"]
        cfg = dict(l1=self.l1, match_weight=self.match_weight, weight=getattr(self, "class_weights_", None))
        if self.stages == 1:
            return lambda net, b: umbe_loss(net, b, **cfg)[0]
        if stage == 1:
            return lambda net, b: umbe_loss(net, unimodal_batch(b, sorted(mods)), **cfg)[0]
        return lambda net, b: umbe_loss(net, drop_modalities(b, sorted(mods), self.drop_prob), **cfg)[0]

    def _train_stage(self, net, train: TensorSet, val: TensorSet | None, eval_set, kind: str, stage: int,
                     device) -> dict:
        val_score = val_loss = None
        tau = self._fixed_shift()  # the epochs are scored on the decisions the head will make
        if val is not None:
            scorer = validation_scorer(self, eval_set[1], kind)
            val_loss = lambda m: self._loss_on(m, val)  # noqa: E731
            val_score = (lambda m: -val_loss(m)) if self.select == "loss" else \
                (lambda m: scorer(self._proba_torch(m, val, self.meta_["prior"], tau)))  # noqa: E731
        hist_acc: list[float] = []
        hist = train_loop(net, self._stage_loss(stage), train, params=self._loop_params(), device=device,
                          val_score=val_score, plateau=Plateau(self.lr_factor, self.lr_patience, self.min_lr),
                          val_loss=val_loss, ema=self.ema, stop_when=self._train_acc_stop(train, device, tau, hist_acc))
        if hist_acc:
            hist["train_acc"] = hist_acc
        return {**hist, "stage": stage}

    def _train_acc_stop(self, train: TensorSet, device, tau: float, record: list):
        """The paper's early end (sec. 4.1): true once the training split's accuracy (every modality given,
        the head's decisions: shifted by tau) exceeds `stop_train_acc`; each epoch's accuracy is appended
        to `record`. None when off."""
        if not self.stop_train_acc:
            return None
        y = train.tensors["y"].cpu().numpy()

        def done(net) -> bool:
            acc = float((self._proba_torch(net, train, self.meta_["prior"], tau).argmax(1) == y).mean())
            record.append(round(acc, 4))
            return acc > self.stop_train_acc
        return done

    def _loop_params(self) -> TorchParams:
        return TorchParams(**{f.name: getattr(self, f.name) for f in dataclasses.fields(TorchParams)})

    @torch.no_grad()
    def _loss_on(self, net, data: TensorSet) -> float:
        """Validation loss of the ReduceLROnPlateau schedule: the cross-entropy that trains (class-weighted
        with `class_weight=balanced`), all modalities given, over the whole split."""
        weight = getattr(self, "class_weights_", None)
        total = den = 0.0
        for b in data.batches(1024):
            total += float(F.cross_entropy(net(b)[0].float(), b["y"], weight=weight, reduction="sum"))
            den += float(weight[b["y"]].sum()) if weight is not None else len(b["y"])
        return total / max(den, 1e-12)

    @staticmethod
    def _proba_torch(net, data: TensorSet, prior, tau: float) -> np.ndarray:
        z = torch.cat([net(b)[0] for b in data.batches(1024)])
        return shifted_softmax(z.cpu().numpy(), prior, tau) if tau else scores_from_outputs(z, "single")

    @torch.no_grad()
    def _next_pool(self, net: UMBENet, train: TensorSet) -> dict:
        """Count stage 1's selections (each modality alone, the training split), then rebuild the pool:
        the activated prompts (most selected first) and fresh ones for the remaining slots."""
        net.eval()
        counts = torch.zeros(len(net.keys), dtype=torch.long, device=net.keys.device)
        for b in train.batches(1024):
            idx = net.select(net.fuse(unimodal_batch(b, net.mods)))
            counts += torch.bincount(idx.flatten(), minlength=len(counts))
        order = sorted(range(len(counts)), key=lambda i: (-int(counts[i]), i))
        carried = [i for i in order if counts[i] > 0]
        keys = torch.randn_like(net.keys) * 0.02
        values = torch.randn_like(net.values) * 0.02
        keys[:len(carried)], values[:len(carried)] = net.keys[carried], net.values[carried]
        net.keys.copy_(keys)
        net.values.copy_(values)
        return {"counts": counts.tolist(), "carried": carried}

    # ---- the FAISS prompt-key lookup ------------------------------------------------
    def _key_index(self):
        import faiss

        keys = np.ascontiguousarray(self.net_.normalised_keys().detach().cpu().numpy(), np.float32)
        index = faiss.IndexFlatIP(keys.shape[1])
        index.add(keys)
        return index

    def select_faiss(self, q: np.ndarray) -> np.ndarray:
        """Top-k key indices of normalised queries `[N, hidden]` from the FAISS inner-product index."""
        _, idx = self.index_.search(np.ascontiguousarray(q, np.float32), self.top_k)
        return idx

    # ---- inference -----------------------------------------------------------------
    def logits(self, X: Features) -> np.ndarray:
        """The network's logits `[N, C]` (scale x cosine), prompts selected with the FAISS key index, before
        any post-hoc shift."""
        self._check_features(X)
        data = self._tensors(X)
        self.net_.eval()
        outs = []
        with torch.no_grad():
            for b in data.batches(2048):
                q = self.net_.fuse(b)
                idx = torch.from_numpy(self.select_faiss(q.numpy()))
                outs.append(self.net_.logits(q, idx))
        return torch.cat(outs).numpy() if outs else np.zeros((0, len(self.meta_["classes"])), np.float32)

    def predict_proba(self, X: Features) -> np.ndarray:
        z = self.logits(X)
        if not len(z):
            return np.zeros((0, len(self.meta_["classes"])))
        tau = float(self.meta_.get("shift", 0.0))
        if tau and self.meta_["kind"] in ("single", "binary"):
            return shifted_softmax(z, self.meta_["prior"], tau)
        return scores_from_outputs(torch.from_numpy(z), self.meta_["kind"])

    # ---- persistence ---------------------------------------------------------------
    def _state(self) -> dict[str, np.ndarray]:
        return {f"net.{k}": v.detach().cpu().numpy() for k, v in self.net_.state_dict().items()}

    def _restore(self, state: Mapping[str, np.ndarray], meta: dict) -> None:
        if "shift" not in meta:  # saved before `shift` existed: it predicted unshifted, and its params say so
            self.shift = "0"
        self.net_ = self._network()
        self.net_.load_state_dict({k[4:]: torch.from_numpy(np.array(v)) for k, v in state.items()
                                   if k.startswith("net.")})
        self.net_.eval()

    def _save_files(self, folder: Path) -> None:
        import faiss

        faiss.write_index(self.index_, str(folder / INDEX_FILE))

    def _load_files(self, folder: Path) -> None:
        import faiss

        path = folder / INDEX_FILE
        if not path.is_file():
            raise FeatureStoreError(f"{path} is missing: the umbe run's prompt-key index was not saved; "
                                    "retrain the run (fs train-head --method umbe)")
        self.index_ = faiss.read_index(str(path))
        if self.index_.ntotal != self.pool_size or self.index_.d != self.hidden:
            raise ConfigError(f"{path} holds {self.index_.ntotal} keys of {self.index_.d}-d, but the head has "
                              f"pool_size={self.pool_size}, hidden={self.hidden}; retrain the run")
