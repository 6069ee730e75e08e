"""Classifiers whose logits are not one class of several: multi-label heads (each label a
sigmoid of its own) and regression heads (values), as transformers' ``config.problem_type``
names them. Decided by argmax with softmax scores they reported a wrong answer. And a masked
LM run as a text classifier, which explains the token it fills in."""

from __future__ import annotations

import pytest
import torch

from engine import DLBacktrace
from tests.helpers.tiny import tiny_bert

IDS = torch.tensor([[2, 5, 9, 11, 3], [2, 7, 30, 4, 3]])
INPUTS = {"input_ids": IDS, "attention_mask": torch.ones_like(IDS)}


def _run(model: torch.nn.Module, **kw: object) -> dict:
    dlb = DLBacktrace(model, INPUTS)
    return dlb.run_task(task="text-classification", inputs=INPUTS, **kw)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**INPUTS).logits


def _relevance(res: dict) -> torch.Tensor:
    return res["relevance"]["input_ids"].float()


@pytest.fixture(scope="module")
def multi_label() -> torch.nn.Module:
    return tiny_bert("BertForSequenceClassification", 4, problem_type="multi_label_classification")


def test_multi_label_reports_each_label_by_its_sigmoid(multi_label):
    """Each label is present where its sigmoid reaches the threshold (several, one or none
    per row), the most confident is explained, and the threshold is not a no-op."""
    logits = _logits(multi_label)
    res = _run(multi_label, thresholding=0.45)
    present = torch.as_tensor(res["labels_present"])
    assert torch.equal(present, torch.sigmoid(logits) >= 0.45)
    assert res["predicted_labels"].tolist() == logits.argmax(-1).tolist()
    assert _run(multi_label, thresholding=0.0)["labels_present"].all()
    c = res["conservation"]
    assert (abs(c["inputs"] + c["sinks"] - 100) < 1e-3).all()


def test_a_multi_label_contrast_is_the_label_against_its_absence(multi_label):
    """Mode contrast explains label k as a one-logit classifier of label k alone explains
    it (its logit is its own contrast), not against another label (the runner-up)."""
    k = 2
    alone = tiny_bert("BertForSequenceClassification", 1)
    alone.load_state_dict(multi_label.state_dict() | _row(multi_label, k))
    present = (torch.sigmoid(_logits(multi_label)[:, k]) >= 0.5).long()
    res = _run(multi_label, mode="contrast", target=k)
    ref = _run(alone, mode="contrast", target=present.tolist())
    torch.testing.assert_close(_relevance(res), _relevance(ref), atol=1e-5, rtol=1e-4)
    runner_up = _run(tiny_bert("BertForSequenceClassification", 4), mode="contrast", target=k)
    assert not torch.allclose(_relevance(res), _relevance(runner_up), atol=1e-3)


def _row(model: torch.nn.Module, k: int) -> dict[str, torch.Tensor]:
    head = model.classifier
    return {"classifier.weight": head.weight[k : k + 1], "classifier.bias": head.bias[k : k + 1]}


def test_multi_label_takes_no_other_class_to_contrast_with(multi_label):
    with pytest.raises(ValueError, match="multi-label"):
        _run(multi_label, mode="contrast", contrast_with=1)


@pytest.fixture(scope="module")
def regression() -> torch.nn.Module:
    model = tiny_bert("BertForSequenceClassification", 1, problem_type="regression")
    with torch.no_grad():  # values below zero
        model.classifier.bias.fill_(-1.0)
    return model


def test_regression_reports_the_value_and_explains_it_unsigned(regression):
    """The value as the model returns it (no temperature), and in mode reference a value
    below zero is explained as itself, where the same logit read as a binary classifier's
    is explained as the evidence for "negative": the opposite seed and relevance."""
    values = _logits(regression)[:, 0]
    assert (values < 0).all()
    res = _run(regression, temperature=3.0, mode="reference")
    assert torch.allclose(torch.as_tensor(res["predictions"])[:, 0], values, atol=1e-6)
    binary = _run(regression, mode="reference", problem_type="single_label_classification")
    assert binary["predicted_labels"].tolist() == [0, 0]
    assert abs(res["conservation"]["seed"]).tolist() == [100.0, 100.0]
    assert (binary["conservation"]["seed"] == -res["conservation"]["seed"]).all()
    torch.testing.assert_close(_relevance(binary), -_relevance(res))


def test_regression_has_no_contrast(regression):
    with pytest.raises(ValueError, match="regression"):
        _run(regression, mode="contrast")


def test_problem_type_is_for_one_decision_per_sample():
    model = tiny_bert("BertForTokenClassification", 3)
    dlb = DLBacktrace(model, INPUTS)
    with pytest.raises(ValueError, match="problem_type is for"):
        dlb.run_task(task="token-classification", inputs=INPUTS, problem_type="regression")


def test_a_masked_lm_explains_its_mask_token_by_default():
    """A masked LM run as a text classifier explains the token it fills in (each row's mask
    token, wherever it is), as position= does; its last token, a separator, before."""
    from types import SimpleNamespace

    mask_id = 4
    ids = torch.tensor([[2, 5, 4, 11, 3], [2, 4, 30, 9, 3]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    dlb = DLBacktrace(tiny_bert("BertForMaskedLM"), inputs)
    tok = SimpleNamespace(mask_token_id=mask_id)
    res = dlb.run_task(task="text-classification", inputs=inputs, tokenizer=tok)
    assert res["position"].tolist() == [2, 1]
    at = dlb.run_task(task="text-classification", inputs=inputs, position=[2, 1])
    torch.testing.assert_close(_relevance(res), _relevance(at))
    plain = dlb.run_task(task="text-classification", inputs=inputs)
    assert plain["position"].tolist() == [4, 4]
