"""Softmax and the other normalisers (rsqrt, sqrt, reciprocal, var, std): constants only where
their output weighs other data (routing weights, gates, a hand-written norm's 1 / rms; attention
weights written out: ``test_attention_written_out``), ordinary ops with a rule where their
output flows on by itself (a classifier that applies softmax to features and then a linear
layer)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from engine import DLBacktrace

B, D = 2, 6
MODES = ["default", "contrast", "reference"]


def rows(seed: int = 0) -> torch.Tensor:
    return torch.randn(B, D, generator=torch.Generator().manual_seed(seed))


def assert_conserved(result: dict) -> None:
    """inputs + sinks == seed to 1e-4 of the seed (plus float32's rounding of larger parts)."""
    c = result["conservation"]
    parts = np.abs(c["inputs"]) + np.abs(c["sinks"])
    error = np.abs(c["inputs"] + c["sinks"] - c["seed"])
    assert (error <= 1e-4 * np.abs(c["seed"]) + 1e-5 * parts).all(), c


def explain(model: nn.Module, inputs: dict[str, torch.Tensor], mode: str, **kw) -> dict:
    result = DLBacktrace(model.eval(), inputs).run_task(inputs=inputs, mode=mode, **kw)
    assert_conserved(result)
    with torch.no_grad():
        torch.testing.assert_close(torch.as_tensor(result["predictions"]), model(**inputs))
    return result


class Flowing(nn.Module):
    """Linear -> a normaliser applied to features -> Linear: nothing multiplies its output."""

    def __init__(self, normaliser: nn.Module, width: int):
        super().__init__()
        torch.manual_seed(0)
        self.inner, self.normaliser, self.head = nn.Linear(D, 8), normaliser, nn.Linear(width, 3)

    def forward(self, x):
        return self.head(self.normaliser(self.inner(x)))


class Reciprocals(nn.Module):
    def forward(self, h):
        return torch.cat([h.exp().sqrt(), torch.rsqrt(h.exp()), torch.reciprocal(h.exp() + 1)], -1)


class Statistics(nn.Module):
    """Statistics pooling (speaker embeddings pool the mean and deviation of features)."""

    def forward(self, h):
        h = h.reshape(h.shape[0], 4, 2)
        return torch.cat([h.var(-1), h.std(-1, correction=0), *torch.var_mean(h[:, :2], -1)], -1)


FLOWING = {
    "softmax": (nn.Softmax(-1), 8),
    "softmin": (nn.Softmin(-1), 8),
    "reciprocals": (Reciprocals(), 24),
    "statistics": (Statistics(), 12),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(FLOWING))
def test_a_normaliser_whose_output_flows_on_passes_relevance(name, mode):
    """The normaliser was a constant: nothing reached the inputs (inputs 0, sinks 100)."""
    result = explain(Flowing(*FLOWING[name]), {"x": rows()}, mode)
    if mode == "default":
        assert (result["conservation"]["inputs"] > 1.0).all(), result["conservation"]


class Gated(nn.Module):
    """softmax(g) weighs v (a gate, as attention and routing weights do); with ``flows`` the
    same softmax also feeds the head directly."""

    def __init__(self, flows: bool):
        super().__init__()
        torch.manual_seed(0)
        self.gate, self.value = nn.Linear(D, 8), nn.Linear(D, 8)
        self.head = nn.Linear(16 if flows else 8, 3)
        self.flows = flows

    def forward(self, g, v):
        weights = torch.softmax(self.gate(g), -1)
        gated = weights * self.value(v)
        return self.head(torch.cat([gated, weights], -1) if self.flows else gated)


@pytest.mark.parametrize("mode", MODES)
def test_a_softmax_that_weighs_other_data_is_a_constant_there(mode):
    """Only the values explain a gate's product: g gets nothing through it."""
    inputs = {"g": rows(1), "v": rows(2)}
    relevance = explain(Gated(flows=False), inputs, mode)["relevance"]
    assert "g" not in relevance or (relevance["g"] == 0).all()
    if mode == "default":
        assert (relevance["v"].sum(-1) > 1.0).all()


def test_a_softmax_that_both_weighs_and_flows_on_passes_relevance_where_it_flows():
    """Constant on the edge where it weighs v, an activation on the edge into the head."""
    inputs = {"g": rows(1), "v": rows(2)}
    relevance = explain(Gated(flows=True), inputs, "default", relevance_nodes="all")["relevance"]
    # the softmax holds what the head gave its half of the head's input, nothing from the gate
    torch.testing.assert_close(relevance["softmax"], relevance["cat"][..., 8:])
    assert (relevance["g"].sum(-1) > 0.1).all()
