"""A label in ``relevance.contrast_with`` in the worker, for a model with no labels (a
torchvision or python source whose registry entry gives none): the job fails saying so, in
the door's words, not with the engine's lookup among no labels ("(labels: [])")."""

from __future__ import annotations

import pytest

from service.schemas import RunTaskRequest
from service.work.context import engine_relevance
from tests.helpers.classify_job import classify_job, small_cnn


def _request(alt: str | int) -> RunTaskRequest:
    relevance = {"mode": "contrast", "contrast_with": alt}
    return RunTaskRequest.model_validate(
        {"model": "resnet", "inputs": {"features": [1.0]}, "relevance": relevance}
    )


def test_a_label_of_a_model_without_labels_fails_saying_so() -> None:
    with pytest.raises(ValueError) as caught:
        engine_relevance(_request("cat"), None)
    assert str(caught.value) == (
        "relevance.contrast_with: 'cat': resnet has no labels (its registry entry gives "
        "none): give a class index, runner-up or rest"
    )
    assert engine_relevance(_request(2), None)["contrast_with"] == 2
    assert engine_relevance(_request("rest"), [])["contrast_with"] == "rest"
    assert engine_relevance(_request("dog"), ["cat", "dog"])["contrast_with"] == 1


def _classify(labels: list[str] | None, alt: str | int) -> object:
    return classify_job(small_cnn(), labels, {"mode": "contrast", "contrast_with": alt})


def test_a_job_contrasting_with_a_label_finishes() -> None:
    """The label becomes its index for the engine; the receipt records it as it was sent."""
    predicted = _classify(["a", "b", "c"], 0)["predictions"][0]["label"]
    alt = next(x for x in "abc" if x != predicted)
    doc = _classify(["a", "b", "c"], alt)
    assert doc["receipt"]["parameters"]["contrast_with"] == alt
    by_index = _classify(["a", "b", "c"], "abc".index(alt))
    assert doc["inputs"] == by_index["inputs"] and doc["conservation"] == by_index["conservation"]
    failed = _classify(None, "a")
    assert isinstance(failed, ValueError) and "m has no labels" in str(failed)
