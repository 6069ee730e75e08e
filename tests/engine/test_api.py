"""The public API around run_task: input forms, asking for less, task detection, missing
rules reported before any work, diagnostics."""

from __future__ import annotations

import platform

import pytest
import torch
from torch import nn

from engine import DLBacktrace, Seed, UnsupportedOpError

from .zoo import ZOO


@pytest.fixture(scope="module")
def bert():
    model, inputs = ZOO["bert"]()
    return model, inputs, DLBacktrace(model, (inputs["input_ids"], inputs["attention_mask"]))


def test_tuple_dict_and_tensor_inputs_agree(bert):
    _, inputs, dlb = bert
    as_dict = dlb.run_task(task="text-classification", inputs=inputs, relevance_nodes="inputs")
    as_tuple = dlb.run_task(
        inputs=(inputs["input_ids"], inputs["attention_mask"]), relevance_nodes="inputs"
    )
    assert as_tuple["task"] == "text-classification"
    torch.testing.assert_close(
        as_dict["relevance"]["input_ids"], as_tuple["relevance"]["input_ids"]
    )


def test_new_sequence_length_reuses_the_graph(bert):
    _, inputs, dlb = bert
    longer = {k: torch.cat([v, v[:, :4]], dim=1) for k, v in inputs.items()}
    res = dlb.run_task(inputs=longer, relevance_nodes="inputs")
    assert res["relevance"]["input_ids"].shape == longer["input_ids"].shape
    assert len(dlb._graphs) == 1  # dynamic sequence dimension: no second capture


def test_all_nodes_by_default_and_less_on_request(bert):
    _, inputs, dlb = bert
    everything = dlb.run_task(inputs=inputs)
    assert len(everything["relevance"]) > 30
    assert "input_ids" in everything["relevance"]
    assert "node_io" in everything and everything["relevance_computed"]
    some = [n for n in everything["relevance"] if n.startswith("linear")][:2]
    chosen = dlb.run_task(inputs=inputs, relevance_nodes=some)
    assert set(chosen["relevance"]) == set(some) | {"input_ids"}
    for name in some:
        torch.testing.assert_close(chosen["relevance"][name], everything["relevance"][name])
    only = dlb.run_task(inputs=inputs, relevance_nodes="inputs")
    assert set(only["relevance"]) == {"input_ids"}


def test_optional_traces(bert):
    _, inputs, dlb = bert
    res = dlb.run_task(
        inputs=inputs,
        return_scores=True,
        return_relevance=True,
        return_layerwise_output=True,
        relevance_nodes="inputs",
    )
    assert len(res["scores_trace"]) == len(res["relevance_trace"]) == 1
    assert res["layerwise_output_trace"][0]


def test_explain_many_seeds_at_once(bert):
    """K seeds in one sweep equal K separate sweeps (the generation fast path relies on it)."""
    _, inputs, dlb = bert
    classes = [0, 1, 2]
    seeds = Seed(index=torch.tensor([[[0, c]] for c in classes]), value=torch.full((3, 1), 100.0))
    together = dlb.explain(inputs, seeds, relevance_nodes="inputs")
    for k, c in enumerate(classes):
        alone = dlb.run_task(inputs=inputs, target=c, relevance_nodes="inputs")
        torch.testing.assert_close(
            together.relevance["input_ids"][k, 0], alone["relevance"]["input_ids"][0]
        )
    assert torch.allclose(together.inputs + together.sinks, together.seed, atol=1e-3)


def test_reference_tuple_form_for_a_causal_lm():
    """(input_ids, attention_mask) binds by name although GPT-2's forward takes the cache
    second, and run_task then generates and explains."""
    from .lm_models import prompts, tiny_lm

    batch = prompts(1, 5)
    dlb = DLBacktrace(tiny_lm("gpt2"), (batch["input_ids"], batch["attention_mask"]))
    assert dlb.captured.input_names == ["input_ids", "attention_mask"]
    res = dlb.run_task(task="auto", inputs=batch, max_new_tokens=2, return_relevance=True)
    assert res["task"] == "generation"
    assert res["relevance_trace"][1]["input_ids"].shape == (1, 6)


class Unruly(nn.Module):
    def forward(self, x):
        return torch.cummax(x, dim=1).values @ torch.ones(x.shape[1], 2)


def test_missing_rule_is_named_before_any_work():
    x = torch.randn(2, 4)
    dlb = DLBacktrace(Unruly(), x)
    report = dlb.diagnose_model_compatibility()
    assert not report["supported"]
    assert report["unsupported"][0]["op"] == "aten.cummax.default"
    with pytest.raises(UnsupportedOpError, match=r"aten\.cummax\.default at node 'cummax'"):
        dlb.run_task(inputs=x)


def test_diagnose_lists_ops_of_a_supported_model(bert):
    _, _, dlb = bert
    report = dlb.diagnose_model_compatibility()
    assert report["supported"] and report["unsupported"] == []
    assert report["ops"]["aten.scaled_dot_product_attention.default"] == 2


def test_evaluation_summarises_a_result(bert):
    _, inputs, dlb = bert
    res = dlb.run_task(inputs=inputs, relevance_nodes="inputs")
    summary = dlb.evaluation(res, top_k=3)
    assert (summary["conservation_error"] < 1e-4).all()
    assert summary["top_features"]["input_ids"]["index"].shape == (2, 3)


def test_predict_returns_node_io(bert):
    model, inputs, dlb = bert
    node_io = dlb.predict(inputs, temperature=2.0)
    assert any("output_values" in v for v in node_io.values())
    with torch.no_grad():
        eager = model(**inputs).logits / 2.0
    torch.testing.assert_close(torch.as_tensor(dlb.predictions), eager, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_tune_allocator_applies_on_glibc():
    from engine import tune_allocator

    assert tune_allocator() is True


def test_node_io_shows_a_fused_convolution_and_its_batch_norm_apart():
    """The forward runs conv + eval batch norm as one op; node_io still shows each op's own
    values: the convolution's output before the norm, and the norm's input and output."""
    torch.manual_seed(0)
    conv, norm = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
    with torch.no_grad():
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2)
    model = nn.Sequential(conv, norm, nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 2)).eval()
    x = torch.randn(2, 3, 8, 8)
    node_io = DLBacktrace(model, x).run_task(inputs=x)["node_io"]
    convs = [n for n in node_io if n.startswith("conv")]
    norms = [n for n in node_io if "batch_norm" in n]
    assert len(convs) == len(norms) == 1
    with torch.no_grad():
        before, after = conv(x), norm(conv(x))
    torch.testing.assert_close(node_io[convs[0]]["output_values"], before)
    torch.testing.assert_close(node_io[norms[0]]["input_values"][0], before)
    torch.testing.assert_close(node_io[norms[0]]["output_values"][0], after)
