"""``python -m bench.service``: start the service on loopback (private redis-server, worker
processes, the API under uvicorn) and drive it with concurrent clients; prints JSON.

Each request is timed from POST /run_task to the ``done`` event on its SSE stream (so no
polling interval inflates it). ``overhead_*`` is that end-to-end time minus the engine's own
time for the job (``timings.engine_s`` measured in the worker around ``run_task``): HTTP,
validation, enqueue, queue wait, dequeue, input preparation, result encoding and delivery."""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from service.cli import api_command
from service.client import Client, parse_sse
from service.redis_server import PrivateRedis, free_port

ROOT = Path(__file__).resolve().parents[1]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def body_for(model: str) -> dict:
    if model == "digits-cnn":
        from service.demo.digits import sample_png

        return {"model": model, "inputs": {"image": base64.b64encode(sample_png(0)).decode()}}
    return {"model": model, "inputs": {"text": "the movie was wonderful"}}


class LeanClient:
    """One keep-alive connection with the standard library's ``http.client``: the load
    generator shares the machine with the service, and httpx costs about three times the
    CPU per request, which would be taken from the service under test."""

    def __init__(self, port: int, stream_post: bool = False):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        self.stream_post = stream_post

    def run(self, body: bytes) -> tuple[dict, float]:
        """Submit a job and wait for it; returns the ``done`` data and the seconds until the
        POST's answer (202, or the stream's headers) came back."""
        t0 = time.perf_counter()
        if not self.stream_post:
            job_id = self.submit(body)
            accepted = time.perf_counter() - t0
            return self.wait(job_id), accepted
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        self.conn.request("POST", "/run_task", body, headers)
        resp = self.conn.getresponse()
        accepted = time.perf_counter() - t0
        return self._follow(resp), accepted

    def submit(self, body: bytes) -> str:
        self.conn.request("POST", "/run_task", body, {"Content-Type": "application/json"})
        resp = self.conn.getresponse()
        payload = resp.read()
        if resp.status != 202:
            raise RuntimeError(f"POST /run_task: {resp.status} {payload[:200]!r}")
        return json.loads(payload)["job_id"]

    def wait(self, job_id: str) -> dict:
        """Follow the job's SSE stream to its terminal event; returns the ``done`` data."""
        self.conn.request("GET", f"/jobs/{job_id}/events")
        return self._follow(self.conn.getresponse())

    def _follow(self, resp: http.client.HTTPResponse) -> dict:
        try:
            lines = (raw.decode().rstrip("\r\n") for raw in iter(resp.readline, b""))
            for event, data, _ in parse_sse(lines):
                if event in ("done", "error", "canceled"):
                    if event != "done":
                        raise RuntimeError(f"{event}: {data}")
                    return data
            raise RuntimeError("the event stream ended without a terminal event")
        finally:
            resp.read()  # the server ends the stream after the terminal event


def one(client: LeanClient, body: bytes) -> tuple[float, float, float, int, float]:
    """(end-to-end s, engine s, queue wait s, jobs in the engine batch, POST answered s) for
    one request; the timings come with the ``done`` event."""
    t0 = time.perf_counter()
    done, accepted = client.run(body)
    e2e = time.perf_counter() - t0
    timings = done["timings"]
    batch = timings.get("batch", {}).get("jobs", 1)
    return e2e, timings["engine_s"], timings["queue_wait_s"] or 0.0, batch, accepted


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.service")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--model", default="digits-cnn")
    p.add_argument("--warmup", type=int, default=10)
    # One intra-op thread per worker: the API, the worker and the clients share the machine's
    # cores, and a second torch thread only spins against them for a model this small.
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument(
        "--stream-post",
        action="store_true",
        help="one request per job (POST with Accept: text/event-stream) instead of POST, then "
        "GET /jobs/{id}/events",
    )
    a = p.parse_args()

    redis_server = PrivateRedis()
    port = free_port()
    env = {
        **os.environ,
        "REDIS_URL": redis_server.url,
        "HF_HUB_OFFLINE": "1",
        "BACKTRACE_WARM_MODELS": a.model,
        "PYTHONPATH": str(ROOT),
        "BACKTRACE_TORCH_THREADS": str(a.torch_threads),
    }
    env.pop("BACKTRACE_REGISTRY", None)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "service", "worker", "--metrics-port", "0"],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(a.workers)
    ]
    procs.append(
        subprocess.Popen(
            api_command(port),
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    )
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            Client(url).wait_ready(timeout=600, processes=procs)
        except (RuntimeError, TimeoutError) as exc:
            raise SystemExit(f"service did not start: {exc}") from exc
        body = json.dumps(body_for(a.model)).encode()
        local = threading.local()

        def run(_: int) -> tuple[float, float, float, int, float] | Exception:
            if not hasattr(local, "client"):
                local.client = LeanClient(port, a.stream_post)
            try:
                return one(local.client, body)
            except Exception as exc:  # noqa: BLE001 - counted as an error
                return exc

        # Where the machine's CPU goes per request, by process, over the timed requests:
        # on a shared machine this, not the wall clock, says what each part costs.
        pids = {"api": procs[-1].pid, "redis": redis_server.proc.pid, "client": os.getpid()}
        pids.update({f"worker{i}": pr.pid for i, pr in enumerate(procs[:-1])})
        with ThreadPoolExecutor(a.concurrency) as pool:
            list(pool.map(run, range(a.warmup)))  # loads the model, captures its graph
            cpu0 = {k: cpu_seconds(v) for k, v in pids.items()}
            t0 = time.perf_counter()
            results = list(pool.map(run, range(a.requests)))
            wall = time.perf_counter() - t0
            cpu = {k: cpu_seconds(v) - cpu0[k] for k, v in pids.items()}
        ok = [r for r in results if not isinstance(r, Exception)]
        e2e = [r[0] for r in ok]
        over = [r[0] - r[1] for r in ok]
        print(
            json.dumps(
                {
                    "requests": a.requests,
                    "concurrency": a.concurrency,
                    "workers": a.workers,
                    "model": a.model,
                    "torch_threads": a.torch_threads,
                    "flow": "streaming POST" if a.stream_post else "POST, then GET events",
                    "errors": len(results) - len(ok),
                    "p50_ms": round(1000 * statistics.median(e2e), 2),
                    "p99_ms": round(1000 * pct(e2e, 99), 2),
                    "throughput_rps": round(len(ok) / wall, 1),
                    "engine_p50_ms": round(1000 * statistics.median(r[1] for r in ok), 2),
                    "queue_wait_p50_ms": round(1000 * statistics.median(r[2] for r in ok), 2),
                    "overhead_p50_ms": round(1000 * statistics.median(over), 2),
                    "batch_jobs_mean": round(statistics.mean(r[3] for r in ok), 2),
                    "post_answered_p50_ms": round(1000 * statistics.median(r[4] for r in ok), 2),
                    "overhead_p99_ms": round(1000 * pct(over, 99), 2),
                    # without the time spent waiting behind other jobs for the worker:
                    "overhead_excl_queue_p50_ms": round(
                        1000 * statistics.median(r[0] - r[1] - r[2] for r in ok), 2
                    ),
                    "cpus": os.cpu_count(),
                    "cpu_ms_per_request": {
                        k: round(1000 * v / a.requests, 2) for k, v in cpu.items()
                    },
                },
                indent=1,
            )
        )
    finally:
        for pr in procs:
            pr.terminate()
        for pr in procs:
            pr.wait(30)
        redis_server.stop()


if __name__ == "__main__":
    main()
