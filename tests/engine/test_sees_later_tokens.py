"""``engine.lm_runner.sees_later_tokens`` on padded prompts: the check that sends a BERT-style
decoder (which attends both ways) to the stepwise path must look at real tokens only. A
right-padded first row used to have its padding changed (which no model sees: "causal") and
padded positions compared (whose logits can be anything)."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertLMHeadModel, GPT2Config, GPT2LMHeadModel

from engine.lm_runner import sees_later_tokens

IDS = torch.tensor([[5, 9, 3, 7, 0, 0], [4, 8, 2, 6, 1, 3]])
RIGHT = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
LEFT = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])


def _bert() -> torch.nn.Module:
    cfg = BertConfig(
        vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16, is_decoder=False,
    )  # fmt: skip
    return BertLMHeadModel(cfg).eval()


def _gpt2() -> torch.nn.Module:
    cfg = GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2, n_positions=16)
    return GPT2LMHeadModel(cfg).eval()


@pytest.mark.parametrize("mask", [RIGHT, LEFT], ids=["right-padded", "left-padded"])
def test_a_bidirectional_decoder_is_seen_through_padding(mask: torch.Tensor) -> None:
    torch.manual_seed(0)
    with torch.no_grad():
        assert sees_later_tokens(_bert(), IDS, mask)


@pytest.mark.parametrize("mask", [RIGHT, LEFT], ids=["right-padded", "left-padded"])
def test_a_causal_lm_is_causal_whatever_its_padding(mask: torch.Tensor) -> None:
    torch.manual_seed(0)
    with torch.no_grad():
        assert not sees_later_tokens(_gpt2(), IDS, mask)
