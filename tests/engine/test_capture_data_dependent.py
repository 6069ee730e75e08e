"""Models whose eager forward branches or loops on values computed from the inputs (a
data-dependent count or condition), which torch.export cannot trace as written: each is
captured by a general mechanism, its recorded forward equals eager, and relevance is
conserved."""

from __future__ import annotations

import torch
import transformers

from engine import DLBacktrace

MULTIPLIER = 100.0


def _ids(batch: int = 2, tokens: int = 9, vocab: int = 96) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, vocab, (batch, tokens), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _conserved(conservation: dict) -> None:
    seed, inputs, sinks = (torch.as_tensor(conservation[k]).double() for k in
                           ("seed", "inputs", "sinks"))  # fmt: skip
    assert (seed.abs().amax() > 0) and (inputs.abs() > 0).any()
    torch.testing.assert_close(inputs + sinks, seed, rtol=0, atol=1e-4 * MULTIPLIER)


def _built(config_cls: str, model_cls: str, **sizes) -> torch.nn.Module:
    transformers.logging.set_verbosity_error()
    config = getattr(transformers, config_cls)(**sizes)
    torch.manual_seed(0)
    return getattr(transformers, model_cls)(config).eval()


_MOE = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    num_local_experts=4,
    num_experts_per_tok=2,
    pad_token_id=0,
)


def test_eager_experts_are_captured_grouped_and_restored():
    """OpenAI's privacy filter runs its experts eager by default, a Python loop over the
    experts some token picked (``nonzero``): captured with the grouped implementation, for any
    routing, and left eager for the user afterwards."""
    model = _built("OpenAIPrivacyFilterConfig", "OpenAIPrivacyFilterForTokenClassification", **_MOE)
    assert model.config._experts_implementation == "eager"
    inputs = _ids()
    dlb = DLBacktrace(model, inputs)
    assert model.config._experts_implementation == "eager"
    result = dlb.run_task(task="token-classification", inputs=inputs, multiplier=MULTIPLIER,
                          relevance_nodes="inputs")  # fmt: skip
    with torch.no_grad():
        eager = model(**inputs).logits
    torch.testing.assert_close(torch.as_tensor(result["predictions"]), eager, rtol=1e-4, atol=1e-4)
    _conserved(result["conservation"])
