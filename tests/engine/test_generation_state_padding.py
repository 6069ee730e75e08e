"""A left-padded batch through an LM whose forward takes no positions and whose cached step
carries a state (Mamba): the padding stays in place and must stay masked.

Two faults made Falcon-Mamba's graph logits differ from the decode's: the explanation forward
fed an all-ones mask (the padding entered the state: 0.025 at step 0), and the decode's cached
step fed the mask that generate withholds there (Mamba's ``prepare_inputs_for_generation``
drops it: the state already holds the padding), so its logits were neither generate's nor a
full forward's from step 1 on."""

from __future__ import annotations

import warnings

import pytest
import torch

from engine import DLBacktrace
from engine.decoding import DecodingConfig, decode
from engine.generation import run_generation
from tests.engine.lm_models import EOS, PAD, SPECIAL, prompts
from tests.helpers.tiny import tiny_model

STEPS = 3
MAMBA = ("MambaConfig", "MambaForCausalLM",
         dict(num_hidden_layers=2, hidden_size=32, state_size=8, expand=2, **SPECIAL))  # fmt: skip


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_model(*MAMBA)


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    return prompts(2, 7, seed=3, pads=(0, 3))


def test_the_cached_decode_gives_generates_logits(model, batch):
    cfg = DecodingConfig(max_new_tokens=STEPS, eos_token_ids=(EOS,), pad_token_id=PAD)
    got = decode(model, batch["input_ids"], batch["attention_mask"], cfg)
    with torch.no_grad():
        want = model.generate(**batch, max_new_tokens=STEPS, do_sample=False, pad_token_id=PAD,
                              output_logits=True, return_dict_in_generate=True)  # fmt: skip
    assert torch.equal(got.sequences, want.sequences)
    new = want.sequences[:, -STEPS:]
    logits = torch.stack([s.gather(1, new[:, i, None])[:, 0] for i, s in enumerate(want.logits)])
    torch.testing.assert_close(got.token_logits, logits.T, rtol=1e-5, atol=1e-5)


def test_the_explained_forward_masks_the_padding_as_the_decode_did(model, batch):
    dlb = DLBacktrace(model, batch)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        result = run_generation(dlb, batch, max_new_tokens=STEPS, return_relevance=True)
    assert not [str(w.message) for w in said if "logits differ" in str(w.message)]
    for relevance, c in zip(result["relevance_trace"], result["conservation_trace"], strict=True):
        assert not relevance["input_ids"][1, :3].any()  # nothing on the padding
        total = relevance["input_ids"].sum(-1) + c["sinks"]
        torch.testing.assert_close(total, c["seed"], rtol=1e-4, atol=1e-4)
