"""Registry source kinds, API keys, back-pressure, dead-job streams and the CLI, against the
session's real stack (and extra API processes where settings differ)."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import time

import httpx
import numpy as np
import redis
from PIL import Image

from service.client import parse_sse
from tests.helpers.inputs import digit_b64
from tests.helpers.jobs import events, submit, wait
from tests.helpers.stack import ROOT, start_api


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


def test_api_keys_and_back_pressure(stack) -> None:
    env = {**stack.env, "BACKTRACE_API_KEYS": "k1,k2", "BACKTRACE_MAX_QUEUE": "0"}
    proc, url = start_api(env, stack.tmp / "api-keys.log")
    try:
        body = {"model": "minilm-sentiment", "inputs": {"text": "fine"}}
        assert httpx.get(f"{url}/healthz").status_code == 200  # probes need no key
        assert httpx.get(f"{url}/models").status_code == 401
        assert httpx.post(f"{url}/run_task", json=body).status_code == 401
        wrong = httpx.post(f"{url}/run_task", json=body, headers={"X-API-Key": "k3"})
        assert wrong.status_code == 401
        assert httpx.get(f"{url}/models", headers={"Authorization": "Bearer k2"}).status_code == 200
        full = httpx.post(f"{url}/run_task", json=body, headers={"X-API-Key": "k1"})
        assert full.status_code == 429 and full.headers["retry-after"]
    finally:
        proc.terminate()
        proc.wait(10)


def test_stream_of_a_job_whose_worker_died_ends_with_error(client: httpx.Client, stack) -> None:
    """What a killed worker leaves behind: events up to 'started', RQ status failed (after
    RQ's abandoned-job cleanup), no terminal event. The stream must still end."""
    r = redis.Redis.from_url(stack.redis_url)
    job_id = "deadbeef" * 4
    r.xadd(f"bt:events:{job_id}", {"event": "queued", "data": "{}"})
    r.xadd(f"bt:events:{job_id}", {"event": "started", "data": "{}"})
    r.hset(f"rq:job:{job_id}", mapping={"status": "failed"})
    r.expire(f"bt:events:{job_id}", 60)
    r.expire(f"rq:job:{job_id}", 60)
    t0 = time.time()
    evs = events(client, job_id)
    assert [e for _, e, _ in evs] == ["queued", "started", "error"]
    assert "without a result" in evs[-1][2]["message"] and time.time() - t0 < 10


def test_cli_run_against_a_running_service(stack, tmp_path) -> None:
    from service.demo.digits import sample_png

    img = tmp_path / "digit.png"
    img.write_bytes(sample_png(0))
    out = tmp_path / "heat.png"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "service",
            "run",
            "--url",
            stack.url,
            "--model",
            "digits-cnn",
            "--image",
            str(img),
            "--out",
            str(out),
            "--json",
        ],
        env=stack.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    view = json.loads(proc.stdout)
    assert view["status"] == "finished" and view["result"]["predictions"][0]["label"] == "0"
    assert Image.open(out).size[0] > 0


def test_sse_client_disconnect_is_noticed(client: httpx.Client, stack) -> None:
    """A client that goes away stops being counted (and read for) within a keep-alive."""
    long = {
        "model": "gpt2-small-config",
        "inputs": {"text": "xyz"},
        "generation": {"max_new_tokens": 64, "path": "stepwise"},
    }
    job = submit(client, long)["job_id"]
    with (
        httpx.Client(base_url=stack.url) as other,
        other.stream("GET", f"/jobs/{job}/events") as resp,
    ):
        for event, _, _ in parse_sse(resp.iter_lines()):
            if event == "started":
                break
    client.delete(f"/jobs/{job}")
    deadline = time.time() + 10
    while time.time() < deadline:
        metrics = client.get("/metrics").text
        line = next(x for x in metrics.splitlines() if x.startswith("backtrace_sse_clients "))
        if float(line.split()[1]) == 0:
            break
        time.sleep(0.2)
    assert float(line.split()[1]) == 0
    wait(client, job)


def test_job_timeout_ends_failed_with_the_reason(stack) -> None:
    """The API sets RQ's job timeout (BACKTRACE_JOB_TIMEOUT); a job past it ends failed,
    with RQ's timeout message, and its stream ends with an error event."""
    proc, url = start_api({**stack.env, "BACKTRACE_JOB_TIMEOUT": "1"}, stack.tmp / "timeout.log")
    try:
        with httpx.Client(base_url=url, timeout=30) as c:
            long = {
                "model": "gpt2-small-config",
                "inputs": {"text": "timeout"},
                "generation": {"max_new_tokens": 64, "path": "stepwise"},
            }
            job = submit(c, long)["job_id"]
            evs = events(c, job)
            assert evs[-1][1] == "error" and "timeout" in evs[-1][2]["message"].lower()
            view = wait(c, job)
            assert view["status"] == "failed" and view["error"]["type"] == "JobTimeoutException"
    finally:
        proc.terminate()
        proc.wait(10)


def test_post_that_streams(client: httpx.Client) -> None:
    """POST /run_task with Accept: text/event-stream answers with the job's events at once;
    the same events, with the same ids, are then on the events URL for resuming."""
    body = {
        "model": "tiny-lookup-lm",
        "inputs": {"text": "a3 c1 f9 h0 ? c"},
        "generation": {"max_new_tokens": 3},
    }
    accept = {"Accept": "text/event-stream", "Idempotency-Key": f"stream-{time.time()}"}
    with client.stream("POST", "/run_task", json=body, headers=accept) as resp:
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"].startswith("text/event-stream")
        job = resp.headers["x-job-id"]
        assert resp.headers["location"] == f"/jobs/{job}"
        streamed = []
        for event, data, eid in parse_sse(resp.iter_lines()):
            streamed.append((eid, event, data))
            if event in ("done", "error", "canceled"):
                break
    names = [e for _, e, _ in streamed]
    assert names[0] == "queued" and names[-1] == "done" and "token" in names
    assert events(client, job) == streamed
    assert wait(client, job)["status"] == "finished"
    # a repeat with the same Idempotency-Key streams the same job again
    with client.stream("POST", "/run_task", json=body, headers=accept) as resp:
        assert resp.headers["x-job-id"] == job and resp.headers["idempotent-replayed"] == "true"
        again = [e for e, _, _ in parse_sse(resp.iter_lines())]
    assert again == names


def test_reference_mode(client: httpx.Client) -> None:
    """Mode "reference" through the service: signed relevance of the change from a zero
    input, conserved like the other modes."""
    body = {
        "model": "digits-cnn",
        "inputs": {"image": digit_b64(5)},
        "relevance": {"mode": "reference"},
        "output": {"encoding": "json"},
    }
    res = wait(client, submit(client, body)["job_id"])["result"]
    assert res["receipt"]["parameters"]["mode"] == "reference"
    c = res["conservation"]
    assert np.allclose(np.add(c["inputs"], c["sinks"]), c["seed"], rtol=1e-3, atol=1e-3)
    rel = np.asarray(res["inputs"][0]["relevance"]["values"])
    assert rel.shape == (1, 16, 16) and np.abs(rel).sum() > 0


def test_named_references(client: httpx.Client) -> None:
    """A named reference changes the explanation and is in the receipt; one that does not fit
    the model's inputs, or comes without its mode, is a 422 that names the field."""

    def run(model: str, inputs: dict, reference: str | None) -> dict:
        rel = {"mode": "reference", **({"reference": reference} if reference else {})}
        body = {"model": model, "inputs": inputs, "relevance": rel, "output": {"encoding": "json"}}
        view = wait(client, submit(client, body)["job_id"])
        assert view["status"] == "finished", view
        return view["result"]

    image = {"image": digit_b64(3)}
    zeros, blur = run("digits-cnn", image, None), run("digits-cnn", image, "blur")
    assert zeros["receipt"]["parameters"]["reference"] == "zeros"
    assert blur["receipt"]["parameters"]["reference"] == "blur"
    values = [np.asarray(r["inputs"][0]["relevance"]["values"]) for r in (zeros, blur)]
    assert not np.allclose(*values)
    text = {"text": "a wonderful, moving film"}
    mask, plain = run("minilm-sentiment", text, "mask"), run("minilm-sentiment", text, None)
    values = [np.asarray(r["inputs"][0]["relevance"]["values"]) for r in (mask, plain)]
    assert values[0].shape == values[1].shape and not np.allclose(*values)

    bad = [
        ("digits-cnn", image, {"mode": "reference", "reference": "mask"}, "takes reference"),
        ("minilm-sentiment", text, {"reference": "mask"}, 'for mode "reference"'),
        ("digits-cnn", image, {"mode": "reference", "reference": "noise"}, "Input should be"),
    ]
    for model, inputs, rel, message in bad:
        resp = client.post("/run_task", json={"model": model, "inputs": inputs, "relevance": rel})
        assert resp.status_code == 422, resp.text
        error = resp.json()["detail"][0]
        assert message in error["message"] and error["loc"][-1] == "reference", error
