"""What users bring: their own models and inputs, in the forms the engine must take or refuse
with an error naming the argument. Each test is of a case that broke or gave a wrong answer
(a numpy float64 example into a float32 model captured a graph no input could run; a mask
one token short failed deep in attention)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from engine import DLBacktrace

from .zoo import ZOO


def _conserved(result, tol=1e-4):
    c = result["conservation"]
    np.testing.assert_allclose(c["inputs"] + c["sinks"], c["seed"], atol=tol * 100)


@pytest.fixture(scope="module")
def tabular():
    model, inputs = ZOO["tabular"]()
    return model, inputs["input"], DLBacktrace(model, inputs["input"])


@pytest.fixture(scope="module")
def bert():
    model, inputs = ZOO["bert"]()
    return model, inputs, DLBacktrace(model, inputs)


def test_a_float64_example_into_a_float32_model_is_refused_at_capture(tabular):
    model, x, _ = tabular
    with pytest.raises(TypeError, match=r"input_for_graph: input is torch.float64.*float32"):
        DLBacktrace(model, x.double().numpy())


def test_a_model_that_casts_its_input_itself_is_captured(tabular):
    model, x, _ = tabular

    class Casts(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            return self.inner(x.float())

    dlb = DLBacktrace(Casts(), x.double())
    result = dlb.run_task(task="tabular-classification", inputs=x.double())
    _conserved(result)
    np.testing.assert_allclose(result["predictions"], model(x).detach().numpy(), atol=1e-5)


@pytest.mark.parametrize(
    ("cut", "match"),
    [
        (lambda m: m[:, :-1], r"attention_mask: shape \(2, 8\) does not match input_ids.*dim"),
        (lambda m: m[:1], r"attention_mask: shape \(1, 9\) does not match input_ids.*batch size"),
    ],
)
def test_inputs_that_disagree_on_a_shared_size_are_named(bert, cut, match):
    _, inputs, dlb = bert
    wrong = {**inputs, "attention_mask": cut(inputs["attention_mask"])}
    with pytest.raises(ValueError, match=match):
        dlb.run_task(task="text-classification", inputs=wrong)


def test_a_float_mask_of_zeros_and_ones_is_the_integer_mask(bert):
    model, inputs, dlb = bert
    floats = {**inputs, "attention_mask": inputs["attention_mask"].float()}
    result = dlb.run_task(task="text-classification", inputs=floats)
    _conserved(result)
    np.testing.assert_allclose(result["predictions"], model(**inputs).logits.detach(), atol=1e-5)
    half = {**inputs, "attention_mask": inputs["attention_mask"].float() / 2}
    with pytest.raises(TypeError, match="attention_mask"):
        dlb.run_task(task="text-classification", inputs=half)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"target": 1.5}, ValueError, r"target must be whole class indices, got 1.5"),
        ({"target": True}, TypeError, r"target must be a class index or a label"),
        ({"target": "cat"}, ValueError, r"target='cat' is not a label of this model"),
        ({"target": {"a": 1}}, TypeError, r"target must be class indices or labels"),
        ({"multiplier": 0}, ValueError, r"multiplier must be > 0"),
        ({"multiplier": -1.0}, ValueError, r"multiplier must be > 0"),
        ({"scaler": 0}, ValueError, r"scaler must be > 0"),
        ({"relevance_nodes": ["linear", "nope"]}, ValueError, r"relevance_nodes: \['nope'\]"),
    ],
)
def test_run_task_arguments_out_of_their_range_are_named(tabular, kwargs, error, match):
    _, x, dlb = tabular
    with pytest.raises(error, match=match):
        dlb.run_task(task="tabular-classification", inputs=x, **kwargs)


def test_targets_as_tensors_arrays_lists_and_labels(tabular):
    model, x, dlb = tabular
    expected = dlb.run_task(task="tabular-classification", inputs=x, target=[0, 2, 1, 2])
    for given in (torch.tensor([0, 2, 1, 2]), np.array([0, 2, 1, 2]), torch.tensor([0.0, 2, 1, 2])):
        got = dlb.run_task(task="tabular-classification", inputs=x, target=given)
        np.testing.assert_array_equal(got["target"], [0, 2, 1, 2])
        torch.testing.assert_close(got["relevance"]["input"], expected["relevance"]["input"])
    model.config = type("Config", (), {"label2id": {"low": 0, "mid": 1, "high": 2}})()
    try:
        by_label = dlb.run_task(task="tabular-classification", inputs=x, target="high")
        by_labels = dlb.run_task(
            task="tabular-classification", inputs=x, target=["low", "high", "mid", "high"]
        )
    finally:
        del model.config
    np.testing.assert_array_equal(by_label["target"], [2, 2, 2, 2])
    torch.testing.assert_close(by_labels["relevance"]["input"], expected["relevance"]["input"])
    _conserved(by_label)


def test_a_threshold_on_a_model_of_several_logits_warns_that_it_does_nothing(tabular):
    _, x, dlb = tabular
    with pytest.warns(UserWarning, match=r"thresholding=0.3 has no effect: .* 3 logits"):
        result = dlb.run_task(task="tabular-classification", inputs=x, thresholding=0.3)
    plain = dlb.run_task(task="tabular-classification", inputs=x)
    np.testing.assert_array_equal(result["predicted_labels"], plain["predicted_labels"])


def test_named_relevance_nodes_are_kept(tabular):
    _, x, dlb = tabular
    result = dlb.run_task(task="tabular-classification", inputs=x, relevance_nodes=["linear_1"])
    assert set(result["relevance"]) == {"input", "linear_1"}


class _DictOut(nn.Module):
    """A user's dict output with the logits after another float tensor."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, input):
        return {"features": input * 2, "logits": self.inner(input)}


def test_a_dict_output_is_explained_at_its_logits(tabular):
    model, x, _ = tabular
    dlb = DLBacktrace(_DictOut(model), x)
    result = dlb.run_task(task="tabular-classification", inputs=x)
    eager = model(x).detach().numpy()
    np.testing.assert_allclose(result["predictions"], eager, atol=1e-5)
    _conserved(result)
    dlb.predict(x)
    np.testing.assert_allclose(dlb.predictions, eager, atol=1e-5)


def _wrapped(model: nn.Module, which: str) -> nn.Module:
    if which == "DataParallel":
        return nn.DataParallel(model)
    if which == "torch.compile":
        return torch.compile(model)
    hooked = ZOO["tabular"]()[0]
    hooked.register_forward_pre_hook(lambda module, args: (args[0] * 2,))
    return hooked


@pytest.mark.parametrize("which", ["DataParallel", "torch.compile", "forward pre-hook"])
def test_wrapped_and_hooked_models_explain_what_they_compute(tabular, which):
    model, x, _ = tabular
    wrapped = {which: _wrapped(model, which)}
    dlb = DLBacktrace(wrapped[which], x)
    result = dlb.run_task(task="tabular-classification", inputs=x)
    with torch.no_grad():
        eager = wrapped[which](x) if which != "torch.compile" else model(x)
    np.testing.assert_allclose(result["predictions"], eager.numpy(), atol=1e-5)
    _conserved(result)


def test_models_whose_output_or_signature_the_engine_cannot_read_are_named(tabular):
    model, x, _ = tabular

    class Summed(nn.Module):
        def forward(self, input):
            return model(input).sum()

    class Star(nn.Module):
        def forward(self, *args):
            return model(args[0])

    with pytest.raises(ValueError, match=r"returns a scalar \(shape \(\)\)"):
        DLBacktrace(Summed(), x).run_task(task="tabular-classification", inputs=x)
    with pytest.raises(TypeError, match=r"Star.forward\(\*args\) names none of its inputs"):
        DLBacktrace(Star(), x)


def test_inputs_embeds_are_text_and_padding_gets_no_relevance(bert):
    model, inputs, _ = bert
    embeds = model.get_input_embeddings()(inputs["input_ids"]).detach()
    given = {"inputs_embeds": embeds, "attention_mask": inputs["attention_mask"]}
    dlb = DLBacktrace(model, given)
    result = dlb.run_task(inputs=given)
    assert result["task"] == "text-classification"
    padded = inputs["attention_mask"] == 0
    assert result["relevance"]["inputs_embeds"][padded].abs().max() == 0
    np.testing.assert_allclose(result["predictions"], model(**given).logits.detach(), atol=1e-5)
    _conserved(result)


class SharedPositions(torch.nn.Module):
    """x [B, T, 4] beside positions [T]: one position row for the whole batch."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.head = torch.nn.Embedding(16, 4), torch.nn.Linear(4, 2)

    def forward(self, x, positions):
        return self.head((x + self.emb(positions)).mean(1))


def test_an_input_whose_first_dimension_is_not_the_batch():
    """positions' first dimension is the sequence, shared with x's second, not the batch."""
    dlb = DLBacktrace(
        SharedPositions().eval(), {"x": torch.randn(2, 5, 4), "positions": torch.arange(5)}
    )
    result = dlb.run_task(inputs={"x": torch.randn(3, 7, 4), "positions": torch.arange(7)})
    assert result["relevance"]["x"].shape == (3, 7, 4)
    with pytest.raises(ValueError, match="positions"):
        dlb.run_task(inputs={"x": torch.randn(3, 7, 4), "positions": torch.arange(6)})
