"""The KV-cached decode returns what transformers' own ``generate`` returns."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from engine.decoding import DecodingConfig, decode
from tests.engine.lm_models import EOS, PAD, WrappedLM, prompts, tiny_lm

FAMILIES = ["gpt2", "llama", "qwen2", "mistral"]
NEW = 10


def _cfg(**kw) -> DecodingConfig:
    return DecodingConfig(max_new_tokens=NEW, eos_token_ids=(EOS,), pad_token_id=PAD, **kw)


@pytest.fixture(scope="module", params=FAMILIES)
def lm(request):
    return tiny_lm(request.param)


@pytest.fixture(scope="module")
def batch():
    return prompts(3, 7, pads=(0, 2, 4))


def _eos_model():
    """A sharpened model with EOS set to a token it emits mid-generation, so rows finish at
    different steps and the finished-row and early-stop paths run."""
    model = tiny_lm("llama", sharpen=30.0)
    p = prompts(4, 6, seed=3, pads=(0, 2))
    out = model.generate(**p, max_new_tokens=NEW, do_sample=False)
    model.generation_config.eos_token_id = int(out[0, 6 + 3])
    return model, p


def test_greedy_equals_generate(lm, batch):
    expected = lm.generate(**batch, max_new_tokens=NEW, do_sample=False)
    got = decode(lm, batch["input_ids"], batch["attention_mask"], _cfg())
    assert torch.equal(got.sequences, expected)


@pytest.mark.parametrize(
    "beams,penalty,early", [(3, 1.0, False), (4, 0.5, True), (2, 2.0, "never")]
)
def test_beam_search_equals_generate(lm, batch, beams, penalty, early):
    kw = dict(num_beams=beams, length_penalty=penalty, early_stopping=early)
    expected = lm.generate(**batch, max_new_tokens=NEW, do_sample=False, **kw)
    got = decode(lm, batch["input_ids"], batch["attention_mask"], _cfg(**kw))
    assert torch.equal(got.sequences, expected)


def test_sampling_is_reproducible_and_matches_generate(batch):
    model = tiny_lm("llama", sharpen=5.0)
    kw = dict(temperature=0.7, top_k=20, top_p=0.9)
    cfg = _cfg(do_sample=True, seed=11, **kw)
    first = decode(model, batch["input_ids"], batch["attention_mask"], cfg)
    again = decode(model, batch["input_ids"], batch["attention_mask"], cfg)
    torch.manual_seed(11)
    expected = model.generate(**batch, max_new_tokens=NEW, do_sample=True, **kw)
    assert torch.equal(first.sequences, again.sequences)
    assert torch.equal(first.sequences, expected)


def test_eos_finishes_rows_like_generate():
    model, p = _eos_model()
    eos = model.generation_config.eos_token_id
    cfg = DecodingConfig(max_new_tokens=NEW, eos_token_ids=(eos,), pad_token_id=PAD)
    got = decode(model, p["input_ids"], p["attention_mask"], cfg)
    assert torch.equal(got.sequences, model.generate(**p, max_new_tokens=NEW, do_sample=False))
    assert not got.active.all(), "no row finished: the test lost its point"
    for kw in (dict(num_beams=3), dict(num_beams=4, early_stopping=True)):
        expected = model.generate(**p, max_new_tokens=NEW, do_sample=False, **kw)
        beam = decode(model, p["input_ids"], p["attention_mask"], DecodingConfig(
            max_new_tokens=NEW, eos_token_ids=(eos,), pad_token_id=PAD, **kw))  # fmt: skip
        assert torch.equal(beam.sequences, expected)


def test_beam_scores_follow_the_returned_sequence(batch):
    """scores[i] are the log-probabilities of the returned sequence's ancestor at step i, so
    the emitted token's score summed over steps is the sequence's log-probability."""
    model = tiny_lm("llama", sharpen=10.0)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    got = decode(model, ids, mask, _cfg(num_beams=3), keep_scores=True)
    new = got.sequences[:, ids.shape[1] :]
    picked = torch.stack([s.gather(1, new[:, i, None])[:, 0] for i, s in enumerate(got.scores)])
    with torch.no_grad():
        full_mask = torch.cat([mask, torch.ones_like(new)], 1)
        pos = (full_mask.cumsum(1) - 1).clamp(min=0)
        logits = model(got.sequences, attention_mask=full_mask, position_ids=pos).logits
    logp = logits[:, ids.shape[1] - 1 : -1].log_softmax(-1).gather(2, new[..., None])[..., 0]
    torch.testing.assert_close(picked.T, logp, rtol=1e-4, atol=1e-4)


class OldCacheName(WrappedLM):
    """A causal LM as transformers before 5.2x calls it: the KV cache is ``past_key_values``
    (5.17 was on the GPU machine's image, and decoding asked for ``cache``)."""

    def forward(self, input_ids, attention_mask, position_ids, past_key_values=None, **kw):
        out = self.lm(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=past_key_values,
            **kw,
        )
        return SimpleNamespace(logits=out.logits, past_key_values=out.cache)


def test_the_cache_goes_by_the_name_the_model_takes(batch, caplog):
    lm = tiny_lm("llama")
    expected = lm.generate(**batch, max_new_tokens=NEW, do_sample=False)
    old = OldCacheName(lm)
    with caplog.at_level(logging.INFO, logger="engine"):
        got = decode(old, batch["input_ids"], batch["attention_mask"], _cfg())
    assert torch.equal(got.sequences, expected)
    assert "without a KV cache" not in caplog.text  # its cache was used
