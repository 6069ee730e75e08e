"""Layer names in ``output.relevance`` on a model no worker has warmed (issue 17, point 5):
the first job captures its graph, so only the worker can check the names. A name that is not
a node fails that job with the reason the door gives (the field, the name, the closest
nodes), on the job and as the stream's ``error`` event, rather than a result without it. The
capture publishes the graph's node names, so the next such request is a 422 at the door.

Its own stack: a private redis-server, an API process and one real worker whose registry
has two tiny random BERTs (``tests.helpers.models``), neither marked warm."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from service.vocabulary import JobStatus
from tests.helpers import models
from tests.helpers.jobs import refused_layers, submit, wait
from tests.helpers.stack import private_stack

TEXT = {"text": "the cat sat on the mat"}
COLD = {"cold-text": "text-classification", "cold-tokens": "token-classification"}
FOLDERS = {"cold-text": "tiny-bert-text", "cold-tokens": "tiny-bert-tokens"}


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("layer-names")
    folders = models.build_folders(tmp / "models")
    entries = [models.entry(m, folders / FOLDERS[m], task) for m, task in COLD.items()]
    with private_stack(tmp, entries) as stack:
        yield stack.url


def _layers(model: str, names: list[str]) -> dict[str, Any]:
    return {"model": model, "inputs": TEXT, "output": {"relevance": names}}


@pytest.mark.parametrize("model", list(COLD))
def test_a_cold_models_unknown_layer_fails_its_job_then_is_refused_at_the_door(
    url: str, model: str
) -> None:
    with httpx.Client(base_url=url, timeout=30) as client:
        # no graph of the model is known yet: the door accepts, the worker refuses
        reason = refused_layers(client, _layers(model, ["linear", "lineer_3"]))
        assert reason.startswith(
            f"output.relevance: 'lineer_3' is not a node of {model}'s graph ("
        ), reason
        assert "closest: linear_3" in reason and "'all'" in reason, reason
        # (the failed job's capture published the node names: the door refused the second try)

        # a real node's relevance comes back under its name
        view = wait(client, submit(client, _layers(model, ["linear"]))["job_id"])
        assert view["status"] == JobStatus.FINISHED, view
        assert set(view["result"]["layers"]) == {"linear"}
