"""`univa`: Unimodal Valence-Arousal driven contrastive learning (paper 002, section 3).

Per modality an encoder makes an utterance vector H_m: text sequences go through an FC and
additive attention (eq. 1); image (vision) and audio sequences through an FC, self-attention
and additive attention (eq. 2); a modality with pooled features only goes through an FC.
The H_m of the present modalities (zeros where absent) are concatenated and a softmax layer
gives the emotion distribution (eq. 6-7). Training minimises, as the authors' code weighs it
(NUSTM/UniVA, `models.py` and `train.py`; the printed eq. 11 reads differently, see docs/heads.md):

    lam * sum_m L_CL_m + (1 - lam) * (kl_weight * L_KL + prior_weight * eta)

- L_CL_m: the VA-driven contrastive loss per modality (eq. 3-5, two views);
- L_KL: KL from the label distribution to the prediction (eq. 10), averaged over items *and*
  classes as torch's `KLDivLoss(reduction='mean')` does, with kl_weight 1000 and the target a
  softmax of the multi-hot labels (`kl_target=softmax`), as in the code;
- eta: the emotion-correlation prior. `prior_form=code` (default): sum_jl M_jl times the L2 norm
  over the batch of (log p_j - log p_l), divided by the batch size, with M learnable from its
  eq. 8 start (`learn_m`); `prior_form=paper`: eq. 9 on probabilities with M fixed.

At inference every emotion whose probability is strictly above zeta is predicted (the paper:
0.18; default `auto`, the best on validation).

Ablations (paper tables 3, 4 and 6): `contrast=none` (without VA-CL), `prior=false` (without the
prior), `contrast=label` (VA-CL replaced by label SupCon), `contrast=self` (self-supervised
contrast: the two views are two dropout passes and only a sample's own views are positive).
"""
from __future__ import annotations

import dataclasses
from typing import Literal, Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from featurestore.config import field
from featurestore.errors import ConfigError

from . import losses
from .base import Features, Head, Targets, parse_threshold
from ._data import TensorSet, align, pad_sequences
from ._engine import autocast, check_kind, pick_device, seeded, validation_scorer
from ._torch import TorchParams
from ._vmapped import VmapSpec, train_vmapped

__all__ = ["UniVA", "UniVAConfig"]

Contrast = Literal["va", "label", "self", "none"]


@dataclasses.dataclass(frozen=True)
class UniVAConfig(TorchParams):
    epochs: int = field(30, "maximum passes over the training split")
    batch_size: int = field(64, "items per mini-batch (the paper: 12 on MOSEI, 22 on M3ED)")
    hidden: int = field(256, "hidden size of each modality's representation (the paper: 768)")
    heads: int = field(4, "attention heads of the self-attention layers (audio, image)")
    pooled_layers: int = field(2, "FC layers (each GELU + dropout) encoding a modality that has pooled features only")
    sa_layers: int = field(1, "self-attention layers over audio and image sequences")
    dropout: float = field(0.4, "dropout after each FC (0.4: chosen on the demo's validation split)")
    contrast: Contrast = field("va", "contrastive loss: va (VA-CL) | label (SupCon) | self | none")
    delta: float = field(0.1, "VA distance below which two items are a positive pair (eq. 3)")
    tau: float = field(0.6, "contrastive temperature (eq. 5; the paper gives none, the authors' code uses 0.6)")
    lam: float = field(0.2, "lambda (the code's alpha; its scripts: 0.2-0.45): weight of the contrastive loss against the KL loss and prior")
    kl_weight: float = field(1000.0, "scale of the KL loss, averaged over items and classes (the code: 1000)")
    kl_target: Literal["softmax", "normalized"] = field(
        "softmax", "KL target: softmax of the multi-hot labels (the code) | labels / their count (eq. 10)")
    prior: bool = field(True, "add the VA-driven emotion-correlation prior eta (eq. 8-9)")
    prior_form: Literal["code", "paper"] = field(
        "code", "eta as the code computes it (L2 norm over the batch of log-prob differences / batch size) "
                "| eq. 9 (squared probability differences, mean over items)")
    learn_m: bool = field(True, "M is a learnable parameter initialised from eq. 8 (the code) | fixed")
    prior_weight: float = field(1.0, "weight of eta beside the KL loss")
    zeta: str = field("auto", "multi-label: predict emotions whose probability is strictly above zeta "
                              "(the paper: 0.18); auto: the best on validation")
    force_top: bool = field(False, "multi-label: also predict the top emotion of an item no score passes")
    views: int = field(2, "views per sample in the contrastive loss (the paper duplicates H: 2)")
    normalize: bool = field(True, "L2-normalise H_m before the contrastive dot product (eq. 5 uses the raw one)")
    standardize: bool = field(True, "z-score each input dimension with training statistics (the code feeds raw "
                                    "backbone features; cached sentence embeddings are L2-normalised and tiny)")
    sequences: bool = field(True, "use stored sequences when the store has them (else pooled features)")
    max_len: int = field(0, "keep at most this many sequence steps per item (0: all)")

    def __post_init__(self):
        super().__post_init__()
        if self.pooled_layers < 1:
            raise ConfigError(f"pooled_layers={self.pooled_layers} must be at least 1")
        if self.hidden < 1 or self.hidden % self.heads:
            raise ConfigError(f"hidden={self.hidden} must be a positive multiple of heads={self.heads}")
        if not 0 <= self.lam <= 1 or self.tau <= 0 or self.delta < 0 or self.views < 1:
            raise ConfigError(f"need 0 <= lam <= 1 (got {self.lam}), tau > 0 ({self.tau}), delta >= 0 "
                              f"({self.delta}), views >= 1 ({self.views})")
        parse_threshold(self.zeta, "zeta")
        bad = [msg for ok, msg in ((0 <= self.dropout < 1, f"dropout={self.dropout} must be in [0, 1)"),
                                   (self.kl_weight > 0, f"kl_weight={self.kl_weight} must be > 0"),
                                   (self.prior_weight >= 0, f"prior_weight={self.prior_weight} must be >= 0")) if not ok]
        if bad:
            raise ConfigError("; ".join(bad))


def _modules():
    class AdditiveAttention(nn.Module):
        """Bahdanau-style pooling: softmax over steps of v^T tanh(W h_t + b)."""

        def __init__(self, hidden: int):
            super().__init__()
            self.proj = nn.Linear(hidden, hidden)
            self.score = nn.Linear(hidden, 1, bias=False)

        def forward(self, x, mask):
            s = self.score(torch.tanh(self.proj(x))).squeeze(-1).float().masked_fill(~mask, -1e4)
            return (torch.softmax(s, -1).unsqueeze(-1).to(x.dtype) * x).sum(1)

    class SequenceEncoder(nn.Module):
        def __init__(self, dim: int, cfg, self_attention: bool):
            super().__init__()
            self.fc = nn.Sequential(nn.Linear(dim, cfg.hidden), nn.Dropout(cfg.dropout))
            layer = nn.TransformerEncoderLayer(cfg.hidden, cfg.heads, 2 * cfg.hidden, cfg.dropout, batch_first=True)
            self.sat = nn.TransformerEncoder(layer, cfg.sa_layers, enable_nested_tensor=False) \
                if self_attention else None
            self.att = AdditiveAttention(cfg.hidden)

        def forward(self, x, steps):
            steps = steps.clone()
            steps[:, 0] |= ~steps.any(1)  # an item with no steps attends to one zero step, not to nothing
            h = self.fc(x)
            if self.sat is not None:
                h = self.sat(h, src_key_padding_mask=~steps)
            return self.att(h, steps)

    class PooledEncoder(nn.Module):
        def __init__(self, dim: int, cfg):
            super().__init__()
            blocks, width = [], dim
            for _ in range(cfg.pooled_layers):
                blocks += [nn.Linear(width, cfg.hidden), nn.GELU(), nn.Dropout(cfg.dropout)]
                width = cfg.hidden
            self.fc = nn.Sequential(*blocks)

        def forward(self, x, steps=None):
            return self.fc(x)

    class UniVANet(nn.Module):
        """Encoders, classifier, and the prior matrix M (a parameter when learnt, as the code does)."""

        def __init__(self, dims: dict, seq: dict, n_classes: int, cfg, M: np.ndarray | None = None):
            super().__init__()
            self.mods = sorted(dims)
            self.encoders = nn.ModuleDict({
                m: SequenceEncoder(seq[m], cfg, self_attention=m != "text") if m in seq else PooledEncoder(dims[m], cfg)
                for m in self.mods})
            self.classifier = nn.Linear(cfg.hidden * len(self.mods), n_classes)
            start = torch.zeros(n_classes, n_classes) if M is None else torch.as_tensor(M, dtype=torch.float32)
            if cfg.learn_m:
                self.M = nn.Parameter(start.clone())
            else:
                self.register_buffer("M", start.clone())

        def forward(self, batch):
            H = {m: self.encoders[m](batch[f"x.{m}"], batch.get(f"s.{m}")) * batch[f"m.{m}"][:, None]
                 for m in self.mods}
            log_p = torch.log_softmax(self.classifier(torch.cat([H[m] for m in self.mods], 1)).float(), -1)
            return log_p, H, self.M

    return UniVANet


class UniVA(Head):
    name = "univa"
    stacked = True  # trains through heads._vmapped (a stack of one alone), so sweeps of it are vectorised
    Config = UniVAConfig
    supports = frozenset({"single", "multi", "binary"})
    uses_sequences = True
    uses_va = True
    threshold_param = "zeta"
    description = "UniVA: per-modality encoders, VA-driven contrastive loss, KL loss, emotion-correlation prior"

    # ---- inputs --------------------------------------------------------------------
    def _tensors(self, X: Features, y: Targets | None = None, *, fit_norm: bool = False) -> TensorSet:
        """The network's inputs; `fit_norm` (training data) first sets the standardisation statistics."""
        t = {}
        if fit_norm:
            self.norm_ = {}
        for mod, (arr, mask) in align(X, self.meta_["dims"]).items():
            t[f"m.{mod}"] = torch.from_numpy(mask.astype(np.float32))
            va = X.va.get(mod)
            t[f"va.{mod}"] = torch.from_numpy(np.asarray(va, np.float32) if va is not None
                                              else np.full((len(mask), 2), np.nan, np.float32))
            if mod in self.meta_["seq_dims"]:
                x, steps = self._padded(X, mod, arr, mask)
                t[f"s.{mod}"] = steps
            else:
                x, steps = torch.from_numpy(arr), torch.from_numpy(mask)
            t[f"x.{mod}"] = self._standardised(mod, x, steps, fit_norm)
        if y is not None:
            t["y"] = torch.as_tensor(y.y if y.kind == "multi" else y.y.astype(np.int64))
        return TensorSet(t, len(X))

    def _standardised(self, mod: str, x, valid, fit: bool):
        """z-score each input dimension with training statistics (rows or steps that exist only)."""
        if not self.standardize:
            return x
        if fit:
            rows = x[valid] if bool(valid.any()) else x.reshape(-1, x.shape[-1])[:1] * 0
            self.norm_[f"{mod}.mean"] = rows.mean(0).numpy()
            self.norm_[f"{mod}.std"] = (rows.std(0, unbiased=False) + 1e-6).numpy()
        mean, std = (torch.from_numpy(np.asarray(self.norm_[f"{mod}.{k}"], np.float32)) for k in ("mean", "std"))
        return torch.where(valid.unsqueeze(-1), (x - mean) / std, torch.zeros((), dtype=x.dtype))

    def _padded(self, X: Features, mod: str, pooled: np.ndarray, mask: np.ndarray):
        """Pad a modality's ragged sequences once into `[N, L, D]` + step mask; no sequence -> its pooled row."""
        seqs = X.sequences.get(mod)
        if seqs is None:
            raise ConfigError(f"head 'univa' was trained on {mod} sequences; pass them (Features.sequences)")
        x, steps = pad_sequences(seqs, pooled, mask, self.meta_["seq_dims"][mod], cap=self.max_len,
                                 what=f"{mod} sequences")
        return torch.from_numpy(x), torch.from_numpy(steps)

    def _prior(self, y: Targets) -> np.ndarray | None:
        if not self.prior or y.kind not in ("multi", "single", "binary"):
            return None
        table = y.label_va
        if table is None:
            from featurestore.va.labels import label_va_table

            try:
                table = label_va_table(y.classes)
            except ConfigError as exc:
                raise ConfigError(f"{exc}; or train without the emotion-correlation prior: --param prior=false") \
                    from None
        return losses.prior_matrix(table).numpy()

    # ---- training ------------------------------------------------------------------
    @property
    def _second_pass(self) -> bool:
        """Whether a training step runs the network twice (self contrast: two dropout views)."""
        return self.contrast == "self" and self.lam > 0

    @staticmethod
    def _stack_loss(members: list, active: list[int], log_p, H: dict, H2: dict | None, batch: dict, M):
        """The total loss for the C' configurations at stack positions `active` (indices into `members`).

        `log_p` `[C', B, K]`, `H[m]` (`H2[m]`: the second pass, `contrast=self`) `[C', B, hidden]`,
        `M` each configuration's prior matrix `[C', K, K]`. Returns the losses `[C']`.
        """
        cfg = [members[c] for c in active]
        dev = log_p.device
        vec = lambda vals: torch.tensor(vals, dtype=torch.float32, device=dev)  # noqa: E731
        lam = vec([h.lam for h in cfg])
        kl = {t: losses.kl_multilabel(log_p, batch["y"], target=t, reduction="mean")
              for t in sorted({h.kl_target for h in cfg})}
        fit = torch.stack([h.kl_weight * kl[h.kl_target][pos] for pos, h in enumerate(cfg)])
        if any(h.prior for h in cfg):
            eta = {"code": lambda: losses.correlation_prior_code(log_p, M),
                   "paper": lambda: losses.correlation_prior(log_p.exp(), M)}
            etas = {f: eta[f]() for f in sorted({h.prior_form for h in cfg if h.prior})}
            fit = fit + torch.stack([h.prior_weight * etas[h.prior_form][pos] if h.prior else fit.new_zeros(())
                                     for pos, h in enumerate(cfg)])
        total = (1 - lam) * fit
        groups: dict[tuple, list[int]] = {}  # configurations sharing the contrastive loss's form
        for pos, h in enumerate(cfg):
            if h.contrast != "none" and h.lam > 0:
                groups.setdefault((h.contrast, h.views, h.normalize), []).append(pos)
        for (contrast, views, normalize), sel in groups.items():
            idx = torch.tensor(sel, dtype=torch.long, device=dev)
            tau = vec([cfg[p].tau for p in sel])
            cl = 0.0
            for m in members[0].meta_["dims"]:
                present = batch[f"m.{m}"] > 0
                if contrast == "va":
                    pairs = {d: losses.va_pairs(batch[f"va.{m}"], d) for d in sorted({cfg[p].delta for p in sel})}
                    ok = next(iter(pairs.values()))[1]
                    pos = pairs[cfg[sel[0]].delta][0] if len(pairs) == 1 else \
                        torch.stack([pairs[cfg[p].delta][0] for p in sel])
                elif contrast == "label":
                    pos, ok = losses.label_pairs(batch["y"])
                else:  # self: only a sample's own other view is positive
                    pos = torch.eye(len(present), dtype=torch.bool, device=dev)
                    ok = torch.ones_like(pos)
                h = H[m].index_select(0, idx)
                z = torch.stack([h] * views if H2 is None else [h, H2[m].index_select(0, idx)], 1)  # [c, V, B, H]
                if normalize:
                    z = F.normalize(z.float(), dim=-1)
                cl = cl + losses.contrastive_loss(z, pos, ok, present, tau)
            total = total + torch.zeros_like(total).index_add(0, idx, lam.index_select(0, idx) * cl)
        return total

    def stack_key(self) -> tuple:
        """Configurations that can train as one vectorised stack: same network, inputs, seed, draws."""
        return ("UniVA", int(self.seed), int(self.batch_size), int(self.hidden), int(self.heads), int(self.pooled_layers),
                int(self.sa_layers), bool(self.sequences), int(self.max_len), float(self.dropout),
                bool(self.standardize),
                self._second_pass, bool(self.learn_m), str(self.device))

    @staticmethod
    def fit_stack(hs, X: Features, y: Targets, *, eval_set=None, log=None) -> list:
        """Fit many univa heads on the same data as vectorised stacks (see `fit_univa`)."""
        return fit_univa(hs, X, y, eval_set=eval_set, log=log)

    def fit(self, X: Features, y: Targets, *, eval_set: tuple[Features, Targets] | None = None) -> "UniVA":
        fit_univa([self], X, y, eval_set=eval_set)
        return self

    # ---- inference -----------------------------------------------------------------
    @staticmethod
    def _proba(model, data: TensorSet) -> np.ndarray:
        model.eval()
        with torch.no_grad():
            outs = [model(b)[0].exp() for b in data.batches(2048)]
        return torch.cat(outs).cpu().numpy().astype(np.float64) if outs else np.zeros((0, 0))

    def predict_proba(self, X: Features) -> np.ndarray:
        self._check_features(X)
        return self._proba(self.net_, self._tensors(X))

    def _state(self) -> dict[str, np.ndarray]:
        state = {f"net.{k}": v.detach().cpu().numpy() for k, v in self.net_.state_dict().items()}
        return {**state, **{f"norm.{k}": np.asarray(v, np.float32) for k, v in self.norm_.items()}}

    def _restore(self, state: Mapping[str, np.ndarray], meta: dict) -> None:
        self.norm_ = {k[5:]: v for k, v in state.items() if k.startswith("norm.")}
        n_out = len(meta["classes"])
        self.net_ = _modules()(meta["dims"], meta.get("seq_dims", {}), n_out, self.config)
        self.net_.load_state_dict({k[4:]: torch.from_numpy(np.array(v)) for k, v in state.items()
                                   if k.startswith("net.")})
        self.net_.eval()


def fit_univa(hs, X: Features, y: Targets, *, eval_set: tuple[Features, Targets] | None = None,
              log=None) -> list:
    """Fit `univa` heads on the same data, one vectorised stack per `stack_key` (heads._vmapped).

    Each head ends as if trained alone: same meta, network (M included), history, threshold. A
    head's own `fit` is this with one head. Configurations in a stack may differ in lr,
    weight_decay, epochs, patience, lam, tau, delta, contrast (but `self` only with `self`), views,
    normalize, kl_weight, kl_target, prior, prior_form, prior_weight, zeta; the loss is computed
    for all of them at once (`UniVA._stack_loss`).
    """
    if not hs:
        return []
    for h in hs:
        check_kind(h, y)
    start_m = next((h._prior(y) for h in hs if h.prior), None)  # eq. 8 from the label VA table
    for h in hs:
        seq_dims = {m: int(next(s.shape[1] for s in X.sequences[m] if s is not None))
                    for m in X.pooled if h.sequences and any(s is not None for s in X.sequences.get(m, []))}
        h._set_meta(X, y, seq_dims=seq_dims, prior=bool(h.prior))
    groups: dict[tuple, list] = {}
    for h in hs:
        groups.setdefault(h.stack_key(), []).append(h)
    for key, members in groups.items():
        lead = members[0]
        device = pick_device(lead.device)
        train = lead._tensors(X, y, fit_norm=True)
        for h in members[1:]:
            h.norm_ = lead.norm_
        val = scorers = None
        if eval_set is not None:
            lead._check_features(eval_set[0])
            val = lead._tensors(eval_set[0]).to(device)
            scorers = [validation_scorer(h, eval_set[1], y.kind) for h in members]
        second = lead._second_pass

        def losses_fn(forward, batch, active, members=members, second=second):
            log_p, H, M = forward(batch)
            H2 = forward(batch)[1] if second else None
            return UniVA._stack_loss(members, active, log_p, H, H2, batch, M)

        val_score = None
        if val is not None:
            def val_score(model_of, active, scorers=scorers, val=val):
                return [scorers[c](UniVA._proba(model_of(pos), val)) for pos, c in enumerate(active)]

        if log:
            log(f"training a stack of {len(members)} univa configuration(s) (seed {lead.seed}, batch size {lead.batch_size})")
        spec = VmapSpec([h.lr for h in members], [h.weight_decay for h in members],
                        [h.epochs for h in members], [h.patience for h in members])
        with seeded(lead.seed, device):
            net = _modules()(lead.meta_["dims"], lead.meta_["seq_dims"], y.n_outputs, lead.config,
                             start_m).to(device)
            states, hists = train_vmapped(net, spec, train, batch_size=lead.batch_size, seed=lead.seed,
                                          device=device, losses_fn=losses_fn, val_score=val_score,
                                          amp=lambda d=device: autocast(d), log=log)
        for h, state, hist in zip(members, states, hists):
            with seeded(h.seed):  # the caller's global RNG is left as it was
                h.net_ = _modules()(h.meta_["dims"], h.meta_["seq_dims"], y.n_outputs, h.config)
            h.net_.load_state_dict(state)
            h.net_.eval()
            h.history_ = {**hist, "stack_size": len(members)}  # trained alongside this many
            h.settle_decision(eval_set)
    return list(hs)
