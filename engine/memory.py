"""The sweep's working memory: an estimate from the graph, and seeds per sweep from a budget.

A sweep holds the recorded forward (the values its rules read, in the model's dtype) and, per
seed, the relevance waiting at the nodes the sweep has reached but not yet passed, plus what
the requested ``relevance_nodes`` keep (rules compute in float32 at least). A lean sweep frees
each recorded value as it passes the node that made it, so the two parts peak at different
places: the record at the top of the graph, before anything is freed; a seed's frontier
wherever the widest tensors wait (an MLP's). ``estimate`` walks the graph from the output back
as ``sweep._Pass.sweep`` does, with every node's size at the run's symbolic sizes, and gives
at each node what is still recorded there and each seed's frontier (``SweepMemory.points``);
a budget is met where their sum for the seeds is largest. Attention holds no seeds x heads x
positions^2 tensor (``rules.attention`` sweeps the scores in blocks of queries): its
score-sized tensors are shared by the seeds, held while its rule runs. A rule's temporaries
(ratios, denominators, the shares it hands on) come on top: ``RULE_FACTOR``, measured against
the resident memory of sweeps of a small Llama-style model (2 layers, width 128, 4 heads, 2 KV
heads; 256 and 512 positions, 1 to 32 seeds, RSS sampled every 2 ms): the estimate was 1.7-2.3
times the measured peak (3.2 at one seed and 256 positions).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, fx

from .params import RelevanceParams
from .recording import drop_schedule
from .rules.attention import BLOCK_ELEMENTS
from .sweep import Sweeper

# The rules' temporaries over the largest live frontier; measured RSS per seed was 1.35 times
# the frontier on the model above, and 2 keeps the estimate above every measured peak.
RULE_FACTOR = 2.0
AUTO_FRACTION = 0.5  # "auto": this share of the device's free memory
# Score-sized tensors the attention rule holds for all seeds (``rules.attention``): A and the
# score multiplier's shared factor; modes "reference" and "contrast" also the scores of both
# inputs, the reference's weights, the softmax slopes and their mix (some freed before the
# blocks).
SHARED_SCORES = {"reference": 6, "contrast": 6}
# Ops whose rule takes |W| of a constant weight from the sweeper's cache (``rules.dense``).
_ABS_CACHED = {torch.ops.aten.linear.default, torch.ops.aten.convolution.default}


class MemoryBudgetError(ValueError):
    """A request whose sweep cannot fit the memory budget, even with one seed per sweep."""


class Point(NamedTuple):
    """What a sweep holds at ``node``: ``fixed`` whatever the seeds, and ``per_seed``."""

    node: str
    fixed: int
    per_seed: int


@dataclass(frozen=True)
class SweepMemory:
    """Bytes of one sweep: ``forward``, the recorded forward's own peak; ``points``, at each
    node the sweep visits, what it holds whatever the seeds (the recorded values it has not
    passed yet, attention's shared score tensors at an attention node) and what it holds per
    seed. A lean sweep frees the recorded values as it passes them, so the top of the graph,
    where the most is still recorded, need not be where a seed holds the most."""

    forward: int
    points: tuple[Point, ...]

    @property
    def fixed(self) -> int:
        """The most held whatever the seeds, at any point (the forward's peak included)."""
        return max([self.forward, *(p.fixed for p in self.points)])

    @property
    def per_seed(self) -> int:
        """The most one seed holds at any point."""
        return max((p.per_seed for p in self.points), default=0)

    def needed(self, seeds: int) -> int:
        return max([self.forward, *(p.fixed + seeds * p.per_seed for p in self.points)])

    def seeds_within(self, budget: int, what: str) -> int:
        """How many seeds one sweep may carry within ``budget`` bytes (at least one, or
        ``MemoryBudgetError`` naming what one seed needs)."""
        if budget < self.needed(1):
            raise MemoryBudgetError(
                f"memory_budget {_mb(budget)} cannot hold one sweep of {what}: it needs at "
                f"least {_mb(self.needed(1))} (recorded forward and shared scores up to "
                f"{_mb(self.fixed)}, up to {_mb(self.per_seed)} per seed); raise the budget "
                f"or shorten the request"
            )
        return min(((budget - p.fixed) // p.per_seed for p in self.points if p.per_seed), default=1)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def resolve_budget(budget: int | str, device: torch.device) -> int:
    """Bytes from a parsed budget; "auto" is ``AUTO_FRACTION`` of the device's free memory
    (``torch.cuda.mem_get_info`` on CUDA, MemAvailable of /proc/meminfo on the CPU)."""
    if budget != "auto":
        return int(budget)
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        free = int(fields["MemAvailable"].split()[0]) * 1024
    return int(free * AUTO_FRACTION)


def estimate(
    sweeper: Sweeper, sizes: dict, mode: str, keep: str | set[str], lean: bool = True
) -> SweepMemory:
    """The working memory of one sweep over ``sweeper``'s graph at the symbolic ``sizes``;
    ``lean``: the recorded forward keeps only what the rules read, and the sweep frees each
    value as it passes the node that made it (False: every op's value, kept to the end, as
    when layer outputs are asked for)."""
    prov = sweeper.provenance
    forward_peak, held = _recorded(sweeper, sizes, mode, lean)
    recorded = sum(held.values())
    width = torch.promote_types(_dtype(sweeper.seed_node), torch.float32).itemsize
    head_rows = _head_rows(sweeper, sizes) if lean else 0
    recorded += _cached_abs(sweeper, sizes)  # never freed: counted at every point
    head = sweeper.seed_head()
    start = prov.bound[head]["input"] if head.target is torch.ops.aten.linear.default else head
    live: dict[fx.Node, int] = {start: _bytes(start, sizes, width)}
    kept, points = 0, []
    for node in reversed(sweeper.captured.nodes):
        if node in live:
            here = live.pop(node)
            if keep == "all" or node.op == "placeholder" or node.name in keep:
                kept += here
            if node.op != "placeholder":
                targets = _targets(sweeper, node, mode)
                added = sum(_bytes(a, sizes, width) for a in targets if a not in live)
                frontier = kept + sum(live.values()) + here + added
                shared = _shared_scores(node, sizes, mode) * width
                per_seed = math.ceil(frontier * RULE_FACTOR) + head_rows
                points.append(Point(node.name, recorded + shared, per_seed))
                for a in targets:
                    live.setdefault(a, _bytes(a, sizes, width))
        if lean:
            recorded -= held.get(node, 0)
    return SweepMemory(forward_peak, tuple(points))


def _recorded(sweeper: Sweeper, sizes: dict, mode: str, lean: bool) -> tuple[int, dict]:
    """Peak bytes of the recorded forward, and the bytes of each node's value it holds when
    the sweep starts. Lean (``Sweeper.forward(lean=True)``): what is alive at each op as it
    runs, values dropped as ``recording.drop_schedule`` drops them, outputs kept, a linear
    head (``Sweeper.head_chain``) computed at the seeds' rows only (counted per seed:
    ``_head_rows``); else every op's value. Modes "reference" and "contrast" hold the
    reference's (lean) record on top."""
    captured = sweeper.captured
    drops = drop_schedule(captured, sweeper.read) if lean else {}
    head = set(sweeper.head_chain) if lean else set()
    held: dict[fx.Node, int] = {}
    alive = peak = 0
    for node in captured.nodes:
        alive -= sum(held.pop(n, 0) for n in drops.get(node, ()))
        if node.op == "call_function" and node not in head:
            held[node] = _bytes(node, sizes)
            alive += held[node]
            peak = max(peak, alive)
    if mode == "default":
        return peak, held
    read = [n for n in sweeper.read if n.op == "call_function" and n not in head]
    for n in read:
        held[n] = held.get(n, 0) + _bytes(n, sizes)
    return peak + sum(_bytes(n, sizes) for n in read), held


def _targets(sweeper: Sweeper, node: fx.Node, mode: str) -> list[fx.Node]:
    """The nodes ``node`` hands its relevance on to, as ``sweep._Pass.sweep`` does."""
    through = sweeper._pass_through[mode]
    if node.target is operator.getitem:
        return [node.args[0]]
    if node in through:
        return [through[node]]
    return [a for a in node.all_input_nodes if sweeper.provenance.carries(node, a)]


def _shared_scores(node: fx.Node, sizes: dict, mode: str) -> int:
    """Elements the attention rule at ``node`` holds for all seeds while it runs: the
    score-sized tensors of ``SHARED_SCORES``, and a block of per-seed scores with its
    temporaries, two blocks (``rules.attention``); none at other nodes."""
    scores = _scores(node, sizes)
    return SHARED_SCORES.get(mode, 2) * scores + 2 * BLOCK_ELEMENTS if scores else 0


def _cached_abs(sweeper: Sweeper, sizes: dict) -> int:
    """Bytes of the |W| ``Sweeper.abs_of`` caches from the first sweep on: the weights of the
    linear layers and convolutions on the relevance path (each once), but the seed head's,
    whose rows the seeds take. 90 MB for the 55 M Llama of ``bench.generation --scale``."""
    bound, data, head = sweeper.provenance.bound, sweeper.provenance.data, sweeper.seed_head()
    weights = set()
    for node in sweeper._order:
        if node.target in _ABS_CACHED and node is not head:
            w = bound[node].get("weight")
            if isinstance(w, fx.Node) and w.op == "placeholder" and not data.get(w, False):
                weights.add(w)
    return sum(_bytes(w, sizes) for w in weights)


def _head_rows(sweeper: Sweeper, sizes: dict) -> int:
    """Bytes of one seed's rows of a lean forward's linear head and its copies: a row of the
    output's last axis per sample (a generation step's seed has one entry per row)."""
    total = 0
    for node in sweeper.head_chain:
        val = node.meta["val"]
        rows = _concrete(val.shape[0], sizes) * _concrete(val.shape[-1], sizes)
        total += rows * val.element_size()
    return total


def _scores(node: fx.Node, sizes: dict) -> int:
    """Elements of an attention's score matrix [B, heads, queries, keys]: zero for other
    ops."""
    if node.target is not torch.ops.aten.scaled_dot_product_attention.default:
        return 0
    q, k = (a.meta["val"] for a in node.args[:2])
    return _numel(q.shape[:-1], sizes) * _concrete(k.shape[-2], sizes)


def _dtype(node: fx.Node) -> torch.dtype:
    val = node.meta.get("val")
    return val.dtype if isinstance(val, Tensor) else torch.float32


def _bytes(node: fx.Node, sizes: dict, itemsize: int | None = None) -> int:
    """Bytes of ``node``'s value (every tensor of a tuple) at ``sizes``; ``itemsize`` replaces
    the value's own element size (relevance is float32 at least)."""
    val = node.meta.get("val")
    vals = val if isinstance(val, list | tuple) else [val]
    total = 0
    for v in vals:
        if isinstance(v, Tensor):
            total += _numel(v.shape, sizes) * (itemsize or v.element_size())
    return total


def _numel(shape: Any, sizes: dict) -> int:
    n = 1
    for size in shape:
        n *= _concrete(size, sizes)
    return n


def _concrete(size: Any, sizes: dict) -> int:
    """A dimension at ``sizes``: static sizes as they are, symbolic ones substituted (their
    traced value where an expression keeps unknown symbols)."""
    if isinstance(size, int):
        return size
    value = size.node.expr.subs(sizes)
    return int(value) if value.is_number else int(size.node.hint)


def plan_seeds(
    dlb: Any,
    plan: Any,
    batch: int,
    length: int,
    mode: str,
    nodes: Any,
    lean: bool = True,
    lengths: dict[str, int] | None = None,
) -> int:
    """Seeds per sweep for a generation of ``batch`` rows over at most ``length`` positions
    (``lengths``: other lengths for some inputs, an encoder-decoder's decoder tokens),
    keeping ``nodes`` (``relevance_nodes``), with a lean recorded forward or not (``lean``,
    see ``estimate``): ``plan.max_seeds_per_sweep`` without a budget; with one, as many as
    fit up to that cap (one, on the stepwise path, must fit), checked before any forward
    runs."""
    if plan.memory_budget is None:
        return plan.max_seeds_per_sweep
    captured, sweeper = dlb._graphs[0]  # the graph generation explains with (dlb.captured)
    lengths = lengths or {}
    shapes = {
        n: torch.empty(batch, lengths.get(n, length), device="meta") for n in captured.input_names
    }
    keep = RelevanceParams(relevance_nodes=nodes).keep
    memory = estimate(sweeper, captured.sizes(shapes), mode, keep, lean)
    budget = resolve_budget(plan.memory_budget, torch.device(dlb.device))
    fit = memory.seeds_within(budget, f"{batch} row(s) x {length} positions")
    return max(1, min(plan.max_seeds_per_sweep, fit))
