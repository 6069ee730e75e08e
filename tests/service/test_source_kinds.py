"""The registry's other source kinds through the session's real stack: a transformers
folder and a torchvision architecture with a safetensors weights file."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
from PIL import Image

from tests.helpers.jobs import submit, wait


def test_transformers_source_kind(client: httpx.Client) -> None:
    job = submit(client, {"model": "minilm-hf", "inputs": {"text": "the trip was wonderful"}})
    view = wait(client, job["job_id"])
    assert view["status"] == "finished", view
    assert view["result"]["predictions"][0]["label"] == "positive"  # id2label from config.json


def test_torchvision_source_kind(client: httpx.Client) -> None:
    rgb = (np.random.default_rng(0).random((40, 30, 3)) * 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG")
    body = {
        "model": "resnet18-random",
        "inputs": {"image": base64.b64encode(buf.getvalue()).decode()},
    }
    view = wait(client, submit(client, body)["job_id"])
    assert view["status"] == "finished", view
    res = view["result"]
    assert res["predictions"][0]["label"] in ("cat", "dog", "bird")
    assert res["inputs"][0]["relevance"]["shape"] == [3, 64, 64]
    assert client.get(f"/jobs/{view['job_id']}/heatmap.png").status_code == 200
