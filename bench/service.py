"""``python -m bench.service``: start the service on loopback (private redis-server, worker
processes, the API under uvicorn) and drive it with concurrent clients; prints JSON.

Each request is timed from POST /run_task to the ``done`` event on its SSE stream (so no
polling interval inflates it). ``overhead_*`` is that end-to-end time minus the engine's own
time for the job (``timings.engine_s`` measured in the worker around ``run_task``): HTTP,
validation, enqueue, queue wait, dequeue, input preparation, result encoding and delivery.

The same clients also time the floor (``bench.floor``: the bare enqueue, pop, stream and relay
a job needs), in turns with the service; ``overhead_vs_floor`` is our overhead p50 over the
floor's p50, a figure that carries across machines where milliseconds do not."""

from __future__ import annotations

import argparse
import base64
import http.client
import itertools
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench import floor as bench_floor
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
            for event, data, _ in parse_sse(sse_lines(resp)):
                if event in ("done", "error", "canceled"):
                    if event != "done":
                        raise RuntimeError(f"{event}: {data}")
                    return data
            raise RuntimeError("the event stream ended without a terminal event")
        finally:
            resp.read()  # the server ends the stream after the terminal event


def sse_lines(resp: http.client.HTTPResponse) -> Iterator[str]:
    """The lines of an event stream as they arrive, from whatever the socket has (``read1``)
    split at once: ``readline`` parses the chunked encoding in Python once per line, which
    made a stream's lines cost the load generator about 4 us each (our streams have 13 lines
    to the floor's 3: 30 us of the client's CPU per request, taken from the service)."""
    rest = b""
    while chunk := resp.read1(1 << 16):
        *lines, rest = (rest + chunk).split(b"\n")
        for raw in lines:
            yield raw.decode().rstrip("\r")
    if rest:
        yield rest.decode().rstrip("\r")


def one(client: LeanClient, body: bytes) -> tuple[float, float, float, int, float]:
    """(end-to-end s, engine s, queue wait s, jobs in the engine batch, POST answered s) for
    one request; the timings come with the ``done`` event."""
    t0 = time.perf_counter()
    done, accepted = client.run(body)
    e2e = time.perf_counter() - t0
    timings = done["timings"]
    batch = timings.get("batch", {}).get("jobs", 1)
    return e2e, timings["engine_s"], timings["queue_wait_s"] or 0.0, batch, accepted


def parse_args() -> argparse.Namespace:
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
    p.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="the service and the floor take turns this many times, so that a change in the "
        "machine's load during the run weighs on both alike",
    )
    return p.parse_args()


def start_service(a: argparse.Namespace, redis_url: str, port: int) -> list[subprocess.Popen]:
    """Worker processes and the API (last) on ``port``, as ``python -m service`` runs them."""
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "HF_HUB_OFFLINE": "1",
        "BACKTRACE_WARM_MODELS": a.model,
        "PYTHONPATH": str(ROOT),
        "BACKTRACE_TORCH_THREADS": str(a.torch_threads),
    }
    env.pop("BACKTRACE_REGISTRY", None)
    worker = [sys.executable, "-m", "service", "worker", "--metrics-port", "0"]
    return [
        subprocess.Popen(
            cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        for cmd in [worker] * a.workers + [api_command(port)]
    ]


Result = tuple[float, float, float, int, float]


class Target:
    """One side of the comparison (the service or the floor): its port, its processes'
    pids, and what its timed requests gave, accumulated over the rounds."""

    def __init__(self, port: int, pids: dict[str, int]):
        self.port, self.pids = port, pids
        self.results: list[Result | Exception] = []
        self.wall = 0.0
        self.cpu = dict.fromkeys(pids, 0.0)

    def timed(self, drive: Callable[[int, int], list[Result | Exception]], n: int) -> None:
        """``n`` requests, with the wall time and each process's CPU time they took."""
        cpu0 = {k: cpu_seconds(v) for k, v in self.pids.items()}
        t0 = time.perf_counter()
        self.results += drive(self.port, n)
        self.wall += time.perf_counter() - t0
        for k, v in self.pids.items():
            self.cpu[k] += cpu_seconds(v) - cpu0[k]

    def ok(self) -> list[Result]:
        """The requests that ended ``done``; none at all ends the run with the first error."""
        ok = [r for r in self.results if not isinstance(r, Exception)]
        if not ok:
            raise SystemExit(f"every request to port {self.port} failed: {self.results[0]!r}")
        return ok


def ms(seconds: float) -> float:
    return round(1000 * seconds, 2)


def floor_summary(floor: Target) -> dict:
    ok = floor.ok()
    e2e = [r[0] for r in ok]
    return {
        "errors": len(floor.results) - len(ok),
        "p50_ms": ms(statistics.median(e2e)),
        "p99_ms": ms(pct(e2e, 99)),
        "throughput_rps": round(len(ok) / floor.wall, 1),
        "cpu_ms_per_request": {k: ms(v / len(floor.results)) for k, v in floor.cpu.items()},
    }


def summary(a: argparse.Namespace, service: Target, floor: Target) -> dict:
    ok = service.ok()
    e2e = [r[0] for r in ok]
    over = [r[0] - r[1] for r in ok]
    floor_figures = floor_summary(floor)
    return {
        "requests": a.requests,
        "concurrency": a.concurrency,
        "workers": a.workers,
        "model": a.model,
        "torch_threads": a.torch_threads,
        "flow": "streaming POST" if a.stream_post else "POST, then GET events",
        "errors": len(service.results) - len(ok),
        "p50_ms": ms(statistics.median(e2e)),
        "p99_ms": ms(pct(e2e, 99)),
        "throughput_rps": round(len(ok) / service.wall, 1),
        "engine_p50_ms": ms(statistics.median(r[1] for r in ok)),
        "queue_wait_p50_ms": ms(statistics.median(r[2] for r in ok)),
        "overhead_p50_ms": ms(statistics.median(over)),
        "batch_jobs_mean": round(statistics.mean(r[3] for r in ok), 2),
        "post_answered_p50_ms": ms(statistics.median(r[4] for r in ok)),
        "overhead_p99_ms": ms(pct(over, 99)),
        # without the time spent waiting behind other jobs for the worker:
        "overhead_excl_queue_p50_ms": ms(statistics.median(r[0] - r[1] - r[2] for r in ok)),
        "cpus": os.cpu_count(),
        "cpu_ms_per_request": {k: ms(v / a.requests) for k, v in service.cpu.items()},
        # The same clients through the bare path (bench.floor), in turns with the service:
        "floor": floor_figures,
        "overhead_vs_floor": round(statistics.median(over) / (floor_figures["p50_ms"] / 1000), 2),
    }


def compare(a: argparse.Namespace, service: Target, floor: Target) -> None:
    """Warm both up, then the service and the floor take ``a.rounds`` turns of equal size."""
    body = json.dumps(body_for(a.model)).encode()
    local = threading.local()

    turns = itertools.count()

    def run(port: int, turn: int) -> Result | Exception:
        # New connections for each turn: the side that waited has had its idle keep-alive
        # connections closed by uvicorn (timeout_keep_alive, 5 s) in the meantime.
        clients = local.__dict__.setdefault("clients", {})
        if clients.get(port, (None,))[0] != turn:
            if port in clients:
                clients[port][1].conn.close()
            clients[port] = (turn, LeanClient(port, a.stream_post))
        try:
            return one(clients[port][1], body)
        except Exception as exc:  # noqa: BLE001 - counted as an error
            return exc

    with ThreadPoolExecutor(a.concurrency) as pool:

        def drive(port: int, n: int) -> list[Result | Exception]:
            turn = next(turns)
            return list(pool.map(lambda _: run(port, turn), range(n)))

        for target in (service, floor):
            drive(target.port, a.warmup)  # loads the model, captures its graph
        sizes = [a.requests // a.rounds + (i < a.requests % a.rounds) for i in range(a.rounds)]
        for n in sizes:
            for target in (service, floor):
                target.timed(drive, n)


def main() -> None:
    a = parse_args()
    redis_server = PrivateRedis()
    port, floor_port = free_port(), free_port()
    procs = start_service(a, redis_server.url, port)
    floor_procs = bench_floor.start(redis_server.url, floor_port)
    try:
        try:
            Client(f"http://127.0.0.1:{port}").wait_ready(timeout=600, processes=procs)
            Client(f"http://127.0.0.1:{floor_port}").wait_ready(60, processes=floor_procs)
        except (RuntimeError, TimeoutError) as exc:
            raise SystemExit(f"service or floor did not start: {exc}") from exc
        # Where the machine's CPU goes per request, by process, over the timed requests:
        # on a shared machine this, not the wall clock, says what each part costs.
        shared = {"redis": redis_server.proc.pid, "client": os.getpid()}
        workers = {f"worker{i}": pr.pid for i, pr in enumerate(procs[:-1])}
        service = Target(port, {"api": procs[-1].pid, **shared, **workers})
        floor_pids = {"api": floor_procs[1].pid, **shared, "consumer": floor_procs[0].pid}
        floor = Target(floor_port, floor_pids)
        compare(a, service, floor)
        print(json.dumps(summary(a, service, floor), indent=1))
    finally:
        for pr in procs + floor_procs:
            pr.terminate()
        for pr in procs + floor_procs:
            pr.wait(30)
        redis_server.stop()


if __name__ == "__main__":
    main()
