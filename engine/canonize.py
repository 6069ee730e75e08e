"""The canonize pass: facts about a captured graph found once per graph, before any sweep, so
that rules see canonical ops and never match graph patterns themselves (``rules.Canonical``).

- Batch-norm folding: an eval batch norm after a convolution is folded into it, one affine
  map. The |z| rule over the folded weights sinks only the folded bias, where a separate
  batch-norm rule would sink the whole shift of every channel; it also saves a rule
  application per layer. The forward runs the folded convolution too (``sweep.forward``).
- A relu after a linear map (mode "reference"'s RevealCancel, ``rules.dense.reveal_cancel``).
- The hand-written RMS norm x * rsqrt(mean(x ** 2, -1, keepdim) + eps) of Llama-style models
  (mode "reference" gives the product the norm's exact difference rule).
- Mixture-of-experts routing: the topk nodes behind the grouped expert matmuls' row offsets,
  or behind the counts a graph specialised to the input's values fixed (``nonzero_static``),
  which the reference forward holds at the input's routing.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import Tensor, fx

from .capture import Captured
from .provenance import Provenance
from .rules import GROUPED_MM, Canonical, batch_norm_affine, family_of

aten = torch.ops.aten
_BATCH_NORM = aten._native_batch_norm_legit_no_training.default


def canonize(captured: Captured, provenance: Provenance, order: list[fx.Node]) -> Canonical:
    """The facts of ``captured`` over the nodes a sweep visits (``order``)."""
    fused = fold_batch_norms(captured, provenance.bound, order)
    return Canonical(
        fused=fused,
        relu_after=frozenset(
            n for n in order if n.target in _LINEAR_MAPS and _relu_after(n, fused) is not None
        ),
        rms_eps=_rms_norms(provenance, order),
        routing=tuple(routing_topks(captured.nodes)),
    )


def fold_batch_norms(
    captured: Captured, bound: dict[fx.Node, dict[str, Any]], order: list[fx.Node]
) -> dict[fx.Node, dict[str, Tensor]]:
    """Convolutions with the eval batch norm after them folded in: conv -> its arguments with
    the folded weight and bias, and the batch norm -> {} (it passes the output on)."""
    folded = {}
    for node in order:
        if node.target is not _BATCH_NORM:
            continue
        conv = bound[node]["input"]
        if conv.target is not aten.conv2d.default or len(conv.users) != 1:
            continue
        value = lambda a: None if a is None else captured.constants.get(a.name)  # noqa: E731
        bn = {k: (value(v) if isinstance(v, fx.Node) else v) for k, v in bound[node].items()}
        weight, bias = value(bound[conv]["weight"]), value(bound[conv]["bias"])
        if weight is None or any(bn[k] is None for k in ("running_mean", "running_var")):
            continue
        scale, shift = batch_norm_affine(bn)
        bias = shift if bias is None else bias * scale + shift
        folded[conv] = {**bound[conv], "weight": weight * scale.view(-1, 1, 1, 1), "bias": bias}
        folded[node] = {}
    return folded


# Mode "reference" splits the change of these activations between the positive and negative
# parts of the change of their input (RevealCancel). Measured on GELU (MiniLM), it lost.
_LINEAR_MAPS = {aten.linear.default, aten.conv1d.default, aten.conv2d.default}
_REVEAL_ACTIVATIONS = {aten.relu.default}
_BETWEEN = {_BATCH_NORM, operator.getitem}


def _relu_after(node: fx.Node, fused: dict[fx.Node, dict]) -> fx.Node | None:
    """The relu that is the only consumer of ``node`` (through a batch norm folded into it:
    the relu's input is then the map's output; behind a batch norm of its own it is not, and
    RevealCancel would read the wrong values)."""
    for _ in range(3):
        if len(node.users) != 1:
            return None
        node = next(iter(node.users))
        if node.target in _REVEAL_ACTIVATIONS:
            return node
        if node.target not in _BETWEEN or (node.target is _BATCH_NORM and node not in fused):
            return None
    return None


def _rms_norms(provenance: Provenance, order: list[fx.Node]) -> dict[fx.Node, float]:
    """Products x * rsqrt(...) with one data operand that are a hand-written RMS norm -> eps."""
    found = {}
    for node in order:
        if node.target is not aten.mul.Tensor or node not in provenance.bound:
            continue
        data = [
            isinstance(a, fx.Node) and provenance.carries(node, a)
            for a in (provenance.bound[node]["self"], provenance.bound[node]["other"])
        ]
        if data.count(True) != 1:
            continue
        x, factor = node.args if data[0] else node.args[::-1]
        eps = rms_eps(factor, x)
        if eps is not None:
            found[node] = eps
    return found


def rms_eps(normaliser: Any, x: Any) -> float | None:
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


def routing_topks(nodes: Any) -> list[fx.Node]:
    """The ``topk`` nodes that pick the experts of grouped expert matmuls: ancestors of a
    grouped matmul's row offsets, or of a ``nonzero_static`` (a specialised graph's expert
    loop: its counts are the input's, so a reference routed otherwise would not fit them)."""
    found, seen = [], set()
    stack = [n.args[2] for n in nodes if family_of(n.target) is GROUPED_MM and len(n.args) > 2]
    stack += [n.args[0] for n in nodes if n.target is aten.nonzero_static.default]
    while stack:
        n = stack.pop()
        if not isinstance(n, fx.Node) or n in seen:
            continue
        seen.add(n)
        if n.target is aten.topk.default:
            found.append(n)
            continue  # the router's own inputs route nothing else
        stack.extend(n.all_input_nodes)
    return found
