"""Weighted maps: linear layers, addmm, convolutions, grouped expert matmuls, and products of
two operands (matmul, mm, bmm, einsum).

A weighted map y = f(x, W) + b is written once as a ``Weighted`` (its forward, its adjoint, how
its bias share reduces) and the modes are written once over it: ``z_abs`` (the |z| rule,
D = f(|x|, |W|) + |b|, R_in = |x| f^T(R / D, |W|); mode "default") and ``z_change`` (the
difference rule: contributions of dx, over y - y'; the bias cancels; modes "reference" and
"contrast"). A linear layer, a convolution, a grouped matmul and the seed head's sparse rows
(``LinearRows``) differ only in their ``Weighted``. At the seed head ``LinearRows.contrast``
splits the logit difference exactly.
"""

from __future__ import annotations

import collections
import string
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import (
    TINY,
    Ctx,
    Family,
    Propagation,
    difference,
    difference_product,
    fold_seeds,
    proportional,
    stable,
    vjp,
)

aten = torch.ops.aten


@dataclass
class Weighted:
    """y = forward(x, W, bias), linear in x for fixed W, as the dense rules apply it."""

    forward: Callable[[Tensor, Tensor, Any], Tensor]  # bias None: the map alone
    backward: Callable[[Tensor, Tensor], Tensor]  # the adjoint in x of ratio [K, *y] -> [K, *x]
    bias_sink: Callable[[Tensor, Any], Tensor]  # ratio * (|b| + TINY), reduced to the sink


@dataclass
class Operands:
    """One node's weighted map and operands: x, W, |W| and |b| + TINY (``extra``)."""

    map: Weighted
    name: str  # the argument relevance goes to
    x: Tensor
    w: Tensor
    aw: Tensor
    extra: Any


def z_abs(ctx: Ctx, o: Operands) -> Propagation:
    """Mode "default": D = f(|x|, |W|) + |b|, R_in = |x| * f^T(R / D, |W|); the bias share
    R |b| / D is the sink."""
    ax = ctx.abs_of(o.x)
    ratio = ctx.R / o.map.forward(ax, o.aw, o.extra)
    return {o.name: ax * o.map.backward(ratio, o.aw)}, o.map.bias_sink(ratio, o.extra)


def z_change(ctx: Ctx, o: Operands, dx: Tensor, ratio: Tensor) -> Propagation:
    """Mode "reference": R_in = dx * f^T(R / dy, W), ``ratio`` = R / dy; the bias cancels."""
    return {o.name: dx * o.map.backward(ratio, o.w)}, ctx.R - ratio * o.map.forward(dx, o.w, None)


class WeightedFamily(Family):
    """The three modes of a weighted map; subclasses say what their map and operands are."""

    bias: str | None = "bias"  # the argument that holds the bias
    maps = True

    def operands(self, ctx: Ctx) -> Operands:
        raise NotImplementedError

    def default(self, ctx: Ctx) -> Propagation:
        return z_abs(ctx, self.operands(ctx))

    def reference(self, ctx: Ctx) -> Propagation:
        o = self.operands(ctx)
        dx = ctx.diff(o.name)
        if ctx.node in ctx.facts.relu_after:
            return reveal_cancel(ctx, o, dx, torch.relu)
        return z_change(ctx, o, dx, self.change_ratio(ctx, o, dx))

    def change_ratio(self, ctx: Ctx, o: Operands, dx: Tensor) -> Tensor:
        """R per unit of the output's change (``Ctx.per_change``)."""
        return ctx.per_change()


MATRIX = Weighted(
    forward=F.linear,
    backward=lambda ratio, w: ratio @ w,
    bias_sink=lambda ratio, extra: ratio @ extra,
)


class Linear(WeightedFamily):
    """y = x W^T + b: the |z| rule in two matrix products."""

    ops = (aten.linear.default,)

    def operands(self, ctx: Ctx) -> Operands:
        x, w, b = ctx.args["input"], ctx.args["weight"], ctx.args["bias"]
        return Operands(MATRIX, "input", x, w, ctx.abs_of(w), ctx.bias_term(b, w.shape[0], x))


ROWS = Weighted(
    forward=lambda x, w, bias: (x * w).sum(-1) + (0 if bias is None else bias),
    backward=lambda ratio, w: ratio[..., None] * w,
    bias_sink=lambda ratio, extra: ratio * extra,
)


class LinearRows(Linear):
    """The linear rule on the seed's sparse entries (``sweep``'s seed head): entry e pairs
    the input row ``input[e]`` with the weight row ``weight[e]`` of its output unit, and
    ``bias[e]`` with that unit's bias (or None). R is the seed's values, [K, E]."""

    def operands(self, ctx: Ctx) -> Operands:
        x, w, b = ctx.args["input"], ctx.args["weight"], ctx.args["bias"]
        return Operands(ROWS, "input", x, w, w.abs(), b.abs() + TINY if b is not None else TINY)

    def change_ratio(self, ctx: Ctx, o: Operands, dx: Tensor) -> Tensor:
        """No output change is recorded per entry: it is the sum of the contributions."""
        return ctx.R / stable(o.map.forward(dx, o.w, None))

    def contrast(self, ctx: Ctx) -> Propagation:
        """Mode "contrast": R is relevance per unit of each entry's logit (+m on the target,
        -m, or -m times the softmax weights of "rest", on the alternatives), so the entries
        of one sample explain m (z_t - z_a), a linear map with weight w_t - w_a and bias
        b_t - b_a. It splits exactly into the contributions of the change from the reference,
        (x_j - x'_j) (w_tj - w_aj), which go on down, and the reference's own difference
        x' (w_t - w_a) + b_t - b_a, the sink: inputs + sinks = m (z_t - z_a) to rounding.
        (No denominator that could vanish where z_t is close to z_a.)"""
        o = self.operands(ctx)
        sink = ctx.R * o.map.forward(ctx.ref[o.name], o.w, ctx.args["bias"])
        return {o.name: ctx.diff(o.name) * o.map.backward(ctx.R, o.w)}, sink


class AddMM(WeightedFamily):
    """b + x @ W, as GPT-2's Conv1D writes a linear layer. A per-row bias is data-shaped,
    not a linear layer's: it stays elementwise in the denominator and the sink, and in mode
    "reference" it is held fixed (its change is not explained)."""

    ops = (aten.addmm.default,)
    bias = "self"

    def operands(self, ctx: Ctx) -> Operands:
        x, w, b = ctx.args["mat1"], ctx.args["mat2"], ctx.args["self"]
        if b.dim() > 1:
            return Operands(_ROW_BIAS, "mat1", x, w.t(), w.abs().t(), b.abs() + TINY)
        extra = ctx.bias_term(b, w.shape[1], x)
        return Operands(MATRIX, "mat1", x, w.t(), ctx.abs_of(w).t(), extra)


_ROW_BIAS = Weighted(
    forward=lambda x, w, bias: F.linear(x, w) + (0 if bias is None else bias),
    backward=lambda ratio, w: ratio @ w,
    bias_sink=lambda ratio, extra: ratio * extra,
)


class BAddBMM(WeightedFamily):
    """beta b + alpha x @ W per group (``baddbmm``): block-diagonal linear layers with a bias,
    as RecurrentGemma's gates write them; x is ``batch1`` [G, N, I], W ``batch2`` [G, I, O].
    The bias, broadcast over the rows, stays elementwise in the denominator and the sink."""

    ops = (aten.baddbmm.default,)
    bias = "self"

    def operands(self, ctx: Ctx) -> Operands:
        x, w, bias = self._terms(ctx.args)
        return Operands(_GROUPS, "batch1", x, w, w.abs(), bias + TINY)

    def default(self, ctx: Ctx) -> Propagation:
        """Data in ``batch2`` too (BLOOM's attention scores, ALiBi + Q K^T): the product
        rule of two data operands (``Product``), the bias's share of each |z| denominator a
        sink."""
        if not self._scores(ctx):
            return super().default(ctx)
        a, b, bias = self._terms(ctx.args)
        (r_a, r_b), sink = product(ctx.R, lambda u, v: u @ v + bias, a, b, self._data(ctx))
        sink = sink + ctx.R * bias / ((a.abs() @ b.abs()).add_(bias).add_(TINY))
        return {"batch1": r_a, "batch2": r_b}, sink

    def reference(self, ctx: Ctx) -> Propagation:
        """The exact split of a product's change (the constant bias cancels)."""
        if not self._scores(ctx):
            return super().reference(ctx)
        a, b, _ = self._terms(ctx.args)
        refs = self._terms(ctx.ref)[:2]
        (r_a, r_b), sink = product_difference(ctx, torch.matmul, a, b, self._data(ctx), refs)
        return {"batch1": r_a, "batch2": r_b}, sink

    @staticmethod
    def _scores(ctx: Ctx) -> bool:
        if ctx.is_data("batch2") and ctx.is_data("self"):
            raise NotImplementedError("baddbmm with data in self and batch2")
        return ctx.is_data("batch2")

    @staticmethod
    def _data(ctx: Ctx) -> tuple[bool, bool]:
        return ctx.is_data("batch1"), True

    @staticmethod
    def _terms(args: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        """batch1, alpha batch2 and |beta self|; with beta 0, self is not read at all (GPT-2's
        upcast attention passes an uninitialised buffer, NaN in it is no bias), as in torch."""
        bias = (args["self"] * args["beta"]).abs() if args["beta"] else args["self"].new_zeros(())
        return args["batch1"], args["batch2"] * args["alpha"], bias


_GROUPS = Weighted(
    forward=lambda x, w, bias: torch.matmul(x, w) + (0 if bias is None else bias),
    backward=lambda ratio, w: ratio @ w.transpose(-1, -2),
    bias_sink=lambda ratio, extra: ratio * extra,
)


_CONV = {1: (F.conv1d, F.conv_transpose1d), 2: (F.conv2d, F.conv_transpose2d)}


class Conv(WeightedFamily):
    """Convolutions of any stride, padding, dilation and groups: the adjoint is a transposed
    convolution with the same geometry. Padding given by name ("valid", "same") is the
    numeric padding it stands for."""

    ops = (aten.conv1d.default, aten.conv2d.default, aten.conv1d.padding, aten.conv2d.padding)

    def operands(self, ctx: Ctx) -> Operands:
        a = ctx.args
        x, w, b = a["input"], a["weight"], a["bias"]
        spatial = w.dim() - 2
        conv_fn, transposed = _CONV[spatial]
        stride, dil = (_expand(a[k], spatial) for k in ("stride", "dilation"))
        pad = _padding(a["padding"], w, dil)
        groups, K = a["groups"], ctx.K
        # output_padding recovers input sizes that a strided conv rounded down
        out_pad = [
            x.shape[2 + i]
            - (
                (ctx.R.shape[3 + i] - 1) * stride[i]
                - 2 * pad[i]
                + dil[i] * (w.shape[2 + i] - 1)
                + 1
            )
            for i in range(spatial)
        ]

        def backward(ratio: Tensor, weight: Tensor) -> Tensor:
            back = transposed(fold_seeds(ratio), weight, None, stride, pad, out_pad, groups, dil)
            return back.view(K, *x.shape)

        conv = Weighted(
            forward=lambda u, weight, bias: conv_fn(u, weight, bias, stride, pad, dil, groups),
            backward=backward,
            bias_sink=lambda ratio, extra: ratio.flatten(3).sum(-1) * extra,
        )
        return Operands(conv, "input", x, w, ctx.abs_of(w), ctx.bias_term(b, w.shape[0], x))


class Convolution(WeightedFamily):
    """The general convolution (``aten.convolution``), which conv3d and the transposed
    convolutions decompose to at capture (``capture.with_rules``): any number of spatial
    dimensions, transposed or not. The |z| rule as for ``Conv``, its adjoint by autograd."""

    ops = (aten.convolution.default,)

    def operands(self, ctx: Ctx) -> Operands:
        a = ctx.args
        x, w, b = a["input"], a["weight"], a["bias"]
        geometry = [a[k] for k in _GEOMETRY]
        outputs = w.shape[1] * a["groups"] if a["transposed"] else w.shape[0]
        conv = Weighted(
            forward=lambda u, weight, bias: torch.convolution(u, weight, bias, *geometry),
            backward=lambda ratio, weight: vjp(
                lambda u: torch.convolution(u, weight, None, *geometry), x, ratio
            ),
            bias_sink=lambda ratio, extra: ratio.flatten(3).sum(-1) * extra,
        )
        return Operands(conv, "input", x, w, ctx.abs_of(w), ctx.bias_term(b, outputs, x))


_GEOMETRY = ("stride", "padding", "dilation", "transposed", "output_padding", "groups")


def _expand(v: int | list[int], n: int) -> list[int]:
    return list(v) * (n // len(v)) if isinstance(v, list | tuple) else [v] * n


def _padding(pad: int | list[int] | str, w: Tensor, dil: list[int]) -> list[int]:
    """Numeric padding per spatial dimension. "same" (stride 1) pads dil * (k - 1) in all,
    which the transposed convolution can undo only when it splits evenly between the sides
    (odd kernels, or even dilations)."""
    spatial = w.dim() - 2
    if not isinstance(pad, str):
        return _expand(pad, spatial)
    if pad == "valid":
        return [0] * spatial
    total = [d * (k - 1) for d, k in zip(dil, w.shape[2:], strict=True)]
    if any(t % 2 for t in total):
        raise NotImplementedError(
            f"padding='same' with kernel {list(w.shape[2:])} and dilation {dil} pads one side "
            "more than the other; only even splits are supported"
        )
    return [t // 2 for t in total]


class GroupedMM(WeightedFamily):
    """Mixture-of-experts expert matmuls: rows (token, expert pairs) sorted by expert, row i
    multiplied by its expert's weight W_e ([E, in, out]), ``offs`` the cumulative row counts.

    The op itself is both products: D = gmm(|X|, |W|), and the adjoint gmm(R / D, W^T). The K
    seeds ride along as extra rows: seed-major rows become row-major blocks of K, so the
    expert offsets scale by K. Mode "reference": the reference forward routes as the input did
    (``sweep.forward``'s ``routed``), so row i is the same token and expert in both.
    """

    def operands(self, ctx: Ctx) -> Operands:
        first, second, third = list(ctx.args)[:3]
        x, w, offs = ctx.args[first], ctx.args[second], ctx.args[third]
        gmm = ctx.node.target

        def backward(ratio: Tensor, weight: Tensor) -> Tensor:
            K, S = ratio.shape[:2]
            rows = ratio.transpose(0, 1).reshape(S * K, -1)
            back = gmm(rows, weight.transpose(1, 2).contiguous(), offs * K)
            return back.view(S, K, -1).transpose(0, 1)

        grouped = Weighted(
            forward=lambda u, weight, bias: gmm(u, weight, offs) + (0 if bias is None else bias),
            backward=backward,
            bias_sink=lambda ratio, extra: ratio * extra,
        )
        return Operands(grouped, first, x, w, w.abs(), TINY)

    def reference(self, ctx: Ctx) -> Propagation:
        offs = list(ctx.args)[2]
        if not torch.equal(ctx.ref[offs], ctx.args[offs]):
            raise NotImplementedError(
                f'mode "reference" at {ctx.node.name}: the reference routed tokens to other'
                " experts (routing not by topk, which the reference forward holds fixed)"
            )
        return super().reference(ctx)


def reveal_cancel(ctx: Ctx, o: Operands, dx: Tensor, f: Callable[[Tensor], Tensor]) -> Propagation:
    """Mode "reference" for z = W x + b followed by the activation ``f`` (after DeepLIFT's
    RevealCancel): the contributions c_jk = w_jk dx_k to the change of z are split into their
    positive sum dz+ and negative sum dz-, and f(z) - f(z') between the two parts by the order
    they arrive in: dz+ first, dy+ = f(z' + dz+) - f(z') and dy- = f(z) - f(z' + dz+), or dz-
    first, likewise (either way dy+ + dy- = dy exactly); each part shares its relevance among
    its own contributions. A positive change that a negative one cancels below the relu's
    threshold is no longer invisible. RevealCancel averages the two orders; here each order
    weighs by its first part's share of the spread dz+ - dz-, so the larger part tends to come
    first (chosen on training images by the faithfulness benchmark, bench/README.md).

    Two products each way: dz+- = (W dx +- |W| |dx|) / 2, and per input
    sum_j c_jk^+ a_j + c_jk^- b_j = dx_k (W^T (a + b) / 2)_k + |dx_k| (|W|^T (a - b) / 2)_k."""
    m, w, aw, adx = o.map, o.w, o.aw, dx.abs()
    dz, spread = m.forward(dx, w, None), m.forward(adx, aw, None)
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
    r_in = dx * m.backward((rp + rn) / 2, w) + adx * m.backward((rp - rn) / 2, aw)
    return {o.name: r_in}, ctx.R - rp * zp - rn * zn


class Product(Family):
    """A product of two operands (matmul, mm, bmm; einsum below).

    One data operand: the other acts as weights and the |z| rule applies. Two data operands:
    half of the relevance to each, each half distributed with the other operand held fixed.
    Mode "reference": the difference rule (exact for two data operands)."""

    ops = (aten.matmul.default, aten.mm.default, aten.bmm.default)
    maps = True

    def operands(self, ctx: Ctx) -> tuple[Callable, list[str], list[Tensor], tuple[bool, bool]]:
        """The product, the argument names, their values and whether each is data."""
        names = list(ctx.args)[:2]
        f = _PRODUCTS.get(ctx.node.target, torch.matmul)
        data = (ctx.is_data(names[0]), ctx.is_data(names[1]))
        return f, names, [ctx.args[n] for n in names], data

    def references(self, ctx: Ctx, names: list[str]) -> list[Tensor]:
        """The operands in the reference's forward."""
        return [ctx.ref[n] for n in names]

    def named(self, names: list[str], outs: list[Tensor | None]) -> dict[str, Any]:
        return {n: o for n, o in zip(names, outs, strict=True) if o is not None}

    def default(self, ctx: Ctx) -> Propagation:
        f, names, (a, b), data = self.operands(ctx)
        outs, sink = product(ctx.R, f, a, b, data)
        return self.named(names, outs), sink

    def reference(self, ctx: Ctx) -> Propagation:
        f, names, (a, b), data = self.operands(ctx)
        outs, sink = product_difference(ctx, f, a, b, data, self.references(ctx, names))
        return self.named(names, outs), sink


_PRODUCTS = {aten.mm.default: torch.mm, aten.bmm.default: torch.bmm}


class Einsum(Product):
    """An einsum of any number of operands, contracted two at a time as torch contracts it (its
    ``path``, else left to right): the product rules run on each pairwise step, from the
    last back, so a data operand gets what the same pairwise products written out would
    give it. One operand (a trace, a transpose, a sum) is a map with weights of one: the
    |z| rule over it. An intermediate step's sink is put back in the output's shape (summed
    over its contracted letters), so the sweep books it to its sample."""

    ops = (aten.einsum.default,)

    def default(self, ctx: Ctx) -> Propagation:
        return self.chain(ctx, reference=False)

    def reference(self, ctx: Ctx) -> Propagation:
        return self.chain(ctx, reference=True)

    def chain(self, ctx: Ctx, reference: bool) -> Propagation:
        inputs, output = einsum_subscripts(ctx.args["equation"], ctx.args["tensors"])
        terms = [
            _Term(s, v, ctx.ref["tensors"][i] if reference else None, ctx.is_data("tensors", i), i)
            for i, (s, v) in enumerate(zip(inputs, ctx.args["tensors"], strict=True))
        ]
        if len(terms) == 1:
            return self.single(ctx, f"{inputs[0]}->{output}", reference)
        steps = _pairwise(ctx, terms, output, ctx.args.get("path"), reference)
        relevance: list[Tensor | None] = [None] * len(terms)
        pending, sink = {len(steps) - 1: ctx.R}, None
        for k in reversed(range(len(steps))):
            step, R = steps[k], pending.pop(k, None)
            if R is None:
                continue
            outs, s = self.step(replace(ctx, R=R, out=step.out.value, ref_out=step.out.ref), step)
            sink = _add(sink, _onto_output(s, step.out.subs, output, ctx.out.shape))
            for term, r in zip((step.left, step.right), outs, strict=True):
                if r is not None and term.source >= 0:
                    relevance[term.source] = r
                elif r is not None:
                    pending[-1 - term.source] = r
        return {"tensors": relevance}, sink

    def step(self, ctx: Ctx, step: _Step) -> tuple[list[Tensor | None], Tensor]:
        """The product rule of one pairwise step (``ctx``: its output and relevance)."""
        left, right = step.left, step.right
        f, data = step.product, (left.data, right.data)
        if ctx.ref is None:
            return product(ctx.R, f, left.value, right.value, data)
        return product_difference(ctx, f, left.value, right.value, data, (left.ref, right.ref))

    def single(self, ctx: Ctx, equation: str, reference: bool) -> Propagation:
        x, f = ctx.args["tensors"][0], lambda u: torch.einsum(equation, u)
        if reference:
            r_in, sink = difference(ctx, ctx.diff("tensors", 0), f)
        else:
            r_in, sink = proportional(ctx.R, x, f)
        return {"tensors": [r_in]}, sink


class Bilinear(Family):
    """y = x1^T W_o x2 + b_o per output unit o (``nn.Bilinear``): a product of two data operands
    with weights between them. As for two-operand products, each data operand takes half of R
    (all of it where the other is a constant), shared by the linear rule (``z_abs``) with the
    other held fixed: x1 by the per-sample weights W x2, D = |x1| |W x2| + |b|, x2 by x1^T W;
    the bias share is a sink. With x2 a constant it is the linear rule of weights W x2.
    Mode "reference": the exact split of a product's change (``product_difference``); the
    bias cancels."""

    ops = (aten.bilinear.default,)
    maps = True
    names = ("input1", "input2")

    def default(self, ctx: Ctx) -> Propagation:
        a, data = ctx.args, [ctx.is_data(n) for n in self.names]
        w, part = a["weight"], replace(ctx, R=ctx.R * (0.5 if all(data) else 1.0))
        extra = ctx.bias_term(a["bias"], w.shape[0], a["input1"])
        held = {
            "input1": torch.einsum("oij,...j->...oi", w, a["input2"]),
            "input2": torch.einsum("oij,...i->...oj", w, a["input1"]),
        }
        grads, sink = {}, None
        for name in (n for n, d in zip(self.names, data, strict=True) if d):
            o = Operands(_PER_SAMPLE, name, a[name], held[name], held[name].abs(), extra)
            r_in, s = z_abs(part, o)
            grads, sink = {**grads, **r_in}, _add(sink, s)
        return grads, sink

    def reference(self, ctx: Ctx) -> Propagation:
        w, data = ctx.args["weight"], tuple(ctx.is_data(n) for n in self.names)
        operands, refs = ([args[n] for n in self.names] for args in (ctx.args, ctx.ref))
        f = lambda u, v: torch.einsum("...i,oij,...j->...o", u, w, v)  # noqa: E731
        outs, sink = product_difference(ctx, f, *operands, data, refs)
        return {n: r for n, r in zip(self.names, outs, strict=True) if r is not None}, sink


def _per_sample(x: Tensor, w: Tensor, bias: Any) -> Tensor:
    """x [..., I] times per-sample weights w [..., O, I], plus ``bias``."""
    return torch.einsum("...i,...oi->...o", x, w) + (0 if bias is None else bias)


_PER_SAMPLE = Weighted(
    forward=_per_sample,
    backward=lambda ratio, w: torch.einsum("k...o,...oi->k...i", ratio, w),
    bias_sink=lambda ratio, extra: ratio @ extra,
)


@dataclass
class _Term:
    """An operand of a pairwise step: its subscripts (one letter a dimension), its value and
    the reference's, whether it carries relevance, and where it comes from (the einsum's
    operand ``source`` >= 0, or the output of step ``-1 - source``)."""

    subs: str
    value: Tensor
    ref: Tensor | None
    data: bool
    source: int


@dataclass
class _Step:
    left: _Term
    right: _Term
    out: _Term

    def product(self, u: Tensor, v: Tensor) -> Tensor:
        return torch.einsum(f"{self.left.subs},{self.right.subs}->{self.out.subs}", u, v)


def _pairwise(
    ctx: Ctx, terms: list[_Term], output: str, path: list[int] | None, reference: bool
) -> list[_Step]:
    """The pairwise steps in torch's order: ``path`` (pairs of positions in the list of
    operands left, each result appended at its end), else left to right. A step keeps the
    letters a later operand or the output still needs; the last one is the op's output."""
    steps: list[_Step] = []
    while len(terms) > 1:
        k = len(steps)
        i, j = (path[2 * k], path[2 * k + 1]) if path else ((0, 1) if k == 0 else (-1, 0))
        i, j = i % len(terms), j % len(terms)
        left, right = terms[i], terms[j]
        others = [t for n, t in enumerate(terms) if n not in (i, j)]
        needed = set(output).union(*(t.subs for t in others))
        subs = "".join(dict.fromkeys(c for c in left.subs + right.subs if c in needed))
        out = _Term(
            subs if others else output, ctx.out, ctx.ref_out, left.data or right.data, -1 - k
        )
        step = _Step(left, right, out)
        if others:  # an intermediate: computed here, as torch computed it
            out.value = step.product(left.value, right.value)
            out.ref = step.product(left.ref, right.ref) if reference else None
        steps.append(step)
        terms = [*others, out]
    return steps


def einsum_subscripts(equation: str, operands: list[Tensor]) -> tuple[list[str], str]:
    """The operands' and the output's subscripts with one letter per dimension: an ellipsis
    becomes letters of its own (right-aligned, as it broadcasts), an implicit output the
    ellipsis and the letters used once, in order."""
    equation = equation.replace(" ", "")
    lhs, _, rhs = equation.partition("->")
    inputs = lhs.split(",")
    spare = sorted(set(string.ascii_letters) - set(equation))
    width = max(t.dim() - len(s.replace("...", "")) for s, t in zip(inputs, operands, strict=True))
    letters = "".join(spare[:width]) if "..." in equation else ""
    inputs = [
        s.replace("...", letters[width - (t.dim() - len(s) + 3) :])
        for s, t in zip(inputs, operands, strict=True)
    ]
    if "->" not in equation:
        counts = collections.Counter("".join(inputs))
        rhs = letters + "".join(sorted(c for c in counts if counts[c] == 1 and c not in letters))
    return inputs, rhs.replace("...", letters)


def _onto_output(sink: Tensor, subs: str, output: str, shape: torch.Size) -> Tensor:
    """A step's sink [K, *step output] in the einsum's output shape: summed over letters the
    output does not have, at index 0 of the output's dimensions the step lacks (or had of
    size 1), so that each sample's sink stays that sample's."""
    if subs == output:
        return sink
    kept = "".join(c for c in output if c in subs)
    seeds = next(c for c in string.ascii_letters if c not in subs + output)
    reduced = torch.einsum(f"{seeds}{subs}->{seeds}{kept}", sink)
    index, view = [slice(None)], [sink.shape[0]]
    for c, n in zip(output, shape, strict=True):
        whole = c in kept and reduced.shape[1 + kept.index(c)] == n
        index.append(slice(None) if whole else slice(0, 1))
        view.append(reduced.shape[1 + kept.index(c)] if c in kept else 1)
    full = sink.new_zeros(sink.shape[0], *shape)
    full[tuple(index)] = reduced.reshape(view)
    return full


def _add(a: Tensor | None, b: Tensor) -> Tensor:
    return b if a is None else a + b


def product(
    R: Tensor, f: Callable, a: Tensor, b: Tensor, data: tuple[bool, bool]
) -> tuple[list[Tensor | None], Tensor]:
    """Mode "default" of a product: each data operand takes its part of R by
    the |z| rule (``proportional``) with the other operand as weights."""
    part = R * (0.5 if all(data) else 1.0)
    outs: list[Tensor | None] = [None, None]
    sink = R * (0.0 if any(data) else 1.0)
    if data[0]:
        outs[0], s = proportional(part, a, lambda u: f(u, b.abs()))
        sink = sink + s
    if data[1]:
        outs[1], s = proportional(part, b, lambda v: f(a.abs(), v))
        sink = sink + s
    return outs, sink


def product_difference(
    ctx: Ctx, f: Callable, a: Tensor, b: Tensor, data: tuple[bool, bool], refs
) -> tuple[list[Tensor | None], Tensor]:
    """Mode "reference" of a product (``refs``: the operands in the reference's forward)."""
    ar, br = refs
    if all(data):
        r_a, r_b, sink = difference_product(ctx, f, a, b, ar, br)
        return [r_a, r_b], sink
    if data[0]:
        r_a, sink = difference(ctx, a - ar, lambda u: f(u, b))
        return [r_a, None], sink
    if data[1]:
        r_b, sink = difference(ctx, b - br, lambda v: f(a, v))
        return [None, r_b], sink
    return [None, None], ctx.R
