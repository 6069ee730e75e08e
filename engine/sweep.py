"""The forward pass that records activations and the backward sweep that applies the rules.

A ``Sweeper`` is built once per captured graph: it canonizes the graph (``engine.canonize``)
and resolves each node's rule per mode (``engine.rules``). Each ``run`` keeps its own state in
a ``_Pass``. The sweep carries ``K`` seeds at once: every relevance tensor has a leading seed
axis. A classification batch needs one (each sample's seed lives in its own batch row);
generation explains every emitted token of a sequence in one sweep with one seed per step.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, fx

from .canonize import canonize
from .capture import Captured
from .explanation import Explanation, Seed
from .provenance import LOOKUPS, Provenance, UnsupportedOpError
from .recording import NodeIO, forward
from .rows import book, gathered_rows, row_orders, samples
from .rules import COMPOSITES, MODES, TINY, Ctx, LinearRows, Rule, rule_for

__all__ = ["Explanation", "NodeIO", "Seed", "Sweeper", "UnsupportedOpError", "forward"]

aten = torch.ops.aten
_PASS_THROUGH = {aten._to_copy.default, aten.clone.default, aten.alias.default}


_NONNEGATIVE_OPS = {
    aten.relu.default,
    aten.sigmoid.default,
    aten.softmax.int,
    aten._softmax.default,
    aten.abs.default,
}


def _nonnegative(node: fx.Node) -> bool:
    """Whether the op's output can never be negative (relu6 is hardtanh from 0)."""
    if node.target is aten.hardtanh.default:
        low = node.args[1] if len(node.args) > 1 else node.kwargs.get("min_val", -1.0)
        return low >= 0
    return node.target in _NONNEGATIVE_OPS


def _exact(value: Any) -> Any:
    """Rules compute in float32 at least: half-precision activations and weights are upcast,
    since TINY and the ratios of small denominators do not fit in float16.

    Relevance is held in float32 too, whatever the model's dtype (the relevance tensors of a
    result are float32). Held in the model's dtype between nodes instead, rules still in
    float32, a tiny bfloat16 Llama missed conservation by 2.8e-3 of the seed per step and a
    float16 one by 3.3e-4 (float32: 1.5e-7); the target is 1e-4, so relevance stays float32.
    """
    if isinstance(value, Tensor) and value.dtype in (torch.float16, torch.bfloat16):
        return value.float()
    return value


# The seed head's rule per mode: the linear family's, on the seed's sparse entries.
_SEED_HEAD = LinearRows()


class Sweeper:
    """Applies the rules over one captured graph; caches |W| across runs."""

    def __init__(self, captured: Captured, seed_node: fx.Node):
        self.captured = captured
        self.seed_node = seed_node
        self.provenance = Provenance(captured.nodes, captured.data_inputs, seed_node)
        self._abs: dict[Any, Any] = {}
        self._order = [n for n in captured.nodes if n in self.provenance.visited]
        self.canonical = canonize(captured, self.provenance, self._order)
        # convolutions run with their batch norm folded in (and those batch norms: {})
        self.fused = self.canonical.fused
        self._missing = self.provenance.unsupported()
        self._nonnegative_nodes = [n for n in self._order if _nonnegative(n)]
        # per node, once: whether no argument is a list of nodes, and its is_data callback
        bound = self.provenance.bound
        self._flat = {
            n: not any(
                isinstance(v, list | tuple) and any(isinstance(i, fx.Node) for i in v)
                for v in bound[n].values()
            )
            for n in self._order
            if n in bound
        }
        self._is_data = {n: functools.partial(self._arg_is_data, n) for n in self._flat}
        # per mode, each node's rule, and the nodes whose rule hands R on unchanged
        self._rules: dict[str, dict[fx.Node, Rule | None]] = {
            mode: {n: rule_for(n.target, mode) for n in self._flat} for mode in MODES
        }
        self._pass_through = {mode: self._pass_through_nodes(mode) for mode in MODES}
        self.head_chain = self._head_chain()
        self.gathered = gathered_rows(captured.nodes, captured.batch_axis)
        self.read = self._read_nodes() | row_orders(self.gathered)
        self._half = any(_exact(t) is not t for t in captured.constants.values())
        self._constant_ids = {id(t) for t in captured.constants.values()} | {
            id(args[k]) for args in self.fused.values() for k in ("weight", "bias") if k in args
        }

    def _pass_through_nodes(self, mode: str) -> dict[fx.Node, fx.Node]:
        """Nodes whose relevance goes unchanged to one data argument in ``mode``: rules that
        pass through (activations, norms, copies) and batch norms folded into their
        convolution. Half the nodes of a CNN; the sweep hands their relevance on directly."""
        bound, prov = self.provenance.bound, self.provenance
        through = {}
        for node in self._order:
            if node in self.fused and not self.fused[node]:
                through[node] = bound[node]["input"]
            elif getattr(self._rules[mode].get(node), "passes_through", False):
                first = next(iter(bound[node].values()))
                if isinstance(first, fx.Node) and prov.carries(node, first):
                    through[node] = first
        return through

    def _read_nodes(self) -> frozenset[fx.Node]:
        """The op values a sweep reads in any mode, all a lean forward records: rules' arguments
        and outputs, the seed head's arguments, the output, the routing references reuse."""
        read = {self.seed_node, *self.canonical.routing}
        fx.node.map_arg(self.provenance.bound.get(self.seed_head(), {}), read.add)
        through = set.intersection(*(set(t) for t in self._pass_through.values()))
        for node in self._flat:
            if node.target is operator.getitem or node in through:
                continue
            read.add(node)
            fx.node.map_arg(self.fused.get(node) or self.provenance.bound[node], read.add)
        return frozenset(read)

    def _head_chain(self) -> list[fx.Node]:
        """The seed head, where it is a linear layer, and the copies from it to the explained
        output, where nothing else reads them: a forward for given seeds need compute them
        only at the seeds' rows (``recording.HeadRows``). Empty for any other output."""
        chain = [self.seed_node]
        while chain[-1].target in _PASS_THROUGH:
            chain.append(chain[-1].all_input_nodes[0])
        chain.reverse()
        if chain[0].target is not aten.linear.default:
            return []
        if any(list(a.users) != [b] for a, b in zip(chain, chain[1:], strict=False)):
            return []
        if any(u.op != "output" for u in self.seed_node.users):
            return []
        later = [a for n in chain[1:] for a in (*n.args[1:], *n.kwargs.values())]
        return [] if any(isinstance(a, fx.Node) for a in later) else chain

    def _head(self, rows: Tensor | None) -> tuple[list[fx.Node], Tensor] | None:
        return (self.head_chain, rows) if rows is not None and self.head_chain else None

    def forward(
        self, inputs: dict[str, Tensor], lean: bool = False, rows: Tensor | None = None
    ) -> tuple[dict, tuple]:
        """The recorded forward, batch norms fused into their convolutions; ``lean``: only
        what a sweep reads (``read``), no ``node_io``; ``rows`` (the seeds' index but the
        last axis, with ``lean``): a linear head computed at those rows only."""
        if not lean:
            return forward(self.captured, inputs, self.fused)
        return forward(self.captured, inputs, self.fused, keep=self.read, head=self._head(rows))

    def reference_forward(
        self,
        inputs: dict[str, Tensor],
        reference: dict[str, Tensor] | None,
        env: dict,
        rows: Tensor | None = None,
    ) -> dict[fx.Node, Any]:
        """The recorded forward of mode "reference"'s reference input. Inputs it leaves out
        default to zeros for floating-point inputs; for token ids, to the same ids with the
        embedding lookups that start relevance paths replaced by zero vectors. Routing is
        the input's (recorded in ``env``): the same experts with the same weights, constants
        as the spec has them, so each expert row has its reference row and a product with a
        routing weight changes only through its other operand. ``rows``: as ``forward``'s."""
        reference = dict(reference or {})
        zeroed = set()
        for name, value in inputs.items():
            if name in reference:
                continue
            if value.is_floating_point():
                reference[name] = torch.zeros_like(value)
            else:
                reference[name] = value
                zeroed |= self._embeddings_of(name)
        for name, value in reference.items():
            if name in inputs and value.shape != inputs[name].shape:
                raise ValueError(
                    f"reference {name!r} has shape {tuple(value.shape)}, "
                    f"the input {tuple(inputs[name].shape)}"
                )
        routed = {node: env[node] for node in self.canonical.routing}
        ref_env, _ = forward(  # lean: only the sweep reads it, never node_io
            self.captured, reference, self.fused, frozenset(zeroed), routed, self.read,
            self._head(rows),
        )  # fmt: skip
        return ref_env

    def _embeddings_of(self, name: str) -> set[fx.Node]:
        """Embedding lookups of input ``name``'s ids on the relevance path."""
        found = set()
        for node in self._order:
            if node.target in LOOKUPS and self.provenance.data.get(node, False):
                ids = self.provenance.bound[node].get(LOOKUPS[node.target])
                if isinstance(ids, fx.Node) and name in _placeholders_behind(ids):
                    found.add(node)
        return found

    def check_rules(self) -> None:
        """Raise, naming op and node, when an op on the relevance path has no rule."""
        missing = self._missing
        if missing:
            listed = ", ".join(f"{op} at node {name!r}" for name, op in missing)
            raise UnsupportedOpError(f"no relevance rule for: {listed}")

    def abs_of(self, t: Tensor) -> Tensor:
        """|t|, cached for the graph's constants (parameters, folded weights): the same weights
        are swept on every request. Anything else is computed afresh."""
        hit = self._abs.get(id(t))
        if hit is not None and hit[0] is t:
            return hit[1]
        if id(t) not in self._constant_ids:
            return t.abs()
        self._abs[id(t)] = (t, t.abs())
        return self._abs[id(t)][1]

    def bias_term(self, bias: Tensor | None, n: int, like: Tensor) -> Tensor:
        """|b| + TINY (or TINY alone), the denominator's bias, cached per parameter."""
        key = (id(bias), n, like.dtype, like.device)
        hit = self._abs.get(key)
        if hit is None or hit[0] is not bias:
            term = torch.full((n,), TINY, dtype=like.dtype, device=like.device)
            hit = (bias, term if bias is None else bias.abs() + TINY)
            self._abs[key] = hit
        return hit[1]

    def run(
        self,
        env: dict[fx.Node, Any],
        inputs: dict[str, Tensor],
        seed: Seed,
        mode: str,
        keep: str | set[str],
        env_ref: dict[fx.Node, Any] | None = None,
        retain: Collection[fx.Node] | None = None,
    ) -> tuple[dict[str, Tensor], Tensor, Tensor, Tensor]:
        """Sweep ``seed`` back to ``inputs``; returns the kept relevance and, per seed and
        sample, the seed, the relevance at the inputs and the sinks. Modes "reference" and
        "contrast" need ``env_ref``, the recorded forward of the reference input. Given
        ``retain``, recorded values but those are freed as the sweep passes them."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if (mode != "default") != (env_ref is not None):
            raise ValueError('the reference forward is for modes "reference" and "contrast"')
        self.check_rules()
        batch = next(iter(inputs.values())).shape[0]
        out = env[self.seed_node]
        if mode == "reference":
            # explain the size of the change: a seed where the output fell is negated
            change = seed.gather(out) - seed.gather(env_ref[self.seed_node])
            seed = Seed(seed.index, seed.value * torch.where(change < 0, -1.0, 1.0).to(seed.value))
        p = _Pass(
            self,
            env,
            env_ref,
            mode,
            batch,
            sizes=self.captured.sizes(inputs),
            nonnegative={id(env[n]) for n in self._nonnegative_nodes if n in env},
            sinks=torch.zeros(seed.K, batch, dtype=torch.float32, device=out.device),
            retain=retain,
        )
        per_unit = seed
        if mode == "contrast":
            # per unit of each entry's logit (``engine.contrast``): the entries hold value * z
            seed = Seed(seed.index, seed.value * seed.gather(out).to(seed.value.device).double())
        seed_total = self._seed_per_sample(seed, batch, out.device)
        p.R = self._seed(p, seed, per_unit)
        kept, at_inputs = p.sweep(keep)
        return kept, seed_total, at_inputs, p.sinks

    def _arguments(self, node: fx.Node, env: dict[fx.Node, Any]) -> dict[str, Any]:
        """The rule's arguments by name: recorded values for nodes (upcast from half
        precision), folded weights for convolutions that absorbed a batch norm."""
        bound = self.fused.get(node) or self.provenance.bound[node]
        if self._flat.get(node):
            args = {k: env[v] if isinstance(v, fx.Node) else v for k, v in bound.items()}
            return {k: _exact(v) for k, v in args.items()} if self._half else args
        return fx.node.map_aggregate(
            bound, lambda a: _exact(env.get(a, a) if isinstance(a, fx.Node) else a)
        )

    def _arg_is_data(self, node: fx.Node, name: str, index: int | None = None) -> bool:
        arg = self.provenance.bound[node][name]
        if index is not None:
            arg = arg[index]
        return isinstance(arg, fx.Node) and self.provenance.carries(node, arg)

    def _sample_axis(self, node: fx.Node) -> int:
        where = self.captured.batch_axis.get(node)
        return where.axis if where else 0

    def _seed_per_sample(self, seed: Seed, batch: int, device) -> Tensor:
        axis = self._sample_axis(self.seed_node)
        b = seed.index[..., axis].to(device) if batch > 1 else torch.zeros_like(seed.value).long()
        total = torch.zeros(seed.K, batch, device=device, dtype=torch.float64)
        return total.scatter_add_(1, b.to(device), seed.value.to(device, total.dtype)).float()

    def seed_head(self) -> fx.Node:
        """The op the seeds are placed through: the explained output, past copies. A linear
        head's seeds land on its input (``_seed``), never on the [B, T, V] output."""
        head = self.seed_node
        while head.target in _PASS_THROUGH:
            head = head.all_input_nodes[0]
        return head

    def _seed(self, p: _Pass, seed: Seed, per_unit: Seed) -> dict:
        """Place the seeds. Where the explained output is a linear layer (a classifier or a
        language-model head), apply the linear rule of the mode to the sparse entries
        directly (``rules.LinearRows``): entry e pairs its input row with its unit's weights.
        Mode "contrast" hands that rule the seed ``per_unit`` of logit, which it splits
        exactly; on any other output the seed is its change (``_contrast_change``)."""
        head = self.seed_head()
        out = p.env[self.seed_node]
        if head.target is not aten.linear.default or not self._arg_is_data(head, "input"):
            # any other output, or a linear head over no data (rounded values, which the rules
            # hold constant): its own rule runs on the dense seed, and sinks what it must
            dtype = torch.promote_types(out.dtype, torch.float32)
            if p.mode == "contrast":
                seed = self._contrast_change(p, per_unit)
            return {self.seed_node: seed.dense(out.shape, dtype, out.device)}
        args = self.provenance.bound[head]
        x, w, b = (_exact(p.env.get(args[k])) for k in ("input", "weight", "bias"))
        dev = x.device
        index = seed.index.to(dev)
        value = (per_unit if p.mode == "contrast" else seed).value.to(dev, x.dtype)
        pos, unit = index[..., :-1].unbind(-1), index[..., -1]
        rows = {"input": x[pos], "weight": w[unit], "bias": None if b is None else b[unit]}
        ref = None if p.env_ref is None else {"input": _exact(p.env_ref[args["input"]])[pos]}
        is_data = functools.partial(self._arg_is_data, head)
        ctx = Ctx(head, rows, None, value, is_data, p.abs_of, self.bias_term, ref)
        grads, sink = COMPOSITES[p.mode].rule(_SEED_HEAD, head.target)(ctx)
        k = torch.arange(seed.K, device=dev)[:, None].expand_as(value)
        R = torch.zeros(seed.K, *x.shape, dtype=x.dtype, device=dev)
        R.index_put_((k, *pos), grads["input"], accumulate=True)
        sample = index[..., self._sample_axis(head)] if p.batch > 1 else torch.zeros_like(unit)
        p.sinks.scatter_add_(1, sample, sink.float())
        return {args["input"]: R}

    def _contrast_change(self, p: _Pass, per_unit: Seed) -> Seed:
        """Mode "contrast" on an output that is no linear layer: each entry's logit splits
        into its change from the reference, the seed the rules carry down, and its value in
        the reference's forward, a sink (as ``LinearRows.contrast`` splits a linear head)."""
        out = p.env[self.seed_node]
        value = per_unit.value.to(out.device, torch.float64)
        at_ref = value * per_unit.gather(p.env_ref[self.seed_node]).to(value)
        index = per_unit.index.to(out.device)
        axis = self._sample_axis(self.seed_node)
        sample = index[..., axis] if p.batch > 1 else torch.zeros_like(index[..., 0])
        p.sinks.scatter_add_(1, sample, at_ref.float())
        return Seed(index, value * per_unit.gather(out).to(value) - at_ref)


@dataclass
class _Pass:
    """One sweep's state: the recorded forwards, the mode, the symbolic sizes of this batch,
    which recorded values cannot be negative, the sinks so far, and the relevance waiting at
    each node. The ``Sweeper`` it runs on is shared between calls and not written to."""

    sweeper: Sweeper
    env: dict[fx.Node, Any]
    env_ref: dict[fx.Node, Any] | None
    mode: str
    batch: int
    sizes: dict[Any, int]
    nonnegative: set[int]
    sinks: Tensor
    retain: Collection[fx.Node] | None = None  # None: free nothing (``Sweeper.run``)
    R: dict[fx.Node, Any] = field(default_factory=dict)
    rows: dict[fx.Node, Tensor] = field(default_factory=dict)  # ``rows.samples``' cache

    def abs_of(self, t: Tensor) -> Tensor:
        """|t|: outputs of ops that cannot be negative (relu, relu6, sigmoid, softmax) are
        their own |t|; constants come from the sweeper's cache."""
        return t if id(t) in self.nonnegative else self.sweeper.abs_of(t)

    def sweep(self, keep: str | set[str]) -> tuple[dict[str, Tensor], Tensor]:
        """Visit the nodes from the output back; the kept relevance and, per seed and sample,
        the relevance that reached the inputs."""
        R, through_of = self.R, self.sweeper._pass_through[self.mode]
        kept: dict[str, Tensor] = {}
        at_inputs = torch.zeros_like(self.sinks)
        for node in reversed(self.sweeper.captured.nodes):
            r = R.pop(node, None)
            if r is not None and (keep == "all" or node.name in keep) and isinstance(r, Tensor):
                kept[node.name] = r
            if r is None:
                pass  # not on the relevance path, or no relevance reached it
            elif node.op == "placeholder":
                kept[node.name] = r
                at_inputs += self.per_sample(r.float(), node)
            elif node.target is operator.getitem:
                parent, index = node.args
                parts = R.setdefault(parent, {})
                parts[index] = parts[index] + r if index in parts else r
            elif node in through_of:  # pass-through rules and folded batch norms, without a Ctx
                self._add(through_of[node], r[0] if isinstance(r, dict) else r)
            else:
                self._apply(node, r)
            self._free(node)
        return kept, at_inputs

    def _free(self, node: fx.Node) -> None:
        """Drop ``node``'s recorded values (``retain`` aside): their readers come later in the
        forward, so their rules have run. Their ids leave ``nonnegative``: ids get reused."""
        if self.retain is None or node.op != "call_function" or node in self.retain:
            return
        for env in (self.env, self.env_ref or {}):
            self.nonnegative.discard(id(env.pop(node, None)))

    def _add(self, node: fx.Node, r: Any) -> None:
        self.R[node] = self.R[node] + r if node in self.R else r

    def _apply(self, node: fx.Node, r: Any) -> None:
        """Run the node's rule on its relevance ``r``: data arguments receive their share,
        constants' shares and the rule's own sink go to the sinks."""
        s, prov = self.sweeper, self.sweeper.provenance
        out, ref_out = self.env[node], None
        if self.env_ref is not None:  # modes "reference", "contrast": float32 at least
            out, ref_out = _exact(out), _exact(self.env_ref[node])
        ref = None if self.env_ref is None else s._arguments(node, self.env_ref)
        ctx = Ctx(node, s._arguments(node, self.env), out, r, s._is_data[node], self.abs_of,
                  s.bias_term, ref, ref_out, s.canonical)  # fmt: skip
        grads, sink = s._rules[self.mode][node](ctx)
        if sink is not None:
            self.sinks += self.per_sample(sink.float(), node)
        for name, g in grads.items():
            arg = prov.bound[node][name]
            pairs = zip(arg, g, strict=True) if isinstance(arg, list | tuple) else [(arg, g)]
            for a, gi in pairs:
                if gi is None or not isinstance(a, fx.Node):
                    continue
                if prov.carries(node, a):
                    self._add(a, gi)
                else:
                    self.sinks += self.per_sample(gi.float(), a)

    def per_sample(self, t: Tensor, node: fx.Node) -> Tensor:
        """Sum a [K, *shape] tensor of ``node`` to [K, batch]."""
        K, batch = t.shape[0], self.batch
        where = self.sweeper.captured.batch_axis.get(node)
        if where is None:
            sizes = list(t.shape[1:])
            if batch not in sizes:
                # Not a per-sample tensor (only for batch size 1 or static captures).
                return (t.reshape(K, -1).sum(1) / batch)[:, None].expand(K, batch)
            axis, inner = sizes.index(batch), 1
        elif node in self.sweeper.gathered:  # rows in a data-dependent order
            s = self.sweeper
            rows = samples(node, s.gathered, self.env, s.captured.batch_axis, self.sizes,
                           batch, self.rows)  # fmt: skip
            return book(t, where.axis, rows, batch)
        else:
            axis, inner = where.axis, where.inner
            if not isinstance(inner, int):
                inner = inner.subs(self.sizes)
                if not (inner.is_Integer and inner >= 1):
                    # Rows in an order neither the static layout nor ``engine.rows`` accounts
                    # for: not attributable per sample, so shared evenly.
                    return (t.reshape(K, -1).sum(1) / batch)[:, None].expand(K, batch)
                inner = int(inner)
        n = t.shape[axis + 1]
        if inner == 1 and n == batch:
            return t.movedim(axis + 1, -1).reshape(K, -1, n).sum(1)
        return book(t, axis, (torch.arange(n) // inner) % batch, batch)


def _placeholders_behind(node: fx.Node) -> set[str]:
    """Names of the placeholders a node is computed from."""
    seen, stack, names = set(), [node], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            names.add(n.name)
        stack.extend(n.all_input_nodes)
    return names
