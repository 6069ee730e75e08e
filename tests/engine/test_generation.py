"""run_generation: per-step relevance that is exact, conserved, and explains what was emitted."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from engine import DLBacktrace
from engine.generation import generates_text, run_generation
from engine.params import DecodingParams, OutputParams, RelevanceParams, StepPlan
from engine.steps import select_steps
from tests.engine.lm_models import LookupTask, prompts, tiny_lm, train_lookup_lm, word_tokenizer

NEW = 6


@pytest.fixture(scope="module")
def batch():
    return prompts(3, 7, seed=1, pads=(0, 2, 4))


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def dlb(request, batch):
    return DLBacktrace(tiny_lm(request.param, sharpen=5.0), batch)


def _rel(result, step):
    return result["relevance_trace"][step]["input_ids"]


def _assert_close_relative(a, b, rtol=1e-5):
    scale = max(float(a.abs().max()), float(b.abs().max()), 1e-12)
    assert float((a - b).abs().max()) <= rtol * scale


@pytest.mark.parametrize("beams", [1, 3])
def test_batched_sweep_equals_stepwise(dlb, batch, beams):
    kw = dict(max_new_tokens=NEW, num_beams=beams, return_relevance=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # graph logits must match the decode's (beam ancestry)
        batched = run_generation(dlb, batch, **kw)
        stepwise = run_generation(dlb, batch, path="stepwise", **kw)
    assert torch.equal(batched["generated_ids"], stepwise["generated_ids"])
    for i in range(NEW):
        assert _rel(batched, i).shape == (3, 7 + i)
        _assert_close_relative(_rel(batched, i), _rel(stepwise, i))


def test_parameter_objects_and_keywords_agree(dlb, batch):
    """run_generation's keyword form replaces the fields of its parameter objects."""
    by_keywords = run_generation(dlb, batch, max_new_tokens=3, steps=[0, 2], scaler=2.0,
                                 return_relevance=True)  # fmt: skip
    by_objects = run_generation(
        dlb,
        batch,
        RelevanceParams(relevance_nodes="inputs", scaler=2.0),
        DecodingParams(max_new_tokens=3),
        plan=StepPlan(steps=[0, 2]),
        output=OutputParams(return_relevance=True),
    )
    assert torch.equal(by_keywords["generated_ids"], by_objects["generated_ids"])
    assert by_objects["explained_steps"] == [0, 2]
    for i in (0, 2):
        assert torch.equal(_rel(by_keywords, i), _rel(by_objects, i))


def test_tokens_equal_generate_and_trace_shapes(dlb, batch):
    result = run_generation(dlb, batch, max_new_tokens=NEW, return_relevance=True,
                            return_scores=True, return_layerwise_output=True)  # fmt: skip
    expected = dlb.model.generate(**batch, max_new_tokens=NEW, do_sample=False)
    assert torch.equal(result["generated_ids"], expected)
    assert result["task"] == "generation"
    assert len(result["relevance_trace"]) == len(result["scores_trace"]) == NEW
    assert result["scores_trace"][0].shape == (3, dlb.model.config.vocab_size)
    assert len(result["layerwise_output_trace"]) == NEW
    assert result["relevance"].keys() == result["relevance_trace"][-1].keys()
    assert result["node_io"]


def test_conservation_per_step(dlb, batch):
    result = run_generation(dlb, batch, max_new_tokens=NEW, return_relevance=True, scaler=2.0)
    for i in range(NEW):
        c = result["conservation_trace"][i]
        total = _rel(result, i).sum(-1) + c["sinks"]
        torch.testing.assert_close(c["seed"], torch.full((3,), 200.0))
        torch.testing.assert_close(total, c["seed"], rtol=1e-4, atol=1e-4)


def test_padding_gets_no_relevance_and_changes_nothing(dlb, batch):
    """A left-padded row explains exactly like the same prompt alone without padding."""
    result = run_generation(dlb, batch, max_new_tokens=3, return_relevance=True)
    alone = {k: v[2:, 4:] for k, v in batch.items()}
    single = run_generation(dlb, alone, max_new_tokens=3, return_relevance=True)
    assert torch.equal(result["generated_ids"][2, 4:], single["generated_ids"][0])
    for i in range(3):
        assert not _rel(result, i)[2, :4].any()
        _assert_close_relative(_rel(result, i)[2, 4:], _rel(single, i)[0], rtol=1e-4)


def test_steps_selection_and_streaming_callback(dlb, batch):
    events = []

    def on_step(step, tokens, scores, relevance):
        events.append((step, tokens.clone(), relevance is not None))

    result = run_generation(dlb, batch, max_new_tokens=NEW, steps=[1, 4], on_step=on_step,
                            return_relevance=True)  # fmt: skip
    assert result["explained_steps"] == [1, 4]
    assert [r is None for r in result["relevance_trace"]] == [True, False, True, True, False, True]
    assert [(s, r) for s, _, r in events] == [(i, False) for i in range(NEW)] + [
        (1, True),
        (4, True),
    ]
    assert torch.equal(events[1][1], result["generated_ids"][:, 7 + 1])

    events.clear()
    run_generation(dlb, batch, max_new_tokens=NEW, steps=2, on_step=on_step, path="stepwise")
    assert [(s, r) for s, _, r in events] == [(i, i < 2) for i in range(NEW)]


def test_tokenizer_output_as_inputs_and_debug_logs_each_step(caplog):
    """The tokenizer's own output (a BatchEncoding, not a dict) is a prompt, as in the
    pipeline's examples; debug=True logs every step with its tokens and conservation."""
    tok = word_tokenizer()
    encoded = tok(["w5 w6 w7"], return_tensors="pt")
    model = tiny_lm("gpt2")
    dlb = DLBacktrace(model, dict(encoded))
    with caplog.at_level("WARNING", logger="engine"):
        result = dlb.run_task(
            task="generation", inputs=encoded, tokenizer=tok, max_new_tokens=3, debug=True
        )
    expected = model.generate(**encoded, max_new_tokens=3, do_sample=False)
    assert torch.equal(result["generated_ids"], expected)
    steps = [r.getMessage() for r in caplog.records if "generation step" in r.getMessage()]
    assert len(steps) == 3 and "sinks" in steps[-1]


def test_select_steps():
    assert select_steps("all", 3) == [0, 1, 2]
    assert select_steps("none", 3) == select_steps(None, 3) == []
    assert select_steps(2, 5) == [0, 1]
    assert select_steps([4, -1, 0], 5) == [0, 4]
    assert select_steps([1, 7], 5) == [1]  # past the end: the generation stopped early
    with pytest.raises(ValueError):
        select_steps("some", 5)


def test_sampling_reproducible_from_seed(dlb, batch):
    kw = dict(max_new_tokens=NEW, temperature=3.0, top_k=40, seed=3, steps="none")
    first, again = run_generation(dlb, batch, **kw), run_generation(dlb, batch, **kw)
    other = run_generation(dlb, batch, **{**kw, "seed": 4})
    assert torch.equal(first["generated_ids"], again["generated_ids"])
    assert not torch.equal(first["generated_ids"], other["generated_ids"])
    assert first["decoding"]["do_sample"] and first["decoding"]["top_p"] == 0.9


class Wrapper(nn.Module):
    """A user module around an LM that returns only the logits."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask):
        return self.lm(input_ids=input_ids, attention_mask=attention_mask).logits


def test_wrapped_lm_is_detected_and_explained(batch):
    lm = tiny_lm("llama")
    wrapped = Wrapper(lm)
    assert generates_text(wrapped) and generates_text(lm)
    assert not generates_text(nn.Linear(2, 2))
    dlb = DLBacktrace(wrapped, batch)
    result = dlb.run_task(task="auto", inputs=batch, max_new_tokens=3, return_relevance=True)
    assert result["task"] == "generation"
    assert torch.equal(result["generated_ids"], lm.generate(**batch, max_new_tokens=3))
    assert _rel(result, 2).shape == (3, 9)


class Scaled(Wrapper):
    """A wrapper whose logits differ from the LM's own: the decode and the graph disagree."""

    def forward(self, input_ids, attention_mask):
        return 2.0 * super().forward(input_ids, attention_mask)


def test_warns_when_graph_logits_differ_from_the_decode(batch):
    dlb = DLBacktrace(Scaled(tiny_lm("llama")), batch)
    with pytest.warns(RuntimeWarning, match="graph logits differ"):
        run_generation(dlb, batch, max_new_tokens=2)


@pytest.fixture(scope="module")
def lookup():
    task = LookupTask()
    return task, train_lookup_lm(task)


def test_planted_evidence_relevance_peaks_at_the_copied_token(lookup):
    task, model = lookup
    ids, answer, source = task.sample(200, seed=12345)  # held out: training used 1000+
    dlb = DLBacktrace(model, {"input_ids": ids[:2]})
    result = run_generation(dlb, {"input_ids": ids}, max_new_tokens=1, return_relevance=True)
    assert (result["generated_ids"][:, -1] == answer).float().mean() >= 0.95
    peak = _rel(result, 0).argmax(1)
    assert (peak == source).float().mean() >= 0.9


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_run_task_with_text_prompts(family):
    """The reference call: run_task(task="generation", tokenizer=..., return_relevance=...),
    with a batch of text prompts of different lengths (left padded by run_generation)."""
    tokenizer = word_tokenizer()
    texts = ["w5 w9 w17 w30 w8", "w40 w41"]
    model = tiny_lm(family, sharpen=5.0)
    encoded = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
    dlb = DLBacktrace(model, dict(encoded))
    result = dlb.run_task(task="generation", inputs=texts, tokenizer=tokenizer,
                          max_new_tokens=4, return_relevance=True, return_scores=True)  # fmt: skip
    expected = model.generate(**encoded, max_new_tokens=4, do_sample=False)
    assert torch.equal(result["generated_ids"], expected)
    assert result["generated_text"][1].startswith("w40 w41")
    for i in range(4):
        rel, c = _rel(result, i), result["conservation_trace"][i]
        assert rel.shape == (2, 5 + i) and not rel[1, :3].any()
        torch.testing.assert_close(rel.sum(-1) + c["sinks"], c["seed"], rtol=1e-4, atol=1e-4)


def test_every_node_trace_agrees_between_paths():
    """With relevance_nodes="all", node relevance and layer outputs are cut to the positions a
    step could see (sequence axes read from the symbolic shapes), so both paths agree."""
    batch = prompts(2, 5, pads=(0, 2))
    dlb = DLBacktrace(tiny_lm("llama"), batch)
    kw = dict(max_new_tokens=3, return_relevance=True, relevance_nodes="all",
              return_layerwise_output=True)  # fmt: skip
    batched = run_generation(dlb, batch, **kw)
    stepwise = run_generation(dlb, batch, path="stepwise", **kw)
    for i in range(3):
        assert len(batched["relevance_trace"][i]) > 20
        for key in ("relevance_trace", "layerwise_output_trace"):
            for name, value in batched[key][i].items():
                other = stepwise[key][i][name]
                assert value.shape == other.shape, (key, i, name)
                _assert_close_relative(value.float(), other.float(), rtol=1e-5)
