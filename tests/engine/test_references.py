"""Named references of mode "reference" (``engine.references``): each name gives the same
explanation as passing its tensors, and relevance still adds up to the change of the logit
from that reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine import DLBacktrace
from engine.references import blurred, channel_mean, masked_ids

from .zoo import ZOO, minilm_tokenizer


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, 3)
    ).eval()


def test_blur_and_mean_are_removal_baselines() -> None:
    torch.manual_seed(0)
    x = torch.rand(2, 3, 8, 8)
    flat = torch.full((1, 1, 8, 8), 0.3)
    torch.testing.assert_close(blurred(flat), flat)  # nothing to remove: unchanged
    assert blurred(x).var(dim=(-2, -1)).max() < 0.2 * x.var(dim=(-2, -1)).min()
    means = blurred(x).mean(dim=(-2, -1))
    torch.testing.assert_close(means, x.mean(dim=(-2, -1)), atol=0.02, rtol=0)
    mean = channel_mean(x)
    assert mean.shape == x.shape and (mean.var(dim=(-2, -1)) < 1e-12).all()
    torch.testing.assert_close(mean[:, :, 0, 0], x.mean(dim=(-2, -1)))


@pytest.mark.parametrize("name,fill", [("blur", blurred), ("mean", channel_mean)])
def test_image_references_by_name(name: str, fill) -> None:
    cnn, x = _cnn(), torch.rand(4, 3, 8, 8)
    dlb = DLBacktrace(cnn, x)
    kw = {"inputs": x, "mode": "reference", "relevance_nodes": "inputs"}
    named = dlb.run_task(reference=name, **kw)
    explicit = dlb.run_task(reference=fill(x), **kw)
    torch.testing.assert_close(named["relevance"]["input"], explicit["relevance"]["input"])
    rows = torch.arange(4)
    target = torch.as_tensor(named["target"])
    with torch.no_grad():
        change = cnn(x)[rows, target] - cnn(fill(x))[rows, target]
    total = named["relevance"]["input"].flatten(1).sum(1) * change.abs() / 100.0
    torch.testing.assert_close(total, change, rtol=1e-3, atol=1e-4)


def test_mask_reference_masks_all_but_special_tokens() -> None:
    model, inputs = ZOO["minilm"]()
    inputs = {**inputs, "token_type_ids": torch.zeros_like(inputs["input_ids"])}
    tok = minilm_tokenizer()
    ids = masked_ids(inputs, tok)
    special = torch.isin(inputs["input_ids"], torch.tensor(tok.all_special_ids))
    assert (ids[special] == inputs["input_ids"][special]).all()
    assert (ids[~special] == tok.mask_token_id).all() and (~special).sum() > 4
    dlb = DLBacktrace(model, inputs)
    kw = {"inputs": inputs, "mode": "reference", "relevance_nodes": "inputs"}
    named = dlb.run_task(reference="mask", tokenizer=tok, **kw)
    explicit = dlb.run_task(reference={**inputs, "input_ids": ids}, **kw)
    torch.testing.assert_close(named["relevance"]["input_ids"], explicit["relevance"]["input_ids"])
    zeros = dlb.run_task(**kw)["relevance"]["input_ids"]
    assert not torch.allclose(named["relevance"]["input_ids"], zeros)


def test_a_reference_that_does_not_fit_is_refused_with_its_reason() -> None:
    model, inputs = ZOO["tabular"]()
    dlb = DLBacktrace(model, inputs)
    kw = {"inputs": inputs, "mode": "reference"}
    with pytest.raises(ValueError, match="image inputs"):
        dlb.run_task(reference="blur", **kw)
    with pytest.raises(ValueError, match="one of"):
        dlb.run_task(reference="noise", **kw)
    with pytest.raises(ValueError, match="token inputs"):
        dlb.run_task(reference="mask", **kw)
    text, ids = ZOO["minilm"]()
    with pytest.raises(ValueError, match="needs the tokenizer"):
        DLBacktrace(text, ids).run_task(inputs=ids, mode="reference", reference="mask")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_reference_mode_stays_bounded(dtype) -> None:
    """A half-precision CNN explained against its blurred input: the changes are small, so the
    forward's rounding is of their size. Relevance stays close to the float32 model's and
    nearly conserved. (Rules that divided by their own recomputed change, instead of the one
    the forward passes computed, put up to 1e11 on single pixels here; TF32 on a GPU did the
    same in float32.)"""
    model, inputs = ZOO["resnet18"]()
    kw = {"relevance_nodes": "inputs", "mode": "reference", "reference": "blur"}
    full = DLBacktrace(model, inputs).run_task(inputs=inputs, **kw)["relevance"]["x"]
    half_inputs = {"x": inputs["x"].to(dtype)}
    res = DLBacktrace(model.to(dtype), half_inputs).run_task(inputs=half_inputs, **kw)
    rel = res["relevance"]["x"]
    cosine = torch.nn.functional.cosine_similarity(rel.flatten(1), full.flatten(1))
    assert (cosine > 0.98).all(), cosine
    assert float(rel.abs().max()) < 2 * float(full.abs().max())
    assert abs(res["conservation"]["sinks"]).max() < 2.0  # of a seed of 100
