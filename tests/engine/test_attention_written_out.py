"""Attention written out as matmul / softmax / matmul gets the relevance of the fused
``scaled_dot_product_attention`` in every mode (relevance-engine.md: "Explicit attention ...
must get the same treatment as SDPA"): the same model with ``attn_implementation="eager"``
and ``"sdpa"`` gives the same relevance. A softmax of a linear layer's logits (a router) is
no attention: its weights stay constants where they weigh other data (``test_normalisers``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BloomConfig,
    BloomForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
)

from engine import DLBacktrace

MODES = ["default", "reference", "contrast"]
SMALL = {"num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}
MODELS = {
    "bert": (BertForSequenceClassification, BertConfig(vocab_size=100, hidden_size=32, **SMALL)),
    "gpt2": (
        GPT2ForSequenceClassification,
        GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, pad_token_id=0),
    ),
    # grouped-query attention: K and V repeated per group before the products
    "llama": (
        LlamaForCausalLM,
        LlamaConfig(vocab_size=100, hidden_size=32, num_key_value_heads=2, **SMALL),
    ),
}


def assert_conserved(result: dict) -> None:
    c = result["conservation"]
    scale = np.abs(c["inputs"]) + np.abs(c["sinks"]) + np.abs(c["seed"])
    assert (np.abs(c["inputs"] + c["sinks"] - c["seed"]) <= 1e-4 * scale).all(), c


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4 * float(a.abs().max()))


def text_inputs() -> dict[str, torch.Tensor]:
    ids = torch.randint(5, 90, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row: the masks differ in form (float, bool) between the two
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("name", MODELS)
def test_eager_attention_explains_as_sdpa(name):
    cls, config = MODELS[name]
    inputs = text_inputs()
    relevance = {}
    for impl in ("sdpa", "eager"):
        torch.manual_seed(0)  # the same weights for both
        model = cls._from_config(config, attn_implementation=impl).eval()
        dlb = DLBacktrace(model, inputs)
        ops = {str(n.target) for n in dlb.graph.nodes}
        assert ("aten.scaled_dot_product_attention.default" in ops) == (impl == "sdpa")
        for mode in MODES:
            result = dlb.run_task(task="text-classification", inputs=inputs, mode=mode)
            assert_conserved(result)
            relevance[impl, mode] = result["relevance"]["input_ids"]
    for mode in MODES:
        assert_same(relevance["sdpa", mode], relevance["eager", mode])


class SelfAttention(nn.Module):
    """One head over 4 tokens of width 3, fused or written out with a scale, a causal mask
    added as a float tensor and a cast to float64 and back around the softmax. With a
    ``slope``, the mask also adds an ALiBi bias, ``-slope`` per token of distance."""

    def __init__(self, fused: bool, slope: float = 0.0):
        super().__init__()
        torch.manual_seed(0)
        self.fused = fused
        self.qkv, self.head = nn.Linear(3, 9), nn.Linear(12, 2)
        distance = (torch.arange(4.0)[None, :] - torch.arange(4.0)[:, None]).abs()
        causal = torch.full((4, 4), float("-inf")).triu(1) - slope * distance
        self.register_buffer("causal", causal)

    def forward(self, x):
        q, k, v = self.qkv(x.reshape(x.shape[0], 4, 3)).chunk(3, -1)
        if self.fused:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=self.causal)
        else:
            scores = q @ k.transpose(-1, -2) / 3**0.5 + self.causal
            o = torch.softmax(scores.double(), -1).float() @ v
        return self.head(o.reshape(x.shape[0], -1))


@pytest.mark.parametrize("slope", [0.0, 0.7], ids=["causal", "alibi"])
@pytest.mark.parametrize("mode", MODES)
def test_a_hand_written_attention_explains_as_the_fused_op(mode, slope):
    """With an ALiBi bias in the fused op's float ``attn_mask``, the bias's share of each
    score is a sink, as the written-out add gives it one (mode default differed by 8 % of
    the largest relevance before)."""
    inputs = {"x": torch.randn(2, 12, generator=torch.Generator().manual_seed(1))}
    results = [
        DLBacktrace(SelfAttention(fused, slope).eval(), inputs).run_task(inputs=inputs, mode=mode)
        for fused in (True, False)
    ]
    for result in results:
        assert_conserved(result)
    fused, written = (r["relevance"]["x"] for r in results)
    assert_same(fused, written)
    assert fused.abs().sum() > 1.0  # relevance reached the input through q, k and v


@pytest.mark.parametrize("mode", MODES)
def test_alibi_scores_in_one_product_pass_relevance_too(mode):
    """BLOOM has eager attention only, its scores ALiBi + Q K^T in one baddbmm: the weights
    pass relevance through it to Q and K, the bias's share a sink."""
    torch.manual_seed(0)
    config = BloomConfig(vocab_size=100, hidden_size=32, n_layer=2, n_head=4, pad_token_id=0)
    model = BloomForSequenceClassification(config).eval()
    inputs = text_inputs()
    dlb = DLBacktrace(model, inputs)
    visited = dlb._graphs[0][1].provenance.visited
    assert any(n.target is torch.ops.aten.baddbmm.default for n in visited)
    result = dlb.run_task(task="text-classification", inputs=inputs, mode=mode)
    assert_conserved(result)
    assert float(result["relevance"]["input_ids"].abs().sum()) > 1.0


class DataMasked(nn.Module):
    """Keys masked by a test on the data (``masked_fill(-inf)``): with a reference input the
    two passes mask different keys, each query attending to itself at least."""

    def __init__(self, fused: bool):
        super().__init__()
        torch.manual_seed(0)
        self.fused = fused
        self.qkv, self.head = nn.Linear(3, 9), nn.Linear(12, 2)

    def forward(self, x):
        h = x.reshape(x.shape[0], 4, 3)
        q, k, v = self.qkv(h).chunk(3, -1)
        keep = (h[..., 0] > -0.5)[:, None, :] | torch.eye(4, dtype=torch.bool)
        if self.fused:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        else:
            scores = (q @ k.mT / 3**0.5).masked_fill(~keep, float("-inf"))
            o = torch.softmax(scores, -1) @ v
        return self.head(o.reshape(x.shape[0], -1))


def test_a_mask_that_differs_between_input_and_reference():
    """Mode reference from -x: keys masked in one pass only have no slope (was NaN)."""
    x = torch.randn(2, 12, generator=torch.Generator().manual_seed(1))
    results = [
        DLBacktrace(DataMasked(fused).eval(), {"x": x}).run_task(
            inputs={"x": x}, mode="reference", reference={"x": -x}
        )
        for fused in (True, False)
    ]
    for result in results:
        assert_conserved(result)
    assert_same(*(r["relevance"]["x"] for r in results))


def test_gpt2_upcast_attention_explains_as_sdpa():
    """GPT-2's reorder_and_upcast_attn: scores by baddbmm with beta 0 into an uninitialised
    buffer (NaN in it is no bias)."""
    cls, config = MODELS["gpt2"]
    inputs = text_inputs()
    relevance = []
    for impl, upcast in (("sdpa", False), ("eager", True)):
        torch.manual_seed(0)
        config.reorder_and_upcast_attn = upcast
        model = cls._from_config(config, attn_implementation=impl).eval()
        result = DLBacktrace(model, inputs).run_task(task="text-classification", inputs=inputs)
        assert_conserved(result)
        relevance.append(result["relevance"]["input_ids"])
    config.reorder_and_upcast_attn = False
    assert_same(*relevance)
