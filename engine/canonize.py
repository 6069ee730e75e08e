"""The canonize pass: facts about a captured graph found once per graph, before any sweep, so
that rules see canonical ops and never match graph patterns themselves (``rules.Canonical``).

- Batch-norm folding: an eval batch norm after a convolution is folded into it, one affine
  map. The |z| rule over the folded weights sinks only the folded bias, where a separate
  batch-norm rule would sink the whole shift of every channel; it also saves a rule
  application per layer. The forward runs the folded convolution too (``sweep.forward``).
- A relu after a linear map (mode "reference"'s RevealCancel, ``rules.dense.reveal_cancel``).
- The hand-written RMS norm x * rsqrt(mean(x ** 2, -1, keepdim) + eps) of Llama-style models
  (mode "reference" gives the product the norm's exact difference rule).
- Ids re-encoded where they are replaced: a masked_fill or where on ids whose condition is
  computed from those ids alone, elementwise (``ids.masked_fill(ids == -100, pad)``, as
  BART and T5 shift their decoder ids), gives each id a new code, as integer arithmetic on
  ids does: a replaced id's relevance goes to the id it replaced, not to a sink.
- The input embeddings: constants added to an input's token embeddings (learned
  positions, token types: looked up by constant ids) are part of each token's input, as
  relevance read at the embedding sum has them (AttnLRP): their share goes to the token
  at their position, where the |z| rule of a sum sank it (half or more of the seed).
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
from .provenance import LOOKUPS, Provenance
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
        embedded=embedding_sums(provenance, order),
        routing=tuple(routing_topks(captured.nodes)),
        recoded=recoded_ids(provenance, order),
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


# Ops between an input's embedding lookup and its sum with constants: sums, scaling by
# constants, casts and copies.
_SUMS = {aten.add.Tensor, aten.sub.Tensor}
_SCALINGS = {aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar}
# Ops whose output holds their input's values, as they were.
_COPIES = {aten.clone.default, aten.alias.default, aten.contiguous.default, aten._to_copy.default}
_CASTS = _COPIES | {aten.dropout.default, aten.type_as.default}
_EMBEDDING_STEPS = _SUMS | _SCALINGS | _CASTS


def embedding_sums(provenance: Provenance, order: list[fx.Node]) -> frozenset[fx.Node]:
    """The sums of a constant tensor and an input's token embeddings: ``embed(ids) + pos``,
    ``embed(ids) * scale + embed(positions)``, ``... + embed(token_types)`` (BERT, GPT-2, BART
    and most encoders). Each element of the constant belongs to the token at its position, as
    the token's embedding does (``rules.Canonical.embedded``). A constant broadcast over the
    positions (a bias [D]) belongs to no token: its share stays a sink."""
    memo: dict[fx.Node, bool] = {}
    found = set()
    for node in order:
        if node.target not in _SUMS or node not in provenance.bound:
            continue
        operands = [provenance.bound[node][k] for k in ("self", "other")]
        if not all(isinstance(a, fx.Node) for a in operands):
            continue  # a number added: not an embedding
        data = [a for a in operands if provenance.carries(node, a)]
        if len(data) != 1 or not _embedded(data[0], provenance, memo):
            continue
        constant = operands[1] if data[0] is operands[0] else operands[0]
        if _per_position(constant.meta.get("val"), node.meta.get("val")):
            found.add(node)
    return frozenset(found)


def _per_position(constant: Any, out: Any) -> bool:
    """Whether ``constant`` has a value per position of ``out`` (sizes equal on every axis but
    the batch, the first, which it may lack): [1, T, D] or [T, D] for [B, T, D], not [D]."""
    if not (isinstance(constant, Tensor) and isinstance(out, Tensor)):
        return False
    if constant.dim() < out.dim() - 1 or constant.dim() > out.dim():
        return False
    sizes = [1] * (out.dim() - constant.dim()) + list(constant.shape)
    return all(str(c) == str(o) for c, o in list(zip(sizes, out.shape, strict=True))[1:])


def _embedded(node: fx.Node, provenance: Provenance, memo: dict[fx.Node, bool]) -> bool:
    """Whether the data ``node`` is an embedding lookup of an input's ids, scaled by
    constants, cast, or summed with constants and other such lookups."""
    if node not in memo:
        memo[node] = False  # a cycle cannot occur; this bounds the recursion anyway
        data = [a for a in node.all_input_nodes if provenance.data.get(a, False)]
        if node.target in LOOKUPS:
            memo[node] = True
        elif node.target in _EMBEDDING_STEPS and data:
            scaled = node.target in _SCALINGS and len(data) == 1
            memo[node] = (node.target not in _SCALINGS or scaled) and all(
                _embedded(a, provenance, memo) for a in data
            )
    return memo[node]


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


# Ops that replace some ids by constant ids: the argument that holds the condition, and the
# two that hold the values it picks between (ids, and a constant id or a number).
_REPLACES = {
    aten.masked_fill.Scalar: ("mask", ("self", "value")),
    aten.masked_fill.Tensor: ("mask", ("self", "value")),
    aten.where.self: ("condition", ("self", "other")),
    aten.where.ScalarSelf: ("condition", ("self", "other")),
    aten.where.ScalarOther: ("condition", ("self", "other")),
}
# Logical combinations of conditions, which torch does not tag pointwise.
_LOGICAL = {aten.__and__.Tensor, aten.__or__.Tensor, aten.__xor__.Tensor}


def recoded_ids(provenance: Provenance, order: list[fx.Node]) -> frozenset[fx.Node]:
    """The masked_fill / where nodes on integer ids (one data operand, the other a constant)
    whose condition is an elementwise function of those ids alone: each output id is then
    a function of the input id at its position, replaced or not, a new code for that token
    (``rules.Canonical.recoded``). A condition from anything else (an attention mask, a
    position) makes the replaced ids constants, whose relevance is a sink."""
    found = set()
    for node in order:
        spec = _REPLACES.get(node.target)
        val = node.meta.get("val")
        if spec is None or node not in provenance.bound or not isinstance(val, Tensor):
            continue
        if val.is_floating_point():
            continue
        bound, (condition, values) = provenance.bound[node], spec
        ids = [bound[n] for n in values if isinstance(bound[n], fx.Node)]
        data = [a for a in ids if provenance.data.get(a, False)]
        if len(data) == 1 and _elementwise_of(bound[condition], data[0], provenance):
            found.add(node)
    return frozenset(found)


def _elementwise_of(node: Any, ids: fx.Node, provenance: Provenance) -> bool:
    """Whether ``node`` is computed from ``ids`` (or a copy of them) by elementwise ops
    (comparisons and their logical combinations) with numbers and 0-dim constants only, so
    that each of its elements depends on the id at its position alone."""
    if isinstance(node, fx.Node) and _same_ids(node) is _same_ids(ids):
        return True
    if not isinstance(node, fx.Node) or not isinstance(node.target, torch._ops.OpOverload):
        return False
    if torch.Tag.pointwise not in node.target.tags and node.target not in _LOGICAL:
        return False
    args = node.all_input_nodes
    return bool(args) and all(
        _elementwise_of(a, ids, provenance) or _scalar_constant(a, provenance) for a in args
    )


def _same_ids(node: fx.Node) -> fx.Node:
    """The node whose values ``node`` copies (through clones and casts), ``node`` itself
    when it copies none: ``where(ids > 12, 0, ids.clone())`` compares and fills the same ids."""
    while node.target in _COPIES and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _scalar_constant(node: fx.Node, provenance: Provenance) -> bool:
    """A 0-dim tensor that is no data (a lifted number)."""
    val = node.meta.get("val")
    return isinstance(val, Tensor) and val.dim() == 0 and not provenance.data.get(node, False)
