"""A label in ``relevance.contrast_with`` in the worker, for a model with no labels (a
torchvision or python source whose registry entry gives none): the job fails saying so, in
the door's words, not with the engine's lookup among no labels ("(labels: [])")."""

from __future__ import annotations

import base64
import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from engine.tasks import TaskName
from service.models import CachedModel, LoadedModel
from service.registry import ImageSpec, ModelSpec
from service.schemas import RunTaskRequest
from service.work.classify import classify
from service.work.context import engine_relevance


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
    """One contrast job of a small image classifier whose labels are ``labels``, through the
    worker's ``classify`` (the engine, the result document and its receipt)."""
    rgb = (np.random.default_rng(0).random((12, 12, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3)).eval()
    loaded = LoadedModel("m", TaskName.IMAGE_CLASSIFICATION, net, None, labels)
    loaded.image = ImageSpec(size=8)
    source = {"kind": "python", "factory": "none:none"}
    spec = ModelSpec(id="m", task="image-classification", source=source, labels=labels)
    entry = CachedModel(loaded, "rev", "cpu", "float32", 0, 0.0)
    run = SimpleNamespace(entry=entry, spec=spec, task=spec.task, state=SimpleNamespace(name="w"))
    relevance = {"mode": "contrast", "contrast_with": alt}
    image = base64.b64encode(buf.getvalue()).decode()
    req = RunTaskRequest(model="m", inputs={"image": image}, relevance=relevance)
    (out,) = classify(run, [SimpleNamespace(req=req)])
    return out


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
