"""A registry entry's ``dtype`` (float16, bfloat16) for an image model: the worker captures
the graph on the input as the model runs it (cast to the model's dtype and device), so that a
cold model's first job runs, as a warmed one's does."""

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


def _png() -> str:
    rgb = (np.random.default_rng(0).random((12, 12, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_a_cold_image_model_runs_in_its_dtype(dtype: str) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    net = net.to(getattr(torch, dtype)).eval()
    loaded = LoadedModel("m", TaskName.IMAGE_CLASSIFICATION, net, None, ["a", "b", "c"])
    loaded.image = ImageSpec(size=8)
    source = {"kind": "python", "factory": "none:none"}
    spec = ModelSpec(id="m", task="image-classification", dtype=dtype, source=source)
    entry = CachedModel(loaded, "rev", "cpu", dtype, 0, 0.0)
    run = SimpleNamespace(entry=entry, spec=spec, task=spec.task, state=SimpleNamespace(name="w"))
    work = SimpleNamespace(req=RunTaskRequest(model="m", inputs={"image": _png()}))
    (outcome,) = classify(run, [work])
    assert isinstance(outcome, dict), outcome
    assert outcome["predictions"][0]["label"] in ("a", "b", "c")
