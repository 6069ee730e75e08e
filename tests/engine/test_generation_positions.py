"""Generation explained with the decode's own positions: where the model's forward takes
``position_ids``, the steps are explained by a graph that takes them too (captured on first
use when the first graph was not), fed the decode's left-padded layout, mask and positions,
where the first graph cannot replay the decode by moving the padding to the end.

A graph that numbers positions itself cannot replay them: X-MOD numbers them from the ids,
RoBERTa-style (padding index + 1 on), while generate feeds 0-based ``cumsum - 1`` positions,
and its graph logits differed from the decode's by 0.11 at step 0; DeepSeek-V4's by 0.02, its
logits moving with the padding itself. Where capturing with positions fails, the first graph
runs with the padding moved to the end, and the logit check says that they differ."""

from __future__ import annotations

import warnings

import pytest
import torch

from engine import DLBacktrace
from engine.capture import CaptureError
from engine.generation import run_generation
from tests.engine.lm_models import PAD, SPECIAL, prompts, tiny_lm
from tests.helpers.tiny import tiny_model

STEPS = 3
XMOD = ("XmodConfig", "XmodForCausalLM",
        dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=64, is_decoder=True, **SPECIAL))  # fmt: skip


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    model = tiny_model(*XMOD)
    model.set_default_language(model.config.languages[0])
    return model


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    return prompts(2, 7, seed=3, pads=(0, 3))


def _generate(dlb: DLBacktrace, batch: dict) -> tuple[dict, list[str]]:
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        result = run_generation(dlb, batch, max_new_tokens=STEPS, return_relevance=True)
    return result, [str(w.message) for w in said if "logits differ" in str(w.message)]


def test_steps_are_explained_with_the_decodes_positions(model, batch):
    dlb = DLBacktrace(model, batch)
    assert "position_ids" not in dlb.captured.input_names
    result, differ = _generate(dlb, batch)
    assert not differ
    assert any("position_ids" in graph.input_names for graph, _ in dlb._graphs)
    with torch.no_grad():
        want = model.generate(**batch, max_new_tokens=STEPS, do_sample=False, pad_token_id=PAD)
    assert torch.equal(torch.as_tensor(result["generated_ids"]), want)
    for relevance, c in zip(result["relevance_trace"], result["conservation_trace"], strict=True):
        assert not relevance["input_ids"][1, :3].any()  # nothing on the padding
        total = relevance["input_ids"].sum(-1) + c["sinks"]
        torch.testing.assert_close(total, c["seed"], rtol=1e-4, atol=1e-4)


def test_a_model_numbering_real_tokens_from_zero_keeps_its_first_graph(batch):
    """Llama builds positions with ``arange``: its first graph replays the decode with the
    padding moved to the end, so no second graph is captured (node names stay the caller's)."""
    dlb = DLBacktrace(tiny_lm("llama"), batch)
    result, differ = _generate(dlb, batch)
    assert not differ
    assert len(dlb._graphs) == 1
    assert not result["relevance_trace"][-1]["input_ids"][1, :3].any()


def test_a_failed_capture_with_positions_keeps_the_first_graph_and_says_so(model, batch):
    dlb = DLBacktrace(model, batch)

    def refuse(inputs):
        raise CaptureError("no export with position_ids here")

    dlb.graph_for = refuse
    result, differ = _generate(dlb, batch)
    assert differ and len(dlb._graphs) == 1
    assert torch.as_tensor(result["generated_ids"]).shape == (2, 7 + STEPS)
