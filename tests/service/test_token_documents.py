"""The worker's result documents of the tasks with several seeds per row (token
classification, question answering): per row, over its real tokens, the predictions and
relevance [seeds, tokens] (engine.heads; the seed names from engine.tasks)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from engine import DLBacktrace
from engine.tasks import TaskName
from service import codec
from service.schemas import OutputOptions
from service.work import documents
from tests.helpers.tiny import tiny_bert


@pytest.mark.parametrize(
    "task, cls_name, labels",
    [
        (TaskName.TOKEN_CLASSIFICATION, "BertForTokenClassification", 3),
        (TaskName.QUESTION_ANSWERING, "BertForQuestionAnswering", 2),
    ],
)
def test_per_token_document(task, cls_name, labels):
    ids = torch.randint(1, 40, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    res = DLBacktrace(tiny_bert(cls_name, labels), batch).run_task(task=task, inputs=batch)
    loaded = SimpleNamespace(tokenizer=None, labels=["O", "B", "I"])
    run = SimpleNamespace(task=task, entry=SimpleNamespace(loaded=loaded))
    doc = documents.per_token(run, batch, res, OutputOptions(dtype="float32"))
    items = doc["inputs"]
    assert [len(item["token_ids"]) for item in items] == [6, 4]  # padding left out
    seeds = [6, 4] if task == TaskName.TOKEN_CLASSIFICATION else [2, 2]
    for item, k in zip(items, seeds, strict=True):
        rel = codec.decode(item["relevance"])
        assert rel.shape == (k, len(item["token_ids"]))
    if task == TaskName.TOKEN_CLASSIFICATION:
        assert items[1]["labels"] == doc["summary"]["labels"][1]
        assert len(items[1]["labels"]) == 4
        assert set(items[0]["labels"]) <= {"O", "B", "I"}
    else:
        assert items[0]["seeds"] == ["start", "end"]
        np.testing.assert_array_equal(items[0]["answer_span"], res["answer_span"][0])
    c = doc["conservation"]
    np.testing.assert_allclose(
        np.add(c["inputs"], c["sinks"]), np.asarray(c["seed"]), atol=1e-4, rtol=0
    )


def test_a_prediction_names_the_class_its_relevance_explains() -> None:
    """With ``relevance.target`` the relevance explains another class (or a regression's
    other output) than the prediction: each row says which, with its label; it said only
    the prediction, so a target's relevance read as the predicted class's."""
    res = {
        "predictions": np.array([[2.0, -1.0, 0.5], [0.1, 3.0, 0.2]]),
        "predicted_labels": np.array([0, 1]),
        "target": np.array([2, 2]),
    }
    rows = documents._predictions(["calm", "arousal", "valence"], res)
    assert [r["label"] for r in rows] == ["calm", "arousal"]
    assert [r["explained"] for r in rows] == [{"index": 2, "label": "valence"}] * 2
    del res["target"]  # no target: the prediction is what is explained
    assert [r["explained"]["label"] for r in documents._predictions(None, res)] == ["0", "1"]
