"""The lean recorded forward (only the values the rules read) and a sweep that frees what it
has passed give the same relevance as the full record, and leave no op value alive."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from engine import DLBacktrace
from engine.sweep import Seed
from tests.engine.lm_models import VOCAB, prompts, tiny_lm


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def dlb(request):
    batch = prompts(2, 7, seed=1, pads=(0, 2))
    return DLBacktrace(tiny_lm(request.param, sharpen=5.0), batch), batch


def _seed(batch) -> Seed:
    rows, T = batch["input_ids"].shape
    index = torch.tensor([[[b, T - 1 - k, 3 + b + k] for b in range(rows)] for k in range(2)])
    return Seed(index, torch.ones(2, rows, dtype=torch.float64))


def _sweep(dlb, batch, mode, lean):
    sweeper = dlb._graphs[0][1]
    prepared = dlb._prepare(batch)
    with torch.no_grad():
        env, _ = sweeper.forward(prepared, lean=lean)
        ref = None
        if mode != "default":
            ref = sweeper.reference_forward(prepared, None, env)
        weak = [weakref.ref(v) for n, v in env.items()
                if n.op == "call_function" and isinstance(v, torch.Tensor)]  # fmt: skip
        retain = frozenset() if lean else None
        out = sweeper.run(env, prepared, _seed(batch), mode, "all", ref, retain=retain)
    return out, env, weak


@pytest.mark.parametrize("mode", ["default", "reference", "contrast"])
def test_lean_and_freed_sweep_equals_full(dlb, mode):
    model, batch = dlb
    full, full_env, _ = _sweep(model, batch, mode, lean=False)
    lean, lean_env, weak = _sweep(model, batch, mode, lean=True)
    sweeper = model._graphs[0][1]
    recorded = {n for n in full_env if n.op == "call_function"}
    assert sweeper.seed_node in sweeper.read and len(sweeper.read) < len(recorded)
    for a, b in zip(full[1:], lean[1:], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert full[0].keys() == lean[0].keys()
    for name, rel in full[0].items():
        torch.testing.assert_close(lean[0][name], rel, rtol=1e-6, atol=1e-6)
    # the sweep freed every op value it passed: none is left in the record, nor alive
    assert not [n for n in lean_env if n.op == "call_function"]
    assert len(full_env) > len(lean_env)
    gc.collect()
    assert all(w() is None for w in weak)


def test_a_lean_explanation_refuses_node_io(dlb):
    """A lean explanation holds few op values, freed by the sweep: ``node_io`` says so
    instead of returning a partial record that passes for a whole one."""
    model, batch = dlb
    lean = model.explain(batch, _seed(batch), retain=frozenset())
    with pytest.raises(RuntimeError, match="lean explanation"):
        lean.node_io()
    io = model.explain(batch, _seed(batch)).node_io()
    assert sum(v["output_values"] is not None for v in io.values()) > len(io) // 2


@pytest.mark.parametrize("mode", ["default", "reference", "contrast"])
def test_lean_forward_computes_the_head_at_the_seed_rows_only(dlb, mode):
    """Given the seeds' rows, a lean forward (and the reference's) runs the LM head on those
    rows alone, never the [B, T, V] logits; the seed's logits and every mode's relevance
    are the full record's."""
    model, batch = dlb
    sweeper, seed = model._graphs[0][1], _seed(batch)
    prepared, rows = model._prepare(batch), seed.index[..., :-1]
    with torch.no_grad():
        env, outputs = sweeper.forward(prepared, lean=True, rows=rows)
        full_env, full_outputs = sweeper.forward(prepared)
    logits = outputs[0]
    assert logits.values.shape == (4, VOCAB)  # 2 positions x 2 rows, not 2 x 7
    assert logits.shape == full_outputs[0].shape
    torch.testing.assert_close(seed.gather(logits), seed.gather(full_outputs[0]))
    with pytest.raises(IndexError, match="seeds' rows"):
        logits[torch.tensor([0]), torch.tensor([0])]
    lean = model.explain(batch, seed, mode, "all", retain=frozenset())
    full = model.explain(batch, seed, mode, "all")
    assert lean.outputs[0].values.numel() == 4 * VOCAB
    if mode != "default":
        with torch.no_grad():
            ref = sweeper.reference_forward(prepared, None, env, rows)
        assert ref[sweeper.seed_node].values.numel() == 4 * VOCAB
    for a, b in zip(
        (lean.seed, lean.inputs, lean.sinks), (full.seed, full.inputs, full.sinks), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    for name, rel in full.relevance.items():
        torch.testing.assert_close(lean.relevance[name], rel, rtol=1e-6, atol=1e-6)
