"""Generation prompts of unequal length are padded on the left, whatever side the model's
tokenizer pads on (a BERT-style tokenizer shipped with a causal LM pads on the right): the
engine decodes after each prompt's last token and refuses right padding. An encoder-decoder's
source is padded as its tokenizer pads (left padding would move BART's absolute positions)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from engine.tasks import TaskName
from service.demo.lookup import _tokenizer, lookup_vocab
from service.registry import ModelSpec
from service.schemas import Inputs
from service.work import inputs


def _entry(
    task: TaskName, side: str, encoder_decoder: bool = False
) -> tuple[SimpleNamespace, ModelSpec]:
    tok = _tokenizer(lookup_vocab(), "words")
    tok.padding_side = side
    model = SimpleNamespace(config=SimpleNamespace(is_encoder_decoder=encoder_decoder))
    loaded = SimpleNamespace(tokenizer=tok, task=task, model=model)
    spec = ModelSpec.model_validate({"id": "m", "task": task, "source": {"kind": "demo"}})
    return SimpleNamespace(loaded=loaded, segments=False), spec


@pytest.mark.parametrize("given", [{"text": ["a3 c1 ? a", "b2"]}, {"token_ids": [[4, 5, 3], [6]]}])
def test_generation_prompts_are_left_padded(given: dict) -> None:
    entry, spec = _entry(TaskName.GENERATION, "right")
    mask = inputs.tokens(entry, spec, Inputs(**given))["attention_mask"]
    assert mask[1, -1] == 1 and mask[1, 0] == 0


def test_classification_keeps_the_tokenizers_side() -> None:
    entry, spec = _entry(TaskName.TEXT_CLASSIFICATION, "right")
    mask = inputs.tokens(entry, spec, Inputs(text=["a3 c1 ? a", "b2"]))["attention_mask"]
    assert mask[1, 0] == 1 and mask[1, -1] == 0


def test_an_encoder_decoders_source_keeps_the_tokenizers_side() -> None:
    entry, spec = _entry(TaskName.GENERATION, "right", encoder_decoder=True)
    mask = inputs.tokens(entry, spec, Inputs(text=["a3 c1 ? a", "b2"]))["attention_mask"]
    assert mask[1, 0] == 1 and mask[1, -1] == 0
