"""scaled_dot_product_attention, as the ops it is made of: O = A V with
A = softmax(Q K^T * scale + mask).

In every mode the rule has one shape: per seed, a multiplier of each (query, key) score, from
which Q and K get their relevance by two products, and V by one product with the attention
weights. The per-seed score multipliers are never held whole ([seeds, heads, queries, keys]
was most of a long prompt's sweep memory): ``score_sweep`` computes them a block of queries at
a time, as fused attention kernels never hold the score matrix, over only the keys those
queries attend to (causality: a block's keys end at its last query) and only for the seeds
with relevance at those queries (a generation step's seed has none past its position).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import TINY, Ctx, Family, Propagation, unbroadcast

aten = torch.ops.aten

# Elements of one block of per-seed score multipliers [*heads, queries, seeds, keys]: 32 MB
# in float32. ``engine.memory`` counts two such blocks (the block and its temporaries) as
# fixed memory of a sweep.
BLOCK_ELEMENTS = 2**23


class Attention(Family):
    """A V is a product of two data operands: half of R to A and half to V, each by the |z|
    rule with the other held fixed, R_V[k, d] = 1/2 sum_q |A_qk V_kd| R_q[d] / sum_k' |A_qk'
    V_k'd|. The softmax passes R_A on unchanged, as every activation does, and Q K^T is again
    a product of two data operands: half to Q, half to K; where a float mask adds a bias to
    the scores (ALiBi), the bias's share of each score is a sink, as where an add meets any
    constant (``_product_share``). Masked and future positions have
    A = 0 and get nothing. The faithfulness benchmark chose this over giving V everything
    (bench/README.md). Grouped-query attention: K and V are repeated per group, and their
    relevance summed back over the group."""

    ops = (aten.scaled_dot_product_attention.default,)
    maps = True

    def default(self, ctx: Ctx) -> Propagation:
        """The two product rules as matmuls (A >= 0; the softmax scale cancels in the |z|
        shares of Q K^T). With ratio = R / (2 (A |V| + TINY)): R_V = |V| (A^T ratio), and per
        score R_A = A (ratio |V|^T), split by ratio_qk = R_A / (2 (|Q| |K|^T + TINY)), so
        the score multiplier is M (ratio |V|^T) with M = A / (2 (|Q| |K|^T + TINY)) shared
        by the seeds; R_Q = |Q| (ratio_qk |K|) and R_K = |K| (ratio_qk^T |Q|)."""
        q, k, v, groups = _operands(ctx)
        A = _weights(ctx, q, k)
        aq, ak, av = q.abs(), k.abs(), v.abs()
        M = torch.div(A, (aq @ ak.mT).add_(TINY).mul_(2))
        # what the shares withhold, per unit of ratio: R * 2 TINY / (2 D) for each half
        # (ratio_qk summed over the keys is ratio . (M |V|))
        withheld = (M @ av + 1).mul_(2 * TINY)
        share = _product_share(ctx, q, k)
        if share is not None:  # a bias in the scores: its share of R_A is a sink
            M.mul_(share)
            withheld.add_((A * (1 - share)) @ av)
        ratio = seeds_inside(ctx.R / (2 * (A @ av + TINY)))
        mult_q, mult_k, mult_v = score_sweep(
            ratio, av, A, aq, ak, lambda S, b: S.mul_(M[..., b.rows, None, b.cols])
        )
        sink = (ratio @ withheld[..., None]).squeeze(-1).movedim(-1, 0)
        return _regroup(ctx, aq * mult_q, ak * mult_k, av * mult_v, groups), sink

    def reference(self, ctx: Ctx) -> Propagation:
        """Multipliers (relevance per unit of change) from the output back: A V - A' V' split
        exactly between the change of A and of V; the softmax by its exact linearisation
        (``softmax_slopes``); Q K^T - Q' K'^T split like A V."""
        q, k, v, groups = _operands(ctx)
        A = _weights(ctx, q, k)
        qr, kr, vr, _ = _operands(replace(ctx, args=ctx.ref))
        scale = _scale(ctx.ref["scale"], q)
        S = attention_scores(q, k, ctx.args["attn_mask"], ctx.args["is_causal"], scale)
        Sr = attention_scores(qr, kr, ctx.ref["attn_mask"], ctx.ref["is_causal"], scale)
        Ar = torch.softmax(Sr, dim=-1).nan_to_num(0.0)
        m, w = softmax_slopes(S, Sr, A, Ar)
        del S, Sr
        ratio = seeds_inside(ctx.per_change())

        def scores_of(mult_a: Tensor, b: Block) -> Tensor:
            mult_a.mul_(m[..., b.rows, None, b.cols])
            return mult_a.sub_(w[..., b.rows, None, b.cols] * mult_a.sum(-1, keepdim=True))

        mult_q, mult_k, mult_v = score_sweep(
            ratio, (v + vr) / 2, (A + Ar) / 2, (q + qr) / 2, (k + kr) / 2, scores_of
        )
        r_q, r_k = (q - qr) * mult_q * scale, (k - kr) * mult_k * scale
        sink = (ctx.R - ratio.movedim(-2, 0) * (A @ v - Ar @ vr)).sum(-1)
        return _regroup(ctx, r_q, r_k, (v - vr) * mult_v, groups), sink


class Softmax(Family):
    """A softmax (``dim``): attention weights written out as matmul / softmax / matmul, a
    softmax over features. Mode "default": R passes on unchanged, as every activation does
    and as ``Attention`` passes it through its softmax. Modes "reference" and "contrast": the
    exact linearisation between the two inputs (``softmax_slopes``), which ``Attention``'s
    reference rule uses too, so written-out attention gets the fused op's relevance in every
    mode."""

    ops = (aten.softmax.int, aten._softmax.default)
    default = Family.identity

    def reference(self, ctx: Ctx) -> Propagation:
        dim = ctx.args["dim"] % ctx.out.dim()
        both = (ctx.x, ctx.ref[ctx.first], ctx.out, ctx.ref_out)
        S, Sr, A, Ar = (t.movedim(dim, -1) for t in both)
        m, _ = softmax_slopes(S, Sr, A, Ar)
        # a score masked in one pass only (a mask computed from the data) changed without
        # bound: no slope there, and what its weight's change carried is a sink
        m = torch.where(S.isfinite() & Sr.isfinite(), m, 0.0)
        w = m / (m.sum(-1, keepdim=True) + TINY)
        mult = ctx.per_change().movedim(dim + 1, -1)  # R's leading axis is the seeds'
        mm = mult * m
        mult_s = mm - w * mm.sum(-1, keepdim=True)
        r_s = torch.where(m != 0, (S - Sr) * mult_s, 0.0)
        sink = ctx.R.movedim(dim + 1, -1).sum(-1) - r_s.sum(-1)  # [K, *out without dim]
        return {ctx.first: r_s.movedim(-1, dim + 1)}, sink


@dataclass(frozen=True)
class Block:
    """Query positions ``rows``, the keys ``cols`` any of them attends to, and the seeds with
    relevance at those queries (``None``: all of them)."""

    rows: slice
    cols: slice
    seeds: Tensor | None


def plan_blocks(weights: Tensor, live: Tensor) -> list[Block]:
    """Blocks of queries, each of at most ``BLOCK_ELEMENTS`` per-seed scores. ``weights``
    [*heads, Tq, Tk] is zero where a query does not attend to a key (masked, future), ``live``
    [K, Tq] says where each seed has relevance. Blocks whose queries attend to nothing or that
    no seed reaches are left out: all their products are zero. One transfer to the host."""
    K, Tq = live.shape
    Tk = weights.shape[-1]
    size = max(1, BLOCK_ELEMENTS // (weights[..., 0, 0].numel() * K * Tk))
    n = -(-Tq // size)
    attends = weights.ne(0).reshape(-1, Tq, Tk).any(0)
    attends = F.pad(attends, (0, 0, 0, n * size - Tq)).view(n, size, Tk).any(1)  # [n, Tk]
    reached = F.pad(live, (0, n * size - Tq)).view(K, n, size).any(2).T  # [n, K]
    at = torch.arange(Tk, device=weights.device)
    first = torch.where(attends, at, Tk).amin(1)
    last = torch.where(attends, at, -1).amax(1) + 1
    first, last, reached = first.tolist(), last.tolist(), reached.cpu()
    blocks = []
    for i in range(n):
        if first[i] >= last[i] or not reached[i].any():
            continue
        seeds = None if reached[i].all() else reached[i].nonzero()[:, 0].to(weights.device)
        rows = slice(i * size, min((i + 1) * size, Tq))
        blocks.append(Block(rows, slice(first[i], last[i]), seeds))
    return blocks


def seeds_inside(R: Tensor) -> Tensor:
    """[K, *heads, T, f] -> [*heads, T, K, f], contiguous (``R`` itself where it already is:
    not to be written to): the layout ``score_sweep`` takes, in which a block of positions
    holds all its seeds' rows together."""
    return R.movedim(0, -2).contiguous()


def score_sweep(
    X: Tensor,
    Y: Tensor,
    mix: Tensor,
    left: Tensor,
    right: Tensor,
    scores_of: Callable[[Tensor, Block], Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    """The multipliers of Q, K and V from X [*heads, Tq, K, c] (``seeds_inside``), without
    [K, heads, Tq, Tk].

    Per block, the score multipliers S = scores_of(X Y^T) [*heads, rows, seeds, keys] (in
    place), and: mult_q = S right, mult_k = S^T left (summed over the blocks), mult_v = mix^T
    X. The seeds ride inside each block's rows, so each product is one large matmul per head.
    Results are [K, *heads, T, features]."""
    heads, (Tq, K, c), Tk = X.shape[:-3], X.shape[-3:], Y.shape[-2]
    live = X.ne(0).any(-1).reshape(-1, Tq, K).any(0).T
    out_q = X.new_zeros(*heads, Tq, K, right.shape[-1])
    out_k = X.new_zeros(*heads, K, Tk, left.shape[-1])
    out_v = X.new_zeros(*heads, Tk, K, c)
    for b in plan_blocks(mix, live):
        x = X[..., b.rows, :, :]
        if b.seeds is not None:
            x = x.index_select(-2, b.seeds)
        rows, n = x.shape[-3:-1]
        S = (x.reshape(*heads, rows * n, c) @ Y[..., b.cols, :].mT).view(*heads, rows, n, -1)
        S = scores_of(S, b)
        cols = S.shape[-1]
        q_part = (S.view(*heads, rows * n, cols) @ right[..., b.cols, :]).view(*heads, rows, n, -1)
        k_part = (S.view(*heads, rows, n * cols).mT @ left[..., b.rows, :]).view(
            *heads, n, cols, -1
        )
        v_part = mix[..., b.rows, b.cols].mT @ x.reshape(*heads, rows, n * c)
        _add(out_q[..., b.rows, :, :], q_part, b.seeds, -2)
        _add(out_k[..., b.cols, :], k_part, b.seeds, -3)
        _add(out_v[..., b.cols, :, :], v_part.view(*heads, cols, n, c), b.seeds, -2)
    return out_q.movedim(-2, 0), out_k.movedim(-3, 0), out_v.movedim(-2, 0)


def _add(out: Tensor, part: Tensor, seeds: Tensor | None, axis: int) -> None:
    """Add ``part`` into ``out`` at ``seeds`` along the seed ``axis`` (all seeds: None)."""
    if seeds is None:
        out.add_(part)
    else:
        out.index_add_(axis, seeds, part)


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


def _product_share(ctx: Ctx, q: Tensor, k: Tensor) -> Tensor | None:
    """Where a float ``attn_mask`` adds a finite bias to the scores (ALiBi, learned relative
    positions), the share of each score that Q K^T * scale carries, |S| / (|S| + |bias|):
    the bias is a constant, and an add gives a constant's share to a sink, as the add of
    attention written out does (``rules.elementwise.Add``). None where no mask adds a bias
    (none, a boolean one, or one of 0 and -inf)."""
    mask = ctx.args["attn_mask"]
    if mask is None or mask.dtype == torch.bool:
        return None
    bias = torch.where(mask.isfinite(), mask.abs(), 0.0)  # -inf: masked, A = 0 there
    if not bool(bias.any()):
        return None
    s = (q @ k.mT).abs_().mul_(abs(_scale(ctx.args["scale"], q)))
    return s / (s + bias + TINY)


def _regroup(ctx: Ctx, r_q: Tensor, r_k: Tensor, r_v: Tensor, groups: int) -> dict[str, Tensor]:
    """Relevance of the repeated K and V summed back over each group, and of operands the
    matmuls broadcast (one K or V head for all query heads) summed over what they met."""
    if groups > 1:
        r_k, r_v = (r.unflatten(-3, (r.shape[-3] // groups, groups)).sum(-3) for r in (r_k, r_v))
    r = {"query": r_q, "key": r_k, "value": r_v}
    return {n: unbroadcast(t, ctx.args[n].shape) for n, t in r.items()}


def _scale(scale: float | None, q: Tensor) -> float:
    return q.shape[-1] ** -0.5 if scale is None else scale


def softmax_slopes(S: Tensor, Sr: Tensor, A: Tensor, Ar: Tensor) -> tuple[Tensor, Tensor]:
    """The exact linearisation of A = softmax(S) (last dim) between two inputs: the
    multiplier of S, given the multiplier ``mult`` of A, is ``mm - w sum(mm)`` with
    ``mm = mult m``.

    Exactly A - A' = diag(m) (I - 1 w^T) (S - S'), with m = (A - A') / (log A - log A'), the
    exp's ratio of differences (A where they vanish), and w = m / sum(m): both A and A' sum
    to 1; the multiplier is that map's transpose applied to ``mult``. Masked positions
    (A = A' = 0) have m = w = 0 and get nothing."""
    live = (A > 0) | (Ar > 0)
    dlog = torch.where(live, torch.log_softmax(S, -1) - torch.log_softmax(Sr, -1), 0.0)
    dlog = dlog.nan_to_num(0.0, 0.0, 0.0)
    m = torch.where(dlog.abs() > 1e-6, (A - Ar) / torch.where(dlog == 0, 1.0, dlog), (A + Ar) / 2)
    m = torch.where(live, m, 0.0)
    return m, m / (m.sum(-1, keepdim=True) + TINY)


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
