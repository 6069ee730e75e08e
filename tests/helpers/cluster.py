"""The fault tests' own processes, apart from the session's shared stack: a redis-server
with the append-only file on (so it can be restarted on the same port with its data), worker
processes that tests kill, API processes, and SSE listeners that run in threads. The
``cluster`` fixture (tests/chaos/conftest.py) builds one per module."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

from service import store
from service.client import Client
from service.redis_server import free_port
from tests.helpers.stack import ROOT, start_api

HEARTBEAT_TTL = 3
# Stepwise generation without relevance: 64 token events over a few seconds, long enough to
# hit a worker mid-job and short enough to run again.
LONG_JOB = {
    "model": "gpt2-small-config",
    "inputs": {"text": "chaos"},
    "generation": {"max_new_tokens": 64, "path": "stepwise", "steps": "none"},
}
QUICK_JOB = {"model": "tiny-lookup-lm", "inputs": {"text": "a3 c1 f9 h0 ? c"}}


class AofRedis:
    """redis-server with appendonly and fsync on every write, on a fixed port and folder, so
    that ``restart`` brings back every acknowledged write."""

    def __init__(self, folder: Path):
        self.port, self.dir = free_port(), folder
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir)]
        args += ["--appendonly", "yes", "--appendfsync", "always", "--save", ""]
        args += ["--maxmemory-policy", "noeviction"]
        self.proc = subprocess.Popen(
            ["redis-server", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis.from_url(self.url).ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM: Redis finishes the append-only file and exits."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def restart(self) -> None:
        self.stop()
        self.start()


@dataclass
class Worker:
    proc: subprocess.Popen
    name: str  # RQ's and the heartbeat key's


@dataclass
class Cluster:
    redis: AofRedis
    env: dict[str, str]
    tmp: Path
    url: str = ""
    apis: list[subprocess.Popen] = field(default_factory=list)
    live: list[Worker] = field(default_factory=list)

    def r(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis.url)

    def api(self, **env: str) -> str:
        """Another API process with these settings; stopped with the cluster."""
        proc, url = start_api({**self.env, **env}, self.tmp / "api.log")
        self.apis.append(proc)
        return url

    def workers(self, n: int, timeout: float = 300) -> list[Worker]:
        """Exactly n live workers: extra ones are killed, missing ones started together
        (returned once each takes jobs: warming three models, gpt2's capture among them,
        takes minutes on a loaded 2-core machine)."""
        alive = [w for w in self.live if w.proc.poll() is None]
        for w in alive[n:]:
            self.kill(w)
        alive = alive[:n]
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "service", "worker", "--metrics-port", "0"],
                env=self.env,
                cwd=ROOT,
                stdout=open(self.tmp / "workers.log", "a"),  # noqa: SIM115
                stderr=subprocess.STDOUT,
            )
            for _ in range(n - len(alive))
        ]
        deadline = time.monotonic() + timeout
        while len(names := self.heartbeats({p.pid for p in procs})) < len(procs):
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError("workers did not start: " + self.log_tail())
            time.sleep(0.2)
        self.live = alive + [Worker(p, names[p.pid]) for p in procs]
        return self.live

    def heartbeats(self, pids: set[int]) -> dict[int, str]:
        """Worker names by pid, from the live heartbeat keys of these processes that take
        jobs (a worker's heartbeat says ``warming`` while it loads its models)."""
        infos = store.live_workers(self.r())
        return {i["pid"]: i["name"] for i in infos if i["pid"] in pids and store.is_ready(i)}

    def kill(self, worker: Worker) -> None:
        """SIGKILL, as the OOM killer or a node failure would."""
        if worker.proc.poll() is None:
            worker.proc.kill()
        worker.proc.wait(10)

    def log_tail(self) -> str:
        logs = [self.tmp / "workers.log", self.tmp / "api.log"]
        return "\n".join(p.read_text()[-3000:] for p in logs if p.exists())


class Listener:
    """An SSE client of one job in a thread (service.client, reconnecting with
    Last-Event-ID), collecting (event, data, id) until a terminal event."""

    def __init__(self, url: str, job_id: str):
        self.events: list[tuple[str, dict[str, Any], str]] = []
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(url, job_id), daemon=True)
        self._thread.start()

    def _run(self, url: str, job_id: str) -> None:
        try:
            for item in Client(url).stream_with_ids(job_id):
                self.events.append(item)
        except BaseException as exc:  # noqa: BLE001 - reported by names()/join()
            self.error = exc

    def wait_for(self, event: str, timeout: float = 60, count: int = 1) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            seen = [d for e, d, _ in self.events if e == event]
            if len(seen) >= count:
                return seen[count - 1]
            if self.error is not None or not self._thread.is_alive():
                break
            time.sleep(0.02)
        raise AssertionError(f"no {event!r} #{count}: {self.names()} {self.error!r}")

    def join(self, timeout: float) -> list[str]:
        """The event names, once the stream has ended (fails if it is still open)."""
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"stream still open after {timeout}s: {self.names()}"
        assert self.error is None, self.error
        return self.names()

    def names(self) -> list[str]:
        return [e for e, _, _ in self.events]


def submit(url: str, body: dict[str, Any]) -> str:
    """The new job's id (a cluster's API is reached by URL, with no shared client)."""
    resp = httpx.post(f"{url}/run_task", json=body, timeout=30)
    assert resp.status_code == 202, resp.text
    return resp.json()["job_id"]
