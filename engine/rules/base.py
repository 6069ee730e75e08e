"""The one mechanism every rule is built from: what a rule sees of a node (``Ctx``), the
stabilisers, the |z| proportional propagation, the difference rule and the adjoint helpers.

A rule receives the relevance ``R`` of a node's output, shaped ``[K, *output.shape]`` (``K``
seeds swept at once), and the values recorded in the forward pass. It returns the relevance
of each tensor argument (by schema name) and the part of ``R`` that stays behind (bias and
constant shares: the sinks of the conservation report), shaped like ``R`` or reduced over
trailing non-batch axes; the sweep sums it per sample.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, fx


@dataclass(frozen=True)
class Canonical:
    """What the canonize pass (``engine.canonize``) found in a graph, once, before any sweep:
    the rules read these facts instead of matching graph patterns themselves."""

    # convolutions with an eval batch norm folded in: node -> arguments (the norm -> {})
    fused: dict[fx.Node, dict[str, Any]] = field(default_factory=dict)
    # convolutions and linear layers whose only consumer is a relu (through a batch norm)
    relu_after: frozenset[fx.Node] = frozenset()
    # x * rsqrt(mean(x ** 2, -1, keepdim) + eps) products: the hand-written RMS norm -> eps
    rms_eps: dict[fx.Node, float] = field(default_factory=dict)
    # adds of a constant (position or token-type embeddings) to an input's token embeddings
    embedded: frozenset[fx.Node] = frozenset()
    # the topk nodes that route tokens to the experts of grouped matmuls
    routing: tuple[fx.Node, ...] = ()
    # masked_fill / where nodes on ids whose condition is computed elementwise from the ids
    # they fill (``ids.masked_fill(ids == -100, pad)``): each output id re-encodes the id
    # at its position (``canonize.recoded_ids``)
    recoded: frozenset[fx.Node] = frozenset()


@dataclass
class Ctx:
    """What a rule sees of one node."""

    node: fx.Node
    args: dict[str, Any]
    out: Any
    R: Any
    is_data: Callable[..., bool]
    abs_of: Callable[[Tensor], Tensor]
    bias_term: Callable[[Tensor | None, int, Tensor], Tensor]
    ref: dict[str, Any] | None = None  # the arguments in the reference's forward (modes
    # "reference" and "contrast")
    ref_out: Any = None  # the output in the reference's forward
    facts: Canonical = field(default_factory=Canonical)

    @property
    def first(self) -> str:
        """Name of the op's first argument (``self`` or ``input`` in ATen schemas)."""
        return next(iter(self.args))

    @property
    def x(self) -> Tensor:
        return self.args[self.first]

    @property
    def K(self) -> int:
        return self.R.shape[0]

    def diff(self, name: str, index: int | None = None) -> Tensor:
        """Argument ``name`` minus its value in the reference's forward pass (``change``)."""
        x, r = self.args[name], self.ref[name]
        return change(x, r) if index is None else change(x[index], r[index])

    def per_change(self) -> Tensor:
        """Mode "reference": R per unit of the output's change y - y', taken as the two forward
        passes computed it. That is what the consumers shared R by (their ``diff``), so the
        ratio stays bounded by theirs. A rule's own sum of contributions equals it in exact
        arithmetic, but not after rounding: in half precision, or with TF32 on a GPU, it can
        be near 0 where y - y' is not, and dividing by it blew relevance up by 1e11. The
        difference between the two becomes a sink instead."""
        return self.R / stable(change(self.out, self.ref_out))


def change(x: Tensor, ref: Tensor) -> Tensor:
    """x - x' of two forward passes; where both hold the same infinity (a mask's -inf added
    to attention scores), no change (inf - inf is NaN; any NaN is taken as no change, and an
    infinite change as the largest float)."""
    d = x - ref
    return d.nan_to_num_(nan=0.0) if d.is_floating_point() else d


Propagation = tuple[dict[str, Any], Tensor | None]
Rule = Callable[[Ctx], Propagation]


def passes_through(method: Callable) -> Callable:
    """Mark a rule method that hands ``R`` unchanged to the op's first argument: the sweep
    then skips building a Ctx for the node."""
    method.passes_through = True
    return method


class Family:
    """The rules of a family of ops, one method per mode (``engine.rules.modes`` picks which).

    ``ops`` lists the op overloads the family covers. A family whose math is the same in
    every mode writes ``default`` only: ``reference`` falls back to it. Mode ``contrast``
    runs the ``reference`` rules (``engine.contrast``); only the seed head differs."""

    ops: tuple[Any, ...] = ()
    # Whether the op is a learned map (a linear layer, a convolution, a product, a norm's
    # affine, attention): its output is features, even where its input was attention or
    # routing weights (``provenance``'s weights, which stay weights through other ops only).
    maps: bool = False

    def default(self, ctx: Ctx) -> Propagation:
        raise NotImplementedError

    def contrast(self, ctx: Ctx) -> Propagation:
        return self.reference(ctx)

    def reference(self, ctx: Ctx) -> Propagation:
        return self.default(ctx)

    @passes_through
    def identity(self, ctx: Ctx) -> Propagation:
        """R goes to the first argument unchanged."""
        return {ctx.first: ctx.R}, None


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


def proportional(R: Tensor, x: Tensor, f_abs: Callable) -> tuple[Tensor, Tensor]:
    """The |z| rule for any map linear in ``x`` without bias: ``f_abs`` applies the map with
    |weights|. D = f_abs(|x|);  R_in = |x| * f_abs^T(R / D). The contributions add up to D,
    so the sink is exactly the share R * TINY / (D + TINY) the stabiliser withheld."""
    ax = x.abs()
    ratio = R / (f_abs(ax) + TINY)
    return ax * vjp(f_abs, ax, ratio), ratio * TINY


def difference(ctx: Ctx, dx: Tensor, f: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    """Mode "reference" for the op, a map ``f`` linear in ``x`` (bias left out: it cancels):
    R_in = dx * f^T(R / dy), and the sink R - (R / dy) f(dx)."""
    ratio = ctx.per_change()
    return dx * vjp(f, dx, ratio), ctx.R - ratio * f(dx)


def difference_product(ctx: Ctx, f: Callable, a: Tensor, b: Tensor, ar: Tensor, br: Tensor):
    """Mode "reference" for the op, a product of two data operands, split exactly:
    f(a, b) - f(a', b') = f(a - a', (b + b') / 2) + f((a + a') / 2, b - b')."""
    da, db, ma, mb = a - ar, b - br, (a + ar) / 2, (b + br) / 2
    ratio = ctx.per_change()
    r_a = da * vjp(lambda u: f(u, mb), da, ratio)
    r_b = db * vjp(lambda v: f(ma, v), db, ratio)
    return r_a, r_b, ctx.R - ratio * (f(a, b) - f(ar, br))


def unbroadcast(r: Tensor, shape: torch.Size) -> Tensor:
    """Sum relevance over dimensions an operand was broadcast along (``r`` has a leading K)."""
    extra = r.dim() - 1 - len(shape)
    if extra:
        r = r.sum(dim=tuple(range(1, 1 + extra)))
    dims = tuple(i + 1 for i, n in enumerate(shape) if n == 1 and r.shape[i + 1] != 1)
    return r.sum(dim=dims, keepdim=True) if dims else r


def fold_seeds(t: Tensor) -> Tensor:
    """[K, B, ...] -> [K*B, ...] for ops that only take one batch dimension."""
    return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])


def vjp(fn: Callable[[Tensor], Tensor], x: Tensor, R: Tensor) -> Tensor:
    """Adjoint of the linear map ``fn`` applied to each of the K relevance maps."""
    _, pullback = torch.func.vjp(fn, x)
    return torch.func.vmap(lambda r: pullback(r)[0])(R)
