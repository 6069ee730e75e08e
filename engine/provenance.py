"""Static facts about a captured graph: op arguments by schema name, which tensors carry
relevance, and which nodes the sweep will visit.

As in autograd, relevance only flows along floating-point paths that start at a floating-point
input or at an embedding lookup of an input's ids. Everything else (parameters, buffers,
attention masks, position ids, rotary tables) is a constant: where it meets a data tensor its
share is a sink. Decided by data provenance in the graph, never by node names.
"""

from __future__ import annotations

import operator
from collections import Counter
from typing import Any

import torch
from torch import fx

from .rules import RESHAPE_OPS, family_of
from .rules.pooling import STATISTICS

aten = torch.ops.aten

# Ops whose output normalises or weighs other data: softmax (attention and routing weights),
# the 1 / rms, 1 / std and variance of hand-written norms. Where their output, or a value
# computed from it alone (``weights``), multiplies other data, it is a constant for that
# product, which passes all relevance to the other operand (explicit softmax attention,
# mixture-of-experts routing, gates, hand-written RMSNorm; mode "reference" gives the
# hand-written RMSNorm the norm's exact difference rule instead, ``canonize.rms_eps``).
# Where it flows on by itself (a softmax over features before a linear layer, statistics
# pooling), it is an op like any other, and its rule passes relevance through.
NORMALISERS = {
    aten.softmax.int,
    aten._softmax.default,
    aten.rsqrt.default,
    aten.sqrt.default,
    aten.reciprocal.default,
    *STATISTICS,
}

# Products, by the arguments they multiply: where weights meet other data there, the weights
# are constants for that product, except attention weights in a matrix product (below).
PRODUCT_FACTORS = {
    aten.mul.Tensor: ("self", "other"),
    aten.div.Tensor: ("self", "other"),
    aten.matmul.default: ("self", "other"),
    aten.mm.default: ("self", "mat2"),
    aten.bmm.default: ("self", "mat2"),
    aten.einsum.default: ("tensors",),
    aten.addcmul.default: ("tensor1", "tensor2"),
}

# Matrix products. A softmax of scores that are a matrix product of two data operands (Q K^T,
# after scaling, masking, casts) is attention: where its weights meet the values in a matrix
# product, they take their half of the relevance on to the scores, Q and K, as the
# scaled_dot_product_attention rule gives it (``rules.attention``): attention written out as
# matmul / softmax / matmul gets the same relevance as the fused op.
MATRIX_PRODUCTS = {aten.matmul.default, aten.mm.default, aten.bmm.default, aten.einsum.default}
# Scores may also come with a bias added in the product (BLOOM's ALiBi: baddbmm).
SCORE_PRODUCTS = {*MATRIX_PRODUCTS, aten.baddbmm.default}

# Piecewise constant in the data (no gradient): constants everywhere; a product with one
# scales the other.
CONSTANT_OPS = {
    aten.sign.default,
    aten.floor.default,
    aten.ceil.default,
    aten.round.default,
    aten.round.decimals,
    aten.trunc.default,
    aten.sgn.default,
    aten.angle.default,  # 0 or pi on real input
}

# Ops that create a tensor shaped like their input without its values (a buffer to write
# into, zeros, a fill): constants, whatever they are made from.
CREATION_OPS = {
    aten.new_empty.default,
    aten.new_zeros.default,
    aten.new_ones.default,
    aten.new_full.default,
    aten.empty_like.default,
    aten.zeros_like.default,
    aten.ones_like.default,
    aten.full_like.default,
}

# Ops that look up rows of a table by integer ids, by the argument that holds the ids: where
# the ids are an input's, their output starts a relevance path (an embedding bag's several
# outputs: its vectors). A one-hot code is the ids' rows of an identity table, integer until
# a cast (``one_hot(ids, C).float()``, then a linear layer: the embedding written as a product).
LOOKUPS = {
    aten.embedding.default: "indices",
    aten.embedding_bag.default: "indices",
    aten.embedding_bag.padding_idx: "indices",
    aten._embedding_bag.default: "indices",
    aten.one_hot.default: "self",
}

# Ops that move integer ids around or re-encode each one: an embedding lookup after them
# still traces back to the input's ids (from any of their arguments: ids concatenated with
# constant ids, added to an offset).
ID_PATH_OPS = {
    *RESHAPE_OPS,
    aten.expand.default,
    aten.slice.Tensor,
    aten.select.int,
    aten.clone.default,
    aten.contiguous.default,
    aten.alias.default,
    aten._to_copy.default,  # ids cast to int32 (CPM-Ant)
    aten.cat.default,  # ids after constant ids (CPM-Ant's prompt ids before the text's)
    aten.permute.default,
    aten.transpose.int,
    aten.index_put.default,  # ids masked to a placeholder id (gemma3's image tokens)
    # ids shifted into a buffer of constant ids (BART's and T5's decoder ids: input_ids[:, :-1]
    # copied into new_zeros(...)[:, 1:], the start id written at [:, 0]): the written ids come
    # from the input's positions, the buffer's and the start id's are constants
    aten.copy.default,
    aten.slice_scatter.default,
    aten.select_scatter.default,
    # ids with some replaced by a constant id (-100 labels by the pad id)
    aten.masked_fill.Scalar,
    aten.masked_fill.Tensor,
    aten.pad.default,  # ids padded to a multiple of the attention window (Longformer)
    # ids with some replaced by a placeholder id (Gemma 4's multimodal positions)
    aten.where.self,
    aten.where.ScalarSelf,
    aten.where.ScalarOther,
    aten.constant_pad_nd.default,
    # integer arithmetic on ids re-encodes each token (CANINE hashes code points into buckets)
    aten.add.Tensor,
    aten.add.Scalar,
    aten.mul.Tensor,
    aten.mul.Scalar,
    aten.remainder.Scalar,
    aten.remainder.Tensor,
}

# Arguments a rule never sends relevance to, although they may be data (type_as reads only
# the dtype of ``other``).
SILENT_ARGS = {
    aten.scaled_dot_product_attention.default: {"attn_mask"},
    aten.type_as.default: {"other"},
}


class UnsupportedOpError(NotImplementedError):
    """An op on the relevance path has no rule."""


def bind(node: fx.Node) -> dict[str, Any]:
    """The node's arguments by schema name, defaults filled in."""
    schema = node.target._schema
    bound: dict[str, Any] = {}
    positional = list(node.args)
    for arg in schema.arguments:
        if positional and not arg.kwarg_only:
            bound[arg.name] = positional.pop(0)
        elif arg.name in node.kwargs:
            bound[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            bound[arg.name] = arg.default_value
        else:
            bound[arg.name] = None
    return bound


def _value(node: fx.Node) -> Any:
    return node.meta.get("val")


def _floating(val: Any) -> bool:
    return isinstance(val, torch.Tensor) and val.is_floating_point()


def _tensor_args(bound: dict[str, Any]):
    """(name, index, node) for every fx.Node argument, lists included."""
    for name, arg in bound.items():
        if isinstance(arg, fx.Node):
            yield name, None, arg
        elif isinstance(arg, list | tuple):
            for i, item in enumerate(arg):
                if isinstance(item, fx.Node):
                    yield name, i, item


class Provenance:
    """Per node: bound arguments, whether it carries relevance, whether the sweep visits it."""

    def __init__(self, nodes: list[fx.Node], input_names: list[str], output: fx.Node):
        self.bound: dict[fx.Node, dict[str, Any]] = {}
        self.data: dict[fx.Node, bool] = {}
        self.weights: set[fx.Node] = set()
        self.attention: set[fx.Node] = set()  # weights that are a softmax of Q K^T
        self.codes: set[fx.Node] = set()  # one-hot codes of an input's ids (integer)
        for node in nodes:
            if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
                self.bound[node] = bind(node)
            self.data[node] = self._is_data(node, input_names)
            if self.data[node] and self._is_codes(node):
                self.codes.add(node)
            if self.data[node] and self._is_weights(node):
                self.weights.add(node)
                if self._is_attention(node):
                    self.attention.add(node)
        self.gates = self._gates(nodes)
        self.output = output
        self.visited = self._reach(nodes, output)

    def carries(self, node: fx.Node, arg: Any) -> bool:
        """Whether ``arg`` takes a share of its consumer ``node``'s relevance: it is data, and
        not weights that ``node`` multiplies other data by."""
        return self.data.get(arg, False) and (node, arg) not in self.gates

    def _is_data(self, node: fx.Node, input_names: list[str]) -> bool:
        if node.op == "placeholder":
            return node.name in input_names
        if node.op != "call_function":
            return False
        val = _value(node)
        if node.target is operator.getitem:
            parent, index = node.args
            return self.data.get(parent, False) and _floating(val)
        if node not in self.bound or node.target in CONSTANT_OPS or node.target in CREATION_OPS:
            return False
        # an argument the op reads no values of (type_as's ``other``: only its dtype) makes
        # nothing data: positions cast to the hidden states' dtype stay constants
        silent = SILENT_ARGS.get(node.target, ())
        args = [a for a in _tensor_args(self.bound[node]) if a[0] not in silent]
        if node.target in LOOKUPS:
            return self.data.get(self.bound[node][LOOKUPS[node.target]], False)
        if isinstance(val, list | tuple) or _floating(val):
            return any(self._floating_data(a) or a in self.codes for _, _, a in args)
        if isinstance(val, torch.Tensor) and node.target in ID_PATH_OPS:
            return any(self.data.get(a, False) for _, _, a in args)
        return False

    def _is_codes(self, node: fx.Node) -> bool:
        """Whether the data node is one-hot codes: a lookup's integer output, or codes
        moved around (reshaped, selected, joined). A floating-point value computed from codes
        (their cast) is data, as a lookup's vectors are; one from ids is not."""
        if _floating(_value(node)) or node not in self.bound:
            return False
        if node.target in LOOKUPS:
            return True
        return node.target in ID_PATH_OPS and any(
            a in self.codes for _, _, a in _tensor_args(self.bound[node])
        )

    def _is_weights(self, node: fx.Node) -> bool:
        """Whether the data node's value is weights: a normaliser's output, or computed from
        weights alone by ops that are no learned map (selections, casts, rescalings,
        reductions, topk). A learned map of weights makes features of them."""
        if node.target in NORMALISERS:
            return True
        if node.target is not operator.getitem:
            family = family_of(node.target) if node in self.bound else None
            if family is None or family.maps:
                return False
        args = self._weight_args(node)
        return bool(args) and all(a in self.weights for a in args)

    def _weight_args(self, node: fx.Node) -> list[fx.Node]:
        """The floating data arguments ``node`` takes relevance to (its parent, for a
        getitem)."""
        if node.target is operator.getitem:
            return [node.args[0]]
        silent = SILENT_ARGS.get(node.target, set())
        return [
            a
            for name, _, a in _tensor_args(self.bound.get(node, {}))
            if name not in silent and self._floating_data(a)
        ]

    def _is_attention(self, node: fx.Node) -> bool:
        """Whether the weights ``node`` are attention weights: a softmax whose scores come
        from a matrix product of two data operands through ops that are no learned map
        (scale, mask, cast, reshape), or a value of such weights alone. A router's softmax
        of a linear layer's logits is not."""
        if node.target not in NORMALISERS:
            args = self._weight_args(node)
            return bool(args) and all(a in self.attention for a in args)
        if node.target not in (aten.softmax.int, aten._softmax.default):
            return False
        seen, todo = set(), self._weight_args(node)
        while todo:
            arg = todo.pop()
            if arg in seen:
                continue
            seen.add(arg)
            if arg.target in SCORE_PRODUCTS:
                if len(self._weight_args(arg)) == 2:
                    return True
                continue
            family = family_of(arg.target) if arg in self.bound else None
            if (family is not None and not family.maps) or arg.target is operator.getitem:
                todo += self._weight_args(arg)
        return False

    def _floating_data(self, node: fx.Node) -> bool:
        return self.data.get(node, False) and _floating(_value(node))

    def _gates(self, nodes: list[fx.Node]) -> set[tuple[fx.Node, fx.Node]]:
        """(product, operand) for each product of weights with other data: the weights are
        a constant there (attention weights times values, routing weights times expert
        outputs, a gate, a hand-written norm's 1 / rms times its input)."""
        gates = set()
        for node in nodes:
            factors = PRODUCT_FACTORS.get(node.target)
            if factors is None or node not in self.bound:
                continue
            operands = [
                a
                for name, _, a in _tensor_args(self.bound[node])
                if name in factors and self._floating_data(a)
            ]
            if any(a not in self.weights for a in operands):
                attends = node.target in MATRIX_PRODUCTS
                gates.update(
                    (node, a)
                    for a in operands
                    if a in self.weights and not (attends and a in self.attention)
                )
        return gates

    def _reach(self, nodes: list[fx.Node], output: fx.Node) -> set[fx.Node]:
        """Nodes that relevance from ``output`` can reach, in the rules' own terms."""
        reached = {output}
        for node in reversed(nodes):
            if node not in reached:
                continue
            if node.target is operator.getitem:
                reached.add(node.args[0])
                continue
            if node not in self.bound:
                continue
            silent = SILENT_ARGS.get(node.target, set())
            for name, _, arg in _tensor_args(self.bound[node]):
                if name not in silent and self.carries(node, arg):
                    reached.add(arg)
        return reached

    def unsupported(self) -> list[tuple[str, str]]:
        """(node name, op) for every node on the relevance path without a rule."""
        missing = []
        for node in self.visited:
            if node.op != "call_function" or node.target is operator.getitem:
                continue
            if family_of(node.target) is None:
                missing.append((node.name, str(node.target)))
        return sorted(missing)

    def op_counts(self) -> Counter:
        return Counter(str(n.target) for n in self.visited if n.op == "call_function")
