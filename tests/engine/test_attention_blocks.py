"""The attention rule computed a block of queries at a time (``rules.attention.score_sweep``)
equals the rule written out whole, with [seeds, heads, queries, keys] tensors, to 1e-5 in
every mode: whatever the block size, with causal and padding masks, grouped and broadcast
K/V heads, and seeds without relevance past their position (a generation step's). The
blocks skip the keys after their last query and the seeds without relevance there."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.rules import TINY, attention_weights
from engine.rules.attention import Attention, attention_scores, plan_blocks, softmax_slopes
from tests.engine.test_rules import conserved, ctx_of, rand

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default


def full_default(q, k, v, mask, causal, R):
    """The default rule with the whole per-seed score matrices, as it was first written."""
    A = attention_weights(q, k, mask, causal, None)
    av = v.abs()
    ratio = R / (2 * (A @ av + TINY))
    r_v, r_a = av * (A.mT @ ratio), A * (ratio @ av.mT)
    aq, ak = q.abs(), k.abs()
    ratio_qk = r_a / (2 * (aq @ ak.mT + TINY))
    r_q, r_k = aq * (ratio_qk @ ak), ak * (ratio_qk.mT @ aq)
    sink = (ratio * (2 * TINY)).sum(-1) + (ratio_qk * (2 * TINY)).sum(-1)
    return {"query": r_q, "key": r_k, "value": r_v}, sink


def full_reference(q, k, v, qr, kr, vr, mask, causal, R, y, yr):
    """Mode "reference" with the whole per-seed score matrices."""
    scale = q.shape[-1] ** -0.5
    S, Sr = (attention_scores(a, b, mask, causal, scale) for a, b in ((q, k), (qr, kr)))
    A, Ar = (torch.softmax(s, -1).nan_to_num(0.0) for s in (S, Sr))
    ratio = R / (y - yr + torch.where(y - yr >= 0, 1e-6, -1e-6))
    m, w = softmax_slopes(S, Sr, A, Ar)
    mm = (ratio @ ((v + vr) / 2).mT) * m
    mult_s = (mm - w * mm.sum(-1, keepdim=True)) * scale
    r_v = (v - vr) * ((A + Ar).mT @ ratio) / 2
    r_q = (q - qr) * (mult_s @ ((k + kr) / 2))
    r_k = (k - kr) * (mult_s.mT @ ((q + qr) / 2))
    return {"query": r_q, "key": r_k, "value": r_v}, (R - ratio * (A @ v - Ar @ vr)).sum(-1)


def case(heads_kv: int, mask_kind: str, T: int = 11, K: int = 4, seed: int = 0):
    """Q [2, 4, T, 8], K and V with ``heads_kv`` heads, a mask, and K seeds of which seed i
    has relevance only at positions <= T - K + i (as a generation step's)."""
    q = rand(2, 4, T, 8, seed=seed)
    k, v = rand(2, heads_kv, T, 8, seed=seed + 1), rand(2, heads_kv, T, 8, seed=seed + 2)
    qr, kr, vr = (t + 0.3 * rand(*t.shape, seed=seed + 3 + i) for i, t in enumerate((q, k, v)))
    R = rand(K, 2, 4, T, 8, seed=seed + 9)
    R = R * (torch.arange(T) <= (T - K + torch.arange(K))[:, None])[:, None, None, :, None]
    causal, mask = mask_kind == "causal", None
    if mask_kind != "causal":  # left padding of 3 in row 1, and causal, as a mask tensor
        keep = torch.ones(T, T, dtype=torch.bool).tril()[None, None].repeat(2, 1, 1, 1)
        keep[1, ..., :3] = False
        keep[1, 0, :3, :3] = torch.eye(3, dtype=torch.bool)  # padded queries see themselves
        mask = keep if mask_kind == "bool" else torch.where(keep, 0.0, float("-inf"))
    return q, k, v, qr, kr, vr, mask, causal, R


def args_of(q, k, v, mask, causal):
    gqa = k.shape[1] not in (1, q.shape[1])
    return {"query": q, "key": k, "value": v, "attn_mask": mask, "dropout_p": 0.0,
            "is_causal": causal, "scale": None, "enable_gqa": gqa}  # fmt: skip


def regrouped(grads, k):
    """The whole rule's relevance of repeated K and V heads, summed back to K's heads."""
    out = dict(grads)
    for name in ("key", "value"):
        g = grads[name]
        if g.shape[2] != k.shape[1]:
            g = g.unflatten(2, (k.shape[1], -1)).sum(3)
        out[name] = g
    return out


def expanded(q, k, v):
    groups = q.shape[1] // k.shape[1]
    return q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)


@pytest.mark.parametrize("block", [1, 37, 2**23])
@pytest.mark.parametrize("heads_kv,mask_kind", [(4, "causal"), (2, "bool"), (1, "additive")])
def test_blockwise_default_equals_the_whole_rule(monkeypatch, block, heads_kv, mask_kind):
    monkeypatch.setattr("engine.rules.attention.BLOCK_ELEMENTS", block)
    q, k, v, _, _, _, mask, causal, R = case(heads_kv, mask_kind)
    grads, sink = Attention().default(
        ctx_of(SDPA, args_of(q, k, v, mask, causal), R, data={"query", "key", "value"})
    )
    expected, expected_sink = full_default(*expanded(q, k, v), mask, causal, R)
    for name, g in regrouped(expected, k).items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-5 * g.abs().max())
    torch.testing.assert_close(sink, expected_sink, rtol=1e-5, atol=1e-5 * sink.abs().max())
    conserved(R, grads, sink)


@pytest.mark.parametrize("block", [1, 37, 2**23])
@pytest.mark.parametrize("heads_kv,mask_kind", [(4, "causal"), (2, "bool")])
def test_blockwise_reference_equals_the_whole_rule(monkeypatch, block, heads_kv, mask_kind):
    monkeypatch.setattr("engine.rules.attention.BLOCK_ELEMENTS", block)
    q, k, v, qr, kr, vr, mask, causal, R = case(heads_kv, mask_kind, seed=3)
    args = args_of(q, k, v, mask, causal)
    ref = {**args, "query": qr, "key": kr, "value": vr}
    gqa = args["enable_gqa"]
    y, yr = (F.scaled_dot_product_attention(a, b, c, mask, is_causal=causal, enable_gqa=gqa)
             for a, b, c in ((q, k, v), (qr, kr, vr)))  # fmt: skip
    ctx = ctx_of(SDPA, args, R, ref=ref, out=y, ref_out=yr)
    grads, sink = Attention().reference(ctx)
    expected, expected_sink = full_reference(
        *expanded(q, k, v), *expanded(qr, kr, vr), mask, causal, R, y, yr
    )
    for name, g in regrouped(expected, k).items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-5 * g.abs().max())
    torch.testing.assert_close(sink, expected_sink, rtol=1e-5, atol=1e-5 * sink.abs().max())


def test_blocks_skip_future_keys_and_seeds_without_relevance(monkeypatch):
    """Causal weights over 12 positions in blocks of 3 queries: block i reaches keys up to
    its last query only; seed j, with relevance at positions <= 8 + j, is left out of the
    blocks after it, and the last block, which no seed reaches, is left out."""
    T, K = 12, 3
    monkeypatch.setattr("engine.rules.attention.BLOCK_ELEMENTS", 3 * T * K * 2)
    A = attention_weights(rand(1, 2, T, 4), rand(1, 2, T, 4, seed=1), None, True, None)
    live = torch.arange(T) <= (8 + torch.arange(K))[:, None]
    blocks = plan_blocks(A, live)
    assert [(b.rows.start, b.rows.stop, b.cols.start, b.cols.stop) for b in blocks] == [
        (0, 3, 0, 3), (3, 6, 0, 6), (6, 9, 0, 9), (9, 12, 0, 12),
    ]  # fmt: skip
    assert [b.seeds for b in blocks[:3]] == [None] * 3
    assert blocks[3].seeds.tolist() == [1, 2]  # seed 0 ends at position 8
    assert plan_blocks(A, live & (torch.arange(T) < 9)) == blocks[:3]
