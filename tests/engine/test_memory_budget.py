"""memory_budget: seeds per sweep chosen from the graph's estimate, a request that cannot fit
refused before any work, and the same relevance however many sweeps the budget asks for, with
one recorded forward held at a time."""

from __future__ import annotations

import pytest
import torch

from engine import DLBacktrace, memory
from engine.generation import run_generation
from engine.memory import MemoryBudgetError, estimate, plan_seeds, resolve_budget
from engine.params import StepPlan
from engine.sweep import Seed, _Pass
from tests.engine.lm_models import prompts, tiny_lm

NEW = 6


@pytest.fixture(scope="module")
def batch():
    return prompts(2, 7, seed=1, pads=(0, 2))


@pytest.fixture(scope="module")
def dlb(batch):
    return DLBacktrace(tiny_lm("llama", sharpen=5.0), batch)


def _needed(dlb, batch, seeds):
    captured, sweeper = dlb._graphs[0]
    shape = (batch["input_ids"].shape[0], batch["input_ids"].shape[1] + NEW - 1)
    sizes = captured.sizes({n: torch.empty(shape, device="meta") for n in captured.input_names})
    return estimate(sweeper, sizes, "default", set()).needed(seeds)


def test_budget_parsing():
    assert StepPlan(memory_budget="2GB").memory_budget == 2 * 10**9
    assert StepPlan(memory_budget="1.5 GiB").memory_budget == 3 * 2**29
    assert StepPlan(memory_budget=4096).memory_budget == 4096
    assert StepPlan(memory_budget="auto").memory_budget == "auto"
    assert resolve_budget("auto", torch.device("cpu")) > 0
    for bad in ("lots", "0MB", "-1GB", "2XB"):
        with pytest.raises(ValueError, match="memory_budget"):
            StepPlan(memory_budget=bad)
    with pytest.raises(TypeError, match="memory_budget"):
        StepPlan(memory_budget=True)


@pytest.mark.parametrize("path", ["batched", "stepwise"])
def test_too_small_budget_is_refused_before_any_work(dlb, batch, path):
    calls = []
    hook = dlb.model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        needed = _needed(dlb, batch, 1)
        with pytest.raises(MemoryBudgetError, match=f"at least {needed / 1e6:.1f} MB"):
            dlb.run_task("generation", batch, max_new_tokens=NEW, path=path,
                         memory_budget=needed - 1)  # fmt: skip
    finally:
        hook.remove()
    assert calls == []


def test_fitting_budget_splits_sweeps_and_keeps_relevance(dlb, batch, monkeypatch):
    kw = dict(max_new_tokens=NEW, return_relevance=True)
    unbounded = run_generation(dlb, batch, **kw)
    budget = _needed(dlb, batch, 2)
    plan = StepPlan(memory_budget=budget)
    assert plan_seeds(dlb, plan, 2, 7 + NEW - 1, "default", "inputs") == 2
    # a budget that holds more seeds than the cap still sweeps at most the cap
    roomy = StepPlan(memory_budget="1TB", max_seeds_per_sweep=5)
    assert plan_seeds(dlb, roomy, 2, 7 + NEW - 1, "default", "inputs") == 5
    sweeps = []
    explain = dlb.explain
    monkeypatch.setattr(
        dlb, "explain", lambda *a, **k: sweeps.append(explain(*a, **k)) or sweeps[-1]
    )
    bounded = run_generation(dlb, batch, memory_budget=budget, **kw)
    assert len(sweeps) == NEW // 2
    # one recorded forward held at a time: earlier sweeps keep only their relevance
    assert [bool(e.env) for e in sweeps] == [False] * (len(sweeps) - 1) + [True]
    # the last step's node_io is whole (recorded again after the lean sweeps)
    io = bounded["node_io"]
    assert sum(v["output_values"] is not None for v in io.values()) > len(io) // 2
    assert torch.equal(bounded["generated_ids"], unbounded["generated_ids"])
    for a, b in zip(bounded["relevance_trace"], unbounded["relevance_trace"], strict=True):
        a, b = a["input_ids"], b["input_ids"]
        assert float((a - b).abs().max()) <= 1e-5 * max(float(b.abs().max()), 1e-12)


def test_memory_per_seed_grows_with_positions_not_their_square(dlb):
    """Attention holds no seeds x heads x positions^2 tensor (``rules.attention`` sweeps the
    scores in blocks): doubling the positions doubles a seed's memory, and the shared score
    matrices, which grow with the square, are fixed memory."""
    captured, sweeper = dlb._graphs[0]

    def memory(positions):
        shape = {n: torch.empty(2, positions, device="meta") for n in captured.input_names}
        return estimate(sweeper, captured.sizes(shape), "default", set())

    short, long = memory(64), memory(128)
    assert 1.9 <= long.per_seed / short.per_seed <= 2.1
    # A and its shared factor, [2 rows, 4 heads, T, T] float32, grow with T^2 as fixed memory
    assert long.fixed - short.fixed >= 2 * 2 * 4 * (128**2 - 64**2) * 4


def test_estimate_counts_the_lean_record(dlb, batch):
    """The recorded forward's estimate is the lean record's peak (what rules read, and the
    outputs, the LM head at the seeds' rows): below every op's value, and above what the lean
    forward really holds; a full record (layer outputs asked for) is counted whole."""
    captured, sweeper = dlb._graphs[0]
    sizes = captured.sizes(dict(batch))
    ops = [n for n in captured.nodes if n.op == "call_function"]
    everything = sum(memory._bytes(n, sizes) for n in ops)
    fixed = memory._recorded(sweeper, sizes, "default", lean=True)[0]
    assert memory._recorded(sweeper, sizes, "default", lean=False)[0] == everything
    rows = torch.tensor([[[0, 6], [1, 6]]])  # one seed on each row's last position
    with torch.no_grad():
        env, _ = sweeper.forward(dlb._prepare(batch), lean=True, rows=rows)
    held = sum(_tensor_bytes(v) for n, v in env.items() if n.op == "call_function")
    head = env[sweeper.seed_node].values
    held += head.numel() * head.element_size()
    assert held <= fixed + memory._head_rows(sweeper, sizes) and fixed < everything
    assert {n for n in env if n.op == "call_function"} <= sweeper.read
    # modes reference and contrast hold the reference's record too
    assert memory._recorded(sweeper, sizes, "reference", lean=True)[0] > fixed


@pytest.mark.parametrize("mode", ["default", "reference"])
def test_estimate_follows_the_sweep_freeing_the_record(dlb, batch, monkeypatch, mode):
    """A lean sweep frees each recorded value as it passes the node that made it: at every
    node the estimate's fixed part covers what the sweep really still holds there (the
    input's and the reference's records), and it shrinks as the sweep goes down, so that the
    seeds a budget allows are set where the record and the frontier together are largest."""
    captured, sweeper = dlb._graphs[0]
    sizes = captured.sizes(dict(batch))
    held: dict[str, int] = {}
    free = _Pass._free

    def spy(self, node):
        envs = (self.env, self.env_ref or {})
        held[node.name] = sum(
            _tensor_bytes(v) for env in envs for n, v in env.items() if n.op == "call_function"
        )
        free(self, node)

    monkeypatch.setattr(_Pass, "_free", spy)
    rows = torch.tensor([[[0, 6], [1, 6]]])
    dlb.explain(batch, Seed(torch.cat([rows, torch.tensor([[[3], [4]]])], -1),
                            torch.ones(1, 2, dtype=torch.float64)),
                mode, "inputs", retain=frozenset())  # fmt: skip
    est = estimate(sweeper, sizes, mode, {"input_ids"})
    assert len(est.points) > 10
    for point in est.points:
        assert held[point.node] <= point.fixed, point.node
    # the sweep has freed most of the record (the cached |W| stays)
    cached = memory._cached_abs(sweeper, sizes)
    weights = [v[1] for k, v in sweeper._abs.items() if isinstance(k, int)]  # |W| by id
    assert cached == sum(_tensor_bytes(w) for w in weights)
    assert 0 < cached and est.points[-1].fixed - cached < (est.points[0].fixed - cached) / 4
    # the budget binds where the record and the seeds' frontier together are largest
    budget = est.needed(3)
    assert est.seeds_within(budget, "x") == 3
    assert all(p.fixed + 3 * p.per_seed <= budget for p in est.points)


def _tensor_bytes(value) -> int:
    vals = value if isinstance(value, list | tuple) else [value]
    return sum(v.numel() * v.element_size() for v in vals if isinstance(v, torch.Tensor))


def test_generation_node_io_is_recorded_only_when_read(dlb, batch, monkeypatch):
    """A lean generation's last-step node_io costs its forward only when someone reads it."""
    calls = []
    record = dlb.record
    monkeypatch.setattr(dlb, "record", lambda *a: calls.append(1) or record(*a))
    result = run_generation(dlb, batch, max_new_tokens=2)
    assert not calls
    assert len(result["node_io"]) and calls == [1]
    list(result["node_io"].items())  # read again: recorded once
    assert calls == [1]
