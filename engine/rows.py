"""Which sample each row of a batch-folded axis holds where the rows come in a data-dependent
order: mixture-of-experts layers sort their (token, expert) rows by expert and gather the
tokens' hidden states in that order, so the static layout (``capture.BatchAxis``: the sample
of row i is (i // inner) % B) no longer says whose row is whose. A sink on such a row (an
expert's bias, a constant added to its gate) must still be booked on its own sample, or the
per-sample conservation report moves relevance between samples (gpt-oss: 98.1 / 101.9 of
100 for a batch of two). Each such row's sample is read at sweep time from the recorded
``sort`` and ``index`` values, following the order in which the rows were gathered.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx

from .capture import size_expr

aten = torch.ops.aten
_SORTS = {aten.sort.default, aten.sort.stable}


@dataclass(frozen=True)
class Gathered:
    """Row i of the node is row ``order[i]`` of ``source`` (``order`` None: row i of it)."""

    source: fx.Node
    order: fx.Node | None


def gathered_rows(nodes: list[fx.Node], batch_axis: dict[fx.Node, Any]) -> dict:
    """Per node whose batch-folded rows come in a data-dependent order, where they came from:
    a gather along the rows (``index`` by one index tensor that carries the batch), a sort
    of a 1-D tensor along its batch axis (values and indices alike), or any op whose batch
    axis has the size of such an input's (the rows passed through)."""
    out: dict[fx.Node, Gathered] = {}
    for node in nodes:
        axis = batch_axis.get(node)
        if node.op != "call_function" or axis is None:
            continue
        found = _gather(node, batch_axis) or _sorted(node, batch_axis)
        if found is None:
            size = _size(node, axis.axis)
            found = next(
                (Gathered(a, None) for a in node.all_input_nodes
                 if a in out and _size(a, batch_axis[a].axis) == size),
                None,
            )  # fmt: skip
        if found is not None:
            out[node] = found
    return out


def _gather(node: fx.Node, batch_axis: dict) -> Gathered | None:
    if node.target is not aten.index.Tensor:
        return None
    src, indices = node.args[0], node.args[1]
    if len(indices) != 1 or not isinstance(indices[0], fx.Node):
        return None
    idx = indices[0]
    if batch_axis.get(idx) is None or idx.meta["val"].dim() != 1:
        return None
    src_axis = batch_axis.get(src)
    if src_axis is not None and src_axis.axis == 0:
        return Gathered(src, idx)
    return Gathered(idx, None)  # a constant's rows picked per index row: the index's samples


def _sorted(node: fx.Node, batch_axis: dict) -> Gathered | None:
    if node.target is not operator.getitem or node.args[0].target not in _SORTS:
        return None
    sort = node.args[0]
    src = sort.args[0]
    if batch_axis.get(src) is None or src.meta["val"].dim() != 1:
        return None
    order = next((u for u in sort.users if u.args[1] == 1), None)
    return None if order is None else Gathered(src, order)


def _size(node: fx.Node, axis: int) -> Any:
    val = node.meta["val"]
    val = val[0] if isinstance(val, list | tuple) else val
    return size_expr(val.shape[axis])


def row_orders(gathered: dict[fx.Node, Gathered]) -> set[fx.Node]:
    """The recorded values the samples are read from (a lean forward must keep them)."""
    return {g.order for g in gathered.values() if g.order is not None}


def samples(
    node: fx.Node,
    gathered: dict[fx.Node, Gathered],
    env: dict,
    batch_axis: dict,
    sizes: dict,
    batch: int,
    cache: dict,
) -> Tensor:
    """[rows] the sample of each row along ``node``'s batch axis."""
    if node in cache:
        return cache[node]
    g = gathered.get(node)
    if g is None:
        where = batch_axis[node]
        n = int(_size(node, where.axis).subs(sizes))
        inner = where.inner if isinstance(where.inner, int) else int(where.inner.subs(sizes))
        rows = (torch.arange(n) // inner) % batch
    else:
        rows = samples(g.source, gathered, env, batch_axis, sizes, batch, cache)
        if g.order is not None:
            rows = rows[env[g.order].reshape(-1).long().cpu()]
    cache[node] = rows
    return rows


def book(t: Tensor, axis: int, rows: Tensor, batch: int) -> Tensor:
    """A [K, *shape] tensor summed to [K, batch], row r of ``axis`` to sample ``rows[r]``."""
    t = t.movedim(axis + 1, -1)
    t = t.reshape(t.shape[0], -1, t.shape[-1]).sum(1)
    out = torch.zeros(t.shape[0], batch, dtype=t.dtype, device=t.device)
    return out.index_add_(1, rows.to(t.device), t)
