"""A supervisor killed without a chance to stop its children (SIGKILL, the OOM killer):
its workers and its private redis-server end with it, instead of running on for good
beside whatever is started next (``service.lifeline``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis
import yaml

from service import store
from service.redis_server import PrivateRedis, free_port
from tests.chaos.test_stuck_workers import MODEL
from tests.helpers.stack import ROOT
from tests.service.test_supervisor import children, cmdline, state, until


@pytest.fixture()
def env(tmp_path: Path) -> Iterator[dict[str, str]]:
    (tmp_path / "registry.yaml").write_text(yaml.safe_dump({"models": [MODEL]}))
    yield {
        **{k: v for k, v in os.environ.items() if k != "REDIS_URL"},
        "BACKTRACE_REGISTRY": str(tmp_path / "registry.yaml"),
        "BACKTRACE_WARM_MODELS": "",
        "BACKTRACE_TORCH_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(ROOT),
    }


def orphaned_by_sigkill(
    command: list[str], env: dict[str, str], kinds: set[str], ready: Callable[[], bool]
) -> list[int]:
    """Start ``command``, wait for its children of ``kinds`` (words of their command
    lines) and for ``ready`` (its workers take jobs), SIGKILL it; returns those children's
    pids."""
    proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    try:

        def found() -> list[int]:
            kids = [p for p in children(proc.pid) if state(p) not in (None, "Z")]
            seen = {k for p in kids for k in kinds if any(k in w for w in cmdline(p))}
            return kids if seen == kinds else []

        until(ready, 300, "workers that take jobs", poll=0.5)
        kids = until(found, 30, f"children {kinds}", poll=0.2)
    finally:
        proc.kill()
        proc.wait(10)
    return kids


def all_gone(pids: list[int]) -> bool:
    return all(state(p) in (None, "Z") for p in pids)


def end_all(pids: list[int]) -> None:
    for pid in pids:
        if state(pid) not in (None, "Z"):
            os.kill(pid, signal.SIGKILL)


def test_workers_end_with_their_killed_supervisor(env: dict[str, str]) -> None:
    with PrivateRedis() as server:
        command = [sys.executable, "-m", "service", "worker", "--processes", "2"]
        command += ["--metrics-port", "0"]
        r = redis.Redis.from_url(server.url)

        def ready() -> bool:
            return sum(map(store.is_ready, store.live_workers(r))) == 2

        kids = orphaned_by_sigkill(command, {**env, "REDIS_URL": server.url}, {"worker"}, ready)
        try:
            until(lambda: all_gone(kids), 60, "the orphaned workers to end", poll=0.2)
        finally:
            end_all(kids)


def test_serve_all_in_one_leaves_nothing_behind_when_killed(env: dict[str, str]) -> None:
    port = free_port()
    command = [sys.executable, "-m", "service", "serve", "--all-in-one"]
    command += ["--port", str(port), "--metrics-port", "0", "--log-level", "warning"]

    def ready() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200
        except httpx.TransportError:
            return False

    kids = orphaned_by_sigkill(command, env, {"worker", "redis-server"}, ready)
    try:
        until(lambda: all_gone(kids), 60, "the worker and redis-server to end", poll=0.2)
    finally:
        end_all(kids)
