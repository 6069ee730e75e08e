"""Shape ops: relevance moves with the elements (reshapes, permutations, selections, joins,
splits), constant padding is a sink, and an embedding lookup sums it per token. The same in
every mode: these maps have no bias and no weights."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Ctx, Family, Propagation, vjp

aten = torch.ops.aten


class Reshape(Family):
    ops = (
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

    def default(self, ctx: Ctx) -> Propagation:
        return {ctx.first: ctx.R.reshape(ctx.K, *ctx.x.shape)}, None


class Permute(Family):
    ops = (aten.permute.default,)

    def default(self, ctx: Ctx) -> Propagation:
        dims = [d % (ctx.R.dim() - 1) for d in ctx.args["dims"]]
        inverse = [0] * len(dims)
        for i, d in enumerate(dims):
            inverse[d] = i
        return {"self": ctx.R.permute(0, *[i + 1 for i in inverse])}, None


class Transpose(Family):
    ops = (aten.transpose.int, aten.t.default)

    def default(self, ctx: Ctx) -> Propagation:
        if ctx.node.target is aten.t.default:
            return {"self": ctx.R.transpose(-1, -2)}, None
        n = ctx.R.dim() - 1
        d0, d1 = ctx.args["dim0"] % n, ctx.args["dim1"] % n
        return {"self": ctx.R.transpose(d0 + 1, d1 + 1)}, None


class Adjoint(Family):
    """Selections, copies and broadcasts: relevance goes back to the elements each output
    element came from (the adjoint of the op, which adds where several outputs share a source)."""

    ops = (
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

    def default(self, ctx: Ctx) -> Propagation:
        args = dict(ctx.args)
        x = args.pop(ctx.first)
        return {ctx.first: vjp(lambda u: ctx.node.target(u, **args), x, ctx.R)}, None


class Cat(Family):
    """Split relevance along the joined dimension."""

    ops = (aten.cat.default,)

    def default(self, ctx: Ctx) -> Propagation:
        tensors = ctx.args["tensors"]
        dim = ctx.args["dim"] % tensors[0].dim()
        sizes = [t.shape[dim] for t in tensors]
        return {"tensors": list(ctx.R.split(sizes, dim=dim + 1))}, None


class Split(Family):
    """Multi-output splits: ``R`` is a dict {output index: relevance}; absent outputs get 0."""

    ops = (aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int, aten.chunk.default)

    def default(self, ctx: Ctx) -> Propagation:
        K = next(iter(ctx.R.values())).shape[0]
        parts = [
            ctx.R.get(i, torch.zeros(K, *o.shape, dtype=o.dtype, device=o.device))
            for i, o in enumerate(ctx.out)
        ]
        dim = ctx.args["dim"] % ctx.x.dim()
        if ctx.node.target is aten.unbind.int:
            parts = [p.unsqueeze(dim + 1) for p in parts]
        return {ctx.first: torch.cat(parts, dim=dim + 1)}, None


class Pad(Family):
    """The padded border holds constants: its relevance is a sink."""

    ops = (aten.constant_pad_nd.default,)

    def default(self, ctx: Ctx) -> Propagation:
        pads = ctx.args["pad"]
        if any(p < 0 for p in pads):
            raise NotImplementedError("constant_pad_nd with negative padding (cropping)")
        index = [slice(None)] * ctx.R.dim()
        for i in range(len(pads) // 2):
            axis = ctx.R.dim() - 1 - i
            index[axis] = slice(pads[2 * i], ctx.R.shape[axis] - pads[2 * i + 1])
        kept: Tensor = ctx.R[tuple(index)]
        sink = ctx.R.clone()
        sink[tuple(index)] = 0
        return {"self": kept.reshape(ctx.K, *ctx.x.shape)}, sink


class Embedding(Family):
    """Per-token relevance: the embedding output's relevance summed over the hidden size."""

    ops = (aten.embedding.default,)

    def default(self, ctx: Ctx) -> Propagation:
        return {"indices": ctx.R.sum(-1)}, None
