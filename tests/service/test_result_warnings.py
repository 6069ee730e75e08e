"""A classification result says when its relevance explains little: under a tenth of the
seed reached the inputs, the rest went to sinks (``documents.LITTLE_REACHED``)."""

from __future__ import annotations

import torch

from tests.helpers.classify_job import classify_job, small_cnn


def test_a_bias_that_decides_the_output_is_said() -> None:
    net = small_cnn()
    with torch.no_grad():  # the output is the last layer's bias, the picture barely moves it
        net[-1].weight.mul_(1e-4)
        net[-1].bias.copy_(torch.tensor([50.0, 40.0, 30.0]))
    doc = classify_job(net, None, {"mode": "default"})
    share = abs(doc["conservation"]["inputs"][0] / doc["conservation"]["seed"][0])
    assert share < 0.01
    (warning,) = doc["warnings"]
    assert warning.startswith("row(s) 0: under 10% of the explained output reached the inputs")
    assert doc["summary"]["warnings"] == doc["warnings"]


def test_a_model_the_inputs_move_has_no_warning() -> None:
    doc = classify_job(small_cnn(), None, {"mode": "default"})
    share = abs(doc["conservation"]["inputs"][0] / doc["conservation"]["seed"][0])
    assert share > 0.1 and "warnings" not in doc
