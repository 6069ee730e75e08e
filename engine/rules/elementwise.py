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
        aten.prelu.default,  # its slope is a parameter, not evidence
        aten.rrelu.default,  # eval: a leaky relu of fixed slope
        aten.elu.default,
        aten.selu.default,
        aten.celu.default,
        aten.threshold.default,
        aten.mish.default,
        aten.log_softmax.int,  # a classifier's last op: the logits less a per-row constant
        aten._log_softmax.default,
        aten.neg.default,
        aten.pow.Tensor_Scalar,
        aten.erf.default,
        aten.exp.default,
        aten.log.default,
        aten.cos.default,
        aten.sin.default,
        aten.acos.default,  # YOSO's hash collision probability
        aten.asin.default,
        aten.atan.default,
        aten.abs.default,
        aten.clone.default,
        aten.alias.default,
        aten.detach.default,
        aten._to_copy.default,
        aten.lift_fresh_copy.default,
        aten.contiguous.default,
        aten.dropout.default,
        aten.type_as.default,
        aten.square.default,
        aten.clamp.default,
        aten.clamp.Tensor,
        aten.clamp_min.default,
        aten.clamp_max.default,
        aten.softplus.default,
        aten.expm1.default,
        aten.log_sigmoid.default,
        # normalisers whose output flows on by itself (``provenance.NORMALISERS``)
        aten.rsqrt.default,
        aten.sqrt.default,
        aten.reciprocal.default,
    )
    default = contrast = reference = Family.identity


class Copy(Family):
    """``copy(self, src)``: the output holds src's values (broadcast), so relevance goes to
    src; the overwritten ``self`` contributed nothing."""

    ops = (aten.copy.default,)

    def default(self, ctx: Ctx) -> Propagation:
        return {"src": unbroadcast(ctx.R, ctx.args["src"].shape)}, None


class Extremum(Family):
    """Elementwise min / max of two tensors: each output element's relevance goes to the
    operand it was taken from (``self`` on ties), as ``Where`` does."""

    ops = (aten.min.other, aten.max.other, aten.minimum.default, aten.maximum.default)

    def default(self, ctx: Ctx) -> Propagation:
        a, b = ctx.args["self"], ctx.args["other"]
        took_a = (ctx.out == a).expand_as(ctx.out)
        return {
            "self": unbroadcast(torch.where(took_a, ctx.R, 0), a.shape),
            "other": unbroadcast(torch.where(took_a, 0, ctx.R), b.shape),
        }, None


class AddCMul(Family):
    """``self + value * tensor1 * tensor2``: a residual sum of ``self`` and a gate, split as
    ``Add`` splits (in proportion to |operand|), the gate's share halved between its data
    factors as ``Mul`` does. Mode "reference": the changes of the sum's terms, the product's
    change split exactly (t1 t2 - t1' t2' = dt1 (t2 + t2') / 2 + (t1 + t1') / 2 dt2)."""

    ops = (aten.addcmul.default,)

    def default(self, ctx: Ctx) -> Propagation:
        a, t1, t2 = ctx.args["self"], ctx.args["tensor1"], ctx.args["tensor2"]
        aa, ap = a.abs(), (ctx.args["value"] * t1 * t2).abs()
        ratio = ctx.R / (aa + ap + TINY)
        factors = [n for n in ("tensor1", "tensor2") if ctx.is_data(n)] or ["tensor1"]
        grads = {"self": unbroadcast(ratio * aa, a.shape)}
        for n in factors:
            grads[n] = unbroadcast(ratio * ap / len(factors), ctx.args[n].shape)
        return grads, ratio * TINY

    def reference(self, ctx: Ctx) -> Propagation:
        value, (t1, t2), (r1, r2) = (
            ctx.args["value"],
            self._factors(ctx.args),
            self._factors(ctx.ref),
        )
        parts = {
            "self": ctx.diff("self"),
            "tensor1": value * (t1 - r1) * (t2 + r2) / 2,
            "tensor2": value * (t1 + r1) / 2 * (t2 - r2),
        }
        ratio = ctx.per_change()
        grads = {n: unbroadcast(ratio * d, ctx.args[n].shape) for n, d in parts.items()}
        return grads, ctx.R - ratio * sum(parts.values())

    @staticmethod
    def _factors(args: dict) -> tuple[Tensor, Tensor]:
        return args["tensor1"], args["tensor2"]


class IdArithmetic(Family):
    """Integer arithmetic on token ids (CANINE hashes each code point into buckets: (id + 1)
    * prime % buckets): the result stands for the token, so R goes whole to the ids."""

    ops = (aten.remainder.Scalar, aten.remainder.Tensor)
    default = contrast = reference = Family.identity


def _on_ids(ctx: Ctx) -> bool:
    """Whether the op computes integer ids (``IdArithmetic``), not values."""
    return isinstance(ctx.out, Tensor) and not ctx.out.is_floating_point()


def _finite(magnitude: Tensor) -> Tensor:
    """|operand| with infinities (a -inf mask added to -inf scores) held to a quarter of the
    largest float, so that two of them sum to a finite denominator: inf / inf shares were
    NaN where the relevance itself is 0 (masked attention scores get none)."""
    if not magnitude.is_floating_point():
        return magnitude
    return magnitude.masked_fill(magnitude.isinf(), torch.finfo(magnitude.dtype).max / 4)


def _number(value: object) -> bool:
    """A Python number, or a 0-dim tensor (a number torch.export lifted to a constant)."""
    return not isinstance(value, Tensor) or value.dim() == 0


def _data_operands(ctx: Ctx) -> list[str]:
    """The names of a binary op's tensor operands ("self", "other") that carry data."""
    return [n for n in ("self", "other") if isinstance(ctx.args.get(n), Tensor) and ctx.is_data(n)]


def _shifted(ctx: Ctx) -> str | None:
    """The data operand of a sum with a number (``x + 1``, ``1 - x``), None for any other sum:
    such a sum is an elementwise function of that operand alone."""
    names = _data_operands(ctx)
    if len(names) != 1:
        return None
    other = "other" if names[0] == "self" else "self"
    same = isinstance(ctx.out, Tensor) and ctx.out.shape == ctx.args[names[0]].shape
    return names[0] if same and _number(ctx.args[other]) else None


class Add(Family):
    """Residuals: split elementwise in proportion to |operand|; a constant's share is a sink.
    On integer ids, R goes whole to the ids (``IdArithmetic``). A constant added to an input's
    token embeddings (positions, token types: ``Canonical.embedded``) is part of each token's
    input: R goes whole to the embeddings, as relevance read at their sum would have it. A
    number added (``1 + tanh(...)`` of a GELU written out, ``x + 3`` of a hard sigmoid) makes
    an elementwise function of one tensor, an activation: R goes whole to that tensor."""

    ops = (
        aten.add.Tensor,
        aten.sub.Tensor,
        aten.add.Scalar,
        aten.sub.Scalar,
        aten.rsub.Scalar,
        aten.rsub.Tensor,
    )

    def default(self, ctx: Ctx) -> Propagation:
        if _on_ids(ctx):
            return {ctx.first: ctx.R}, None
        if ctx.node in ctx.facts.embedded:
            name = "self" if ctx.is_data("self") else "other"
            return {name: unbroadcast(ctx.R, ctx.args[name].shape)}, None
        shifted = _shifted(ctx)
        if shifted is not None:
            return {shifted: ctx.R}, None
        a, b = ctx.args["self"], ctx.args["other"] * ctx.args.get("alpha", 1)
        aa = _finite(a.abs()) if isinstance(a, Tensor) else abs(a)
        ab = _finite(b.abs()) if isinstance(b, Tensor) else abs(b)
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
        if _on_ids(ctx):
            return self.default(ctx)
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
                parts[name] = ctx.diff(name) * c
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
        names = _data_operands(ctx)
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


def _recoded(ctx: Ctx) -> Propagation | None:
    """On ids whose condition is computed from those ids alone (``Canonical.recoded``:
    ``ids.masked_fill(ids == -100, pad)``), every output id stands for the id at its position,
    replaced or not: R goes whole to the ids, as ``IdArithmetic`` gives it. None elsewhere."""
    if ctx.node not in ctx.facts.recoded:
        return None
    name = _data_operands(ctx)[0]
    return {name: unbroadcast(ctx.R, ctx.args[name].shape)}, None


class Where(Family):
    """Each output element's relevance goes to the operand it was taken from (a sink where
    that is a constant or a number), on ids recoded by their own condition to the ids."""

    ops = (aten.where.self, aten.where.ScalarSelf, aten.where.ScalarOther, aten.where.Scalar)

    def default(self, ctx: Ctx) -> Propagation:
        recoded = _recoded(ctx)
        if recoded is not None:
            return recoded
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
    """Filled positions hold a constant: their relevance is a sink, but for ids filled where
    a condition on those ids holds (-100 labels made pad ids), which it goes to."""

    ops = (aten.masked_fill.Scalar, aten.masked_fill.Tensor)

    def default(self, ctx: Ctx) -> Propagation:
        recoded = _recoded(ctx)
        if recoded is not None:
            return recoded
        mask = ctx.args["mask"]
        kept = unbroadcast(torch.where(mask, 0, ctx.R), ctx.x.shape)
        return {"self": kept}, torch.where(mask, ctx.R, 0)
