"""A registry model whose weights file is broken, on a private stack (real Redis, API and
worker): the worker's warming and the job that needs the model fail saying which model,
which file and why (safetensors alone says "header too large"); GET /models shows the
failure until a worker loads the model, once the file is fixed."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from service.client import Client
from tests.helpers.inputs import blank_png_b64
from tests.helpers.jobs import submit, wait
from tests.helpers.stack import private_stack

WHY = "is unreadable (SafetensorError: Error while deserializing header: header too large)"
JOB = {"model": "broken", "inputs": {"image": blank_png_b64(64, 64)}}


def _entry(weights: Path) -> dict[str, Any]:
    image = {"channels": 3, "size": 64, "mean": [0.5] * 3, "std": [0.25] * 3, "mode": "RGB"}
    source = {"kind": "torchvision", "arch": "resnet18", "weights": str(weights), "num_classes": 3}
    return {
        "id": "broken",
        "task": "image-classification",
        "source": source,
        "labels": ["cat", "dog", "bird"],
        "image": image,
        "warm": True,
    }


def _write_weights(path: Path) -> None:
    """Seeded resnet18 weights, written by another process (this one stays torch-free)."""
    code = (
        "import torch, torchvision, sys; from safetensors.torch import save_file; "
        "torch.manual_seed(0); m = torchvision.models.resnet18(weights=None, num_classes=3); "
        "save_file(m.state_dict(), sys.argv[1])"
    )
    subprocess.run([sys.executable, "-c", code, str(path)], check=True)


def _wait_for_log(log: Path, line: str, times: int, timeout: float = 10) -> None:
    """Until ``line`` is in ``log`` ``times`` times (RQ logs a job's failure after storing
    it)."""
    deadline = time.monotonic() + timeout
    while log.read_text().count(line) < times:
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)


def _model(client: httpx.Client) -> dict[str, Any]:
    (model,) = [m for m in client.get("/models").json()["models"] if m["id"] == "broken"]
    return model


def test_a_broken_weights_file_is_named_and_shown(tmp_path: Path) -> None:
    weights = tmp_path / "resnet.safetensors"
    weights.write_bytes(b"\xff" * 64)  # a header length of 2**64 - 1 bytes
    message = f"model broken cannot load: its weights file {weights} {WHY}"
    with private_stack(tmp_path, [_entry(weights)]) as ps:
        Client(ps.url).wait_ready(timeout=300, processes=[ps.worker])  # warming failed
        with httpx.Client(base_url=ps.url, timeout=30) as client:
            model = _model(client)
            assert (model["status"], model["warm"]) == ("failed", False)
            assert model["load_error"]["message"] == message
            assert f".{ps.worker.pid}." in model["load_error"]["worker"]
            assert model["load_error"]["at"] <= time.time()

            view = wait(client, submit(client, JOB)["job_id"])
            assert view["status"] == "failed"
            assert view["error"] == {"type": "ModelLoadError", "message": message}
            _wait_for_log(ps.worker_log, message, 2)  # warming, then the job

            _write_weights(weights)
            assert wait(client, submit(client, JOB)["job_id"])["status"] == "finished"
            model = _model(client)
            assert model["load_error"] is None and model["status"] != "failed"


def test_a_missing_model_folder_is_said_when_the_worker_starts(tmp_path: Path) -> None:
    """A mistyped ``source.path`` of a model not warmed was found by its first job only: a
    starting worker names it in its log and ``GET /models`` shows it failed (the other
    models are served as before)."""
    weights = tmp_path / "resnet.safetensors"
    _write_weights(weights)
    good = {**_entry(weights), "id": "good", "warm": False}
    folder = tmp_path / "no-such-folder"
    missing = {"id": "typo", "task": "text-classification", "labels": ["a", "b"],
               "source": {"kind": "transformers", "path": str(folder)}}  # fmt: skip
    message = f"registry entry typo: source.path {folder} is not a folder on this machine"
    with private_stack(tmp_path, [good, missing]) as ps:
        Client(ps.url).wait_ready(timeout=300, processes=[ps.worker])
        _wait_for_log(ps.worker_log, message, 1)
        with httpx.Client(base_url=ps.url, timeout=30) as client:
            models = {m["id"]: m for m in client.get("/models").json()["models"]}
            assert models["typo"]["status"] == "failed", models["typo"]
            assert models["typo"]["load_error"]["message"] == message
            assert models["good"]["load_error"] is None
            job = {**JOB, "model": "good"}
            assert wait(client, submit(client, job)["job_id"])["status"] == "finished"
