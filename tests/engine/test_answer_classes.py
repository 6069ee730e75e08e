"""Question answering by a model that picks its answer from a fixed set (visual question
answering, LXMERT's ``[B, C]`` answer scores) rather than a span of its text: explained as a
classifier of its answers."""

from __future__ import annotations

import pytest
import torch

from engine import DLBacktrace
from tests.helpers.tiny import tiny_model

MULTIPLIER = 100.0


@pytest.fixture(scope="module")
def lxmert():
    sizes = dict(
        vocab_size=96,
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=48,
        l_layers=1,
        x_layers=1,
        r_layers=1,
        num_qa_labels=7,
        visual_feat_dim=8,
        visual_pos_dim=4,
    )
    model = tiny_model("LxmertConfig", "LxmertForQuestionAnswering", sizes)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 96, (2, 9), generator=g)
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "visual_feats": torch.randn(2, 4, 8, generator=g),
        "visual_pos": torch.rand(2, 4, 4, generator=g),
    }
    return model, inputs, DLBacktrace(model, inputs)


@pytest.mark.parametrize("mode", ["default", "contrast"])
def test_an_answer_from_a_fixed_set_is_explained_as_a_class(lxmert, mode):
    model, inputs, dlb = lxmert
    result = dlb.run_task(task="question-answering", inputs=inputs, mode=mode,
                          multiplier=MULTIPLIER)  # fmt: skip
    with torch.no_grad():
        scores = model(**inputs).question_answering_score
    torch.testing.assert_close(torch.as_tensor(result["predictions"]), scores)
    assert result["predicted_labels"].tolist() == scores.argmax(-1).tolist()
    assert result["relevance"]["input_ids"].shape == (2, 9)  # one seed: the answer
    c = {k: torch.as_tensor(v).double() for k, v in result["conservation"].items()}
    assert (c["seed"].abs() == MULTIPLIER).all()
    torch.testing.assert_close(c["inputs"] + c["sinks"], c["seed"], rtol=0, atol=1e-4 * MULTIPLIER)
    assert (c["inputs"].abs() > 0).all()


def test_an_answer_class_can_be_targeted(lxmert):
    _, inputs, dlb = lxmert
    result = dlb.run_task(task="question-answering", inputs=inputs, target=3)
    assert result["target"].tolist() == [3, 3]
