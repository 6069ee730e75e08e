"""Dynamic batching (``service.batching``) through the real stack: classification jobs that
queue up behind a running job are run by the worker as one engine batch per model and
parameters, and each gets exactly the result it gets when it runs alone."""

from __future__ import annotations

import time

import httpx
import numpy as np
import redis

from service import codec
from tests.helpers.inputs import digit_b64
from tests.helpers.jobs import submit, wait

# Holds the only worker while the jobs under test queue up behind it; canceled afterwards.
BLOCKER = {
    "model": "gpt2-small-config",
    "inputs": {"text": "hold the worker"},
    "generation": {"max_new_tokens": 64, "path": "stepwise", "steps": "none"},
}
TEXTS = [
    "good",
    "the plot was thin but the acting was wonderful and the music even better",
    "terrible, just terrible",
]


def _bodies() -> list[dict]:
    json_out = {"encoding": "json"}
    images = [
        {"model": "digits-cnn", "inputs": {"image": digit_b64(i)}, "output": json_out}
        for i in range(4)
    ]
    texts = [
        {"model": "minilm-sentiment", "inputs": {"text": t}, "output": json_out} for t in TEXTS
    ]
    return images + texts


def _behind_blocker(client: httpx.Client, bodies: list[dict]) -> list[str]:
    blocker = submit(client, BLOCKER)["job_id"]
    deadline = time.monotonic() + 120
    while client.get(f"/jobs/{blocker}").json()["status"] != "started":
        assert time.monotonic() < deadline, "the blocker never started"
        time.sleep(0.02)
    ids = [submit(client, b)["job_id"] for b in bodies]
    assert client.delete(f"/jobs/{blocker}").status_code == 202
    return ids


def test_queued_jobs_run_as_one_batch_with_the_results_they_get_alone(
    client: httpx.Client, stack
) -> None:
    bodies = _bodies()
    batched = [wait(client, j) for j in _behind_blocker(client, bodies)]
    assert all(v["status"] == "finished" for v in batched), batched
    sizes = [v["result"]["timings"]["batch"]["jobs"] for v in batched]
    assert sizes == [4] * 4 + [3] * 3, "one batch per model"
    r = redis.Redis.from_url(stack.redis_url)
    # RQ's own record agrees: at once for the jobs that the worker took out of the queue
    # itself, and for the job RQ handed out once the worker ends it in RQ (it first waits
    # up to service.jobs.BATCH_WAIT_S for more of its group)
    deadline = time.monotonic() + 10
    while {r.hget(f"rq:job:{v['job_id']}", "status") for v in batched} != {b"finished"}:
        assert time.monotonic() < deadline, "RQ's record never says finished"
        time.sleep(0.02)
    assert not r.hlen("bt:claims"), "claims are released"

    alone = [wait(client, submit(client, b)["job_id"]) for b in bodies]
    assert [v["result"]["timings"]["batch"]["jobs"] for v in alone] == [1] * len(bodies)
    for b, a in zip(batched, alone, strict=True):
        rb, ra = b["result"], a["result"]
        assert rb["predictions"] == ra["predictions"] or np.allclose(
            rb["predictions"][0]["logits"], ra["predictions"][0]["logits"], atol=1e-4
        )
        ib, ia = rb["inputs"][0], ra["inputs"][0]
        assert ib.get("tokens") == ia.get("tokens"), "padding is not part of the result"
        xb, xa = codec.decode(ib["relevance"]), codec.decode(ia["relevance"])
        assert xb.shape == xa.shape
        np.testing.assert_allclose(xb, xa, rtol=1e-4, atol=1e-4 * np.abs(xa).max())
        np.testing.assert_allclose(
            rb["conservation"]["inputs"], ra["conservation"]["inputs"], rtol=1e-4
        )
