"""The logits processors a checkpoint's generation config asks for (forced BOS / EOS,
suppressed tokens, minimum length, repetition penalty, no-repeat n-grams) act in our decoding
as in ``generate``: same tokens, greedy, beam search and sampling."""

from __future__ import annotations

import pytest
import torch

from engine.decoding import DecodingConfig, decode
from tests.engine.lm_models import EOS, PAD, prompts, tiny_lm

NEW, PROMPT = 6, 7


@pytest.fixture(scope="module")
def configured():
    """A sharpened llama whose generation config suppresses the first token it would emit,
    forces EOS at the last step and sets the other processors generate builds."""
    model = tiny_lm("llama", sharpen=5.0)
    batch = prompts(3, PROMPT, pads=(0, 2, 4))
    plain = model.generate(**batch, max_new_tokens=NEW, do_sample=False)
    gen = model.generation_config
    gen.suppress_tokens = [int(plain[0, PROMPT])]
    gen.begin_suppress_tokens = [int(plain[1, PROMPT])]
    gen.forced_eos_token_id = EOS
    gen.min_new_tokens = 2
    gen.repetition_penalty = 1.3
    gen.no_repeat_ngram_size = 2
    return model, batch, plain


@pytest.mark.parametrize(
    "kw", [{}, {"num_beams": 3}, {"do_sample": True, "temperature": 0.8, "top_k": 30}]
)
def test_processors_of_the_generation_config_give_generates_tokens(configured, kw):
    model, batch, plain = configured
    cfg = DecodingConfig(max_new_tokens=NEW, eos_token_ids=(EOS,), pad_token_id=PAD,
                         seed=5, **kw)  # fmt: skip
    got = decode(model, batch["input_ids"], batch["attention_mask"], cfg)
    torch.manual_seed(5)
    expected = model.generate(**batch, max_new_tokens=NEW, **{"do_sample": False, **kw})
    assert torch.equal(got.sequences, expected)
    new = got.sequences[:, PROMPT:]
    assert not torch.equal(got.sequences, plain)  # the processors changed the tokens
    assert not (new == model.generation_config.suppress_tokens[0]).any()
    assert (new == EOS).any(1).all()  # every row ends, at the latest where EOS is forced
