"""One classification job through the worker's ``classify`` (the engine, the result
document and its receipt), without Redis or RQ: a small image classifier given as a module."""

from __future__ import annotations

import base64
import io
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from engine.tasks import TaskName
from service.models import CachedModel, LoadedModel
from service.registry import ImageSpec, ModelSpec
from service.schemas import RunTaskRequest
from service.work.classify import classify


def small_cnn(classes: int = 3) -> nn.Module:
    """A CNN for 8x8 RGB pictures (seeded weights)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, classes))


def classify_job(net: nn.Module, labels: list[str] | None, relevance: dict[str, Any]) -> Any:
    """The result document of one job (or the exception that ended it) of ``net`` on a
    seeded random picture, with ``relevance`` as the request's."""
    rgb = (np.random.default_rng(0).random((12, 12, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    loaded = LoadedModel("m", TaskName.IMAGE_CLASSIFICATION, net.eval(), None, labels)
    loaded.image = ImageSpec(size=8)
    source = {"kind": "python", "factory": "none:none"}
    spec = ModelSpec(id="m", task="image-classification", source=source, labels=labels)
    entry = CachedModel(loaded, "rev", "cpu", "float32", 0, 0.0)
    run = SimpleNamespace(entry=entry, spec=spec, task=spec.task, state=SimpleNamespace(name="w"))
    image = base64.b64encode(buf.getvalue()).decode()
    req = RunTaskRequest(model="m", inputs={"image": image}, relevance=relevance)
    (out,) = classify(run, [SimpleNamespace(req=req)])
    return out
