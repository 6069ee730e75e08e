"""Elementwise ops: residual sums, gates and divisions, where, masked_fill, and the activations
and copies that hand relevance on unchanged."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import TINY, Ctx, Family, Propagation, difference_product, unbroadcast
from .normalisation import norm_difference

aten = torch.ops.aten


class Identity(Family):
    """Activations (the nonlinearity is not evidence: relevance passes unchanged, and in mode
    "reference" their ratio of differences becomes the multiplier), copies and casts."""

    ops = (
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
        aten.clone.default,
        aten.alias.default,
        aten.detach.default,
        aten._to_copy.default,
        aten.lift_fresh_copy.default,
        aten.contiguous.default,
        aten.dropout.default,
    )
    default = contrast = reference = Family.identity


class Add(Family):
    """Residuals: split elementwise in proportion to |operand|; a constant's share is a sink."""

    ops = (
        aten.add.Tensor,
        aten.sub.Tensor,
        aten.add.Scalar,
        aten.sub.Scalar,
        aten.rsub.Scalar,
        aten.rsub.Tensor,
    )

    def default(self, ctx: Ctx) -> Propagation:
        a, b = ctx.args["self"], ctx.args["other"] * ctx.args.get("alpha", 1)
        aa = a.abs() if isinstance(a, Tensor) else abs(a)
        ab = b.abs() if isinstance(b, Tensor) else abs(b)
        ratio = ctx.R / (aa + ab + TINY)
        grads, passed = {}, None
        for name, mag, value in (("self", aa, a), ("other", ab, b)):
            if isinstance(value, Tensor) and ctx.is_data(name):
                share = ratio * mag
                grads[name] = unbroadcast(share, value.shape)
                passed = share if passed is None else passed + share
        # the constant's share, and where both magnitudes are 0 (nothing can be passed on)
        return grads, ctx.R if passed is None else ctx.R - passed

    def reference(self, ctx: Ctx) -> Propagation:
        """Shares of the operands' changes; a constant does not change."""
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
        grads = {n: unbroadcast(ratio * d, ctx.args[n].shape) for n, d in parts.items()}
        return grads, ctx.R - ratio * total


class Mul(Family):
    """Gates: half to each data operand; a constant factor or divisor passes all to the data
    operand (the numerator, for a division by a data-derived tensor).

    Mode "reference": a product of two data operands splits exactly (``difference_product``),
    and the hand-written RMS norm x * rsqrt(mean(x^2) + eps) (``Canonical.rms_eps``) gets the
    norm's difference rule, since its normaliser changes with x as in aten.rms_norm."""

    ops = (aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar)

    def targets(self, ctx: Ctx) -> list[str]:
        """The data operands relevance goes to."""
        names = [n for n in ("self", "other") if isinstance(ctx.args[n], Tensor) and ctx.is_data(n)]
        return ["self"] if self.division(ctx) and "self" in names else names

    def division(self, ctx: Ctx) -> bool:
        return ctx.node.target in (aten.div.Tensor, aten.div.Scalar)

    def default(self, ctx: Ctx) -> Propagation:
        targets = self.targets(ctx)
        grads = {n: unbroadcast(ctx.R / len(targets), ctx.args[n].shape) for n in targets}
        return grads, (None if targets else ctx.R)

    def reference(self, ctx: Ctx) -> Propagation:
        targets = self.targets(ctx)
        if len(targets) == 2:
            a, b = ctx.args["self"], ctx.args["other"]
            r_a, r_b, sink = difference_product(
                ctx, torch.mul, a, b, ctx.ref["self"], ctx.ref["other"]
            )
            return {"self": unbroadcast(r_a, a.shape), "other": unbroadcast(r_b, b.shape)}, sink
        eps = ctx.facts.rms_eps.get(ctx.node)
        if len(targets) == 1 and not self.division(ctx) and eps is not None:
            name = targets[0]
            r_in, sink = norm_difference(ctx, ctx.args[name], ctx.ref[name], 1.0, eps, 1, False)
            return {name: r_in}, sink
        return self.default(ctx)


class Where(Family):
    """Each output element's relevance goes to the operand it was taken from."""

    ops = (aten.where.self,)

    def default(self, ctx: Ctx) -> Propagation:
        cond = ctx.args["condition"]
        grads, sink = {}, ctx.R * 0
        for name, keep in (("self", cond), ("other", ~cond)):
            share = torch.where(keep, ctx.R, 0)
            value = ctx.args[name]
            if isinstance(value, Tensor) and ctx.is_data(name):
                grads[name] = unbroadcast(share, value.shape)
            else:
                sink = sink + share
        return grads, sink


class MaskedFill(Family):
    """Filled positions hold a constant: their relevance is a sink."""

    ops = (aten.masked_fill.Scalar, aten.masked_fill.Tensor)

    def default(self, ctx: Ctx) -> Propagation:
        mask = ctx.args["mask"]
        kept = unbroadcast(torch.where(mask, 0, ctx.R), ctx.x.shape)
        return {"self": kept}, torch.where(mask, ctx.R, 0)
