"""A worker that is warming its models (issue 17): its heartbeat says ``warming`` from the
moment it starts, with the model it is on, so that /readyz is still 503 but the job view and
the event stream of a queued job say a worker is warming (not that none is alive); once it is
ready the job runs. And, once a worker has warmed a model, layer names in ``output.relevance``
are checked at the door against the node names of the graph it captured.

Its own stack: a private redis-server, an API process and one real worker whose registry has
two warm models, tiny random BERTs (``tests.helpers.models``); the second waits for a gate
file before it builds, so the test decides when warming ends. A model no worker warmed is
checked by the worker on its first job (tests/service/test_layer_names.py)."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from service.vocabulary import JobStatus
from tests.helpers import models
from tests.helpers.jobs import events, submit, wait
from tests.helpers.stack import private_stack

TEXT = {"text": "the cat sat on the mat"}
WARMING_NOTE = "a worker is warming (model gated-bert, 2 of 2); the job starts when it is ready"


def until(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)
    return value


@dataclass
class Warming:
    url: str
    gate: Path
    worker: subprocess.Popen
    log: Path

    def ready(self) -> None:
        """Open the gate and wait until the worker takes jobs."""
        self.gate.touch()
        until(lambda: httpx.get(f"{self.url}/readyz").status_code == 200, 300, "ready")


@pytest.fixture(scope="module")
def warming(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Warming]:
    tmp = tmp_path_factory.mktemp("warming")
    folders = models.build_folders(tmp / "models")
    text = folders / "tiny-bert-text"
    gated = {
        "id": "gated-bert",
        "task": "text-classification",
        "source": {"kind": "python", "factory": "tests.helpers.models:gated_text_classifier"},
        "limits": {"max_tokens": models.MAX_TOKENS},
        "warm": True,
    }
    entries = [
        models.entry("tiny-bert-text", text, "text-classification", warm=True),
        gated,
    ]
    gate = {models.GATE_ENV: str(tmp / "gate"), models.GATED_FOLDER_ENV: str(text)}
    with private_stack(tmp, entries, BACKTRACE_HEARTBEAT_TTL="3", **gate) as stack:
        yield Warming(stack.url, tmp / "gate", stack.worker, stack.worker_log)


def test_warming_worker_is_named_until_ready(warming: Warming) -> None:
    with httpx.Client(base_url=warming.url, timeout=30) as client:

        def warming_readiness() -> httpx.Response | None:
            resp = client.get("/readyz")
            return resp if resp.json().get("warming") else None

        try:
            ready = until(warming_readiness, 180, "a warming heartbeat")
        except AssertionError:
            pytest.fail("no warming heartbeat:\n" + warming.log.read_text()[-3000:])
        assert ready.status_code == 503
        assert ready.json() == {"ready": False, "redis": True, "workers": 0, "warming": 1}

        job = submit(client, {"model": "tiny-bert-text", "inputs": TEXT})["job_id"]
        # tiny-bert-text warms in seconds; gated-bert waits for the gate
        view = until(
            lambda: (v := client.get(f"/jobs/{job}").json())["note"] == WARMING_NOTE and v,
            180,
            "the note naming gated-bert",
        )
        assert view["status"] == JobStatus.QUEUED and view["workers_alive"] == 1, view

        comments: list[str] = []
        seen: list[list[tuple[str, str, dict]]] = []

        def stream() -> None:
            with httpx.Client(base_url=warming.url, timeout=30) as c:
                seen.append(events(c, job, comments=comments))

        reader = threading.Thread(target=stream, daemon=True)
        reader.start()
        until(lambda: f": {WARMING_NOTE}" in comments, 30, "a warming comment on the stream")
        assert client.get("/readyz").status_code == 503, "still warming"

        warming.gate.touch()
        reader.join(300)
        assert seen, "the stream ended"
        assert [e for _, e, _ in seen[0]][-1] == "done", seen
        assert not any("no worker" in c for c in comments), comments

        done = wait(client, job)
        assert done["status"] == JobStatus.FINISHED, done
        assert done.get("note") is None
        c = done["result"]["conservation"]
        np.testing.assert_allclose(np.add(c["inputs"], c["sinks"]), c["seed"], rtol=1e-4)
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json() == {"ready": True, "redis": True, "workers": 1, "warming": 0}
        warm = {m["id"] for m in client.get("/models").json()["models"] if m["warm"]}
        assert warm == {"tiny-bert-text", "gated-bert"}


def _layers(model: str, names: list[str]) -> dict[str, Any]:
    return {"model": model, "inputs": TEXT, "output": {"relevance": names}}


def test_unknown_layer_names_are_refused_once_a_worker_warmed_the_model(
    warming: Warming,
) -> None:
    warming.ready()
    with httpx.Client(base_url=warming.url, timeout=30) as client:
        resp = client.post("/run_task", json=_layers("tiny-bert-text", ["linear", "lineer_3"]))
        assert resp.status_code == 422, resp.text
        (error,) = resp.json()["detail"]
        assert error["loc"] == ["body", "output", "relevance"]
        message = error["message"]
        assert message.startswith(
            "output.relevance: 'lineer_3' is not a node of tiny-bert-text's graph ("
        ), message
        assert "closest: linear_3" in message and "'all'" in message, message

        # a real node: its relevance comes back under its name
        view = wait(client, submit(client, _layers("tiny-bert-text", ["linear"]))["job_id"])
        assert view["status"] == JobStatus.FINISHED, view
        assert set(view["result"]["layers"]) == {"linear"}
