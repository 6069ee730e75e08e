"""One relevance rule per op.

A rule receives the relevance ``R`` of a node's output, shaped ``[K, *output.shape]`` (``K``
seeds swept at once), and the values recorded in the forward pass. It returns the relevance
of each tensor argument (by schema name) and the part of ``R`` that stays behind (bias and
constant shares: the sinks of the conservation report), shaped like ``R`` or reduced over
trailing non-batch axes; the sweep sums it per sample.

Mode ``"default"`` is the |z| rule of Backtrace: contributions ``|x_k w_jk|`` share ``R_j`` in
proportion, ``|b_j|`` takes the rest. Mode ``"contrast"`` uses signed contributions over the
same denominator, so opposing evidence comes out negative; what the signed shares do not
pass on is reported as sink.

Mode ``"reference"`` explains the change from a reference input (``ctx.ref``: the same op's
arguments in the reference's forward pass), as DeepLIFT's rescale rule does: a map linear in
``x`` shares ``R_j`` by the contributions of the difference, ``w_jk (x_k - x'_k)``, over their
sum ``y_j - y'_j`` (the bias cancels); a product of two data operands splits exactly,
``ab - a'b' = (a - a')(b + b')/2 + (a + a')/2 (b - b')``; activations pass relevance on, so
their ratio of differences becomes the multiplier. Relevance is signed; what a stabilised
denominator withholds is the sink, and so is what rounding leaves between a rule's sum of
contributions and the change of its output (``Ctx.per_change``).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx

aten = torch.ops.aten
MODES = ("default", "contrast", "reference")


@dataclass
class Ctx:
    """What a rule sees of one node."""

    node: fx.Node
    args: dict[str, Any]
    out: Any
    R: Any
    mode: str
    is_data: Callable[..., bool]
    abs_of: Callable[[Tensor], Tensor]
    bias_term: Callable[[Tensor | None, int, Tensor], Tensor]
    ref: dict[str, Any] | None = None  # the arguments in the reference's forward (mode "reference")
    ref_out: Any = None  # the output in the reference's forward

    @property
    def first(self) -> str:
        """Name of the op's first argument (``self`` or ``input`` in ATen schemas)."""
        return next(iter(self.args))

    @property
    def x(self) -> Tensor:
        return self.args[self.first]

    @property
    def signed(self) -> bool:
        return self.mode == "contrast"

    @property
    def K(self) -> int:
        return self.R.shape[0]

    @property
    def delta(self) -> bool:
        return self.mode == "reference"

    def diff(self, name: str, index: int | None = None) -> Tensor:
        """Argument ``name`` minus its value in the reference's forward pass."""
        x, r = self.args[name], self.ref[name]
        return x - r if index is None else x[index] - r[index]

    def per_change(self) -> Tensor:
        """Mode "reference": R per unit of the output's change y - y', taken as the two forward
        passes computed it. That is what the consumers shared R by (their ``diff``), so the
        ratio stays bounded by theirs. A rule's own sum of contributions equals it in exact
        arithmetic, but not after rounding: in half precision, or with TF32 on a GPU, it can
        be near 0 where y - y' is not, and dividing by it blew relevance up by 1e11. The
        difference between the two becomes a sink instead."""
        return self.R / stable(self.out - self.ref_out)


Propagation = tuple[dict[str, Any], Tensor | None]
Rule = Callable[[Ctx], Propagation]
RULES: dict[Any, Rule] = {}


def rule(*targets: Any) -> Callable[[Rule], Rule]:
    def register(fn: Rule) -> Rule:
        for target in targets:
            RULES[target] = fn
        return fn

    return register


# Added to every denominator. R / D stays finite where D = 0 (no contribution at all, so no
# input can take a share: 0 * R / TINY = 0), and the share R * TINY / D withheld from the
# inputs is then all of R, reported as a sink; where D > 0 it is below float precision.
# It also lets the |b| + TINY term ride inside the matmul or convolution as its bias.
TINY = 1e-20


# Stabiliser of the signed denominators of mode "reference": y - y' -> y - y' +- EPS. Where
# the difference vanishes, its relevance (which then is about as small) becomes a sink.
EPS = 1e-6


def stable(z: Tensor) -> Tensor:
    return z + torch.where(z >= 0, EPS, -EPS)


def _delta_linear(ctx: Ctx, dx: Tensor, f: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    """Mode "reference" for the op, a map ``f`` linear in ``x`` (bias left out: it cancels):
    R_in = dx * f^T(R / dy), and the sink R - (R / dy) f(dx)."""
    ratio = ctx.per_change()
    return dx * _vjp(f, dx, ratio), ctx.R - ratio * f(dx)


def _delta_product(ctx: Ctx, f: Callable, a: Tensor, b: Tensor, ar: Tensor, br: Tensor):
    """Mode "reference" for the op, a product of two data operands, split exactly:
    f(a, b) - f(a', b') = f(a - a', (b + b') / 2) + f((a + a') / 2, b - b')."""
    da, db, ma, mb = a - ar, b - br, (a + ar) / 2, (b + br) / 2
    ratio = ctx.per_change()
    r_a = da * _vjp(lambda u: f(u, mb), da, ratio)
    r_b = db * _vjp(lambda v: f(ma, v), db, ratio)
    return r_a, r_b, ctx.R - ratio * (f(a, b) - f(ar, br))


def _unbroadcast(r: Tensor, shape: torch.Size) -> Tensor:
    """Sum relevance over dimensions an operand was broadcast along (``r`` has a leading K)."""
    extra = r.dim() - 1 - len(shape)
    if extra:
        r = r.sum(dim=tuple(range(1, 1 + extra)))
    dims = tuple(i + 1 for i, n in enumerate(shape) if n == 1 and r.shape[i + 1] != 1)
    return r.sum(dim=dims, keepdim=True) if dims else r


def _fold(t: Tensor) -> Tensor:
    """[K, B, ...] -> [K*B, ...] for ops that only take one batch dimension."""
    return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])


def _vjp(fn: Callable[[Tensor], Tensor], x: Tensor, R: Tensor) -> Tensor:
    """Adjoint of the linear map ``fn`` applied to each of the K relevance maps."""
    _, pullback = torch.func.vjp(fn, x)
    return torch.func.vmap(lambda r: pullback(r)[0])(R)


def _proportional(
    ctx: Ctx, R: Tensor, x: Tensor, f_abs: Callable, f_signed: Callable, bias=None
) -> tuple[Tensor, Tensor]:
    """The |z| rule for any map linear in ``x``: ``f_abs`` applies the map with |weights|.

    D = f_abs(|x|) + |b|;  R_in = |x| * f_abs^T(R / D)   (contrast: x * f^T(R / D)).
    What the contributions do not account for (bias share, or cancellation in contrast mode)
    is returned as sink: R - (R / D) * Z with Z the sum of the propagated contributions.
    """
    ax = x.abs()
    extra = bias.abs() + TINY if bias is not None else TINY
    ratio = R / (f_abs(ax) + extra)
    if ctx.signed:
        return x * _vjp(f_signed, x, ratio), R - ratio * f_signed(x)
    # the contributions add up to D - extra, so exactly R - ratio * (D - extra) stays behind
    return ax * _vjp(f_abs, ax, ratio), ratio * extra


# ---------------------------------------------------------------- weighted maps


def _dense(ctx: Ctx, x: Tensor, w: Tensor, aw: Tensor, extra: Tensor) -> Propagation:
    """The |z| rule of y = x W^T + b in two matrix products: D = |X||W|^T + |b|,
    R_in = |X| * ((R / D) |W|). ``aw`` is |W| and ``extra`` is |b| + TINY."""
    ax = ctx.abs_of(x)
    ratio = ctx.R / F.linear(ax, aw, extra)
    if ctx.signed:
        return x * (ratio @ w), ctx.R - ratio * F.linear(x, w)
    return ax * (ratio @ aw), ratio @ extra


def _delta_dense(ctx: Ctx, dx: Tensor, w: Tensor, name: str = "input") -> Propagation:
    """Mode "reference" of y = x W^T + b: R_in = dX * ((R / (dX W^T)) W)."""
    ratio = ctx.per_change()
    return {name: dx * (ratio @ w)}, ctx.R - ratio * F.linear(dx, w)


@rule(aten.linear.default)
def linear(ctx: Ctx) -> Propagation:
    x, w, b = ctx.args["input"], ctx.args["weight"], ctx.args["bias"]
    if ctx.delta:
        act = _activation_after(ctx.node)
        if act is not None:
            bwd = lambda ratio, weight: ratio @ weight  # noqa: E731
            return _reveal_cancel(ctx, ctx.diff("input"), w, F.linear, bwd, act)
        return _delta_dense(ctx, ctx.diff("input"), w)
    r_in, sink = _dense(ctx, x, w, ctx.abs_of(w), ctx.bias_term(b, w.shape[0], x))
    return {"input": r_in}, sink


@rule(aten.addmm.default)
def addmm(ctx: Ctx) -> Propagation:
    """b + x @ W, as GPT-2's Conv1D writes a linear layer."""
    x, w, b = ctx.args["mat1"], ctx.args["mat2"], ctx.args["self"]
    if ctx.delta:  # a data-shaped bias is held fixed: its change is not explained
        return _delta_dense(ctx, ctx.diff("mat1"), w.t(), "mat1")
    if b.dim() > 1:  # a per-row bias is data-shaped: not a linear layer's bias
        r_in, sink = _proportional(ctx, ctx.R, x, lambda u: u @ w.abs(), lambda u: u @ w, bias=b)
    else:
        r_in, sink = _dense(ctx, x, w.t(), ctx.abs_of(w).t(), ctx.bias_term(b, w.shape[1], x))
    return {"mat1": r_in}, sink


def grouped_mm(ctx: Ctx) -> Propagation:
    """Mixture-of-experts expert matmuls: rows (token, expert pairs) sorted by expert, row i
    multiplied by its expert's weight W_e ([E, in, out]), ``offs`` the cumulative row counts.

    The |z| rule per row, with the op itself for both products: D = gmm(|X|, |W|), and the
    backward gmm(R / D, |W|^T). The K seeds ride along as extra rows: seed-major rows become
    row-major blocks of K, so the expert offsets scale by K. Mode "reference": the same with
    the rows' changes, z = gmm(dX, W); its reference forward routes as the input did
    (``sweep.forward``'s ``routed``), so row i is the same token and expert in both.
    """
    first, second, third = list(ctx.args)[:3]
    x, w, offs = ctx.args[first], ctx.args[second], ctx.args[third]
    gmm = ctx.node.target

    def backward(ratio: Tensor, weight: Tensor, source: Tensor) -> Tensor:
        K, S = ratio.shape[:2]
        rows = ratio.transpose(0, 1).reshape(S * K, -1)
        back = gmm(rows, weight.transpose(1, 2).contiguous(), offs * K)
        return source * back.view(S, K, -1).transpose(0, 1)

    if ctx.delta:  # the reference forward used the input's experts: rows line up
        if not torch.equal(ctx.ref[third], offs):
            raise NotImplementedError(
                f'mode "reference" at {ctx.node.name}: the reference routed tokens to other'
                " experts (routing not by topk, which the reference forward holds fixed)"
            )
        dx = ctx.diff(first)
        ratio = ctx.per_change()
        return {first: backward(ratio, w, dx)}, ctx.R - ratio * gmm(dx, w, offs)
    ax, aw = x.abs(), w.abs()
    ratio = ctx.R / (gmm(ax, aw, offs) + TINY)
    if ctx.signed:
        return {first: backward(ratio, w, x)}, ctx.R - ratio * gmm(x, w, offs)
    return {first: backward(ratio, aw, ax)}, ratio * TINY


def register_grouped_mm() -> None:
    """The grouped matmul ops exist only once torch (or transformers) registered them."""
    for namespace, name in (("aten", "_grouped_mm"), ("transformers", "grouped_mm_fallback")):
        packet = getattr(getattr(torch.ops, namespace, None), name, None)
        if packet is not None and packet.default not in RULES:
            RULES[packet.default] = grouped_mm


_CONV = {1: (F.conv1d, F.conv_transpose1d), 2: (F.conv2d, F.conv_transpose2d)}


@rule(aten.conv1d.default, aten.conv2d.default)
def conv(ctx: Ctx) -> Propagation:
    """The |z| rule for convolutions of any stride, padding, dilation and groups: the backward
    pass is a transposed convolution with |W| and the same geometry."""
    a = ctx.args
    x, w, b = a["input"], a["weight"], a["bias"]
    spatial = w.dim() - 2
    conv_fn, transposed = _CONV[spatial]
    stride, pad, dil = (_expand(a[k], spatial) for k in ("stride", "padding", "dilation"))
    groups = a["groups"]
    # output_padding recovers input sizes that a strided conv rounded down
    out_pad = [
        x.shape[2 + i]
        - ((ctx.R.shape[3 + i] - 1) * stride[i] - 2 * pad[i] + dil[i] * (w.shape[2 + i] - 1) + 1)
        for i in range(spatial)
    ]
    K = ctx.K

    def forward(u: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        return conv_fn(u, weight, bias, stride, pad, dil, groups)

    def backward(ratio: Tensor, weight: Tensor) -> Tensor:
        back = transposed(_fold(ratio), weight, None, stride, pad, out_pad, groups, dil)
        return back.view(K, *x.shape)

    if ctx.delta:
        dx = ctx.diff("input")
        act = _activation_after(ctx.node)
        if act is not None:
            return _reveal_cancel(ctx, dx, w, forward, backward, act)
        ratio = ctx.per_change()
        return {"input": dx * backward(ratio, w)}, ctx.R - ratio * forward(dx, w)
    aw, extra = ctx.abs_of(w), ctx.bias_term(b, w.shape[0], x)
    ax = ctx.abs_of(x)
    ratio = ctx.R / conv_fn(ax, aw, extra, stride, pad, dil, groups)
    weight, source = (w, x) if ctx.signed else (aw, ax)
    back = transposed(_fold(ratio), weight, None, stride, pad, out_pad, groups, dil)
    r_in = source * back.view(K, *x.shape)
    if ctx.signed:
        return {"input": r_in}, ctx.R - ratio * conv_fn(x, w, None, stride, pad, dil, groups)
    return {"input": r_in}, ratio.flatten(3).sum(-1) * extra


# Mode "reference" splits the change of these activations between the positive and negative
# parts of the change of their input (RevealCancel). Measured on GELU (MiniLM), it lost.
_REVEAL_ACTIVATIONS = {aten.relu.default}
_BETWEEN = {aten._native_batch_norm_legit_no_training.default, operator.getitem}


def _activation_after(node: fx.Node) -> Callable[[Tensor], Tensor] | None:
    """The activation that is the only consumer of ``node`` (through a folded batch norm)."""
    for _ in range(3):
        if len(node.users) != 1:
            return None
        node = next(iter(node.users))
        if node.target in _REVEAL_ACTIVATIONS:
            return torch.relu
        if node.target not in _BETWEEN:
            return None
    return None


def _reveal_cancel(
    ctx: Ctx, dx: Tensor, w: Tensor, forward: Callable, backward: Callable, f
) -> Propagation:
    """Mode "reference" for z = W x + b followed by the activation ``f`` (after DeepLIFT's
    RevealCancel): the contributions c_jk = w_jk dx_k to the change of z are split into their
    positive sum dz+ and negative sum dz-, and f(z) - f(z') between the two parts by the order
    they arrive in: dz+ first, dy+ = f(z' + dz+) - f(z') and dy- = f(z) - f(z' + dz+), or dz-
    first, likewise (either way dy+ + dy- = dy exactly); each part shares its relevance among
    its own contributions. A positive change that a negative one cancels below the relu's
    threshold is no longer invisible. RevealCancel averages the two orders; here each order
    weighs by its first part's share of the spread dz+ - dz-, so the larger part tends to come
    first (chosen on training images by the faithfulness benchmark, bench/README.md).
    ``forward(u, w)`` applies the map without bias, ``backward(ratio, w)`` its transpose.

    Two products each way: dz+- = (W dx +- |W| |dx|) / 2, and per input
    sum_j c_jk^+ a_j + c_jk^- b_j = dx_k (W^T (a + b) / 2)_k + |dx_k| (|W|^T (a - b) / 2)_k."""
    aw, adx = ctx.abs_of(w), dx.abs()
    dz, spread = forward(dx, w), forward(adx, aw)
    zp, zn = (dz + spread) / 2, (dz - spread) / 2
    # The parts start where the contributions do, z - dz, so each part's share is a secant of
    # f over that part (|dy+-| <= |dz+-| for a relu); R is per unit of the activation's change
    # as the forward passes computed it (see Ctx.per_change), and rounding's difference sinks.
    z = ctx.out
    start = z - dz
    first = zp / stable(spread)  # how likely dz+ comes first
    yp = first * (f(start + zp) - f(start)) + (1 - first) * (f(z) - f(start + zn))
    yn = first * (f(z) - f(start + zp)) + (1 - first) * (f(start + zn) - f(start))
    ratio = ctx.R / stable(f(z) - f(ctx.ref_out))
    rp, rn = ratio * yp / stable(zp), ratio * yn / stable(zn)
    r_in = dx * backward((rp + rn) / 2, w) + adx * backward((rp - rn) / 2, aw)
    return {"input": r_in}, ctx.R - rp * zp - rn * zn


def _expand(v: int | list[int], n: int) -> list[int]:
    return list(v) * (n // len(v)) if isinstance(v, list | tuple) else [v] * n


@rule(aten._native_batch_norm_legit_no_training.default)
def batch_norm(ctx: Ctx) -> Propagation:
    """Eval batch norm is a per-channel affine map x * s + t: the |z| rule with one
    contribution per unit, the shift t is the sink."""
    a = ctx.args
    x = a["input"]
    shape = (-1,) + (1,) * (x.dim() - 2)
    scale, shift = batch_norm_affine(a)
    R = ctx.R[0]  # relevance of output 0; the saved statistics carry none
    if ctx.delta:  # the shift cancels
        c = ctx.diff("input") * scale.view(shape)
        r_in = R * (c / stable(c))
        return {"input": r_in}, R - r_in
    c = x * scale.view(shape)
    ac = c.abs()
    r_in = R * ((c if ctx.signed else ac) / (ac + shift.abs().view(shape) + TINY))
    return {"input": r_in}, R - r_in


def batch_norm_affine(a: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """Eval batch norm as y = x * scale + shift, per channel."""
    scale = torch.rsqrt(a["running_var"] + a["eps"])
    if a["weight"] is not None:
        scale = scale * a["weight"]
    shift = -a["running_mean"] * scale
    if a["bias"] is not None:
        shift = shift + a["bias"]
    return scale, shift


def _product(
    ctx: Ctx, f: Callable, a: Tensor, b: Tensor, data: tuple[bool, bool], refs=(None, None)
):
    """A product of two operands (matmul, bmm, einsum).

    One data operand: the other acts as weights and the |z| rule applies. Two data operands:
    half of the relevance to each, each half distributed with the other operand held fixed.
    Mode "reference" (``refs``: the operands in the reference's forward): the difference rule.
    """
    if ctx.delta:
        ar, br = refs
        if all(data):
            r_a, r_b, sink = _delta_product(ctx, f, a, b, ar, br)
            return [r_a, r_b], sink
        if data[0]:
            r_a, sink = _delta_linear(ctx, a - ar, lambda u: f(u, b))
            return [r_a, None], sink
        if data[1]:
            r_b, sink = _delta_linear(ctx, b - br, lambda v: f(a, v))
            return [None, r_b], sink
        return [None, None], ctx.R
    share = ctx.R * (0.5 if all(data) else 1.0)
    outs: list[Tensor | None] = [None, None]
    sink = ctx.R * (0.0 if any(data) else 1.0)
    if data[0]:
        outs[0], s = _proportional(ctx, share, a, lambda u: f(u, b.abs()), lambda u: f(u, b))
        sink = sink + s
    if data[1]:
        outs[1], s = _proportional(ctx, share, b, lambda v: f(a.abs(), v), lambda v: f(a, v))
        sink = sink + s
    return outs, sink


def _binary_product(fn: Callable[[Tensor, Tensor], Tensor]) -> Rule:
    def propagate(ctx: Ctx) -> Propagation:
        first, second = list(ctx.args)[:2]
        data = (ctx.is_data(first), ctx.is_data(second))
        refs = (ctx.ref[first], ctx.ref[second]) if ctx.delta else (None, None)
        outs, sink = _product(ctx, fn, ctx.args[first], ctx.args[second], data, refs)
        named = zip((first, second), outs, strict=True)
        return {n: o for n, o in named if o is not None}, sink

    return propagate


rule(aten.matmul.default)(_binary_product(torch.matmul))
rule(aten.mm.default)(_binary_product(torch.mm))
rule(aten.bmm.default)(_binary_product(torch.bmm))


@rule(aten.einsum.default)
def einsum(ctx: Ctx) -> Propagation:
    operands = ctx.args["tensors"]
    if len(operands) != 2:
        raise NotImplementedError(f"einsum with {len(operands)} operands")
    eq = ctx.args["equation"]
    data = (ctx.is_data("tensors", 0), ctx.is_data("tensors", 1))
    refs = tuple(ctx.ref["tensors"]) if ctx.delta else (None, None)
    outs, sink = _product(ctx, lambda u, v: torch.einsum(eq, u, v), *operands, data, refs)
    return {"tensors": outs}, sink


@rule(aten.scaled_dot_product_attention.default)
def attention(ctx: Ctx) -> Propagation:
    """Attention as the ops it is made of: O = A V with A = softmax(Q K^T * scale + mask).

    A V is a product of two data operands: half of R to A and half to V, each by the |z| rule
    with the other held fixed, R_V[k, d] = 1/2 sum_q |A_qk V_kd| R_q[d] / sum_k' |A_qk' V_k'd|.
    The softmax passes R_A on unchanged, as every activation does, and Q K^T is again a
    product of two data operands: half to Q, half to K. Masked and future positions have
    A = 0 and get nothing. The faithfulness benchmark chose this over giving V everything
    (bench/README.md).
    """
    a = ctx.args
    q, k, v = a["query"], a["key"], a["value"]
    if a.get("enable_gqa") and k.shape[-3] != q.shape[-3]:
        groups = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(groups, dim=-3), v.repeat_interleave(groups, dim=-3)
    else:
        groups = 1
    A = attention_weights(q, k, a["attn_mask"], a["is_causal"], a["scale"])
    if ctx.delta:
        r_q, r_k, r_v, sink = _attention_delta(ctx, q, k, v, A, groups)
    elif ctx.signed:
        (r_a, r_v), sink_av = _product(ctx, torch.matmul, A, v, (True, True))
        scores = replace(ctx, R=r_a)
        (r_q, r_kt), sink_qk = _product(scores, torch.matmul, q, k.transpose(-2, -1), (True, True))
        r_k = r_kt.transpose(-2, -1)
    else:
        # the same two product rules written out as matmuls (A >= 0; the softmax scale
        # cancels in the |z| shares of Q K^T)
        av = v.abs()
        ratio = ctx.R / (2 * (A @ av + TINY))
        r_v, r_a = av * (A.transpose(-2, -1) @ ratio), A * (ratio @ av.transpose(-2, -1))
        aq, ak = q.abs(), k.abs()
        ratio_qk = r_a / (2 * (aq @ ak.transpose(-2, -1) + TINY))
        r_q, r_k = aq * (ratio_qk @ ak), ak * (ratio_qk.transpose(-2, -1) @ aq)
        # what the shares withheld: R * 2 TINY / (2 D) for each half
        sink_av, sink_qk = ratio * (2 * TINY), ratio_qk * (2 * TINY)
    if not ctx.delta:
        sink = sink_av.sum(-1) + sink_qk.sum(-1)
    if groups > 1:
        r_k, r_v = (r.unflatten(-3, (r.shape[-3] // groups, groups)).sum(-3) for r in (r_k, r_v))
    return {"query": r_q, "key": r_k, "value": r_v}, sink


def _attention_delta(ctx: Ctx, q: Tensor, k: Tensor, v: Tensor, A: Tensor, groups: int):
    """Mode "reference", with multipliers (relevance per unit of change) from the output back:
    A V - A' V' split exactly between the change of A and of V; the softmax by its exact
    linearisation (``_softmax_multiplier``); Q K^T - Q' K'^T split like A V."""
    a = ctx.ref
    qr, kr, vr = a["query"], a["key"], a["value"]
    if groups > 1:
        kr, vr = kr.repeat_interleave(groups, dim=-3), vr.repeat_interleave(groups, dim=-3)
    scale = q.shape[-1] ** -0.5 if a["scale"] is None else a["scale"]
    S = attention_scores(q, k, ctx.args["attn_mask"], ctx.args["is_causal"], scale)
    Sr = attention_scores(qr, kr, a["attn_mask"], a["is_causal"], scale)
    Ar = torch.softmax(Sr, dim=-1).nan_to_num(0.0)
    ratio = ctx.per_change()
    r_v = (v - vr) * ((A + Ar).transpose(-2, -1) @ ratio) / 2
    mult_a = ratio @ ((v + vr) / 2).transpose(-2, -1)
    mult_s = _softmax_multiplier(S, Sr, A, Ar, mult_a) * scale
    r_q = (q - qr) * (mult_s @ ((k + kr) / 2))
    r_k = (k - kr) * (mult_s.transpose(-2, -1) @ ((q + qr) / 2))
    return r_q, r_k, r_v, (ctx.R - ratio * (A @ v - Ar @ vr)).sum(-1)


def _softmax_multiplier(S: Tensor, Sr: Tensor, A: Tensor, Ar: Tensor, mult: Tensor) -> Tensor:
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
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.softmax(attention_scores(q, k, mask, causal, scale), dim=-1).nan_to_num(0.0)


@rule(aten.embedding.default)
def embedding(ctx: Ctx) -> Propagation:
    """Per-token relevance: the embedding output's relevance summed over the hidden size."""
    return {"indices": ctx.R.sum(-1)}, None


# ---------------------------------------------------------------- pooling and reductions


@rule(aten.max_pool2d.default)
def max_pool(ctx: Ctx) -> Propagation:
    """Winner takes all (overlapping windows add up at a shared winner).

    Mode "reference": the change of a window's maximum goes to the input's winner where the
    maximum rose, and to the reference's winner where it fell (the element whose loss of
    value lowered it)."""
    a = ctx.args
    x = a["self"]
    out, idx = _max_pool_indices(x, a)
    K = ctx.K
    flat = ctx.R.flatten(3)
    r_in = torch.zeros(K, *x.shape[:2], x.shape[2] * x.shape[3], dtype=flat.dtype, device=x.device)
    if ctx.delta:
        xr = ctx.ref["self"]
        out_ref, idx_ref = _max_pool_indices(xr, a)
        xf, xrf = x.flatten(2), xr.flatten(2)
        i, j = idx.flatten(2), idx_ref.flatten(2)
        gap_ref = (out_ref.flatten(2) - xrf.gather(2, i)).clamp(min=0)  # j* ahead at the start
        gap_in = (out.flatten(2) - xf.gather(2, j)).clamp(min=0)  # i* ahead at the end
        cross = torch.where(i == j, 0.0, gap_ref / (gap_ref + gap_in + TINY))
        d_i = (xf.gather(2, i) - xrf.gather(2, i)) * (1 - cross)
        d_j = (xf.gather(2, j) - xrf.gather(2, j)) * cross
        ratio = flat / stable((out - out_ref).flatten(2))
        r_in.scatter_add_(3, i.expand(K, -1, -1, -1), ratio * d_i)
        r_in.scatter_add_(3, j.expand(K, -1, -1, -1), ratio * d_j)
        return {"self": r_in.view(K, *x.shape)}, flat - ratio * (d_i + d_j)
    r_in.scatter_add_(3, idx.flatten(2).expand(K, -1, -1, -1), flat)
    return {"self": r_in.view(K, *x.shape)}, None


def _max_pool_indices(x: Tensor, a: dict[str, Any]) -> tuple[Tensor, Tensor]:
    return F.max_pool2d(
        x,
        a["kernel_size"],
        a["stride"] or a["kernel_size"],
        a["padding"],
        a["dilation"],
        ceil_mode=a["ceil_mode"],
        return_indices=True,
    )


def _positive_map(fn: Callable[[Ctx, Tensor], Tensor]) -> Rule:
    """Rule for maps with non-negative weights (average pools, sums, means): proportional."""

    def propagate(ctx: Ctx) -> Propagation:
        f = lambda u: fn(ctx, u)  # noqa: E731
        if ctx.delta:
            r_in, sink = _delta_linear(ctx, ctx.diff(ctx.first), f)
        else:
            r_in, sink = _proportional(ctx, ctx.R, ctx.x, f, f)
        return {ctx.first: r_in}, sink

    return propagate


rule(aten.adaptive_avg_pool2d.default)(
    _positive_map(lambda c, u: F.adaptive_avg_pool2d(u, c.args["output_size"]))
)
rule(aten.avg_pool2d.default)(
    _positive_map(lambda c, u: aten.avg_pool2d.default(**{**c.args, "self": u}))
)
rule(aten.mean.dim)(
    _positive_map(lambda c, u: u.mean(c.args["dim"] or list(range(u.dim())), c.args["keepdim"]))
)
rule(aten.sum.dim_IntList)(
    _positive_map(lambda c, u: u.sum(c.args["dim"] or list(range(u.dim())), c.args["keepdim"]))
)


# ---------------------------------------------------------------- elementwise


def identity(ctx: Ctx) -> Propagation:
    return {ctx.first: ctx.R}, None


IDENTITY_OPS = (
    # activations: relevance passes unchanged (the nonlinearity is not evidence)
    aten.relu.default,
    aten.gelu.default,
    aten.silu.default,
    aten.tanh.default,
    aten.sigmoid.default,
    aten.hardtanh.default,
    aten.hardswish.default,
    aten.hardsigmoid.default,
    aten.leaky_relu.default,
    aten.elu.default,
    aten.mish.default,
    aten.softmax.int,
    aten._softmax.default,
    aten.neg.default,
    aten.pow.Tensor_Scalar,
    aten.erf.default,
    aten.exp.default,
    aten.cos.default,
    aten.sin.default,
    # norms: the normalising factor is a constant, the affine weight is not a target
    aten.layer_norm.default,
    aten.rms_norm.default,
    aten.group_norm.default,
    # copies and casts
    aten.clone.default,
    aten.alias.default,
    aten.detach.default,
    aten._to_copy.default,
    aten.lift_fresh_copy.default,
    aten.contiguous.default,
    aten.dropout.default,
)
rule(*IDENTITY_OPS)(identity)

# Mode "reference" replaces the identity of these ops (the sweep then does not pass their
# relevance straight through).
REFERENCE_RULES: dict[Any, Rule] = {}


def _norm_reference(ctx: Ctx, center: bool) -> Propagation:
    """Mode "reference" for layer norm y = g (x - mean x) s + b, s = 1 / sqrt(var x + eps), and
    (``center=False``: u = x, var = mean x^2) rms norm.

    The change splits exactly into a linear map of the change of x: with u = x - mean x,
    y - y' = g (s (u - u') + u' (s - s')), and s - s' = m (var - var') with
    var - var' = 2 / n sum((u + u') / 2 (u - u')) and m the ratio of differences of
    1 / sqrt (its derivative where var = var'). R_x = dx * M^T (R / dy). The input's own
    factor s scales the first term: a reference with no spread (u' = 0, zero embeddings)
    has s' = 1 / sqrt(eps), and would otherwise blow the shares up."""
    a = ctx.args
    dims = len(a["normalized_shape"])
    g = a["weight"].flatten() if a["weight"] is not None else 1.0
    eps = a["eps"] if a["eps"] is not None else torch.finfo(a["input"].dtype).eps
    r_in, sink = _norm_delta(ctx, a["input"], ctx.ref["input"], g, eps, dims, center)
    return {"input": r_in}, sink


def _norm_delta(
    ctx: Ctx, x: Tensor, xr: Tensor, g: Tensor | float, eps: float, dims: int, center: bool
) -> tuple[Tensor, Tensor]:
    """The difference rule of ``_norm_reference`` over the last ``dims`` dimensions of x, for
    the op ``ctx`` (its output's change: the normalised x's, times g)."""
    shape = x.shape
    x, xr = x.flatten(-dims), xr.flatten(-dims)
    u, ur = (x - x.mean(-1, keepdim=True), xr - xr.mean(-1, keepdim=True)) if center else (x, xr)
    var, var_r = (t.pow(2).mean(-1, keepdim=True) for t in (u, ur))
    s, sr = (torch.rsqrt(t + eps) for t in (var, var_r))
    dvar, u_mid, du = var - var_r, (u + ur) / 2, u - ur
    slope = torch.where(
        dvar.abs() > 1e-12, (s - sr) / torch.where(dvar == 0, 1.0, dvar), -0.5 * s**3
    )
    coupling = ur * (2 * slope / x.shape[-1])  # u' ds/d(var) d(var)/du, per element
    z = g * (s * du + coupling * (u_mid * du).sum(-1, keepdim=True))
    R, ratio = ctx.R.flatten(-dims), ctx.per_change().flatten(-dims)
    r = g * ratio
    back = s * r + u_mid * (coupling * r).sum(-1, keepdim=True)
    if center:
        back = back - back.mean(-1, keepdim=True)
    r_in = (x - xr) * back
    return r_in.view(R.shape[0], *shape), R - ratio * z


def _rms_eps(normaliser: Any, x: Any) -> float | None:
    """``eps`` when the node ``normaliser`` is rsqrt(mean(x ** 2, -1, keepdim) + eps) of the
    node ``x``: the RMS norm that Llama-style models write out (``x * rsqrt(...)``, with
    casts around it), else None."""

    def source(n: Any) -> Any:
        while isinstance(n, fx.Node) and n.target in (aten._to_copy.default, aten.clone.default):
            n = n.args[0]
        return n

    if not isinstance(normaliser, fx.Node) or normaliser.target is not aten.rsqrt.default:
        return None
    add = normaliser.args[0]
    if not (isinstance(add, fx.Node) and add.target is aten.add.Tensor):
        return None
    mean, eps = add.args[0], add.args[1]
    if not (isinstance(mean, fx.Node) and mean.target is aten.mean.dim) or len(mean.args) < 3:
        return None
    square, dims, keepdim = mean.args[:3]
    last = square.meta["val"].dim() - 1 if "val" in square.meta else -1
    if not keepdim or list(dims) not in ([-1], [last]) or not isinstance(eps, int | float):
        return None
    if square.target is not aten.pow.Tensor_Scalar or square.args[1] != 2:
        return None
    return float(eps) if source(square.args[0]) is source(x) else None


REFERENCE_RULES[aten.layer_norm.default] = lambda ctx: _norm_reference(ctx, center=True)
REFERENCE_RULES[aten.rms_norm.default] = lambda ctx: _norm_reference(ctx, center=False)


@rule(
    aten.add.Tensor,
    aten.sub.Tensor,
    aten.add.Scalar,
    aten.sub.Scalar,
    aten.rsub.Scalar,
    aten.rsub.Tensor,
)
def add(ctx: Ctx) -> Propagation:
    """Residuals: split elementwise in proportion to |operand|; a constant's share is a sink."""
    first, second = "self", "other"
    a, b = ctx.args[first], ctx.args[second] * ctx.args.get("alpha", 1)
    if ctx.delta:
        return _add_delta(ctx)
    aa = a.abs() if isinstance(a, Tensor) else abs(a)
    ab = b.abs() if isinstance(b, Tensor) else abs(b)
    ratio = ctx.R / (aa + ab + TINY)
    grads, passed = {}, None
    for name, mag, value in ((first, aa, a), (second, ab, b)):
        if isinstance(value, Tensor) and ctx.is_data(name):
            share = ratio * mag
            grads[name] = _unbroadcast(share, value.shape)
            passed = share if passed is None else passed + share
    # the constant's share, and where both magnitudes are 0 (nothing can be passed on)
    return grads, ctx.R if passed is None else ctx.R - passed


def _add_delta(ctx: Ctx) -> Propagation:
    """Mode "reference": shares of the operands' changes; a constant does not change."""
    alpha = ctx.args.get("alpha", 1)
    coef = {
        aten.sub.Tensor: (1, -alpha),
        aten.sub.Scalar: (1, -alpha),
        aten.rsub.Tensor: (-alpha, 1),
        aten.rsub.Scalar: (-alpha, 1),
    }.get(ctx.node.target, (1, alpha))
    parts = {}
    for name, c in zip(("self", "other"), coef, strict=True):
        value = ctx.args[name]
        if isinstance(value, Tensor) and ctx.is_data(name):
            parts[name] = (value - ctx.ref[name]) * c
    if not parts:
        return {}, ctx.R
    total = sum(parts.values())
    ratio = ctx.per_change()
    grads = {n: _unbroadcast(ratio * d, ctx.args[n].shape) for n, d in parts.items()}
    return grads, ctx.R - ratio * total


@rule(aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar)
def mul(ctx: Ctx) -> Propagation:
    """Gates: half to each data operand; a constant factor or divisor passes all to the data
    operand (the numerator, for a division by a data-derived tensor)."""
    first, second = "self", "other"
    division = ctx.node.target in (aten.div.Tensor, aten.div.Scalar)
    targets = [n for n in (first, second) if isinstance(ctx.args[n], Tensor) and ctx.is_data(n)]
    if division and first in targets:
        targets = [first]
    if ctx.delta and len(targets) == 2:
        a, b = ctx.args[first], ctx.args[second]
        r_a, r_b, sink = _delta_product(ctx, torch.mul, a, b, ctx.ref[first], ctx.ref[second])
        return {first: _unbroadcast(r_a, a.shape), second: _unbroadcast(r_b, b.shape)}, sink
    if ctx.delta and len(targets) == 1 and not division:
        # x * rsqrt(mean(x^2) + eps): the normaliser changes with x, as in aten.rms_norm
        data, factor = ctx.node.args if targets[0] == first else ctx.node.args[::-1]
        eps = _rms_eps(factor, data)
        if eps is not None:
            name = targets[0]
            r_in, sink = _norm_delta(ctx, ctx.args[name], ctx.ref[name], 1.0, eps, 1, False)
            return {name: r_in}, sink
    grads = {}
    for name in targets:
        grads[name] = _unbroadcast(ctx.R / len(targets), ctx.args[name].shape)
    return grads, (None if targets else ctx.R)


@rule(aten.where.self)
def where(ctx: Ctx) -> Propagation:
    cond = ctx.args["condition"]
    grads, sink = {}, ctx.R * 0
    for name, keep in (("self", cond), ("other", ~cond)):
        share = torch.where(keep, ctx.R, 0)
        value = ctx.args[name]
        if isinstance(value, Tensor) and ctx.is_data(name):
            grads[name] = _unbroadcast(share, value.shape)
        else:
            sink = sink + share
    return grads, sink


@rule(aten.masked_fill.Scalar, aten.masked_fill.Tensor)
def masked_fill(ctx: Ctx) -> Propagation:
    """Filled positions hold a constant: their relevance is a sink."""
    mask = ctx.args["mask"]
    return {"self": _unbroadcast(torch.where(mask, 0, ctx.R), ctx.x.shape)}, (
        torch.where(mask, ctx.R, 0)
    )


# ---------------------------------------------------------------- shape ops


def _reshape_back(ctx: Ctx) -> Propagation:
    return {ctx.first: ctx.R.reshape(ctx.K, *ctx.x.shape)}, None


RESHAPE_OPS = (
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.unsqueeze.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.squeeze.default,
    aten.flatten.using_ints,
    aten.unflatten.int,
)
rule(*RESHAPE_OPS)(_reshape_back)


@rule(aten.permute.default)
def permute(ctx: Ctx) -> Propagation:
    dims = [d % (ctx.R.dim() - 1) for d in ctx.args["dims"]]
    inverse = [0] * len(dims)
    for i, d in enumerate(dims):
        inverse[d] = i
    return {"self": ctx.R.permute(0, *[i + 1 for i in inverse])}, None


@rule(aten.transpose.int)
def transpose(ctx: Ctx) -> Propagation:
    n = ctx.R.dim() - 1
    d0, d1 = ctx.args["dim0"] % n, ctx.args["dim1"] % n
    return {"self": ctx.R.transpose(d0 + 1, d1 + 1)}, None


@rule(aten.t.default)
def t(ctx: Ctx) -> Propagation:
    return {"self": ctx.R.transpose(-1, -2)}, None


@rule(
    aten.expand.default,
    aten.slice.Tensor,
    aten.select.int,
    aten.index.Tensor,
    aten.index_select.default,
    aten.gather.default,
    aten.repeat.default,
    aten.narrow.default,
    aten.roll.default,
    aten.flip.default,
    aten.unfold.default,
    aten.diagonal.default,
)
def adjoint(ctx: Ctx) -> Propagation:
    """Selections, copies and broadcasts: relevance goes back to the elements each output
    element came from (the adjoint of the op, which adds where several outputs share a source)."""
    args = dict(ctx.args)
    x = args.pop(ctx.first)
    fn = lambda u: ctx.node.target(u, **args)  # noqa: E731
    return {ctx.first: _vjp(fn, x, ctx.R)}, None


@rule(aten.cat.default)
def cat(ctx: Ctx) -> Propagation:
    """Split relevance along the joined dimension; a constant piece's share is a sink."""
    tensors = ctx.args["tensors"]
    dim = ctx.args["dim"] % tensors[0].dim()
    sizes = [t.shape[dim] for t in tensors]
    pieces = list(ctx.R.split(sizes, dim=dim + 1))
    return {"tensors": pieces}, None


def _split_rule(ctx: Ctx) -> Propagation:
    """Multi-output splits: ``R`` is a dict {output index: relevance}; absent outputs get 0."""
    x = ctx.x
    outs = ctx.out
    parts = [
        ctx.R.get(
            i,
            torch.zeros(
                next(iter(ctx.R.values())).shape[0], *o.shape, dtype=o.dtype, device=o.device
            ),
        )
        for i, o in enumerate(outs)
    ]
    dim = ctx.args["dim"] % x.dim()
    if ctx.node.target is aten.unbind.int:
        parts = [p.unsqueeze(dim + 1) for p in parts]
    return {ctx.first: torch.cat(parts, dim=dim + 1)}, None


for _op in (aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int, aten.chunk.default):
    rule(_op)(_split_rule)


@rule(aten.constant_pad_nd.default)
def pad(ctx: Ctx) -> Propagation:
    """The padded border holds constants: its relevance is a sink."""
    x = ctx.x
    pads = ctx.args["pad"]
    index = [slice(None)] * ctx.R.dim()
    for i in range(len(pads) // 2):
        axis = ctx.R.dim() - 1 - i
        lo, hi = pads[2 * i], pads[2 * i + 1]
        index[axis] = slice(lo, ctx.R.shape[axis] - hi)
    kept = ctx.R[tuple(index)]
    if any(p < 0 for p in pads):
        raise NotImplementedError("constant_pad_nd with negative padding (cropping)")
    sink = ctx.R.clone()
    sink[tuple(index)] = 0
    return {"self": kept.reshape(ctx.K, *x.shape)}, sink
