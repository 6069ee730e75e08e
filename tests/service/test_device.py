"""A registry entry with ``device: cuda`` on a worker without a GPU: each job fails saying
so (the model, what it asks for, what this worker has), before the model loads, and a
worker that warms the model logs it once, in one line; torch said only "Found no NVIDIA
driver on your system", at every job."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from service import worker
from service.models import DeviceUnavailable, ModelCache
from service.registry import ModelSpec, Registry

NO_GPU = (
    "model cnn asks for device cuda (its registry entry), but this worker has no GPU (torch "
    "sees no CUDA device): run it on a worker with a GPU, or set device auto or cpu"
)


def _registry(tmp_path: Path, device: str) -> Registry:
    # A factory that is never called: the device is checked before anything loads.
    source = {"kind": "python", "factory": "no_such_module:build"}
    spec = {"id": "cnn", "task": "image-classification", "source": source, "device": device}
    return Registry([ModelSpec.model_validate(spec)], tmp_path)


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_a_job_fails_saying_there_is_no_gpu(tmp_path: Path, no_gpu: None) -> None:
    registry = _registry(tmp_path, "cuda")
    cache = ModelCache(registry, str(tmp_path), 1 << 30)
    with pytest.raises(DeviceUnavailable) as caught:
        cache.get(registry.get("cnn"))
    assert str(caught.value) == NO_GPU
    with pytest.raises(DeviceUnavailable, match="asks for device cuda:1"):
        cache.get(_registry(tmp_path, "cuda:1").get("cnn"))


def test_a_gpu_of_another_index_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    registry = _registry(tmp_path, "cuda:2")
    with pytest.raises(DeviceUnavailable) as caught:
        ModelCache(registry, str(tmp_path), 1 << 30).get(registry.get("cnn"))
    assert str(caught.value).endswith(
        "but this worker has 2 GPUs (cuda:0 to cuda:1): run it on a worker with cuda:2, or "
        "set device cuda, auto or cpu"
    )


def test_warming_logs_it_once(
    tmp_path: Path, no_gpu: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    registry = _registry(tmp_path, "cuda")
    state = SimpleNamespace(load=ModelCache(registry, str(tmp_path), 1 << 30).get)
    monkeypatch.setattr("service.work.run.state", lambda: state)
    beat = SimpleNamespace(warming_model=lambda *args: None)
    with caplog.at_level(logging.INFO, logger="service.worker"):
        worker._warm(registry, ["cnn"], beat)
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.getMessage() for r in errors] == [f"could not warm cnn: {NO_GPU}"]
    assert errors[0].exc_info is None  # one line, no traceback
