"""UniVA's losses (paper 002, section 3), vectorised over the batch: no Python loops over pairs.

- `va_pairs`: eq. 3, which pairs are positive (VA distance < delta) and which are comparable.
- `contrastive_loss`: eq. 4-5 over V views, for any positive mask (VA-CL, label SupCon, self).
- `prior_matrix` / `correlation_prior`: eq. 8-9, the emotion-correlation prior eta as printed;
  `correlation_prior_code`: eta as the authors' code computes it.
- `kl_multilabel`: eq. 10, KL from the label distribution to the prediction (eq. 10's normalised
  labels, or the code's softmax of the multi-hot labels).

Eq. 4 sums over anchors; here the sum is averaged over the anchors that count, so the loss
does not grow with the batch size (the authors' code averages too). An anchor counts when it
is valid and has at least one positive; a batch with none gives 0, never NaN.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["va_pairs", "label_pairs", "contrastive_loss", "prior_matrix", "correlation_prior",
           "correlation_prior_code", "kl_multilabel"]

_FAR = -1e9  # finite "minus infinity": masked logits stay finite, so gradients stay finite


def _wide(t):
    """At least float32 (autocast may hand in bfloat16); float64 stays float64."""

    return t if t.dtype == torch.float64 else t.float()


def va_pairs(va, delta: float):
    """Eq. 3 on a batch of per-modality VA `[B, 2]` (NaN unknown) -> (positive, comparable) `[B, B]` bool.

    The distance uses the dimensions known for both items (both, for fully scored items, as in
    eq. 3); a pair with no dimension known for both is not comparable and drops out.
    """
    known = ~va.isnan()
    both = known[:, None, :] & known[None, :, :]  # [B, B, 2]
    diff = (va.nan_to_num()[:, None, :] - va.nan_to_num()[None, :, :]) * both
    dist = diff.pow(2).sum(-1).sqrt()
    comparable = both.any(-1)
    return comparable & (dist < delta), comparable


def label_pairs(y):
    """Sup-CL: positives share exactly the same label (single) or label set (multi)."""

    if y.dim() == 1:
        pos = y[:, None] == y[None, :]
    else:
        pos = (y[:, None, :] == y[None, :, :]).all(-1)
    return pos, torch.ones_like(pos)


def contrastive_loss(views, positive, comparable, valid, tau):
    """Eq. 4-5. `views` `[V, B, H]` (view v of sample b); `positive`, `comparable` `[B, B]`; `valid` `[B]`.

    Every view of every valid sample is an anchor x_i; A(x_i) is every other valid view whose pair
    with x_i is comparable; P(x_i) those among A(x_i) that are positive. The other views of the
    anchor's own sample are positives when `positive` says a sample is close to itself.

    Vectorised over configurations too: `views` `[C, V, B, H]`, `positive` `[B, B]` or `[C, B, B]`
    and `tau` a number or a tensor `[C]` give the C losses `[C]` (one per configuration) at once.
    """

    V, B, Hd = views.shape[-3:]
    lead = views.shape[:-3]
    z = _wide(views.reshape(*lead, V * B, Hd))
    sample = torch.arange(V * B, device=z.device) % B
    valid_v = valid[sample]
    allowed = comparable[sample][:, sample] & valid_v[:, None] & valid_v[None, :]
    allowed &= ~torch.eye(V * B, dtype=torch.bool, device=z.device)
    pos = positive[..., sample, :][..., :, sample] & allowed
    if torch.is_tensor(tau) and tau.dim():
        tau = tau.to(z.dtype).view(*tau.shape, 1, 1)
    logits = (z @ z.transpose(-1, -2) / tau).masked_fill(~allowed, _FAR)
    log_prob = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    n_pos = pos.sum(-1)
    anchors = valid_v & (n_pos > 0)
    mean_pos = torch.where(pos, log_prob, torch.zeros_like(log_prob)).sum(-1) / n_pos.clamp(min=1)
    n_anchors = anchors.sum(-1)
    # a configuration with no anchor gives 0 (its terms are all multiplied by 0: finite gradients)
    return -(mean_pos * anchors).sum(-1) / n_anchors.clamp(min=1)


def prior_matrix(label_va):
    """Eq. 8: cosine similarity of the classes' (V, A) points `[C, 2]`; a class at the origin gets 0."""

    v = torch.as_tensor(label_va, dtype=torch.float32)
    norm = v.norm(dim=1, keepdim=True)
    unit = torch.where(norm > 0, v / norm.clamp(min=1e-12), torch.zeros_like(v))
    return unit @ unit.T


def correlation_prior(p, M):
    """Eq. 9 per batch: mean over items of sum_{j,l} M_jl (p_j - p_l)^2, via the Laplacian of M.

    `p` `[B, K]` -> a scalar; `p` `[C, B, K]` (C configurations, `M` `[K, K]` or `[C, K, K]`) -> `[C]`."""
    p = _wide(p)
    M = M.to(p.dtype)
    # sum_jl M_jl (p_j - p_l)^2 = sum_j p_j^2 (rowsum_j + colsum_j) - 2 p^T M p
    weights = (M.sum(-1) + M.sum(-2)).unsqueeze(-2)  # [..., 1, K]
    return ((p * p * weights).sum(-1) - 2 * ((p @ M) * p).sum(-1)).mean(-1)


def correlation_prior_code(log_p, M):
    """eta as the authors' code computes it (`models.py`): sum_jl M_jl ||log p_j - log p_l||_2 / B,
    the L2 norm taken over the batch (not squared, not per item), on log-probabilities.

    `log_p` `[B, K]`, `M` `[K, K]` -> a scalar; `log_p` `[C, B, K]`, `M` `[C, K, K]` -> `[C]`."""

    log_p = _wide(log_p)
    B, K = log_p.shape[-2:]
    diff = log_p.unsqueeze(-1) - log_p.unsqueeze(-2)  # [..., B, K, K]
    norm = torch.linalg.vector_norm(diff, dim=-3)  # [..., K, K]; 0 on the diagonal, where the gradient is 0
    return (norm * M.to(norm.dtype)).sum((-2, -1)) / B


def kl_multilabel(log_p, y, *, target: str = "normalized", reduction: str = "batchmean"):
    """Eq. 10: KL(target || p); items with no label drop out.

    `target`: `normalized` (eq. 10: the labels divided by their count) or `softmax` (the authors'
    code: `softmax` of the multi-hot labels). `reduction`: `batchmean` (the sum over classes,
    averaged over items) or `mean` (averaged over items and classes, torch's `KLDivLoss(reduction=
    'mean')`, as the code uses it). `log_p` `[B, K]` -> a scalar; `log_p` `[C, B, K]` (C
    configurations, shared `y`) -> `[C]`."""

    if y.dim() == 1:
        y = F.one_hot(y, log_p.shape[-1]).float()
    log_p = _wide(log_p)
    y = y.to(log_p.dtype)
    total = y.sum(1, keepdim=True)
    dist = F.softmax(y, -1) if target == "softmax" else y / total.clamp(min=1e-12)
    per_item = F.kl_div(log_p, dist.expand_as(log_p), reduction="none").sum(-1)
    if reduction == "mean":
        per_item = per_item / log_p.shape[-1]
    has = total.squeeze(1) > 0
    return per_item[..., has].mean(-1) if bool(has.any()) else log_p.sum((-2, -1)) * 0.0
