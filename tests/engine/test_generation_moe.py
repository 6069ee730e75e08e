"""Mixture-of-experts causal LMs: decoding, relevance through routed experts, per expert."""

from __future__ import annotations

import pytest
import torch

from engine import DLBacktrace
from engine.decoding import DecodingConfig, decode
from engine.generation import run_generation
from tests.engine.lm_models import EOS, PAD, conserved_and_paths_agree, prompts, tiny_lm

FAMILIES = ["mixtral", "qwen2_moe", "olmoe"]
NEW = 4


# transformers 5 runs experts as grouped matmuls (rows sorted by expert, rules.grouped_mm).
@pytest.fixture(scope="module", params=FAMILIES)
def moe(request):
    model = tiny_lm(request.param)
    return model, prompts(2, 6, seed=4, pads=(0, 2))


def test_moe_greedy_and_beam_equal_generate(moe):
    model, batch = moe
    for beams in (1, 3):
        cfg = DecodingConfig(max_new_tokens=NEW, num_beams=beams, eos_token_ids=(EOS,),
                             pad_token_id=PAD)  # fmt: skip
        got = decode(model, batch["input_ids"], batch["attention_mask"], cfg)
        expected = model.generate(**batch, max_new_tokens=NEW, num_beams=beams, do_sample=False)
        assert torch.equal(got.sequences, expected)


def test_moe_relevance_conserved_and_batched_equals_stepwise(moe):
    model, batch = moe
    conserved_and_paths_agree(DLBacktrace(model, batch), batch, 1e-5)


def test_moe_per_expert_relevance(moe):
    model, batch = moe
    dlb = DLBacktrace(model, batch)
    result = run_generation(dlb, batch, max_new_tokens=NEW, return_relevance=True)
    trace = result["expert_relevance_trace"]
    assert len(trace) == NEW and result["expert_relevance"] == trace[-1]
    experts = model.config.num_local_experts if hasattr(model.config, "num_local_experts") \
        else model.config.num_experts  # fmt: skip
    for step in trace:
        # One entry per grouped matmul (two per MoE layer), one value per expert.
        assert len(step) == 2 * model.config.num_hidden_layers
        for totals in step.values():
            assert totals.shape == (experts,)
            assert (totals >= 0).all() and totals.sum() > 0


def test_moe_reference_mode_routes_the_reference_as_the_input(moe):
    """Mode "reference" through routed experts: the reference forward picks the input's
    experts (so expert rows line up), relevance is conserved with next to nothing sunk, and
    the batched and stepwise paths agree."""
    model, batch = moe
    dlb = DLBacktrace(model, batch)
    sweeper = dlb._graphs[0][1]
    env, _ = sweeper.forward(dict(batch))
    other = prompts(2, 6, seed=1, pads=(0, 2))["input_ids"]  # other tokens: other experts
    ref_env = sweeper.reference_forward(dict(batch), {"input_ids": other}, env)
    assert sweeper.canonical.routing, "no routing topk found"
    for node in sweeper.canonical.routing:  # the same experts, with the same weights
        assert torch.equal(ref_env[node][1], env[node][1])
        assert torch.equal(ref_env[node][0], env[node][0])
    for c in conserved_and_paths_agree(dlb, batch, 1e-4, mode="reference"):
        assert float(c["sinks"].abs().max()) < 0.1, c  # the stabiliser's share, as without experts


def test_router_weights_are_constants_of_the_gate_product():
    """JetMoe gathers expert rows by index (no grouped matmul) and scales them by its router's
    top-k weights, cast to the hidden states' dtype by ``type_as``. The weights are constants
    of that product, as Mixtral's are: ``type_as`` made them data, half of each expert's
    relevance went to them and sank at the softmax (7.1 and 11.5 of 100). JetMoe has no
    biases: all of the seed reaches the tokens, per sample. (Sinks on its [B*T, k] rows were
    booked per sample there: ``test_sorted_rows`` keeps that.)"""
    model = tiny_lm("jetmoe")
    batch = prompts(2, 6, seed=4, pads=(0, 2))
    trace = conserved_and_paths_agree(DLBacktrace(model, batch), batch, 1e-5, steps=2)
    assert all(float(c["sinks"].abs().max()) < 1e-3 for c in trace), trace
