"""Generation of causal LMs without a standard KV cache (none, a state of their own, or a
cached step that fails): decoding re-runs the whole prefix, gives generate's tokens, and the
steps are explained; a model that generate does not run on the plain prompt says so."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

from engine import DLBacktrace
from engine.decoding import DecodingConfig, decode
from engine.generation import run_generation
from tests.engine.lm_models import (
    EOS,
    PAD,
    SPECIAL,
    WrappedLM,
    conserved_and_paths_agree,
    prompts,
    tiny_lm,
)
from tests.helpers.tiny import tiny_model

NEW = 5
# OpenAI GPT has no cache at all; RWKV carries a recurrent state of its own (``state``)
UNCACHED = {
    "openai-gpt": (
        "OpenAIGPTConfig",
        "OpenAIGPTLMHeadModel",
        dict(n_layer=2, n_embd=32, n_head=4, n_positions=64, **SPECIAL),
    ),
    "rwkv": (
        "RwkvConfig",
        "RwkvForCausalLM",
        dict(
            num_hidden_layers=2,
            hidden_size=32,
            attention_hidden_size=32,
            intermediate_size=64,
            context_length=64,
            **SPECIAL,
        ),
    ),  # fmt: skip
}


def _cfg(**kw) -> DecodingConfig:
    return DecodingConfig(max_new_tokens=NEW, eos_token_ids=(EOS,), pad_token_id=PAD, **kw)


def test_a_model_without_a_cache_decodes_like_generate(caplog):
    model = tiny_model(*UNCACHED["openai-gpt"])
    batch = prompts(2, 6, seed=1, pads=(0, 2))
    with caplog.at_level(logging.INFO, logger="engine"):
        got = decode(model, batch["input_ids"], batch["attention_mask"], _cfg())
    expected = model.generate(**batch, max_new_tokens=NEW, do_sample=False)
    assert torch.equal(got.sequences, expected)
    assert "without a KV cache (its forward takes no cache)" in caplog.text


def test_a_state_of_its_own_is_not_a_cache_the_prefix_is_rerun(caplog):
    """RWKV returns and takes a ``state`` of its own. Decoding re-runs the whole prefix, the
    forward the explanation replays: its tokens are the greedy tokens of full forwards (on this
    tiny random model transformers' state path gives other logits from the second token on)."""
    model = tiny_model(*UNCACHED["rwkv"])
    batch = prompts(2, 6, seed=1)
    with caplog.at_level(logging.INFO, logger="engine"):
        got = decode(model, batch["input_ids"], batch["attention_mask"], _cfg())
    ids = batch["input_ids"]
    with torch.no_grad():
        for _ in range(NEW):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(got.sequences, ids)
    assert "without a KV cache" in caplog.text


def test_uncached_beam_search_equals_generate():
    model = tiny_model(*UNCACHED["openai-gpt"])
    batch = prompts(2, 6, seed=1, pads=(0, 2))
    got = decode(model, batch["input_ids"], batch["attention_mask"], _cfg(num_beams=3))
    expected = model.generate(**batch, max_new_tokens=NEW, num_beams=3, do_sample=False)
    assert torch.equal(got.sequences, expected)


def test_uncached_generation_is_explained_and_conserved():
    """OpenAI GPT stopped with ``AttributeError ... 'cache'``; now both paths explain it,
    agree, and conserve per sample."""
    model = tiny_model(*UNCACHED["openai-gpt"])
    batch = prompts(2, 6, seed=1, pads=(0, 2))
    trace = conserved_and_paths_agree(DLBacktrace(model, batch), batch, 1e-5, steps=3)
    assert all(float(c["seed"].min()) > 0 for c in trace)


class CachedStepFails(WrappedLM):
    """A causal LM whose cached step raises (as transformers' own attention did for X-MOD),
    the rest being the wrapped LM's."""

    def forward(self, input_ids, attention_mask, position_ids=None, cache=None, **kw):
        if cache is not None and cache.get_seq_length() > 0:
            raise RuntimeError("output with shape [2, 4, 1, 1] doesn't match the broadcast shape")
        return self.lm(input_ids=input_ids, attention_mask=attention_mask,
                       position_ids=position_ids, cache=cache, **kw)  # fmt: skip


def test_a_cached_step_that_raises_falls_back_to_the_whole_prefix(caplog):
    lm = tiny_lm("llama")
    batch = prompts(2, 6, seed=2, pads=(0, 3))
    with caplog.at_level(logging.INFO, logger="engine"):
        got = decode(CachedStepFails(lm), batch["input_ids"], batch["attention_mask"], _cfg())
    assert torch.equal(got.sequences, lm.generate(**batch, max_new_tokens=NEW, do_sample=False))
    assert "its cached step raised RuntimeError" in caplog.text


def test_xlnet_generation_says_why_it_cannot_be_explained():
    """XLNet's generate predicts a dummy token through perm_mask / target_mapping: a plain
    forward over the prompt (decode, captured graph) computes other logits. Said before any
    decoding, instead of other tokens than generate's."""
    model = tiny_model("XLNetConfig", "XLNetLMHeadModel",
                       dict(n_layer=2, d_model=32, n_head=4, d_inner=64, **SPECIAL))  # fmt: skip
    batch = prompts(2, 6, seed=1)
    with pytest.raises(ValueError, match="perm_mask, target_mapping"):
        decode(model, batch["input_ids"], batch["attention_mask"], _cfg())


def test_a_decoder_that_is_not_causal_is_explained_step_by_step():
    """A BERT run as a causal LM without ``is_decoder`` attends both ways: one forward over the
    final sequence would show earlier steps later tokens. Each step is then explained over its
    own prefix: no 'logits differ' warning, batched equals stepwise, conserved."""
    model = tiny_model("BertConfig", "BertLMHeadModel",
                       dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=64,
                            **SPECIAL))  # fmt: skip
    assert not model.config.is_decoder
    batch = prompts(2, 6, seed=1, pads=(0, 2))
    dlb = DLBacktrace(model, batch)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        conserved_and_paths_agree(dlb, batch, 1e-5, steps=3)
    assert not [w for w in said if "logits differ" in str(w.message)]


def test_without_position_ids_left_padding_is_explained_in_place():
    """An LM whose forward takes no positions (BlenderbotSmall) numbers left padding, in
    generate and in the decode; the explanation must replay that layout, not move the padding
    (its logits differed from the decode's by 1e-3)."""
    model = tiny_model("BlenderbotSmallConfig", "BlenderbotSmallForCausalLM",
                       dict(decoder_layers=2, d_model=32, decoder_attention_heads=4,
                            decoder_ffn_dim=64, max_position_embeddings=64, **SPECIAL))  # fmt: skip
    with torch.no_grad():  # positions that matter: padding then shifts the logits visibly
        model.model.decoder.embed_positions.weight.normal_(0, 1.0)
    batch = prompts(2, 6, seed=1, pads=(0, 2))
    dlb = DLBacktrace(model, batch)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        result = run_generation(dlb, batch, max_new_tokens=3, return_relevance=True)
    assert not [w for w in said if "logits differ" in str(w.message)]
    padding = result["relevance_trace"][-1]["input_ids"][1, :2]
    assert torch.equal(padding, torch.zeros_like(padding))
