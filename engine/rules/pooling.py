"""Pooling, interpolation and reductions: max pooling, the maps with non-negative weights
(average pools, means, sums, bilinear upsampling) and bicubic interpolation (signed weights)
by the |z| rule, and the non-linear reductions by shares that add up to 1."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy
import torch
import torch.nn.functional as F
from torch import Tensor

from .base import (
    TINY,
    Ctx,
    Family,
    Propagation,
    change,
    difference,
    proportional,
    stable,
    vjp,
)

aten = torch.ops.aten
# A variance or a standard deviation (with the mean, var_mean): shares by squared deviations
# here, and a constant where it weighs other data (``engine.provenance.NORMALISERS``).
STATISTICS = (
    aten.var.correction,
    aten.var.dim,
    aten.std.correction,
    aten.std.dim,
    aten.var_mean.correction,
    aten.var_mean.dim,
)


class MaxPool(Family):
    """Winner takes all (overlapping windows add up at a shared winner)."""

    ops = (aten.max_pool2d.default,)

    def default(self, ctx: Ctx) -> Propagation:
        x = ctx.x
        _, idx = _max_pool_indices(x, ctx.args)
        flat, r_in = ctx.R.flatten(3), _zeros_like_input(ctx)
        r_in.scatter_add_(3, idx.flatten(2).expand(ctx.K, -1, -1, -1), flat)
        return {"self": r_in.view(ctx.K, *x.shape)}, None

    def reference(self, ctx: Ctx) -> Propagation:
        """The change of a window's maximum goes to the input's winner where the maximum
        rose, and to the reference's winner where it fell (the element whose loss of value
        lowered it)."""
        a, x, xr, K = ctx.args, ctx.x, ctx.ref["self"], ctx.K
        out, idx = _max_pool_indices(x, a)
        out_ref, idx_ref = _max_pool_indices(xr, a)
        xf, xrf = x.flatten(2), xr.flatten(2)
        i, j = idx.flatten(2), idx_ref.flatten(2)
        gap_ref = (out_ref.flatten(2) - xrf.gather(2, i)).clamp(min=0)  # j* ahead at the start
        gap_in = (out.flatten(2) - xf.gather(2, j)).clamp(min=0)  # i* ahead at the end
        cross = torch.where(i == j, 0.0, gap_ref / (gap_ref + gap_in + TINY))
        d_i = (xf.gather(2, i) - xrf.gather(2, i)) * (1 - cross)
        d_j = (xf.gather(2, j) - xrf.gather(2, j)) * cross
        flat, r_in = ctx.R.flatten(3), _zeros_like_input(ctx)
        ratio = flat / stable((out - out_ref).flatten(2))
        r_in.scatter_add_(3, i.expand(K, -1, -1, -1), ratio * d_i)
        r_in.scatter_add_(3, j.expand(K, -1, -1, -1), ratio * d_j)
        return {"self": r_in.view(K, *x.shape)}, flat - ratio * (d_i + d_j)


def _zeros_like_input(ctx: Ctx) -> Tensor:
    """[K, B, C, H * W] zeros for the input's relevance."""
    x = ctx.x
    shape = (ctx.K, *x.shape[:2], x.shape[2] * x.shape[3])
    return torch.zeros(shape, dtype=ctx.R.dtype, device=x.device)


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


class PositiveMap(Family):
    """Maps with non-negative weights (average pools, sums, means): proportional shares by
    the |z| rule (in mode "default"), the difference rule in modes "reference" and "contrast"."""

    maps: dict[Any, Callable[[Ctx, Tensor], Tensor]] = {
        aten.adaptive_avg_pool2d.default: lambda c, u: F.adaptive_avg_pool2d(
            u, c.args["output_size"]
        ),
        aten.avg_pool2d.default: lambda c, u: aten.avg_pool2d.default(**{**c.args, "self": u}),
        # nn.LocalResponseNorm's sum of squares over neighbouring channels (of 4-D inputs)
        aten.avg_pool3d.default: lambda c, u: aten.avg_pool3d.default(**{**c.args, "self": u}),
        aten.mean.dim: lambda c, u: u.mean(_dims(c, u), c.args["keepdim"]),
        aten.sum.dim_IntList: lambda c, u: u.sum(_dims(c, u), c.args["keepdim"]),
        aten.cumsum.default: lambda c, u: u.cumsum(c.args["dim"]),
        aten.adaptive_avg_pool1d.default: lambda c, u: F.adaptive_avg_pool1d(
            u, c.args["output_size"]
        ),
        aten.upsample_bilinear2d.vec: lambda c, u: aten.upsample_bilinear2d.vec(
            **{**c.args, "input": u}
        ),
    }
    ops = tuple(maps)

    def map(self, ctx: Ctx) -> Callable[[Tensor], Tensor]:
        fn = self.maps[ctx.node.target]
        return lambda u: fn(ctx, u)

    def default(self, ctx: Ctx) -> Propagation:
        r_in, sink = proportional(ctx.R, ctx.x, self.map(ctx))
        return {ctx.first: r_in}, sink

    def reference(self, ctx: Ctx) -> Propagation:
        r_in, sink = difference(ctx, ctx.diff(ctx.first), self.map(ctx))
        return {ctx.first: r_in}, sink


class Interpolation(Family):
    """Separable 2-D interpolations y = A_h x A_w^T whose weights can be negative (bicubic;
    the antialiased kernels too): the |z| rule over |A_h| and |A_w|, D = |A_h| |x| |A_w|^T,
    whose contributions add up to D exactly, so R is conserved (the stabiliser's share is
    the sink). Mode "reference": the difference rule over the op itself (linear in x, so
    exact with signed weights)."""

    ops = (
        aten.upsample_bicubic2d.vec,
        aten.upsample_bicubic2d.default,
        aten._upsample_bicubic2d_aa.vec,
        aten._upsample_bicubic2d_aa.default,
        aten._upsample_bilinear2d_aa.vec,
        aten._upsample_bilinear2d_aa.default,
    )

    def default(self, ctx: Ctx) -> Propagation:
        a_h, a_w = (a.abs() for a in axis_matrices(ctx))
        r_in, sink = proportional(
            ctx.R, ctx.x, lambda u: torch.einsum("oh,...hw,pw->...op", a_h, u, a_w)
        )
        return {ctx.first: r_in}, sink

    def reference(self, ctx: Ctx) -> Propagation:
        r_in, sink = difference(ctx, ctx.diff(ctx.first), _op_on(ctx))
        return {ctx.first: r_in}, sink


class Fold(Family):
    """``col2im`` (``nn.Fold``: MobileViT-v2 folds its patches back into an image): each output
    element is the sum of the patch entries that land on it, a map linear in x with weights
    of one, so the |z| rule over the op itself shares an element's relevance over its
    entries in proportion to |entry| and conserves it (non-overlapping patches: each entry
    gets its element's). Mode "reference": the difference rule over the op."""

    ops = (aten.col2im.default,)

    def default(self, ctx: Ctx) -> Propagation:
        r_in, sink = proportional(ctx.R, ctx.x, _op_on(ctx))
        return {ctx.first: r_in}, sink

    def reference(self, ctx: Ctx) -> Propagation:
        r_in, sink = difference(ctx, ctx.diff(ctx.first), _op_on(ctx))
        return {ctx.first: r_in}, sink


def _op_on(ctx: Ctx) -> Callable[[Tensor], Tensor]:
    """The node's op, with its arguments, applied to another first argument."""
    return lambda u: ctx.node.target(**{**ctx.args, ctx.first: u})


def axis_matrices(ctx: Ctx) -> tuple[Tensor, Tensor]:
    """A_h [H_out, H] and A_w [W_out, W] of a separable interpolation, read off the op applied
    to unit rows (columns) held constant along the other axis: each output row of an
    interpolation kernel sums to 1, so the other axis contributes a factor 1."""
    x, op = ctx.x, _op_on(ctx)
    h, w = x.shape[-2:]
    eye = torch.eye(max(h, w), dtype=x.dtype, device=x.device)
    rows = eye[:h, None, :h, None].expand(h, 1, h, w).contiguous()
    cols = eye[:w, None, None, :w].expand(w, 1, h, w).contiguous()
    return op(rows)[:, 0, :, 0].T, op(cols)[:, 0, 0, :].T


def _dims(ctx: Ctx, u: Tensor) -> list[int]:
    return ctx.args["dim"] or list(range(u.dim()))


class Share(Family):
    """Reductions that are not linear (log-sum-exp, max, min, medians, vector norms): each
    output element's relevance is shared over the elements it reduced, by weights that add up
    to 1, so it is conserved in every mode. log-sum-exp: by softmax, the weights of its
    gradient (a soft maximum); amax / amin, and the median (nanmedian) of all elements: the
    element taken takes all, as in max pooling (ties split evenly); the p-norm: in proportion
    to |x|^p, each element's share of sum |x|^p (for p = inf, the winner); variance and
    standard deviation (where their output flows on by itself, as in statistics pooling:
    ``provenance.NORMALISERS``): each element's share of the sum of squared deviations
    (``var_mean``'s mean: its share of sum |x|, as a mean's).

    Mode "reference" uses the same shares: the weights at the input, not a difference rule,
    as the activations pass relevance on unchanged there."""

    ops = (
        aten.logsumexp.default,
        aten.amax.default,
        aten.amin.default,
        aten.linalg_vector_norm.default,
        aten.median.default,
        aten.nanmedian.default,
        *STATISTICS,
    )

    def default(self, ctx: Ctx) -> Propagation:
        x, a = ctx.x, ctx.args
        dims = a.get("dim") or list(range(x.dim()))
        if ctx.node.target in _VAR_MEAN:  # R of the outputs taken, by index
            weights = {0: _weights(aten.var.correction, x, dims, a), 1: _normalise(x.abs(), dims)}
            parts = [(ctx.R[i], weights[i]) for i in ctx.R]
        else:
            parts = [(ctx.R, _weights(ctx.node.target, x, dims, a))]
        shape = _kept_shape(x, dims)
        return {"self": sum(R.reshape(R.shape[0], *shape) * w for R, w in parts)}, None


class ScatterReduce(Family):
    """``self.scatter_reduce(dim, index, src, reduce, include_self)``: each output element
    reduces the ``src`` elements scattered to it (and its own ``self`` element where
    ``include_self``, or where nothing was scattered to it: it keeps ``self``). Its relevance
    is shared over those elements by weights that add up to 1, as ``Share``'s reductions do:
    "sum" and "mean" by |operand| (the |z| rule of their sum), "amax" and "amin" to the element
    taken (ties split evenly: BLT pools its bytes' states into patches so), "prod" evenly (as
    ``Prod``). A constant operand's share is a sink; so is an output element's relevance where
    all weights are 0. The same shares in every mode."""

    ops = (aten.scatter_reduce.two,)

    def default(self, ctx: Ctx) -> Propagation:
        a, out = ctx.args, ctx.out
        dim, index = a["dim"] % out.dim(), a["index"]
        covered = tuple(slice(0, n) for n in index.shape)  # the part of src index reaches
        src = a["src"][covered]
        hit = torch.zeros_like(out).scatter_add(dim, index, torch.ones_like(src)) > 0
        w_src, w_self = _scatter_weights(a["reduce"], a["self"], src, out, out.gather(dim, index))
        w_self = w_self * (~hit | a.get("include_self", True))
        total = w_self.scatter_add(dim, index, w_src)
        ratio = ctx.R / (total + TINY)
        grads, sink = {}, ratio * TINY
        if ctx.is_data("self"):
            grads["self"] = ratio * w_self
        else:
            sink = sink + ratio * w_self
        if ctx.is_data("src"):
            r_src = ctx.R.new_zeros(ctx.K, *a["src"].shape)
            at = index.expand(ctx.K, *index.shape)
            r_src[(slice(None), *covered)] = ratio.gather(dim + 1, at) * w_src
            grads["src"] = r_src
        else:
            sink = sink + ratio * (total - w_self)
        return grads, sink


def _scatter_weights(
    reduce: str, self_: Tensor, src: Tensor, out: Tensor, taken: Tensor
) -> tuple[Tensor, Tensor]:
    """``ScatterReduce``'s weights of the ``src`` elements and of ``self``'s, before their sum
    per output element (``taken``: the output at each src element's destination)."""
    if reduce in ("amax", "amin"):
        return (src == taken).to(src.dtype), (self_ == out).to(self_.dtype)
    if reduce == "prod":
        return torch.ones_like(src), torch.ones_like(self_)
    return src.abs(), self_.abs()


# Products of factors along a dimension, each with the sum that adds up the same elements:
# its adjoint spreads an output element's relevance over that element's factors.
_SUM_TWINS: dict[Any, Callable[[Ctx, Tensor], Tensor]] = {
    aten.prod.dim_int: lambda c, u: u.sum(c.args["dim"], c.args["keepdim"]),
    aten.prod.default: lambda c, u: u.sum(),
    aten.cumprod.default: lambda c, u: u.cumsum(c.args["dim"]),
}


class Prod(Family):
    """Products of many data factors (``prod``, ``cumprod``). Mode "default": each of an
    output element's n factors takes an equal share R / n, as the two factors of a gate do
    (``Mul``): with the other factors held fixed a factor is its map's only contribution, so
    the |z| rule gives it all of its part. The factors are the elements the op's sum twin
    (sum, cumsum) adds up: R_in is that sum's adjoint of R / n.

    Modes "reference" and "contrast": y - y' splits exactly into the factors' contributions
    along the straight line between the inputs, dx_i * integral_0^1 dy/dx_i(x' + t dx) dt
    (two factors: ``difference_product``'s split, dx_1 (x_2 + x'_2) / 2). The integrand is a
    polynomial of degree n - 1 in t: Gauss-Legendre nodes, ceil(n / 2) of them, are exact."""

    ops = tuple(_SUM_TWINS)

    def twin(self, ctx: Ctx) -> Callable[[Tensor], Tensor]:
        return lambda u: _SUM_TWINS[ctx.node.target](ctx, u)

    def default(self, ctx: Ctx) -> Propagation:
        ones, twin = torch.ones_like(ctx.x), self.twin(ctx)
        return {"self": vjp(twin, ones, ctx.R / twin(ones))}, None

    def reference(self, ctx: Ctx) -> Propagation:
        xr, f = ctx.ref["self"], _op_on(ctx)
        dx, ratio = ctx.diff("self"), ctx.per_change()
        factors = int(self.twin(ctx)(torch.ones_like(dx)).max())
        nodes, weights = numpy.polynomial.legendre.leggauss((factors + 1) // 2)
        slope = sum(
            w / 2 * vjp(f, xr + (t + 1) / 2 * dx, ratio)
            for t, w in zip(nodes.tolist(), weights.tolist(), strict=True)
        )
        return {"self": dx * slope}, ctx.R - ratio * change(ctx.out, ctx.ref_out)


def _kept_shape(x: Tensor, dims: list[int]) -> list[int]:
    reduced = {d % x.dim() for d in dims}
    return [1 if i in reduced else n for i, n in enumerate(x.shape)]


def _weights(target: Any, x: Tensor, dims: list[int], a: dict[str, Any]) -> Tensor:
    """Weights over ``dims`` that add up to 1, the shape of ``x``."""
    if target is aten.logsumexp.default:
        return _normalise((x - x.amax(dims, keepdim=True)).exp(), dims)
    if target in _DEVIATIONS:
        return _normalise((x - x.mean(dims, keepdim=True)).square(), dims)
    if target is aten.linalg_vector_norm.default:
        p = float(a["ord"])
        if abs(p) != float("inf"):
            return _normalise(x.abs() ** p if p else (x != 0).to(x.dtype), dims)
        x, target = x.abs(), aten.amax.default if p > 0 else aten.amin.default
    return _normalise((x == _TAKEN[target](x, dims)).to(x.dtype), dims)


# The element a selecting reduction takes (amax, amin over ``dims``; a median over all).
_TAKEN = {
    aten.amax.default: lambda x, dims: x.amax(dims, keepdim=True),
    aten.amin.default: lambda x, dims: x.amin(dims, keepdim=True),
    aten.median.default: lambda x, dims: x.median(),
    aten.nanmedian.default: lambda x, dims: x.nanmedian(),
}


_DEVIATIONS = {aten.var.correction, aten.var.dim, aten.std.correction, aten.std.dim}
_VAR_MEAN = {aten.var_mean.correction, aten.var_mean.dim}


def _normalise(w: Tensor, dims: list[int]) -> Tensor:
    return w / w.sum(dims, keepdim=True).clamp_min(TINY)
