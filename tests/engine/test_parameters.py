"""mode, multiplier, scaler, thresholding, temperature and target each change the result as
documented in ``DLBacktrace.run_task``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from engine import DLBacktrace

from .zoo import ZOO


@pytest.fixture(scope="module")
def tabular():
    model, inputs = ZOO["tabular"]()
    return model, inputs, DLBacktrace(model, inputs)


def _run(dlb, inputs, **kw):
    return dlb.run_task(inputs=inputs, relevance_nodes="inputs", **kw)


def test_multiplier_scales_relevance_linearly(tabular):
    _, inputs, dlb = tabular
    a = _run(dlb, inputs, multiplier=100.0)
    b = _run(dlb, inputs, multiplier=250.0)
    torch.testing.assert_close(b["relevance"]["input"], a["relevance"]["input"] * 2.5)
    assert np.allclose(b["conservation"]["seed"], 250.0)


def test_scaler_multiplies_every_reported_value(tabular):
    _, inputs, dlb = tabular
    a = _run(dlb, inputs)
    b = _run(dlb, inputs, scaler=0.5)
    torch.testing.assert_close(b["relevance"]["input"], a["relevance"]["input"] * 0.5)
    c = b["conservation"]
    assert np.allclose(c["inputs"] + c["sinks"], 100.0 * 0.5, rtol=1e-5)


def test_contrast_mode_is_signed_and_split(tabular):
    _, inputs, dlb = tabular
    default = _run(dlb, inputs)["relevance"]["input"]
    res = _run(dlb, inputs, mode="contrast")
    signed = res["relevance"]["input"]
    assert (default >= 0).all()
    assert (signed < 0).any() and (signed > 0).any()
    torch.testing.assert_close(
        res["relevance_positive"]["input"] + res["relevance_negative"]["input"], signed
    )
    # the magnitudes of the first layer's shares are the default rule's
    assert not torch.allclose(signed.abs(), default)


def test_temperature_divides_reported_logits(tabular):
    model, inputs, dlb = tabular
    a = _run(dlb, inputs, temperature=1.0)
    b = _run(dlb, inputs, temperature=4.0)
    assert np.allclose(b["predictions"], a["predictions"] / 4.0, rtol=1e-6)
    # the argmax decision and so the explanation do not change with temperature
    torch.testing.assert_close(a["relevance"]["input"], b["relevance"]["input"])


def test_target_explains_another_class(tabular):
    _, inputs, dlb = tabular
    a = _run(dlb, inputs)
    other = [(int(t) + 1) % 3 for t in a["predicted_labels"]]
    b = _run(dlb, inputs, target=other)
    assert list(b["target"]) == other
    assert not torch.allclose(a["relevance"]["input"], b["relevance"]["input"])


def test_thresholding_decides_single_logit_classifiers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 1)).eval()
    x = torch.randn(16, 5)
    dlb = DLBacktrace(model, x)
    with torch.no_grad():
        p = torch.sigmoid(model(x)).squeeze(1)
    cut = float(p.median())
    low = _run(dlb, x, thresholding=0.0)
    high = _run(dlb, x, thresholding=1.01)
    mid = _run(dlb, x, thresholding=cut, mode="contrast")
    assert low["predicted_labels"].tolist() == [1] * 16
    assert high["predicted_labels"].tolist() == [0] * 16
    assert mid["predicted_labels"].tolist() == (p >= cut).long().tolist()
    # in contrast mode a "negative" decision is explained by the evidence against the logit
    pos = _run(dlb, x, thresholding=0.0, mode="contrast")["relevance"]["input"]
    neg = mid["relevance"]["input"]
    below = p < cut
    torch.testing.assert_close(neg[below], -pos[below])
    torch.testing.assert_close(neg[~below], pos[~below])
    c = mid["conservation"]
    assert np.allclose(c["inputs"] + c["sinks"], c["seed"], atol=1e-3)
    assert np.allclose(np.abs(c["seed"]), 100.0)


def test_bad_arguments_are_named(tabular):
    _, inputs, dlb = tabular
    with pytest.raises(ValueError, match="mode"):
        _run(dlb, inputs, mode="bogus")
    with pytest.raises(ValueError, match="task"):
        dlb.run_task(task="translation", inputs=inputs)
    with pytest.raises(ValueError, match="temperature"):
        _run(dlb, inputs, temperature=0)
    with pytest.raises(ValueError, match="relevance_nodes"):
        dlb.run_task(inputs=inputs, relevance_nodes="some")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_are_swept_in_float32(dtype):
    """Relevance of a half-precision model: conserved, float32, and close to the float32
    model's (the forward itself runs in the model's dtype)."""
    model, inputs = ZOO["tabular"]()
    reference = _run(DLBacktrace(model, inputs), inputs)["relevance"]["input"]
    half = {k: v.to(dtype) for k, v in inputs.items()}
    res = _run(DLBacktrace(model.to(dtype), half), half)
    rel = res["relevance"]["input"]
    assert rel.dtype == torch.float32
    c = res["conservation"]
    assert np.allclose(c["inputs"] + c["sinks"], c["seed"], rtol=1e-4)
    torch.testing.assert_close(rel, reference, rtol=0.05, atol=0.5)


def _change(model, x, ref, target):
    with torch.no_grad():
        rows = torch.arange(len(x))
        return model(x)[rows, target] - model(ref)[rows, target]


def test_reference_mode_explains_the_change_from_the_reference():
    """Mode "reference": per sample, relevance * |f(x) - f(x')| / multiplier adds up to the
    change of the explained logit; for a linear model it is exactly w_k (x_k - x'_k)."""
    torch.manual_seed(0)
    linear = nn.Linear(6, 3).eval()
    x, ref = torch.randn(5, 6), torch.randn(5, 6)
    res = _run(DLBacktrace(linear, x), x, mode="reference", reference=ref)
    target = torch.as_tensor(res["target"])
    change = _change(linear, x, ref, target)
    rel = res["relevance"]["input"] * change.abs()[:, None] / 100.0
    torch.testing.assert_close(
        rel, linear.weight.detach()[target] * (x - ref), rtol=1e-4, atol=1e-5
    )
    # the seed's sign is the change's: a logit that fell is explained by what lowered it
    assert np.allclose(res["conservation"]["seed"], 100.0 * np.sign(change.numpy()))

    cnn = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, 3)
    ).eval()
    x, ref = torch.rand(4, 1, 8, 8), torch.rand(4, 1, 8, 8)
    res = _run(DLBacktrace(cnn, x), x, mode="reference", reference=ref)
    change = _change(cnn, x, ref, torch.as_tensor(res["target"]))
    total = res["relevance"]["input"].flatten(1).sum(1) * change.abs() / 100.0
    torch.testing.assert_close(total, change, rtol=1e-3, atol=1e-4)
    c = res["conservation"]
    assert np.allclose(c["inputs"] + c["sinks"], c["seed"], atol=1e-3)
    assert res["relevance_positive"]["input"].sum() > 0 > res["relevance_negative"]["input"].sum()


def test_reference_defaults_to_zeros_and_belongs_to_its_mode(tabular):
    _, inputs, dlb = tabular
    zeros = {k: torch.zeros_like(v) for k, v in inputs.items()}
    implicit = _run(dlb, inputs, mode="reference")["relevance"]["input"]
    explicit = _run(dlb, inputs, mode="reference", reference=zeros)["relevance"]["input"]
    torch.testing.assert_close(implicit, explicit)
    with pytest.raises(ValueError, match="reference"):
        _run(dlb, inputs, reference=zeros)
    with pytest.raises(ValueError, match="shape"):
        _run(dlb, inputs, mode="reference", reference={"input": torch.zeros(1, 6)})


@pytest.mark.parametrize("norm", [nn.LayerNorm, nn.RMSNorm])
def test_reference_mode_is_complete_through_norms(norm):
    """Layer and rms norms have exact difference rules: relevance adds up to the change."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), norm(8), nn.GELU(), nn.Linear(8, 3)).eval()
    x, ref = torch.randn(5, 6), torch.randn(5, 6)
    dlb = DLBacktrace(model, x)
    ops = dlb.diagnose_model_compatibility()["ops"]
    assert any("norm" in op for op in ops), ops
    res = _run(dlb, x, mode="reference", reference=ref)
    change = _change(model, x, ref, torch.as_tensor(res["target"]))
    total = res["relevance"]["input"].sum(1) * change.abs() / 100.0
    torch.testing.assert_close(total, change, rtol=1e-3, atol=1e-4)


class HandWrittenRMSNorm(nn.Module):
    """RMS norm as Llama, Mistral and Qwen write it in transformers (pow, mean, rsqrt, mul)."""

    def __init__(self, width: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def test_reference_mode_treats_a_hand_written_rms_norm_as_the_norm_op():
    """The written-out norm gets the exact difference rule of ``aten.rms_norm`` (the change of
    its normaliser is part of the map), not a pass through it: same relevance as nn.RMSNorm."""
    torch.manual_seed(0)
    by_hand = HandWrittenRMSNorm(8)
    op = nn.RMSNorm(8, eps=by_hand.eps)
    op.weight.data.copy_(by_hand.weight.data)
    first, last = nn.Linear(6, 8), nn.Linear(8, 3)
    x, ref = torch.randn(5, 6), torch.randn(5, 6)
    rel = []
    for norm in (op, by_hand):
        model = nn.Sequential(first, norm, nn.GELU(), last).eval()
        res = _run(DLBacktrace(model, x), x, mode="reference", reference=ref, target=0)
        rel.append(res["relevance"]["input"])
    torch.testing.assert_close(rel[1], rel[0], rtol=1e-4, atol=1e-4)


def test_parameter_objects_validate_where_they_are_built():
    """run_task's checks live in the parameter objects, with run_task's messages."""
    from engine.params import DecodingParams, RelevanceParams, StepPlan, with_keywords

    for bad, match in [
        ({"mode": "bogus"}, "mode"),
        ({"temperature": 0}, "temperature"),
        ({"relevance_nodes": "some"}, "relevance_nodes"),
        ({"reference": "zeros"}, 'for modes "reference" and "contrast"'),
        ({"mode": "reference", "reference": "bogus"}, "reference must be"),
    ]:
        with pytest.raises(ValueError, match=match):
            RelevanceParams(**bad)
    with pytest.raises(ValueError, match="path"):
        StepPlan(path="sideways")
    nodes = RelevanceParams(relevance_nodes=["a", "b"])
    assert nodes.relevance_nodes == ("a", "b") and nodes.keep == {"a", "b"}
    assert RelevanceParams().keep == "all"
    assert RelevanceParams(relevance_nodes="inputs").keep == set()
    decoding, relevance = with_keywords(
        {"temperature": 2.0, "mode": "contrast"}, DecodingParams(), RelevanceParams()
    )
    assert decoding.temperature == 2.0 and relevance.temperature == 1.0  # the first taker
    assert relevance.mode == "contrast"
    with pytest.raises(TypeError, match="unexpected arguments for generation: \\['beams'\\]"):
        with_keywords({"beams": 2}, DecodingParams())
