"""scaled_dot_product_attention, as the ops it is made of: O = A V with
A = softmax(Q K^T * scale + mask)."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from .base import TINY, Ctx, Family, Propagation, unbroadcast

aten = torch.ops.aten


class Attention(Family):
    """A V is a product of two data operands: half of R to A and half to V, each by the |z|
    rule with the other held fixed, R_V[k, d] = 1/2 sum_q |A_qk V_kd| R_q[d] / sum_k' |A_qk'
    V_k'd|. The softmax passes R_A on unchanged, as every activation does, and Q K^T is again
    a product of two data operands: half to Q, half to K. Masked and future positions have
    A = 0 and get nothing. The faithfulness benchmark chose this over giving V everything
    (bench/README.md). Grouped-query attention: K and V are repeated per group, and their
    relevance summed back over the group."""

    ops = (aten.scaled_dot_product_attention.default,)

    def default(self, ctx: Ctx) -> Propagation:
        """The two product rules written out as matmuls (A >= 0; the softmax scale cancels in
        the |z| shares of Q K^T)."""
        q, k, v, groups = _operands(ctx)
        A = _weights(ctx, q, k)
        av = v.abs()
        ratio = ctx.R / (2 * (A @ av + TINY))
        r_v, r_a = av * (A.transpose(-2, -1) @ ratio), A * (ratio @ av.transpose(-2, -1))
        aq, ak = q.abs(), k.abs()
        ratio_qk = r_a / (2 * (aq @ ak.transpose(-2, -1) + TINY))
        r_q, r_k = aq * (ratio_qk @ ak), ak * (ratio_qk.transpose(-2, -1) @ aq)
        # what the shares withheld: R * 2 TINY / (2 D) for each half
        sink = (ratio * (2 * TINY)).sum(-1) + (ratio_qk * (2 * TINY)).sum(-1)
        return _regroup(ctx, r_q, r_k, r_v, groups), sink

    def reference(self, ctx: Ctx) -> Propagation:
        """Multipliers (relevance per unit of change) from the output back: A V - A' V' split
        exactly between the change of A and of V; the softmax by its exact linearisation
        (``softmax_multiplier``); Q K^T - Q' K'^T split like A V."""
        q, k, v, groups = _operands(ctx)
        A = _weights(ctx, q, k)
        qr, kr, vr, _ = _operands(replace(ctx, args=ctx.ref))
        scale = _scale(ctx.ref["scale"], q)
        S = attention_scores(q, k, ctx.args["attn_mask"], ctx.args["is_causal"], scale)
        Sr = attention_scores(qr, kr, ctx.ref["attn_mask"], ctx.ref["is_causal"], scale)
        Ar = torch.softmax(Sr, dim=-1).nan_to_num(0.0)
        ratio = ctx.per_change()
        r_v = (v - vr) * ((A + Ar).transpose(-2, -1) @ ratio) / 2
        mult_a = ratio @ ((v + vr) / 2).transpose(-2, -1)
        mult_s = softmax_multiplier(S, Sr, A, Ar, mult_a) * scale
        r_q = (q - qr) * (mult_s @ ((k + kr) / 2))
        r_k = (k - kr) * (mult_s.transpose(-2, -1) @ ((q + qr) / 2))
        sink = (ctx.R - ratio * (A @ v - Ar @ vr)).sum(-1)
        return _regroup(ctx, r_q, r_k, r_v, groups), sink


def _operands(ctx: Ctx) -> tuple[Tensor, Tensor, Tensor, int]:
    """Q, K, V with K and V repeated to Q's heads, and the group size."""
    a = ctx.args
    q, k, v = a["query"], a["key"], a["value"]
    if a.get("enable_gqa") and k.shape[-3] != q.shape[-3]:
        groups = q.shape[-3] // k.shape[-3]
        return q, k.repeat_interleave(groups, dim=-3), v.repeat_interleave(groups, dim=-3), groups
    return q, k, v, 1


def _weights(ctx: Ctx, q: Tensor, k: Tensor) -> Tensor:
    a = ctx.args
    return attention_weights(q, k, a["attn_mask"], a["is_causal"], a["scale"])


def _regroup(ctx: Ctx, r_q: Tensor, r_k: Tensor, r_v: Tensor, groups: int) -> dict[str, Tensor]:
    """Relevance of the repeated K and V summed back over each group, and of operands the
    matmuls broadcast (one K or V head for all query heads) summed over what they met."""
    if groups > 1:
        r_k, r_v = (r.unflatten(-3, (r.shape[-3] // groups, groups)).sum(-3) for r in (r_k, r_v))
    r = {"query": r_q, "key": r_k, "value": r_v}
    return {n: unbroadcast(t, ctx.args[n].shape) for n, t in r.items()}


def _scale(scale: float | None, q: Tensor) -> float:
    return q.shape[-1] ** -0.5 if scale is None else scale


def softmax_multiplier(S: Tensor, Sr: Tensor, A: Tensor, Ar: Tensor, mult: Tensor) -> Tensor:
    """Multiplier of the scores S, given the multiplier ``mult`` of A = softmax(S) (last dim).

    Exactly A - A' = diag(m) (I - 1 w^T) (S - S'), with m = (A - A') / (log A - log A'), the
    exp's ratio of differences (A where they vanish), and w = m / sum(m): both A and A' sum
    to 1. The multiplier of S is that map's transpose applied to ``mult``. Masked positions
    (A = A' = 0) get nothing."""
    live = (A > 0) | (Ar > 0)
    dlog = torch.where(live, torch.log_softmax(S, -1) - torch.log_softmax(Sr, -1), 0.0)
    dlog = dlog.nan_to_num(0.0, 0.0, 0.0)
    m = torch.where(dlog.abs() > 1e-6, (A - Ar) / torch.where(dlog == 0, 1.0, dlog), (A + Ar) / 2)
    m = torch.where(live, m, 0.0)
    w = m / (m.sum(-1, keepdim=True) + TINY)
    mm = mult * m
    return mm - w * mm.sum(-1, keepdim=True)


def attention_scores(q: Tensor, k: Tensor, mask: Tensor | None, causal: bool, scale) -> Tensor:
    """q k^T * scale + mask (masked positions -inf), as scaled_dot_product_attention does."""
    scores = (q @ k.transpose(-2, -1)) * scale
    if causal:
        tq, tk = scores.shape[-2:]
        keep = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)
        scores = scores.masked_fill(~keep, float("-inf"))
    if mask is not None:
        scores = (
            scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        )
    return scores


def attention_weights(q: Tensor, k: Tensor, mask: Tensor | None, causal: bool, scale) -> Tensor:
    """softmax(q k^T * scale + mask), as scaled_dot_product_attention computes it."""
    return torch.softmax(attention_scores(q, k, mask, causal, _scale(scale, q)), dim=-1).nan_to_num(
        0.0
    )
