"""Validation from the captured signature: a python factory's model has no config.json, so
the door knows neither its classes, its feature width nor its vocabulary until a worker has
captured its graph and published what the graph takes and gives (``store.publish_graph``).
From then on a row of the wrong width, a class the model does not have or a token id past
its embedding table is a 422 naming the field; before, the job fails with the engine's
reason (accepted: the door cannot know).

Its own stack (``private_stack``): a private redis-server, an API process and one real
worker, with a tabular classifier (4 features, 3 classes), a token classifier of a
20-token vocabulary (2 classes) and a tagger of its tokens (2 classes per token), ``python``
sources, not warm."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from service.vocabulary import JobStatus
from tests.helpers.jobs import submit, wait
from tests.helpers.stack import private_stack

FEATURES, CLASSES, VOCAB = 4, 3, 20


def tabular() -> Any:
    """4 features -> 3 classes, seeded random weights."""
    import torch

    from engine.tasks import TaskName
    from service.models import LoadedModel

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(FEATURES, 8), torch.nn.ReLU(), torch.nn.Linear(8, CLASSES)
    )
    return LoadedModel("tab", TaskName.TABULAR_CLASSIFICATION, model.eval(), None)


def bag_of_ids() -> Any:
    """Token ids (vocabulary of 20) -> mean embedding -> 2 classes."""
    import torch

    from engine.tasks import TaskName
    from service.models import LoadedModel

    class Bag(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(VOCAB, 8)
            self.out = torch.nn.Linear(8, 2)

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.out(self.emb(input_ids).mean(1))

    torch.manual_seed(0)
    return LoadedModel("ids", TaskName.TEXT_CLASSIFICATION, Bag().eval(), None)


def tagger_of_ids() -> Any:
    """Token ids (vocabulary of 20) -> 2 classes per token ([B, T, 2] logits)."""
    import torch

    from engine.tasks import TaskName
    from service.models import LoadedModel

    class Tagger(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(VOCAB, 8)
            self.out = torch.nn.Linear(8, 2)

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.out(self.emb(input_ids))

    torch.manual_seed(0)
    return LoadedModel("tagger", TaskName.TEXT_CLASSIFICATION, Tagger().eval(), None)


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("signature-door")
    entries = [
        {
            "id": "tab",
            "task": "tabular-classification",
            "source": {"kind": "python", "factory": f"{__name__}:tabular"},
        },
        {
            "id": "ids",
            "task": "text-classification",
            "source": {"kind": "python", "factory": f"{__name__}:bag_of_ids"},
        },
        {
            "id": "tagger",
            "task": "text-classification",
            "source": {"kind": "python", "factory": f"{__name__}:tagger_of_ids"},
        },
    ]
    with private_stack(tmp, entries) as stack:
        yield stack.url


def _refused(client: httpx.Client, body: dict[str, Any]) -> tuple[list, str]:
    """The 422 the door gives ``body`` once it has read the published signature (it reads
    it again at most every second: ``metadata.RECHECK_S``)."""
    deadline = time.monotonic() + 10
    while True:
        resp = client.post("/run_task", json=body)
        if resp.status_code == 422 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert resp.status_code == 422, resp.text
    (error,) = resp.json()["detail"]
    return error["loc"], error["message"]


def test_a_tabular_models_width_and_classes_from_its_graph(url: str) -> None:
    wide = {"model": "tab", "inputs": {"features": [[1.0] * 5]}}
    with httpx.Client(base_url=url, timeout=60) as client:
        first = submit(client, wide)["job_id"]  # cold: the worker captures, then refuses
        view = wait(client, first)
        assert view["status"] == JobStatus.FAILED, view
        assert "does not run on inputs of shapes input (1, 5)" in view["error"]["message"], view
        ok = submit(client, {"model": "tab", "inputs": {"features": [1.0, 2.0, 3.0, 4.0]}})
        assert wait(client, ok["job_id"])["status"] == JobStatus.FINISHED
        assert _refused(client, wide) == (
            ["body", "inputs", "features"],
            "inputs.features: rows of 5 features, but tab takes 4 a row",
        )
        target = {"model": "tab", "inputs": {"features": [1.0] * 4}, "relevance": {"target": 3}}
        assert _refused(client, target) == (
            ["body", "relevance", "target"],
            "relevance.target: 3 is not a class of tab: 0 to 2",
        )
        alt = {**target, "relevance": {"mode": "contrast", "contrast_with": 7}}
        message = _refused(client, alt)[1]
        assert message == "relevance.contrast_with: 7 is not a class of tab: 0 to 2"


def test_a_token_models_vocabulary_from_its_graph(url: str) -> None:
    with httpx.Client(base_url=url, timeout=60) as client:
        ok = submit(client, {"model": "ids", "inputs": {"token_ids": [1, 2, 3]}})
        view = wait(client, ok["job_id"])
        assert view["status"] == JobStatus.FINISHED, view["error"]
        loc, message = _refused(client, {"model": "ids", "inputs": {"token_ids": [1, 25]}})
    assert loc == ["body", "inputs", "token_ids"], message
    assert "25" in message and "0 to 19" in message, message


def test_a_position_on_padding_is_named_where_only_the_worker_pads(url: str) -> None:
    """A python factory's padding is the worker's to know: a batch's position on a shorter
    input's padding fails the job in the door's words, naming the field and the input; it
    was the engine's "position [2, 2] falls on padding". On a token of each, it runs."""
    body = {"model": "tagger", "inputs": {"token_ids": [[1, 2, 3], [4]]}}
    with httpx.Client(base_url=url, timeout=60) as client:
        bad = wait(client, submit(client, {**body, "relevance": {"position": 2}})["job_id"])
        ok = wait(client, submit(client, {**body, "relevance": {"position": 0}})["job_id"])
    assert bad["status"] == JobStatus.FAILED, bad
    assert bad["error"]["message"] == (
        "relevance.position: 2 falls on the padding of inputs.token_ids.1 (1 tokens, padded "
        "on the right to 3): positions 0 to 0 are tokens of every input"
    )
    assert ok["status"] == JobStatus.FINISHED, ok["error"]
