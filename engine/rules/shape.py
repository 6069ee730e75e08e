"""Shape ops: relevance moves with the elements (reshapes, permutations, selections, joins,
splits), constant padding is a sink, and an embedding lookup sums it per token. The same in
every mode: these maps have no bias and no weights."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import TINY, Ctx, Family, Propagation, unbroadcast, vjp

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
        aten.repeat_interleave.self_int,
        aten.upsample_nearest1d.vec,
        aten.upsample_nearest2d.vec,
        aten.upsample_nearest2d.default,
        aten.im2col.default,
        aten.reflection_pad1d.default,
        aten.reflection_pad2d.default,
        aten.replication_pad1d.default,
        aten.replication_pad2d.default,
        aten.as_strided.default,  # overlapping windows (Longformer's chunks) add up
        # triangles of a data tensor (linear attention's causal masks): the zeroed entries
        # are zero outputs, which the rules above them give no relevance
        aten.tril.default,
        aten.triu.default,
    )

    def default(self, ctx: Ctx) -> Propagation:
        """Integer inputs (ids on their way to an embedding) are selected as floats: the
        adjoint of a selection does not depend on the values."""
        args = dict(ctx.args)
        x = args.pop(ctx.first)
        if not x.is_floating_point():
            x = x.to(ctx.R.dtype)
        return {ctx.first: vjp(lambda u: ctx.node.target(u, **args), x, ctx.R)}, None


class Cat(Family):
    """Split relevance along the joined dimension."""

    ops = (aten.cat.default, aten.concatenate.default)

    def default(self, ctx: Ctx) -> Propagation:
        tensors = ctx.args["tensors"]
        dim = ctx.args["dim"] % tensors[0].dim()
        sizes = [t.shape[dim] for t in tensors]
        return {"tensors": list(ctx.R.split(sizes, dim=dim + 1))}, None


class Stack(Family):
    """Each piece gets its slice of the stacked dimension."""

    ops = (aten.stack.default,)

    def default(self, ctx: Ctx) -> Propagation:
        dim = ctx.args["dim"] % (ctx.R.dim() - 1)
        return {"tensors": list(ctx.R.unbind(dim + 1))}, None


class Scatter(Family):
    """Writes into a tensor (``slice_scatter``, ``select_scatter``, ``index_put``,
    ``index_add``, ``scatter``), linear in all
    its tensor operands together: an element that was overwritten takes relevance from the
    one that replaced it (the adjoint), one that was added to shares it with the addends in
    proportion to |operand| (the |z| rule; the difference rule in mode "reference").
    A constant operand's share is a sink."""

    ops = (
        aten.slice_scatter.default,
        aten.select_scatter.default,
        aten.index_put.default,
        aten.index_add.default,
        aten.scatter.src,
    )

    def default(self, ctx: Ctx) -> Propagation:
        names, f, values = self._map(ctx, absolute=True)
        data = [ctx.is_data(n) for n in names]
        if not self._adds(ctx):
            shares = _joint_vjp(f, values, ctx.R)
            # what constants wrote, in the output's shape (a broadcast constant's own shape
            # would not say which sample its share came from)
            written = f(*_constants([torch.ones_like(v) for v in values], data))
            grads = {n: g for n, g, d in zip(names, shares, data, strict=True) if d}
            return grads, ctx.R * written
        magnitudes = [v.abs() for v in values]
        ratio = ctx.R / (f(*magnitudes) + TINY)
        shares = _joint_vjp(f, magnitudes, ratio)
        grads = {n: m * g for n, m, g, d in zip(names, magnitudes, shares, data, strict=True) if d}
        constants = f(*_constants(magnitudes, data))
        return grads, ratio * (constants + TINY)

    def reference(self, ctx: Ctx) -> Propagation:
        if not self._adds(ctx):
            return self.default(ctx)
        names, f, _ = self._map(ctx, absolute=False)
        changes = [ctx.diff(n) for n in names]
        ratio = ctx.per_change()
        shares = _joint_vjp(f, changes, ratio)
        grads = {n: d * g for n, d, g in zip(names, changes, shares, strict=True)}
        return grads, ctx.R - ratio * f(*changes)

    @staticmethod
    def _adds(ctx: Ctx) -> bool:
        return ctx.node.target is aten.index_add.default or bool(ctx.args.get("accumulate"))

    @staticmethod
    def _map(ctx: Ctx, absolute: bool) -> tuple[list[str], Callable[..., Tensor], list[Tensor]]:
        """The operands written from and into, the op as a function of them (|alpha| for the
        |z| rule) and their values. Integer ids (an index_put that masks some ids on their way
        to an embedding) are taken as floats: the adjoint of a write does not depend on them."""
        names = [n for n in _WRITTEN if isinstance(ctx.args.get(n), Tensor)]
        args = dict(ctx.args)
        for n in names:
            if not args[n].is_floating_point():
                args[n] = args[n].to(ctx.R.dtype)
        for bound in ("start", "end"):
            # the exported graph's end may be sys.maxsize, a start negative (Longformer's
            # x[:, -w:] = ...): in range, as the forward reads them, because slice_scatter's
            # adjoint takes end - start for the slice's length
            if args.get(bound) is not None:
                size = ctx.x.shape[args["dim"]]
                at = args[bound] + size if args[bound] < 0 else args[bound]
                args[bound] = min(max(at, 0), size)
        if absolute and "alpha" in args:
            args["alpha"] = abs(args["alpha"])
        return (
            names,
            lambda *ts: ctx.node.target(**{**args, **dict(zip(names, ts, strict=True))}),
            [args[n] for n in names],
        )


class MaskedScatter(Family):
    """``self.masked_scatter(mask, source)``, as vision-language models put image features at
    their image tokens' embeddings (Gemma 3, LLaVA): the masked elements, in order, take
    source's first elements. A replaced element's relevance goes to the source element
    written there, every other to ``self``; a selection, the same in every mode."""

    ops = (aten.masked_scatter.default,)

    def default(self, ctx: Ctx) -> Propagation:
        x, src = ctx.args["self"], ctx.args["source"]
        mask = ctx.args["mask"].expand_as(ctx.out)
        taken = ctx.R[:, mask]  # [K, masked elements], in the order source fills them
        r_src = taken.new_zeros(ctx.K, src.numel())
        r_src[:, : taken.shape[1]] = taken
        r_self = unbroadcast(ctx.R.masked_fill(mask, 0), x.shape)
        return {"self": r_self, "source": r_src.view(ctx.K, *src.shape)}, None


# the operands of Scatter's ops that values are written from or into (not their indices)
_WRITTEN = ("self", "src", "values", "source")


def _constants(values: list[Tensor], data: list[bool]) -> list[Tensor]:
    """``values`` with the data operands zeroed: the op applied to them is what constants
    put in."""
    return [torch.zeros_like(v) if d else v for v, d in zip(values, data, strict=True)]


def _joint_vjp(f: Callable[..., Tensor], values: list[Tensor], R: Tensor) -> list[Tensor]:
    """Adjoint of the map ``f``, linear in all of ``values`` together, for each of the K
    relevance maps: one result per operand."""
    _, pullback = torch.func.vjp(f, *values)
    return list(torch.func.vmap(pullback)(R))


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


class TopK(Family):
    """Selections along a dimension: each value taken gives its relevance back to the element
    it was taken from, found by the op's own indices (which carry none). ``topk`` and
    ``sort`` (and ``msort``, which export writes as a sort) take k or all of the elements, in
    order; ``max`` / ``min``, ``median``, ``nanmedian`` and ``kthvalue`` along a dimension
    take one: the winner takes all, as in max pooling."""

    ops = (
        aten.topk.default,
        aten.max.dim,
        aten.min.dim,
        aten.sort.default,
        aten.sort.stable,
        aten.kthvalue.default,
        aten.median.dim,
        aten.nanmedian.dim,
    )

    def default(self, ctx: Ctx) -> Propagation:
        values, index = ctx.out
        r = ctx.R.get(0)
        r_in = torch.zeros(r.shape[0], *ctx.x.shape, dtype=r.dtype, device=r.device)
        dim = ctx.args["dim"] % ctx.x.dim()
        if not ctx.args.get("keepdim", True):  # one element taken, its dimension dropped
            r, index = r.unsqueeze(dim + 1), index.unsqueeze(dim)
        return {"self": r_in.scatter_add(dim + 1, index.expand_as(r), r)}, None


class Pad(Family):
    """A constant border holds constants: its relevance is a sink (negative pads crop: the
    cropped elements contributed nothing; padded token ids: the pad tokens' share). A
    reflected, replicated or circular border copies elements: their relevance goes back to
    the element each copied (the adjoint)."""

    ops = (aten.constant_pad_nd.default, aten.pad.default)

    def default(self, ctx: Ctx) -> Propagation:
        pads, mode = ctx.args["pad"], ctx.args.get("mode", "constant")
        x = ctx.x if ctx.x.is_floating_point() else ctx.x.to(ctx.R.dtype)  # ids padded
        r_in = vjp(lambda u: F.pad(u, pads, mode), x, ctx.R)
        if mode != "constant":
            return {"self": r_in}, None
        border = F.pad(torch.zeros_like(x), pads, value=1.0)
        return {"self": r_in}, ctx.R * border


class Embedding(Family):
    """Per-token relevance: the embedding output's relevance summed over the hidden size."""

    ops = (aten.embedding.default,)
    ids = "indices"  # the argument that holds the ids

    def default(self, ctx: Ctx) -> Propagation:
        return {self.ids: ctx.R.sum(-1)}, None


class OneHot(Embedding):
    """``one_hot(ids, C)``: each id's row of an identity table, its codes cast to floats and
    multiplied by a weight where a user embeds ids so (an embedding written as a product).
    Each id gets the relevance its row receives, summed over the class axis, as an
    embedding's token gets its vector's: the rules above give a code's zeros none in mode
    default, and in mode reference they are the difference of the two ids' rows."""

    ops = (aten.one_hot.default,)
    ids = "self"


# The embedding bag's modes (``mode`` in its schema).
_BAG_MAX = 2


class EmbeddingBag(Family):
    """Per-token relevance of ``nn.EmbeddingBag``, which sums, averages or takes the maximum
    of the rows its ids look up, one bag per ``offsets`` entry: each id's share of a bag's
    vector, by the |z| rule over the bag's rows (the rows times their per-sample weights;
    the mean's 1 / count is common to a bag's rows and cancels); of a maximum, the row
    that is it (the winner takes all, ties share). Ids equal to ``padding_idx`` add nothing
    and get nothing. The offsets and per-sample weights are not what a token says: they
    take none. Relevance [K, N] on the flat ids; the view that flattened [B, L] undoes it."""

    ops = (aten.embedding_bag.default, aten.embedding_bag.padding_idx, aten._embedding_bag.default)

    def default(self, ctx: Ctx) -> Propagation:
        ids, weight, out = ctx.args["indices"], ctx.args["weight"], ctx.out[0]
        R = ctx.R.get(0)
        bag = self._bags(ctx.args["offsets"], ids.shape[0], out.shape[0])
        rows = weight[ids]  # [N, D]
        weights = ctx.args.get("per_sample_weights")
        if weights is not None:
            rows = rows * weights[:, None]
        padding = ctx.args.get("padding_idx")
        if padding is not None and padding >= 0:
            rows = rows.masked_fill((ids == padding)[:, None], 0.0)
        if ctx.args.get("mode", 0) == _BAG_MAX:
            share = (rows == out[bag]).to(R.dtype)
        else:
            share = rows.abs()
        total = torch.zeros_like(out, dtype=R.dtype).index_add(0, bag, share)  # [bags, D]
        ratio = R / (total + TINY)  # [K, bags, D]
        r_ids = (share * ratio[:, bag]).sum(-1)  # [K, N]
        return {"indices": r_ids}, (ratio * TINY).sum(-1)

    @staticmethod
    def _bags(offsets: Tensor, ids: int, bags: int) -> Tensor:
        """The bag of each id: the last offset at or before its position (an offset past the
        ids, ``include_last_offset``'s end, starts no bag)."""
        positions = torch.arange(ids, device=offsets.device)
        bag = torch.searchsorted(offsets, positions, right=True) - 1
        return bag.clamp(0, bags - 1)
