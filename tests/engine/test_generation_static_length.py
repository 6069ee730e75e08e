"""Models whose export specialises the sequence length (RWKV's and Mamba's loops over the
tokens): the graph's length dim is a SymInt of constant value, not a plain int. It used to
be taken as dynamic, so longer prefixes ran through the example's graph: RWKV's logits
differed from the decode's by 0.6, Falcon-Mamba raised a size mismatch (9 vs 11). Each new
length must be captured again, and every step's graph logits equal the eager ones."""

from __future__ import annotations

import warnings

import torch

from engine import DLBacktrace
from engine.capture import capture
from engine.generation import run_generation
from tests.engine.lm_models import prompts
from tests.engine.test_generation_uncached import UNCACHED
from tests.helpers.tiny import tiny_model

STEPS = 3


def _longer(batch: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    ids = torch.cat([batch["input_ids"], batch["input_ids"][:, :n]], dim=1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_a_specialised_length_is_not_accepted_for_another_length():
    model = tiny_model(*UNCACHED["rwkv"])
    batch = prompts(2, 6, seed=1)
    captured = capture(model, batch)
    assert captured.accepts(batch)
    assert not captured.accepts(_longer(batch, 2))


def test_rwkv_generation_graph_logits_equal_eager_and_conserve():
    model = tiny_model(*UNCACHED["rwkv"])
    batch = prompts(2, 6, seed=1)
    dlb = DLBacktrace(model, batch)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        result = run_generation(dlb, batch, max_new_tokens=STEPS, return_relevance=True)
    assert not [w for w in said if "logits differ" in str(w.message)]
    ids = batch["input_ids"]
    with torch.no_grad():  # greedy tokens of full eager forwards
        for _ in range(STEPS):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(torch.as_tensor(result["generated_ids"]), ids)
    for relevance, c in zip(result["relevance_trace"], result["conservation_trace"], strict=True):
        total = relevance["input_ids"].sum(-1) + c["sinks"]
        torch.testing.assert_close(total, c["seed"], rtol=1e-4, atol=1e-4)
