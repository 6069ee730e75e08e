"""End to end: real Redis, a real worker process, the API over HTTP on loopback."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from service import codec
from service.client import parse_sse
from tests.helpers.inputs import blank_png_b64, digit_b64
from tests.helpers.jobs import events, submit, wait

from .faulty import MESSAGE

POSITIVE = "what a wonderful film, i loved it"
NEGATIVE = "the service was terrible and the food was awful"


def test_health_ready_models(client: httpx.Client) -> None:
    assert client.get("/healthz").json()["status"] == "ok"
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["workers"] == 1
    models = {m["id"]: m for m in client.get("/models").json()["models"]}
    assert set(models) >= {"minilm-sentiment", "digits-cnn", "tiny-lookup-lm", "faulty"}
    assert models["minilm-sentiment"]["warm"] and models["digits-cnn"]["warm"]
    assert not models["faulty"]["warm"]
    assert models["minilm-sentiment"]["labels"] == ["negative", "positive"]


def test_api_process_never_imports_torch(stack) -> None:
    code = (
        "import sys, service.api, service.cli, service.client; "
        "service.api.create_app(); assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=stack.env)


def test_text_classification_by_polling(client: httpx.Client) -> None:
    job = submit(client, {"model": "minilm-sentiment", "inputs": {"text": [POSITIVE, NEGATIVE]}})
    assert job["status"] == "queued" and job["urls"]["events"].endswith("/events")
    view = wait(client, job["job_id"])
    assert view["status"] == "finished", view
    res = view["result"]
    assert [p["label"] for p in res["predictions"]] == ["positive", "negative"]
    for item, seed, inp, sinks in zip(res["inputs"], *res["conservation"].values(), strict=True):
        rel = codec.decode(item["relevance"])
        assert item["tokens"][0] == "[CLS]" and rel.shape == (len(item["tokens"]),)
        assert np.isfinite(rel).all()
        assert inp + sinks == pytest.approx(seed, rel=1e-3)  # conservation report adds up
        assert rel.sum() == pytest.approx(inp, rel=2e-2)  # float16 on the wire
    receipt = res["receipt"]
    assert receipt["model"] == "minilm-sentiment" and receipt["revision"] != "unversioned"
    assert receipt["engine_version"] and receipt["device"] == "cpu"
    assert receipt["parameters"]["multiplier"] == 100.0
    assert view["timings"]["run_s"] > 0 and view["started_at"] and view["ended_at"]
    png = client.get(job["urls"]["heatmap"])
    assert png.status_code == 200 and Image.open(io.BytesIO(png.content)).size[0] > 0


def test_json_encoding_and_named_layers(client: httpx.Client) -> None:
    body = {
        "model": "digits-cnn",
        "inputs": {"image": digit_b64(3)},
        "output": {"encoding": "json", "relevance": "all"},
    }
    res = wait(client, submit(client, body)["job_id"])["result"]
    rel = res["inputs"][0]["relevance"]
    assert rel["dtype"] == "float32" and np.asarray(rel["values"]).shape == (1, 16, 16)
    assert res["layers"], "relevance='all' returns the other nodes too"


def test_image_classification_by_polling(client: httpx.Client) -> None:
    from sklearn.datasets import load_digits

    labels = load_digits().target
    ids = [
        submit(client, {"model": "digits-cnn", "inputs": {"image": digit_b64(i)}})["job_id"]
        for i in range(10)
    ]
    views = [wait(client, j) for j in ids]
    assert all(v["status"] == "finished" for v in views)
    correct = sum(
        v["result"]["predictions"][0]["label"] == str(labels[i]) for i, v in enumerate(views)
    )
    assert correct >= 9
    item = views[0]["result"]["inputs"][0]
    assert codec.decode(item["relevance_map"]).shape == (16, 16)
    png = client.get(f"/jobs/{ids[0]}/heatmap.png")
    assert png.headers["content-type"] == "image/png"
    img = np.asarray(Image.open(io.BytesIO(png.content)).convert("RGB"))
    assert img.std() > 0, "heatmap is blank"


def test_generation_over_sse(client: httpx.Client) -> None:
    body = {
        "model": "tiny-lookup-lm",
        "inputs": {"text": "a3 c1 f9 h0 ? c"},
        "generation": {"max_new_tokens": 4},
    }
    job = submit(client, body)
    evs = events(client, job["job_id"])
    names = [e for _, e, _ in evs]
    assert names[0] == "queued" and names[1] == "started" and names[-1] == "done"
    tokens = [d for _, e, d in evs if e == "token"]
    assert [t["step"] for t in tokens] == list(range(len(tokens))) and tokens
    assert tokens[0]["tokens"] == ["1"], "the lookup model answers the stored value"
    assert tokens[0]["top"][0][0]["prob"] > 0.5
    rel = [d for _, e, d in evs if e == "relevance"]
    assert [r["step"] for r in rel] == list(range(len(tokens)))
    first = codec.decode(rel[0]["input_ids"])[0]
    assert first.argmax() == 1, "step 0 relevance peaks at the pair token 'c1'"
    ids = [i for i, _, _ in evs]
    assert ids == sorted(ids, key=lambda s: tuple(map(int, s.split("-")))) and len(set(ids)) == len(
        ids
    )
    view = wait(client, job["job_id"])
    gen = view["result"]["generation"]
    assert gen["text"][0].startswith("1") and gen["new_tokens"][0][0] == "1"
    assert [s["tokens"] for s in gen["steps"]] == [t["tokens"] for t in tokens]
    assert len(gen["relevance_trace"]) == len(tokens)
    png = client.get(f"/jobs/{job['job_id']}/heatmap.png")
    assert png.status_code == 200 and Image.open(io.BytesIO(png.content)).size[1] > 0


def test_sse_resume_with_last_event_id(client: httpx.Client) -> None:
    job = submit(
        client,
        {
            "model": "tiny-lookup-lm",
            "inputs": {"text": "b2 d7 e5 g1 ? e"},
            "generation": {"max_new_tokens": 3},
        },
    )
    full = events(client, job["job_id"])
    for k in range(len(full) - 1):
        rest = events(client, job["job_id"], last_id=full[k][0])
        assert rest == full[k + 1 :], f"resume after event {k}"


def test_cancel_queued_and_running_jobs(client: httpx.Client) -> None:
    long = {
        "model": "gpt2-small-config",
        "inputs": {"text": "hello world"},
        "generation": {"max_new_tokens": 64, "path": "stepwise"},
    }
    running = submit(client, long)["job_id"]
    queued = submit(client, long)["job_id"]
    comments: list[str] = []
    # Wait for the first token of the running job, then cancel both.
    with client.stream("GET", f"/jobs/{running}/events") as resp:
        for event, _, _ in parse_sse(resp.iter_lines()):
            if event == "token":
                break
    resp = client.delete(f"/jobs/{queued}")
    assert resp.status_code == 200 and resp.json()["status"] == "canceled"
    assert wait(client, queued)["status"] == "canceled"
    assert events(client, queued)[-1][1] == "canceled"
    resp = client.delete(f"/jobs/{running}")
    assert resp.status_code == 202 and resp.json()["status"] == "canceling"
    evs = events(client, running, comments=comments)
    assert evs[-1][1] == "canceled"
    assert sum(e == "token" for _, e, _ in evs) < 64
    view = wait(client, running)
    assert view["status"] == "canceled" and "cancel" in view["error"]["message"]
    assert client.delete(f"/jobs/{running}").status_code == 409


def test_keepalive_comments_while_idle(client: httpx.Client) -> None:
    """A job stuck behind another: its stream is idle and must carry keep-alive comments."""
    long = {
        "model": "gpt2-small-config",
        "inputs": {"text": "abc"},
        "generation": {"max_new_tokens": 64, "path": "stepwise"},
    }
    first = submit(client, long)["job_id"]
    second = submit(client, {"model": "minilm-sentiment", "inputs": {"text": POSITIVE}})["job_id"]
    comments: list[str] = []
    got = []
    with client.stream("GET", f"/jobs/{second}/events") as resp:
        lines = resp.iter_lines()
        t0 = time.time()
        for line in lines:
            got.append(line)
            if line.startswith(":"):
                comments.append(line)
                client.delete(f"/jobs/{first}")
            if line.startswith("event: done") or time.time() - t0 > 120:
                break
    assert comments, got
    assert wait(client, second)["status"] == "finished"


def test_unknown_model_is_404(client: httpx.Client) -> None:
    resp = client.post("/run_task", json={"model": "no-such-model", "inputs": {"text": "x"}})
    assert resp.status_code == 404 and "no-such-model" in resp.text
    assert client.get("/jobs/0123456789abcdef").status_code == 404
    assert client.get("/jobs/0123456789abcdef/events").status_code == 404


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"model": "minilm-sentiment", "inputs": {}}, "inputs"),
        ({"model": "minilm-sentiment", "inputs": {"text": ""}}, "inputs.text"),
        ({"model": "minilm-sentiment", "inputs": {"image": "aGVsbG8="}}, "inputs.image"),
        ({"model": "digits-cnn", "inputs": {"image": "not base64!"}}, "inputs.image"),
        (
            {"model": "minilm-sentiment", "inputs": {"text": "x"}, "relevance": {"multiplier": -1}},
            "relevance.multiplier",
        ),
        (
            {"model": "minilm-sentiment", "inputs": {"text": "x"}, "relevance": {"mode": "weird"}},
            "relevance.mode",
        ),
        (
            {
                "model": "tiny-lookup-lm",
                "inputs": {"text": "a1 ? a"},
                "generation": {"max_new_tokens": 500},
            },
            "generation.max_new_tokens",
        ),
        ({"model": "minilm-sentiment", "task": "generation", "inputs": {"text": "x"}}, "task"),
        ({"model": "minilm-sentiment", "inputs": {"text": "x"}, "surprise": 1}, "surprise"),
        ({"model": "minilm-sentiment", "inputs": {"token_ids": [1] * 500}}, "inputs.token_ids"),
        # The registry's limits: image side, beams, batch, row width.
        ({"model": "digits-cnn", "inputs": {"image": blank_png_b64(600, 20)}}, "inputs.image"),
        (
            {
                "model": "tiny-lookup-lm",
                "inputs": {"text": "a1 ? a"},
                "generation": {"num_beams": 5},
            },
            "generation.num_beams",
        ),
        ({"model": "minilm-sentiment", "inputs": {"text": ["x"] * 9}}, "inputs.text"),
        ({"model": "faulty", "inputs": {"features": [0.0] * 513}}, "inputs.features"),
    ],
)
def test_bad_inputs_are_422_naming_the_field(client: httpx.Client, body, field) -> None:
    resp = client.post("/run_task", json=body)
    assert resp.status_code == 422, resp.text
    messages = [d["message"] for d in resp.json()["detail"]]
    assert any(m.startswith(field) for m in messages), messages


def test_malformed_json_is_422(client: httpx.Client) -> None:
    resp = client.post(
        "/run_task", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert resp.status_code == 422


def test_oversized_body_is_413(client: httpx.Client) -> None:
    big = {"model": "digits-cnn", "inputs": {"image": "A" * (2 << 20)}}
    assert client.post("/run_task", json=big).status_code == 413

    def chunks():  # no Content-Length: the limit must count streamed bytes
        yield b'{"model": "digits-cnn", "inputs": {"image": "'
        for _ in range(40):
            yield b"A" * 65536
        yield b'"}}'

    resp = client.post("/run_task", content=chunks(), headers={"content-type": "application/json"})
    assert resp.status_code == 413


def test_model_that_raises_ends_failed_with_its_message(client: httpx.Client, stack) -> None:
    import redis

    job = submit(client, {"model": "faulty", "inputs": {"features": [1, 2, 3, 4]}})
    evs = events(client, job["job_id"])
    assert evs[-1][1] == "error" and MESSAGE in evs[-1][2]["message"]
    view = wait(client, job["job_id"])
    assert view["status"] == "failed" and MESSAGE in view["error"]["message"]
    # Deterministic failures are not retried: RQ ends the job failed after one attempt.
    r = redis.Redis.from_url(stack.redis_url)
    deadline = time.time() + 10
    while r.hget(f"rq:job:{job['job_id']}", "status") != b"failed" and time.time() < deadline:
        time.sleep(0.05)
    assert r.hget(f"rq:job:{job['job_id']}", "status") == b"failed"
    time.sleep(0.5)
    stream = r.xrange(f"bt:events:{job['job_id']}")
    assert [f[b"event"] for _, f in stream].count(b"started") == 1
    assert client.get(f"/jobs/{job['job_id']}/heatmap.png").status_code == 404


def test_metrics(client: httpx.Client, stack) -> None:
    wait(
        client,
        submit(client, {"model": "minilm-sentiment", "inputs": {"text": POSITIVE}})["job_id"],
    )
    api = client.get("/metrics").text
    for name in (
        "backtrace_http_requests_total",
        "backtrace_http_request_duration_seconds_bucket",
        "backtrace_queue_depth",
        "backtrace_workers_live",
        "backtrace_sse_clients",
    ):
        assert name in api, name
    assert 'route="/jobs/{job_id}"' in api and 'queue="default"' in api
    assert "backtrace_workers_live 1.0" in api
    assert 'le="600.0"' in api
    worker = httpx.get(stack.worker_metrics).text
    for name in (
        "backtrace_job_queue_wait_seconds_bucket",
        "backtrace_job_run_seconds_bucket",
        "backtrace_token_seconds_bucket",
        "backtrace_jobs_total",
        "backtrace_model_cache_hits_total",
        "backtrace_model_cache_misses_total",
        "backtrace_model_load_seconds_bucket",
        "backtrace_trace_bytes_total",
    ):
        assert name in worker, name
    assert 'status="finished"' in worker and 'le="600.0"' in worker
    assert not re.search(r"[0-9a-f]{32}", api + worker), "a job id leaked into a label"


def test_python_client_round_trip(stack) -> None:
    from service.client import Client

    c = Client(stack.url)
    res = c.run({"model": "minilm-sentiment", "inputs": {"text": NEGATIVE}})
    assert res["predictions"][0]["label"] == "negative"
    job = c.submit({"model": "tiny-lookup-lm", "inputs": {"text": "a3 c1 f9 h0 ? f"}})
    kinds = [e for e, _ in c.stream(job["job_id"])]
    assert kinds[-1] == "done" and "token" in kinds
    assert json.loads(json.dumps(c.job(job["job_id"])))["status"] == "finished"


@pytest.mark.parametrize(
    "generation",
    [
        {"num_beams": 2, "max_new_tokens": 3},
        {"top_k": 3, "seed": 7, "max_new_tokens": 3},
        {"path": "stepwise", "max_new_tokens": 3},
        {"steps": "none", "max_new_tokens": 3},
    ],
)
def test_generation_settings(client: httpx.Client, generation: dict) -> None:
    job = submit(
        client,
        {
            "model": "tiny-lookup-lm",
            "inputs": {"text": ["a3 c1 f9 h0 ? h"]},
            "generation": generation,
        },
    )
    evs = events(client, job["job_id"])
    assert evs[-1][1] == "done", evs[-1]
    steps = [d["step"] for _, e, d in evs if e == "token"]
    assert steps == list(range(len(steps))) and steps
    rel = [d["step"] for _, e, d in evs if e == "relevance"]
    assert rel == ([] if generation.get("steps") == "none" else steps)
    gen = wait(client, job["job_id"])["result"]["generation"]
    if "top_k" not in generation:
        assert gen["new_tokens"][0][0] == "0"


def test_listed_steps_the_decode_never_reached_are_warned_of(client: httpx.Client) -> None:
    """Steps past an end-of-sequence token are not explained (the door cannot know where the
    decode ends): the result says which, where it said nothing. -1 is the last token
    generated, explained."""
    body = {"model": "tiny-lookup-lm", "inputs": {"text": "a3 c1 f9 h0 ? c"}}
    job = submit(client, {**body, "generation": {"steps": [0, -1, 7]}})
    result = wait(client, job["job_id"])["result"]
    done = len(result["generation"]["steps"])
    assert done < 8, "the lookup model answers, then ends"
    assert result["warnings"] == [
        f"generation.steps 7 not explained: the decode ended after {done} tokens, at an "
        "end-of-sequence token"
    ]
    assert len(result["generation"]["relevance_trace"]) == len({0, done - 1})
