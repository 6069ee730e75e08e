"""The forward pass that records activations and the backward sweep that applies the rules.

The sweep carries ``K`` seeds at once: every relevance tensor has a leading seed axis. A
classification batch needs one (each sample's seed lives in its own batch row); generation
explains every emitted token of a sequence in one sweep with one seed per step.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, fx

from .capture import Captured
from .provenance import Provenance, UnsupportedOpError
from .rules import (
    MODES,
    REFERENCE_RULES,
    RULES,
    TINY,
    Ctx,
    batch_norm_affine,
    grouped_mm,
    identity,
    stable,
)

aten = torch.ops.aten
_PASS_THROUGH = {aten._to_copy.default, aten.clone.default, aten.alias.default}


@dataclass
class Seed:
    """K seeds on the explained output: seed k puts ``value[k, e]`` at ``output[index[k, e]]``.

    Entries are sparse so that a seed on a [B, T, V] language-model output never becomes a
    dense tensor of that size.
    """

    index: Tensor  # [K, E, output.ndim], long
    value: Tensor  # [K, E]

    @property
    def K(self) -> int:
        return self.index.shape[0]

    def gather(self, output: Tensor) -> Tensor:
        """The output's values at the seed's entries [K, E]."""
        return output[tuple(self.index.to(output.device).unbind(-1))]

    def dense(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> Tensor:
        R = torch.zeros(self.K, *shape, dtype=dtype, device=device)
        k = torch.arange(self.K, device=device)[:, None].expand_as(self.value)
        R.index_put_(
            (k, *self.index.to(device).unbind(-1)), self.value.to(device, dtype), accumulate=True
        )
        return R


@dataclass
class Explanation:
    """Relevance of one sweep. Tensors have a leading seed axis K."""

    relevance: dict[str, Tensor]
    seed: Tensor  # [K, B] seed value per sample
    inputs: Tensor  # [K, B] relevance that reached the inputs
    sinks: Tensor  # [K, B] relevance left in biases, constants and cancelled shares
    outputs: tuple
    env: dict[fx.Node, Any] = field(repr=False, default_factory=dict)
    fused: dict[fx.Node, dict[str, Any]] = field(repr=False, default_factory=dict)
    captured: Captured | None = field(repr=False, default=None)  # the graph that ran

    def node_io(self) -> NodeIO:
        """The public ``node_io`` form: recorded inputs and output of every op."""
        return NodeIO(self.captured, self.env, self.fused)


class NodeIO(Mapping):
    """``node_io[name] = {"input_values": [...], "output_values": ...}`` for every op,
    built on access: most callers read a few nodes, and the values are already recorded.

    The recorded forward runs a convolution and its eval batch norm as one op (``fused``).
    node_io shows the convolution's own output (also the norm's input): the convolution is
    run again, unfused, the first time it is read. The norm's output is the fused op's, equal
    to the norm of that output up to rounding."""

    def __init__(
        self,
        captured: Captured,
        env: dict[fx.Node, Any],
        fused: dict[fx.Node, dict[str, Any]] | None = None,
    ):
        self._env, self._fused = env, fused or {}
        self._unfused: dict[fx.Node, Any] = {}
        self._nodes = {n.name: n for n in captured.nodes if n.op == "call_function"}

    def _value(self, node: fx.Node) -> Any:
        if not self._fused.get(node):  # not a convolution that absorbed a batch norm
            return self._env.get(node)
        if node not in self._unfused:
            with torch.no_grad():
                self._unfused[node] = _call(node, self._env.__getitem__)
        return self._unfused[node]

    def __getitem__(self, name: str) -> dict[str, Any]:
        node = self._nodes[name]
        ins = [self._value(a) for a in node.all_input_nodes if a in self._env]
        return {"input_values": ins, "output_values": self._value(node)}

    def __iter__(self) -> Iterator[str]:
        return iter(self._nodes)

    def __len__(self) -> int:
        return len(self._nodes)


def forward(
    captured: Captured,
    inputs: dict[str, Tensor],
    fused: dict[fx.Node, dict[str, Any]] | None = None,
    zeroed: frozenset[fx.Node] = frozenset(),
    routed: dict[fx.Node, Any] | None = None,
) -> tuple[dict[fx.Node, Any], tuple]:
    """Run the exported graph, keeping every value. Op errors propagate unchanged.

    ``fused`` maps a convolution to its arguments with a following eval batch norm folded in
    (the batch norm node, mapped to {}, then just passes the convolution's output on), as
    inference engines do: one op instead of two, and what the sweep's rule sees. The outputs
    of ``zeroed`` nodes are replaced by zeros (a reference forward with empty embeddings).
    ``routed`` maps a mixture-of-experts ``topk`` to the (weights, experts) it returns instead:
    the input's, in the reference forward.
    """
    routed = routed or {}
    fused = fused or {}
    env: dict[fx.Node, Any] = {}
    for node in captured.nodes:
        if node.op == "placeholder":
            env[node] = inputs[node.name] if node.name in inputs else captured.constants[node.name]
        elif node in fused and not fused[node]:
            out = env[node.args[0]]
            env[node] = (out, out.new_empty(0), out.new_empty(0))
        elif node in fused:
            env[node] = node.target(**fx.node.map_arg(fused[node], env.__getitem__))
        elif node in routed:
            env[node] = routed[node]
        elif node.op == "call_function":
            env[node] = _call(node, env.__getitem__)
            if node in zeroed:
                env[node] = torch.zeros_like(env[node])
        elif node.op == "output":
            outputs = fx.node.map_arg(node.args[0], env.__getitem__)
            return env, tuple(outputs) if isinstance(outputs, list | tuple) else (outputs,)
    raise RuntimeError("graph has no output node")


def _call(node: fx.Node, value_of: Callable[[fx.Node], Any]) -> Any:
    """Run ``node``'s op on the values of its arguments."""
    args = fx.node.map_arg(node.args, value_of)
    return node.target(*args, **fx.node.map_arg(node.kwargs, value_of))


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
    since TINY and the ratios of small denominators do not fit in float16."""
    if isinstance(value, Tensor) and value.dtype in (torch.float16, torch.bfloat16):
        return value.float()
    return value


class Sweeper:
    """Applies the rules over one captured graph; caches |W| across runs."""

    def __init__(self, captured: Captured, seed_node: fx.Node):
        self.captured = captured
        self.seed_node = seed_node
        self.provenance = Provenance(captured.nodes, captured.input_names, seed_node)
        self._abs: dict[int, Tensor] = {}
        self._order = [n for n in captured.nodes if n in self.provenance.visited]
        # convolutions run with their batch norm folded in (and those batch norms: {})
        self.fused = self._fold_batch_norms()
        self._pass_through = self._pass_through_nodes()
        self._missing = self.provenance.unsupported()
        self._nonnegative_nodes = [n for n in self._order if _nonnegative(n)]
        self._reference = {n for n in self._order if n.target in REFERENCE_RULES}
        self._routing = _routing_topks(captured.nodes)
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
        self._half = any(_exact(t) is not t for t in captured.constants.values())
        self._nonnegative: set[int] = set()
        self._constant_ids = {id(t) for t in captured.constants.values()} | {
            id(args[k]) for args in self.fused.values() for k in ("weight", "bias") if k in args
        }

    def _fold_batch_norms(self) -> dict[fx.Node, dict[str, Tensor]]:
        """Fold eval batch norms into the convolution before them.

        conv followed by batch norm is one affine map; the |z| rule over the folded weights
        sinks only the folded bias, where a separate batch-norm rule would sink the whole
        shift of every channel. It also saves a rule application per layer.
        """
        folded = {}
        bound = self.provenance.bound
        for node in self._order:
            if node.target is not aten._native_batch_norm_legit_no_training.default:
                continue
            conv = bound[node]["input"]
            if conv.target is not aten.conv2d.default or len(conv.users) != 1:
                continue
            value = lambda a: None if a is None else self.captured.constants.get(a.name)  # noqa: E731
            bn = {k: (value(v) if isinstance(v, fx.Node) else v) for k, v in bound[node].items()}
            weight, bias = value(bound[conv]["weight"]), value(bound[conv]["bias"])
            if weight is None or any(bn[k] is None for k in ("running_mean", "running_var")):
                continue
            scale, shift = batch_norm_affine(bn)
            bias = shift if bias is None else bias * scale + shift
            folded[conv] = {
                **bound[conv],
                "weight": weight * scale.view(-1, 1, 1, 1),
                "bias": bias,
            }
            folded[node] = {}
        return folded

    def _pass_through_nodes(self) -> dict[fx.Node, fx.Node]:
        """Nodes whose relevance goes unchanged to one data argument: identity rules
        (activations, norms, copies) and batch norms folded into their convolution. Half the
        nodes of a CNN; the sweep hands their relevance on directly."""
        bound, data = self.provenance.bound, self.provenance.data
        through = {}
        for node in self._order:
            if node in self.fused and not self.fused[node]:
                through[node] = bound[node]["input"]
            elif RULES.get(node.target) is identity:
                first = next(iter(bound[node].values()))
                if isinstance(first, fx.Node) and data.get(first, False):
                    through[node] = first
        return through

    def forward(self, inputs: dict[str, Tensor]) -> tuple[dict[fx.Node, Any], tuple]:
        """The recorded forward, with batch norms fused into their convolutions."""
        return forward(self.captured, inputs, self.fused)

    def reference_forward(
        self, inputs: dict[str, Tensor], reference: dict[str, Tensor] | None, env: dict
    ) -> dict[fx.Node, Any]:
        """The recorded forward of mode "reference"'s reference input. Inputs it leaves out
        default to zeros for floating-point inputs; for token ids, to the same ids with the
        embedding lookups that start relevance paths replaced by zero vectors. Routing is
        the input's (recorded in ``env``): the same experts with the same weights, constants
        as the spec has them, so each expert row has its reference row and a product with a
        routing weight changes only through its other operand."""
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
        routed = {node: env[node] for node in self._routing}
        ref_env, _ = forward(self.captured, reference, self.fused, frozenset(zeroed), routed)
        return ref_env

    def _embeddings_of(self, name: str) -> set[fx.Node]:
        """Embedding lookups of input ``name``'s ids on the relevance path."""
        found = set()
        for node in self._order:
            if node.target is aten.embedding.default and self.provenance.data.get(node, False):
                ids = self.provenance.bound[node].get("indices")
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
        are swept on every request. Outputs of ops that cannot be negative (relu, relu6,
        sigmoid, softmax) are their own |t|. Anything else is computed afresh."""
        if id(t) in self._nonnegative:
            return t
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

    def per_sample(self, t: Tensor, node: fx.Node, batch: int) -> Tensor:
        """Sum a [K, *shape] tensor of ``node`` to [K, batch]."""
        K = t.shape[0]
        where = self.captured.batch_axis.get(node)
        if where is None:
            sizes = list(t.shape[1:])
            if batch not in sizes:
                # Not a per-sample tensor (only for batch size 1 or static captures).
                return (t.reshape(K, -1).sum(1) / batch)[:, None].expand(K, batch)
            axis, inner = sizes.index(batch), 1
        else:
            axis, inner = where.axis, where.inner
            if not isinstance(inner, int):
                inner = inner.subs(self._sizes)
                if not (inner.is_Integer and inner >= 1):
                    # Rows mixed across samples (mixture-of-experts rows are sorted by
                    # expert): not attributable per sample, so shared evenly.
                    return (t.reshape(K, -1).sum(1) / batch)[:, None].expand(K, batch)
                inner = int(inner)
        t = t.movedim(axis + 1, -1)
        n = t.shape[-1]
        t = t.reshape(K, -1, n).sum(1)
        if inner == 1 and n == batch:
            return t
        sample = (torch.arange(n, device=t.device) // inner) % batch
        return torch.zeros(K, batch, dtype=t.dtype, device=t.device).index_add_(1, sample, t)

    def run(
        self,
        env: dict[fx.Node, Any],
        inputs: dict[str, Tensor],
        seed: Seed,
        mode: str,
        keep: str | set[str],
        env_ref: dict[fx.Node, Any] | None = None,
    ) -> tuple[dict[str, Tensor], Tensor, Tensor, Tensor]:
        """Sweep ``seed`` back to ``inputs``; returns the kept relevance and, per seed and
        sample, the seed, the relevance at the inputs and the sinks. Mode "reference" needs
        ``env_ref``, the recorded forward of the reference input."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if (mode == "reference") != (env_ref is not None):
            raise ValueError('the recorded reference forward is for mode "reference" only')
        self.check_rules()
        batch = next(iter(inputs.values())).shape[0]
        self._sizes = self.captured.sizes(inputs)
        self._nonnegative = {id(env[n]) for n in self._nonnegative_nodes}
        prov = self.provenance
        out = env[self.seed_node]
        if env_ref is not None:
            # explain the size of the change: a seed where the output fell is negated
            change = seed.gather(out) - seed.gather(env_ref[self.seed_node])
            seed = Seed(seed.index, seed.value * torch.where(change < 0, -1.0, 1.0).to(seed.value))
        K = seed.K
        sinks = torch.zeros(K, batch, dtype=torch.float32, device=out.device)
        seed_total = self._seed_per_sample(seed, batch, out.device)
        R: dict[fx.Node, Any] = self._seed(env, seed, mode, sinks, batch, env_ref)
        kept: dict[str, Tensor] = {}
        inputs = torch.zeros_like(sinks)
        for node in reversed(self._order):
            r = R.pop(node, None)
            if r is None:
                continue
            if keep == "all" or node.name in keep:
                if isinstance(r, Tensor):
                    kept[node.name] = r
            if node.op == "placeholder":
                kept[node.name] = r
                inputs += self.per_sample(r.float(), node, batch)
                continue
            if node.target is operator.getitem:
                parent, index = node.args
                parts = R.setdefault(parent, {})
                parts[index] = parts[index] + r if index in parts else r
                continue
            through = self._pass_through.get(node)
            if through is not None and not (env_ref is not None and node in self._reference):
                # identity rules and folded batch norms, without a Ctx
                r = r[0] if isinstance(r, dict) else r
                R[through] = R[through] + r if through in R else r
                continue
            out, ref_out = env[node], None
            if env_ref is not None:  # mode "reference" subtracts them: float32 at least
                out, ref_out = _exact(out), _exact(env_ref[node])
            ctx = Ctx(
                node=node,
                args=self._arguments(node, env),
                out=out,
                R=r,
                mode=mode,
                is_data=self._is_data[node],
                abs_of=self.abs_of,
                bias_term=self.bias_term,
                ref=None if env_ref is None else self._arguments(node, env_ref),
                ref_out=ref_out,
            )
            rule = REFERENCE_RULES.get(node.target) if env_ref is not None else None
            grads, sink = (rule or RULES[node.target])(ctx)
            if sink is not None:
                sinks += self.per_sample(sink.float(), node, batch)
            for name, g in grads.items():
                arg = prov.bound[node][name]
                pairs = zip(arg, g, strict=True) if isinstance(arg, list | tuple) else [(arg, g)]
                for a, gi in pairs:
                    if gi is None or not isinstance(a, fx.Node):
                        continue
                    if prov.data.get(a, False):
                        R[a] = R[a] + gi if a in R else gi
                    else:
                        sinks += self.per_sample(gi.float(), a, batch)
        return kept, seed_total, inputs, sinks

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
        return isinstance(arg, fx.Node) and self.provenance.data.get(arg, False)

    def _seed_per_sample(self, seed: Seed, batch: int, device) -> Tensor:
        where = self.captured.batch_axis.get(self.seed_node)
        axis = where.axis if where else 0
        b = seed.index[..., axis].to(device) if batch > 1 else torch.zeros_like(seed.value).long()
        total = torch.zeros(seed.K, batch, device=device)
        return total.scatter_add_(1, b.to(device), seed.value.to(device, torch.float32))

    def _seed(self, env, seed: Seed, mode: str, sinks: Tensor, batch: int, env_ref=None) -> dict:
        """Place the seeds. Where the explained output is a linear layer (a classifier or a
        language-model head), apply its rule to the sparse entries directly."""
        head = self.seed_node
        while head.target in _PASS_THROUGH:
            head = head.all_input_nodes[0]
        out = env[self.seed_node]
        if head.target is not aten.linear.default:
            dtype = torch.promote_types(out.dtype, torch.float32)
            return {self.seed_node: seed.dense(out.shape, dtype, out.device)}
        args = self.provenance.bound[head]
        x, w, b = (_exact(env.get(args[k])) for k in ("input", "weight", "bias"))
        dev = x.device
        index, value = seed.index.to(dev), seed.value.to(dev, x.dtype)
        pos, unit = index[..., :-1].unbind(-1), index[..., -1]
        xs, ws = x[pos], w[unit]  # [K, E, in]
        if mode == "reference":  # contributions of the change; the bias cancels
            c = (xs - _exact(env_ref[args["input"]])[pos]) * ws
            rows = c * (value / stable(c.sum(-1)))[..., None]
        else:
            c_abs = xs.abs() * ws.abs()
            D = c_abs.sum(-1) + (b[unit].abs() if b is not None else 0)
            ratio = torch.where(D != 0, value / torch.where(D != 0, D, 1), 0)
            rows = (xs * ws if mode == "contrast" else c_abs) * ratio[..., None]
        k = torch.arange(seed.K, device=dev)[:, None].expand_as(value)
        R = torch.zeros(seed.K, *x.shape, dtype=x.dtype, device=dev)
        R.index_put_((k, *pos), rows, accumulate=True)
        where = self.captured.batch_axis.get(head)
        axis = where.axis if where else 0
        sample = index[..., axis] if batch > 1 else torch.zeros_like(unit)
        sinks.scatter_add_(1, sample, (value - rows.sum(-1)).float())
        return {args["input"]: R}


def _routing_topks(nodes: Any) -> list[fx.Node]:
    """The ``topk`` nodes that pick the experts of grouped expert matmuls: ancestors of a
    grouped matmul's row offsets."""
    found, seen = [], set()
    stack = [n.args[2] for n in nodes if RULES.get(n.target) is grouped_mm and len(n.args) > 2]
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
