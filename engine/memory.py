"""The sweep's working memory: an estimate from the graph, and seeds per sweep from a budget.

A sweep holds the recorded forward (the values its rules read, in the model's dtype, at the
peak of the forward that records them: ``fixed``; the sweep frees them as it goes) and,
per seed, the relevance waiting at the nodes the sweep has reached but not yet passed, plus
what the requested ``relevance_nodes`` keep (rules compute in float32 at least). ``estimate``
walks the graph from the output back as ``sweep._Pass.sweep`` does, with every node's size
at the run's symbolic sizes, and takes the largest such frontier. Attention holds no
seeds x heads x positions^2 tensor (``rules.attention`` sweeps the scores in blocks of queries):
its score-sized tensors are shared by the seeds, and count as fixed. A rule's temporaries
(ratios, denominators, the shares it hands on) come on top: ``RULE_FACTOR``, measured against
the resident memory of sweeps of a small Llama-style model (2 layers, width 128, 4 heads, 2 KV
heads; 256 and 512 positions, 1 to 32 seeds, RSS sampled every 2 ms): the estimate was 1.7-2.3
times the measured peak (3.2 at one seed and 256 positions).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any

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


class MemoryBudgetError(ValueError):
    """A request whose sweep cannot fit the memory budget, even with one seed per sweep."""


@dataclass(frozen=True)
class SweepMemory:
    """Bytes of one sweep: ``fixed`` (the recorded forward) and ``per_seed``."""

    fixed: int
    per_seed: int

    def needed(self, seeds: int) -> int:
        return self.fixed + seeds * self.per_seed

    def seeds_within(self, budget: int, what: str) -> int:
        """How many seeds one sweep may carry within ``budget`` bytes (at least one, or
        ``MemoryBudgetError`` naming what one seed needs)."""
        if budget < self.needed(1):
            raise MemoryBudgetError(
                f"memory_budget {_mb(budget)} cannot hold one sweep of {what}: it needs at "
                f"least {_mb(self.needed(1))} (recorded forward {_mb(self.fixed)} + "
                f"{_mb(self.per_seed)} per seed); raise the budget or shorten the request"
            )
        return (budget - self.fixed) // self.per_seed


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
    ``lean``: the recorded forward keeps only what the rules read (False: every op's value,
    as when layer outputs are asked for)."""
    prov, through = sweeper.provenance, sweeper._pass_through[mode]
    fixed = _recorded(sweeper, sizes, mode, lean)
    width = torch.promote_types(_dtype(sweeper.seed_node), torch.float32).itemsize

    def numel(node: fx.Node) -> int:
        return _bytes(node, sizes, itemsize=width)

    head = sweeper.seed_head()
    start = prov.bound[head]["input"] if head.target is torch.ops.aten.linear.default else head
    live: dict[fx.Node, int] = {start: numel(start)}
    kept = peak = scores = 0
    for node in reversed(sweeper._order):
        if node not in live:
            continue
        here = live.pop(node)
        if keep == "all" or node.op == "placeholder" or node.name in keep:
            kept += here
        if node.op == "placeholder":
            continue
        if node.target is operator.getitem:
            targets = [node.args[0]]
        elif node in through:
            targets = [through[node]]
        else:
            targets = [a for a in node.all_input_nodes if prov.data.get(a, False)]
        added = sum(numel(a) for a in targets if a not in live)
        scores = max(scores, _scores(node, sizes))
        peak = max(peak, kept + sum(live.values()) + here + added)
        for a in targets:
            live.setdefault(a, numel(a))
    # a block of per-seed scores and its temporaries: at most two blocks (``rules.attention``)
    shared = (SHARED_SCORES.get(mode, 2) * scores + 2 * BLOCK_ELEMENTS) * width if scores else 0
    per_seed = math.ceil(peak * RULE_FACTOR) + (_head_rows(sweeper, sizes) if lean else 0)
    return SweepMemory(fixed + shared, per_seed)


def _recorded(sweeper: Sweeper, sizes: dict, mode: str, lean: bool) -> int:
    """Peak bytes of the recorded forward: lean (``Sweeper.forward(lean=True)``), what is
    alive at each op as it runs, values dropped as ``recording.drop_schedule`` drops them,
    outputs kept, a linear head (``Sweeper.head_chain``) computed at the seeds' rows only
    (counted per seed: ``_head_rows``); else every op's value. Modes "reference" and
    "contrast" hold the reference's (lean) record on top."""
    captured = sweeper.captured
    drops = drop_schedule(captured, sweeper.read) if lean else {}
    head = set(sweeper.head_chain) if lean else set()
    alive = peak = 0
    for node in captured.nodes:
        alive -= sum(_bytes(n, sizes) for n in drops.get(node, ()))
        if node.op == "call_function" and node not in head:
            alive += _bytes(node, sizes)
            peak = max(peak, alive)
    if mode == "default":
        return peak
    read = (n for n in sweeper.read if n.op == "call_function" and n not in head)
    return peak + sum(_bytes(n, sizes) for n in read)


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
    dlb: Any, plan: Any, batch: int, length: int, mode: str, nodes: Any, lean: bool = True
) -> int:
    """Seeds per sweep for a generation of ``batch`` rows over at most ``length`` positions,
    keeping ``nodes`` (``relevance_nodes``), with a lean recorded forward or not (``lean``,
    see ``estimate``): ``plan.max_seeds_per_sweep`` without a budget;
    with one, as many as fit (one, on the stepwise path, must fit), checked before any
    forward runs."""
    if plan.memory_budget is None:
        return plan.max_seeds_per_sweep
    captured, sweeper = dlb._graphs[0]  # the graph generation explains with (dlb.captured)
    shapes = {n: torch.empty(batch, length, device="meta") for n in captured.input_names}
    keep = RelevanceParams(relevance_nodes=nodes).keep
    memory = estimate(sweeper, captured.sizes(shapes), mode, keep, lean)
    budget = resolve_budget(plan.memory_budget, torch.device(dlb.device))
    return max(1, memory.seeds_within(budget, f"{batch} row(s) x {length} positions"))
