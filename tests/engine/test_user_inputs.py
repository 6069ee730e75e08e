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
