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
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx

aten = torch.ops.aten
MODES = ("default", "contrast")


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


@rule(aten.linear.default)
def linear(ctx: Ctx) -> Propagation:
    x, w, b = ctx.args["input"], ctx.args["weight"], ctx.args["bias"]
    r_in, sink = _dense(ctx, x, w, ctx.abs_of(w), ctx.bias_term(b, w.shape[0], x))
    return {"input": r_in}, sink


@rule(aten.addmm.default)
def addmm(ctx: Ctx) -> Propagation:
    """b + x @ W, as GPT-2's Conv1D writes a linear layer."""
    x, w, b = ctx.args["mat1"], ctx.args["mat2"], ctx.args["self"]
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
    row-major blocks of K, so the expert offsets scale by K.
    """
    first, second, third = list(ctx.args)[:3]
    x, w, offs = ctx.args[first], ctx.args[second], ctx.args[third]
    gmm = ctx.node.target
    ax, aw = x.abs(), w.abs()
    ratio = ctx.R / (gmm(ax, aw, offs) + TINY)
    K, S = ratio.shape[:2]
    rows = ratio.transpose(0, 1).reshape(S * K, -1)
    weight, source = (w, x) if ctx.signed else (aw, ax)
    back = gmm(rows, weight.transpose(1, 2).contiguous(), offs * K)
    r_in = source * back.view(S, K, -1).transpose(0, 1)
    if ctx.signed:
        return {first: r_in}, ctx.R - ratio * gmm(x, w, offs)
    return {first: r_in}, ratio * TINY


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
    aw, extra = ctx.abs_of(w), ctx.bias_term(b, w.shape[0], x)
    ax = ctx.abs_of(x)
    ratio = ctx.R / conv_fn(ax, aw, extra, stride, pad, dil, groups)
    # output_padding recovers input sizes that a strided conv rounded down
    out_pad = [
        x.shape[2 + i]
        - ((ratio.shape[3 + i] - 1) * stride[i] - 2 * pad[i] + dil[i] * (w.shape[2 + i] - 1) + 1)
        for i in range(spatial)
    ]
    K = ctx.K
    weight, source = (w, x) if ctx.signed else (aw, ax)
    back = transposed(_fold(ratio), weight, None, stride, pad, out_pad, groups, dil)
    r_in = source * back.view(K, *x.shape)
    if ctx.signed:
        return {"input": r_in}, ctx.R - ratio * conv_fn(x, w, None, stride, pad, dil, groups)
    return {"input": r_in}, ratio.flatten(3).sum(-1) * extra


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


def _product(ctx: Ctx, f: Callable, a: Tensor, b: Tensor, data: tuple[bool, bool]):
    """A product of two operands (matmul, bmm, einsum).

    One data operand: the other acts as weights and the |z| rule applies. Two data operands:
    half of the relevance to each, each half distributed with the other operand held fixed.
    """
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
        outs, sink = _product(ctx, fn, ctx.args[first], ctx.args[second], data)
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
    outs, sink = _product(ctx, lambda u, v: torch.einsum(eq, u, v), *operands, data)
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
    if ctx.signed:
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
    if groups > 1:
        r_k, r_v = (r.unflatten(-3, (r.shape[-3] // groups, groups)).sum(-3) for r in (r_k, r_v))
    return {"query": r_q, "key": r_k, "value": r_v}, sink_av.sum(-1) + sink_qk.sum(-1)


def attention_weights(q: Tensor, k: Tensor, mask: Tensor | None, causal: bool, scale) -> Tensor:
    """softmax(q k^T * scale + mask), as scaled_dot_product_attention computes it."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale
    if causal:
        tq, tk = scores.shape[-2:]
        keep = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)
        scores = scores.masked_fill(~keep, float("-inf"))
    if mask is not None:
        scores = (
            scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        )
    return torch.softmax(scores, dim=-1).nan_to_num(0.0)


@rule(aten.embedding.default)
def embedding(ctx: Ctx) -> Propagation:
    """Per-token relevance: the embedding output's relevance summed over the hidden size."""
    return {"indices": ctx.R.sum(-1)}, None


# ---------------------------------------------------------------- pooling and reductions


@rule(aten.max_pool2d.default)
def max_pool(ctx: Ctx) -> Propagation:
    """Winner takes all (overlapping windows add up at a shared winner)."""
    a = ctx.args
    x = a["self"]
    _, idx = F.max_pool2d(
        x,
        a["kernel_size"],
        a["stride"] or a["kernel_size"],
        a["padding"],
        a["dilation"],
        ceil_mode=a["ceil_mode"],
        return_indices=True,
    )
    K = ctx.K
    flat = ctx.R.flatten(3)
    r_in = torch.zeros(K, *x.shape[:2], x.shape[2] * x.shape[3], dtype=flat.dtype, device=x.device)
    r_in.scatter_add_(3, idx.flatten(2).expand(K, -1, -1, -1), flat)
    return {"self": r_in.view(K, *x.shape)}, None


def _positive_map(fn: Callable[[Ctx, Tensor], Tensor]) -> Rule:
    """Rule for maps with non-negative weights (average pools, sums, means): proportional."""

    def propagate(ctx: Ctx) -> Propagation:
        f = lambda u: fn(ctx, u)  # noqa: E731
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
    _positive_map(lambda c, u: u.sum(c.args["dim"] or list(range(u.dim())), c.args["keepdim"]))
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


@rule(aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar)
def mul(ctx: Ctx) -> Propagation:
    """Gates: half to each data operand; a constant factor or divisor passes all to the data
    operand (the numerator, for a division by a data-derived tensor)."""
    first, second = "self", "other"
    division = ctx.node.target in (aten.div.Tensor, aten.div.Scalar)
    targets = [n for n in (first, second) if isinstance(ctx.args[n], Tensor) and ctx.is_data(n)]
    if division and first in targets:
        targets = [first]
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
