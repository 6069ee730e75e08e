"""The recorded forward pass: every value of the exported graph kept, and ``NodeIO``, the
public view of those values by node name."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, fx

from .capture import Captured


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


class OnFirstRead(Mapping):
    """A ``node_io`` whose forward is recorded when it is first read: a result that offers it
    (generation's, for the last explained step) costs no forward to callers that never look
    (the service, most scripts)."""

    def __init__(self, record: Callable[[], Mapping]):
        self._record, self._io = record, None

    def _mapping(self) -> Mapping:
        if self._io is None:
            self._io = self._record()
        return self._io

    def __getitem__(self, name: str) -> dict[str, Any]:
        return self._mapping()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._mapping())

    def __len__(self) -> int:
        return len(self._mapping())


class HeadRows:
    """A linear head's output (and its copies) computed at only some rows: ``values`` [N, V]
    for the rows ``lookup`` numbers (-1 elsewhere; ``lookup`` has the output's shape but the
    last axis). Indexed as the whole output would be, at those rows: ``out[b, t]`` gives
    [..., V], ``out[b, t, v]`` gives [...]. A language model's [B, T, V] logits are what the
    explanation forward would hold longest (266 MB at 2079 positions and a vocabulary of
    32000), and only the seeds' rows of them are ever read (the decode check, the seed's
    value in modes "reference" and "contrast", contrast's alternatives)."""

    def __init__(self, values: Tensor, lookup: Tensor):
        self.values, self.lookup = values, lookup

    @classmethod
    def at(cls, node: fx.Node, env: dict[fx.Node, Any], rows: Tensor) -> HeadRows:
        """``node`` (a linear op) run on its input's ``rows`` [..., input.ndim - 1] only."""
        x, *rest = fx.node.map_arg(node.args, env.__getitem__)
        kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
        where = rows.to(x.device).reshape(-1, rows.shape[-1]).unique(dim=0)
        lookup = torch.full(x.shape[:-1], -1, dtype=torch.long, device=x.device)
        lookup[tuple(where.unbind(-1))] = torch.arange(where.shape[0], device=x.device)
        return cls(node.target(x[tuple(where.unbind(-1))], *rest, **kwargs), lookup)

    def then(self, node: fx.Node) -> HeadRows:
        """``node`` (a copy or cast of this output, its other arguments constants) applied."""
        return HeadRows(node.target(self.values, *node.args[1:], **node.kwargs), self.lookup)

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.lookup.shape, self.values.shape[-1]))

    def detach(self) -> HeadRows:
        return self

    def __getitem__(self, index: tuple[Tensor, ...]) -> Tensor:
        at = self.lookup.dim()
        row = self.lookup[index[:at]]
        if bool((row < 0).any()):
            raise IndexError("the head's output was computed at the seeds' rows only")
        picked = self.values[row]
        if len(index) == at:
            return picked
        unit = torch.as_tensor(index[at], device=picked.device).expand(row.shape)
        return picked.gather(-1, unit[..., None])[..., 0]


def forward(
    captured: Captured,
    inputs: dict[str, Tensor],
    fused: dict[fx.Node, dict[str, Any]] | None = None,
    zeroed: frozenset[fx.Node] = frozenset(),
    routed: dict[fx.Node, Any] | None = None,
    keep: Collection[fx.Node] | None = None,
    head: tuple[list[fx.Node], Tensor] | None = None,
) -> tuple[dict[fx.Node, Any], tuple]:
    """Run the exported graph, keeping every value (or, given ``keep``, only those values and
    the graph's inputs and outputs: the rest are dropped once the last op reading them ran,
    so a sweep's recorded forward holds what its rules read, not every intermediate).
    Op errors propagate unchanged.

    ``fused`` maps a convolution to its arguments with a following eval batch norm folded in
    (the batch norm node, mapped to {}, then just passes the convolution's output on), as
    inference engines do: one op instead of two, and what the sweep's rule sees. The outputs
    of ``zeroed`` nodes are replaced by zeros (a reference forward with empty embeddings).
    ``routed`` maps a mixture-of-experts ``topk`` to the (weights, experts) it returns instead:
    the input's, in the reference forward. ``head``: a linear head and the copies from it to
    the output, nothing else reading them (``Sweeper.head_chain``), and the rows [..., n] of
    its input where they are computed (``HeadRows``), not the whole output.
    """
    routed = routed or {}
    chain, rows = head or ([], None)
    fused = fused or {}
    env: dict[fx.Node, Any] = {}
    drops = {} if keep is None else drop_schedule(captured, keep)
    for node in captured.nodes:
        for done in drops.get(node, ()):
            env.pop(done, None)
        if node.op == "placeholder":
            env[node] = inputs[node.name] if node.name in inputs else captured.constants[node.name]
        elif node in fused and not fused[node]:
            out = env[node.args[0]]
            env[node] = (out, out.new_empty(0), out.new_empty(0))
        elif node in fused:
            env[node] = node.target(**fx.node.map_arg(fused[node], env.__getitem__))
        elif node in routed:
            env[node] = routed[node]
        elif node in chain:
            done = node is not chain[0]
            env[node] = env[node.args[0]].then(node) if done else HeadRows.at(node, env, rows)
        elif node.op == "call_function":
            env[node] = _call(node, env.__getitem__)
            if node in zeroed:
                env[node] = _zeros(env[node])
        elif node.op == "output":  # what the model returns: no buffer it wrote in place
            return env, tuple(fx.node.map_arg(captured.user_outputs(), env.__getitem__))
    raise RuntimeError("graph has no output node")


def _zeros(value: Tensor | tuple) -> Tensor | tuple:
    """A lookup's output made zeros; of a lookup returning several tensors (an embedding bag's
    vectors, then its bookkeeping), the first."""
    if isinstance(value, tuple):
        return (torch.zeros_like(value[0]), *value[1:])
    return torch.zeros_like(value)


def drop_schedule(captured: Captured, keep: Collection[fx.Node]) -> dict[fx.Node, list[fx.Node]]:
    """Per node, the op values not in ``keep`` whose last reader ran just before it: dropped
    as the forward reaches it (a value no op reads goes at the next node)."""
    nodes = list(captured.nodes)
    last = {n: i for i, n in enumerate(nodes)}
    for i, node in enumerate(nodes):
        for a in node.all_input_nodes:
            last[a] = i
    drops: dict[fx.Node, list[fx.Node]] = {}
    for node, i in last.items():
        if node.op == "call_function" and node not in keep and i + 1 < len(nodes):
            drops.setdefault(nodes[i + 1], []).append(node)
    return drops


def _call(node: fx.Node, value_of: Callable[[fx.Node], Any]) -> Any:
    """Run ``node``'s op on the values of its arguments."""
    args = fx.node.map_arg(node.args, value_of)
    return node.target(*args, **fx.node.map_arg(node.kwargs, value_of))
