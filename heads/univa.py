"""`univa`: Unimodal Valence-Arousal driven contrastive learning (paper 002, section 3).

Per modality an encoder makes an utterance vector H_m: text sequences go through an FC and
additive attention (eq. 1); image (vision) and audio sequences through an FC, self-attention
and additive attention (eq. 2); a modality with pooled features only goes through an FC.
The H_m of the present modalities (zeros where absent) are concatenated and a softmax layer
gives the emotion distribution (eq. 6-7). Training minimises (eq. 11)

    lambda * sum_m L_CL_m + (1 - lambda) * L_KL + prior_weight * eta

with the VA-driven contrastive loss per modality (eq. 3-5, two views), the KL multi-label
loss (eq. 10) and the emotion-correlation prior from the label VA table (eq. 8-9). At
inference every emotion whose probability is at least zeta (0.18) is predicted.

Ablations (paper tables 4 and 6): `contrast=none` (without VA-CL), `prior=false` (without the
prior), `contrast=label` (VA-CL replaced by label SupCon), `contrast=self` (self-supervised
contrast: the two views are two dropout passes and only a sample's own views are positive).
"""
from __future__ import annotations

import dataclasses
from typing import Literal, Mapping

import numpy as np

from featurestore.config import field
from featurestore.errors import ConfigError

from . import losses
from .base import Features, Head, Targets
from ._data import TensorSet, align
from ._torch import TorchParams, _check_kind, pick_device, seeded, validation_scorer

__all__ = ["UniVA", "UniVAConfig"]

Contrast = Literal["va", "label", "self", "none"]


@dataclasses.dataclass(frozen=True)
class UniVAConfig(TorchParams):
    epochs: int = field(30, "maximum passes over the training split")
    batch_size: int = field(64, "items per mini-batch (the paper: 12 on MOSEI, 22 on M3ED)")
    hidden: int = field(256, "hidden size of each modality's representation (the paper: 768)")
    heads: int = field(4, "attention heads of the self-attention layers (audio, image)")
    sa_layers: int = field(1, "self-attention layers over audio and image sequences")
    dropout: float = field(0.1, "dropout after each FC")
    contrast: Contrast = field("va", "contrastive loss: va (VA-CL) | label (SupCon) | self | none")
    delta: float = field(0.1, "VA distance below which two items are a positive pair (eq. 3)")
    tau: float = field(0.6, "contrastive temperature (eq. 5; the paper gives none, the authors' code uses 0.6)")
    lam: float = field(0.4, "lambda of eq. 11: weight of the contrastive loss against the KL loss")
    prior: bool = field(True, "add the VA-driven emotion-correlation prior eta (eq. 8-9)")
    prior_weight: float = field(1.0, "weight of eta in the total loss (eq. 11 uses 1)")
    zeta: float = field(0.18, "inference threshold on the emotion distribution (multi-label)")
    views: int = field(2, "views per sample in the contrastive loss (the paper duplicates H: 2)")
    normalize: bool = field(True, "L2-normalise H_m before the contrastive dot product (eq. 5 uses the raw one)")
    sequences: bool = field(True, "use stored sequences when the store has them (else pooled features)")
    max_len: int = field(0, "keep at most this many sequence steps per item (0: all)")

    def __post_init__(self):
        super().__post_init__()
        if self.hidden < 1 or self.hidden % self.heads:
            raise ConfigError(f"hidden={self.hidden} must be a positive multiple of heads={self.heads}")
        if not 0 <= self.lam <= 1 or self.tau <= 0 or self.delta < 0 or self.views < 1:
            raise ConfigError(f"need 0 <= lam <= 1 (got {self.lam}), tau > 0 ({self.tau}), delta >= 0 "
                              f"({self.delta}), views >= 1 ({self.views})")
        if not 0 < self.zeta < 1 or not 0 <= self.dropout < 1:
            raise ConfigError(f"zeta={self.zeta} must be in (0, 1) and dropout={self.dropout} in [0, 1)")


def _modules():
    import torch
    import torch.nn as nn

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
            self.fc = nn.Sequential(nn.Linear(dim, cfg.hidden), nn.GELU(), nn.Dropout(cfg.dropout))

        def forward(self, x, steps=None):
            return self.fc(x)

    class UniVANet(nn.Module):
        def __init__(self, dims: dict, seq: dict, n_classes: int, cfg):
            super().__init__()
            self.mods = sorted(dims)
            self.encoders = nn.ModuleDict({
                m: SequenceEncoder(seq[m], cfg, self_attention=m != "text") if m in seq else PooledEncoder(dims[m], cfg)
                for m in self.mods})
            self.classifier = nn.Linear(cfg.hidden * len(self.mods), n_classes)

        def forward(self, batch):
            H = {m: self.encoders[m](batch[f"x.{m}"], batch.get(f"s.{m}")) * batch[f"m.{m}"][:, None]
                 for m in self.mods}
            return torch.log_softmax(self.classifier(torch.cat([H[m] for m in self.mods], 1)).float(), -1), H

    return UniVANet


class UniVA(Head):
    name = "univa"
    stacked = True  # trains through heads._vmapped (a stack of one alone), so sweeps of it are vectorised
    Config = UniVAConfig
    supports = frozenset({"single", "multi", "binary"})
    uses_sequences = True
    uses_va = True
    description = "UniVA: per-modality encoders, VA-driven contrastive loss, KL loss, emotion-correlation prior"

    # ---- inputs --------------------------------------------------------------------
    def _tensors(self, X: Features, y: Targets | None = None) -> TensorSet:
        import torch

        t = {}
        for mod, (arr, mask) in align(X, self.meta_["dims"]).items():
            t[f"m.{mod}"] = torch.from_numpy(mask.astype(np.float32))
            va = X.va.get(mod)
            t[f"va.{mod}"] = torch.from_numpy(np.asarray(va, np.float32) if va is not None
                                              else np.full((len(mask), 2), np.nan, np.float32))
            if mod in self.meta_["seq_dims"]:
                t[f"x.{mod}"], t[f"s.{mod}"] = self._padded(X, mod, arr, mask)
            else:
                t[f"x.{mod}"] = torch.from_numpy(arr)
        if y is not None:
            t["y"] = torch.as_tensor(y.y if y.kind == "multi" else y.y.astype(np.int64))
        return TensorSet(t, len(X))

    def _padded(self, X: Features, mod: str, pooled: np.ndarray, mask: np.ndarray):
        """Pad a modality's ragged sequences once into `[N, L, D]` + step mask; no sequence -> its pooled row."""
        import torch

        seqs = X.sequences.get(mod)
        if seqs is None:
            raise ConfigError(f"head 'univa' was trained on {mod} sequences; pass them (Features.sequences)")
        cap = self.max_len or None
        rows = [s[:cap] if s is not None and len(s) else (pooled[i:i + 1] if mask[i] else None)
                for i, s in enumerate(seqs)]
        dim = self.meta_["seq_dims"][mod]
        longest = max((len(r) for r in rows if r is not None), default=1)
        x = np.zeros((len(rows), longest, dim), np.float32)
        steps = np.zeros((len(rows), longest), bool)
        for i, r in enumerate(rows):
            if r is not None and mask[i]:
                if r.shape[1] != dim:
                    raise ConfigError(f"{mod} sequences are {r.shape[1]}-d but head 'univa' was trained on {dim}-d")
                x[i, :len(r)], steps[i, :len(r)] = r, True
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
        """Eq. 11 for the C' configurations at stack positions `active` (indices into `members`), at once.

        `log_p` `[C', B, K]`, `H[m]` (`H2[m]`: the second pass, `contrast=self`) `[C', B, hidden]`,
        `M` the prior matrix (None when no configuration uses it). Returns the losses `[C']`.
        """
        import torch
        import torch.nn.functional as F

        cfg = [members[c] for c in active]
        dev = log_p.device
        vec = lambda vals: torch.tensor(vals, dtype=torch.float32, device=dev)  # noqa: E731
        lam = vec([h.lam for h in cfg])
        total = (1 - lam) * losses.kl_multilabel(log_p, batch["y"])
        if M is not None:
            pw = vec([h.prior_weight if h.prior_ is not None else 0.0 for h in cfg])
            total = total + pw * losses.correlation_prior(log_p.exp(), M)
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
        return ("UniVA", int(self.seed), int(self.batch_size), int(self.hidden), int(self.heads),
                int(self.sa_layers), bool(self.sequences), int(self.max_len), float(self.dropout),
                self._second_pass, str(self.device))

    @staticmethod
    def fit_stack(hs, X: Features, y: Targets, *, eval_set=None, log=None) -> list:
        """Fit many univa heads on the same data as vectorised stacks (see `fit_univa`)."""
        return fit_univa(hs, X, y, eval_set=eval_set, log=log)

    def fit(self, X: Features, y: Targets, *, eval_set: tuple[Features, Targets] | None = None) -> "UniVA":
        fit_univa([self], X, y, eval_set=eval_set)
        return self

    def _loop_params(self) -> TorchParams:
        return TorchParams(**{f.name: getattr(self, f.name) for f in dataclasses.fields(TorchParams)})

    # ---- inference -----------------------------------------------------------------
    def _threshold(self) -> float | None:
        return self.zeta if self.meta_["kind"] == "multi" else None

    @staticmethod
    def _proba(model, data: TensorSet) -> np.ndarray:
        import torch

        model.eval()
        with torch.no_grad():
            outs = [model(b)[0].exp() for b in data.batches(2048)]
        return torch.cat(outs).cpu().numpy().astype(np.float64) if outs else np.zeros((0, 0))

    def predict_proba(self, X: Features) -> np.ndarray:
        self._check_features(X)
        return self._proba(self.net_, self._tensors(X))

    def predict(self, X: Features, *, threshold: float | None = None) -> np.ndarray:
        return self.decide(self.predict_proba(X), self.meta_["kind"],
                           self._threshold() if threshold is None else threshold)

    def _state(self) -> dict[str, np.ndarray]:
        state = {f"net.{k}": v.detach().cpu().numpy() for k, v in self.net_.state_dict().items()}
        if self.prior_ is not None:
            state["prior.M"] = np.asarray(self.prior_, np.float32)
        return state

    def _restore(self, state: Mapping[str, np.ndarray], meta: dict) -> None:
        import torch

        self.prior_ = state.get("prior.M")
        n_out = len(meta["classes"])
        self.net_ = _modules()(meta["dims"], meta.get("seq_dims", {}), n_out, self.config)
        self.net_.load_state_dict({k[4:]: torch.from_numpy(np.array(v)) for k, v in state.items()
                                   if k.startswith("net.")})
        self.net_.eval()


def fit_univa(hs, X: Features, y: Targets, *, eval_set: tuple[Features, Targets] | None = None,
              log=None) -> list:
    """Fit `univa` heads on the same data, one vectorised stack per `stack_key` (heads._vmapped).

    Each head ends as if trained alone: same meta, prior, network, history. A head's own `fit` is
    this with one head. Configurations in a stack may differ in lr, weight_decay, epochs, patience,
    lam, tau, delta, contrast (but `self` only with `self`), views, normalize, prior, prior_weight, zeta;
    the loss of eq. 11 is computed for all of them at once (`UniVA._stack_loss`).
    """
    import torch

    from ._torch import autocast
    from ._vmapped import VmapSpec, train_vmapped

    if not hs:
        return []
    for h in hs:
        _check_kind(h, y)
    if not len(y):
        raise ConfigError("head 'univa': no training items")
    for h in hs:
        seq_dims = {m: int(next(s.shape[1] for s in X.sequences[m] if s is not None))
                    for m in X.pooled if h.sequences and any(s is not None for s in X.sequences.get(m, []))}
        h._set_meta(X, y, seq_dims=seq_dims)
        h.prior_ = h._prior(y)
    groups: dict[tuple, list] = {}
    for h in hs:
        groups.setdefault(h.stack_key(), []).append(h)
    for key, members in groups.items():
        lead = members[0]
        device = pick_device(lead.device)
        train = lead._tensors(X, y)
        val = scorers = None
        if eval_set is not None:
            lead._check_features(eval_set[0])
            val = lead._tensors(eval_set[0]).to(device)
            scorers = [validation_scorer(h, eval_set[1], y.kind, h._threshold()) for h in members]
        M = next((torch.as_tensor(h.prior_, device=device) for h in members if h.prior_ is not None), None)
        second = lead._second_pass

        def losses_fn(forward, batch, active, members=members, M=M, second=second):
            log_p, H = forward(batch)
            H2 = forward(batch)[1] if second else None
            return UniVA._stack_loss(members, active, log_p, H, H2, batch, M)

        val_score = None
        if val is not None:
            def val_score(model_of, active, scorers=scorers, val=val):
                return [scorers[c](UniVA._proba(model_of(pos), val)) for pos, c in enumerate(active)]

        if log:
            log(f"training a stack of {len(members)} univa configuration(s) {key[1:]}")
        spec = VmapSpec([h.lr for h in members], [h.weight_decay for h in members],
                        [h.epochs for h in members], [h.patience for h in members])
        with seeded(lead.seed, device):
            net = _modules()(lead.meta_["dims"], lead.meta_["seq_dims"], y.n_outputs, lead.config).to(device)
            states, hists = train_vmapped(net, spec, train, batch_size=lead.batch_size, seed=lead.seed,
                                          device=device, losses_fn=losses_fn, val_score=val_score,
                                          amp=lambda d=device: autocast(d))
        for h, state, hist in zip(members, states, hists):
            with seeded(h.seed):  # the caller's global RNG is left as it was
                h.net_ = _modules()(h.meta_["dims"], h.meta_["seq_dims"], y.n_outputs, h.config)
            h.net_.load_state_dict(state)
            h.net_.eval()
            h.history_ = {**hist, "stack_size": len(members)}  # trained alongside this many
    return list(hs)
