"""The service's long-lived processes freeze their start-up heap (``service.heap``), so that
full collections no longer walk it, and unfreeze it again when what lives long changes, so
that cycles that left (a model evicted from the cache) are still freed."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest
import torch
from fastapi.testclient import TestClient

from engine.tasks import TaskName
from service import heap
from service.api import create_app
from service.config import Settings
from service.models import LoadedModel, ModelCache
from service.registry import ModelSpec, Registry
from service.work.context import WorkerState


class _Node:
    """An object in a reference cycle: only the cyclic collector frees it."""

    def __init__(self) -> None:
        self.me = self


@pytest.fixture(autouse=True)
def _thawed() -> Iterator[None]:
    """This process's heap as the other tests found it: not frozen."""
    yield
    gc.unfreeze()


def test_settle_freezes_and_frees_cycles_that_left() -> None:
    node = _Node()
    alive = weakref.ref(node)
    heap.settle()
    assert gc.get_freeze_count() > 0
    del node
    gc.collect()
    assert alive() is not None  # frozen: the collector does not walk it
    heap.settle()
    assert alive() is None  # unfrozen first, then collected


def test_settle_leaves_no_garbage_frozen() -> None:
    node = _Node()
    alive = weakref.ref(node)
    del node  # garbage before the freeze: collected, not frozen for good
    heap.settle()
    assert alive() is None


def test_api_freezes_its_heap_at_start() -> None:
    gc.unfreeze()
    with TestClient(create_app(Settings(redis_url="redis://127.0.0.1:1/0"))):
        assert gc.get_freeze_count() > 10_000


def cyclic() -> LoadedModel:
    """A registry model that holds a reference cycle, as captured graphs do."""
    model = torch.nn.Linear(4, 2)
    model.cycle = [model]  # type: ignore[assignment]
    return LoadedModel("m", TaskName.TABULAR_CLASSIFICATION, model, labels=["a", "b"])


def test_a_model_evicted_after_the_freeze_is_freed(tmp_path) -> None:
    """A worker settles at each load: a model that left the cache for the next one is
    collected, though it was frozen while it served."""
    specs = [
        ModelSpec.model_validate(
            {
                "id": model_id,
                "task": "tabular-classification",
                "source": {"kind": "python", "factory": f"{__name__}:cyclic"},
                "labels": ["a", "b"],
            }
        )
        for model_id in ("a", "b")
    ]
    registry = Registry(specs)
    cache = ModelCache(registry, str(tmp_path), max_bytes=1)  # room for one model
    worker = WorkerState(Settings(), registry, cache, "w")
    first, hit = worker.load(specs[0])
    assert not hit and gc.get_freeze_count() > 0
    gone = weakref.ref(first.loaded.model)
    del first
    worker.load(specs[1])  # evicts "a"
    assert cache.warm_ids() == ["b"]
    assert gone() is None


class _StaticLength(torch.nn.Module):
    """A model whose graphs each take one sequence length (a branch on it): every new length
    is a capture of its own, and past ``MAX_GRAPHS`` the oldest but the first is dropped."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        if x.shape[1] == 5:
            y = y * 2
        return y.sum(1)


def test_a_graph_dropped_after_the_freeze_is_freed(monkeypatch) -> None:
    """A captured graph (reference cycles) that was frozen while it served and that its
    model's cache of graphs then drops, between two model loads, is still collected."""
    from engine import DLBacktrace
    from engine import backtrace as bt

    monkeypatch.setattr(bt, "MAX_GRAPHS", 2)  # the first graph and one more
    dlb = DLBacktrace(_StaticLength().eval(), {"x": torch.randn(2, 3, 4)})
    second = dlb.graph_for({"x": torch.randn(2, 4, 4)})
    gone = weakref.ref(second)
    del second
    heap.settle()  # a worker's load of another model
    dlb.graph_for({"x": torch.randn(2, 6, 4)})  # drops the graph of length 4
    gc.collect()
    assert gone() is None
