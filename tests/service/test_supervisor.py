"""Supervised workers (issue 17): a worker that dies is reaped, logged and replaced.

The unit tests supervise cheap commands (``sleep``, ``sh``); the end-to-end test SIGKILLs the
worker of ``python -m service serve --all-in-one`` and sees a new one take the next job."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import yaml

from service.client import Client
from service.redis_server import PrivateRedis, free_port
from service.registry import DEMO_REGISTRY
from service.supervisor import Backoff, Supervisor
from service.vocabulary import JobStatus
from tests.helpers.inputs import blank_png_b64
from tests.helpers.stack import ROOT

SLEEP = ["sleep", "60"]


def state(pid: int) -> str | None:
    """The process's state letter from /proc ('Z' for a zombie), None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return None
    return re.search(r"^State:\s+(\S)", text, re.M).group(1)


def until(cond: Callable[[], object], timeout: float, what: str, poll: float = 0.05) -> object:
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(poll)
    return value


def delays(caplog: pytest.LogCaptureFixture) -> list[float]:
    """The restart delays the supervisor logged, in order."""
    found = [re.search(r"restarting in ([\d.]+) s", r.getMessage()) for r in caplog.records]
    return [float(m.group(1)) for m in found if m]


@pytest.fixture
def supervisors() -> Iterator[list[Supervisor]]:
    made: list[Supervisor] = []
    yield made
    for s in made:
        s.stop(grace=2)


def test_a_killed_child_is_reaped_logged_and_replaced(supervisors, caplog) -> None:
    caplog.set_level(logging.INFO, "service.supervisor")
    sup = Supervisor([SLEEP, SLEEP], backoff=Backoff(first=0.1)).start().watch(interval=0.05)
    supervisors.append(sup)
    victim, other = sup.procs
    victim.kill()
    new = until(lambda: sup.procs[0] is not victim and sup.procs[0], 5, "a replacement")
    assert new.poll() is None and sup.procs[1] is other
    assert state(victim.pid) is None  # waited for: no zombie left behind
    assert f"worker {victim.pid} killed by SIGKILL" in caplog.text
    assert "restarting in 0.1 s (1 of 2 alive)" in caplog.text
    sup.stop(grace=5)
    assert [p.returncode for p in (new, other)] == [-signal.SIGTERM] * 2
    time.sleep(0.3)
    assert state(new.pid) is None and state(other.pid) is None  # stopped ones stay stopped


def test_backoff_doubles_while_children_die_young_and_resets_after_a_healthy_run(
    supervisors, caplog
) -> None:
    caplog.set_level(logging.INFO, "service.supervisor")
    crash = Supervisor([["sh", "-c", "exit 3"]], backoff=Backoff(0.1, 0.4, healthy_s=60))
    supervisors.append(crash.start().watch(interval=0.01))
    until(lambda: len(delays(caplog)) >= 5, 10, "five restarts")
    crash.stop()
    assert delays(caplog)[:5] == [0.1, 0.2, 0.4, 0.4, 0.4]
    assert "exited with status 3" in caplog.text
    caplog.clear()
    healthy = Supervisor([["sh", "-c", "sleep 0.3; exit 1"]], backoff=Backoff(0.1, 1, 0.2))
    supervisors.append(healthy.start().watch(interval=0.01))
    until(lambda: len(delays(caplog)) >= 3, 10, "three restarts")
    healthy.stop()
    assert delays(caplog)[:3] == [0.1] * 3


def test_a_clean_exit_is_recycled_at_once(supervisors, caplog) -> None:
    """Status 0 is a worker that ended on purpose (--max-jobs): no backoff."""
    caplog.set_level(logging.INFO, "service.supervisor")
    sup = Supervisor([["true"]], backoff=Backoff(first=5)).start().watch(interval=0.01)
    supervisors.append(sup)
    until(lambda: len(delays(caplog)) >= 3, 5, "three restarts")
    assert set(delays(caplog)) == {0.0}


def test_stop_kills_a_child_that_ignores_sigterm(tmp_path: Path, supervisors) -> None:
    ready = tmp_path / "ready"
    stubborn = ["sh", "-c", f"trap '' TERM; touch {ready}; sleep 60"]
    sup = Supervisor([stubborn]).start()
    supervisors.append(sup)
    until(ready.exists, 5, "the child's trap")
    started = time.monotonic()
    sup.stop(grace=0.5)
    assert sup.procs[0].returncode == -signal.SIGKILL
    assert time.monotonic() - started < 5


def test_worker_processes_stops_its_children_on_sigterm() -> None:
    """The foreground loop of ``worker --processes``: SIGTERM stops every child and exits 0."""
    code = (
        "import logging; logging.basicConfig(level=logging.INFO)\n"
        "from service.supervisor import Supervisor\n"
        "Supervisor([['sleep', '60']] * 2).start().run_until_signal(interval=0.05)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, stderr=subprocess.PIPE, text=True
    )
    kids = until(lambda: len(children(proc.pid)) == 2 and children(proc.pid), 10, "2 children")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "SIGTERM: stopping 2 workers" in err
    assert all(state(pid) is None for pid in kids)


def children(pid: int) -> list[int]:
    """The child pids of ``pid`` (Linux /proc)."""
    pids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        pids += [int(p) for p in (task / "children").read_text().split()]
    return pids


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().split("\0")
    except FileNotFoundError:
        return []


def worker_pid(server: subprocess.Popen) -> int | None:
    """The live worker child of ``serve --all-in-one`` (its other child is redis-server)."""
    for pid in children(server.pid):
        if "worker" in cmdline(pid) and state(pid) not in (None, "Z"):
            return pid
    return None


def digit_job() -> dict:
    return {"model": "digits-cnn", "inputs": {"image": blank_png_b64(16, 16)}}


@pytest.fixture
def all_in_one(tmp_path: Path) -> Iterator[tuple[subprocess.Popen, Client, Path]]:
    """``serve --all-in-one`` with its own private redis-server and the digits model only."""
    registry = tmp_path / "registry.yaml"
    models = [m for m in DEMO_REGISTRY if m["id"] == "digits-cnn"]
    registry.write_text(yaml.safe_dump({"models": models}))
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env |= {
        "BACKTRACE_REGISTRY": str(registry),
        "BACKTRACE_DATA_DIR": os.environ.get("BACKTRACE_DATA_DIR", str(ROOT / "var" / "models")),
        "BACKTRACE_HEARTBEAT_TTL": "3",
        "BACKTRACE_TORCH_THREADS": "1",
        "PYTHONPATH": str(ROOT),
    }
    port, log = free_port(), tmp_path / "serve.log"
    command = [sys.executable, "-m", "service", "serve", "--all-in-one", "--port", str(port)]
    command += ["--metrics-port", "0", "--log-level", "warning"]
    with open(log, "w") as out:
        server = subprocess.Popen(command, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    family = []
    try:
        client = Client(f"http://127.0.0.1:{port}")
        client.wait_ready(timeout=300, processes=[server])
        family = children(server.pid)
        yield server, client, log
    finally:
        family += children(server.pid) if server.poll() is None else []
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(60)
        finally:
            for pid in family:  # nothing may outlive the test, whatever happened
                if state(pid) not in (None, "Z"):
                    os.kill(pid, signal.SIGKILL)


def test_all_in_one_replaces_a_killed_worker(all_in_one) -> None:
    server, client, log = all_in_one
    assert client.run(digit_job(), timeout=120)["predictions"]
    old = until(lambda: worker_pid(server), 10, "the worker child")
    os.kill(old, signal.SIGKILL)
    new = until(lambda: (pid := worker_pid(server)) != old and pid, 60, "a new worker")
    until(lambda: state(old) is None, 10, "the dead worker to be reaped")  # no zombie
    until(lambda: client.http.get("/readyz").json().get("workers") == 1, 120, "its heartbeat")
    view = client.wait(client.submit(digit_job())["job_id"], timeout=120)
    assert view["status"] == JobStatus.FINISHED, view
    assert new == worker_pid(server)
    assert f"worker {old} killed by SIGKILL" in log.read_text()
    server.send_signal(signal.SIGTERM)
    server.wait(60)
    assert state(new) is None, "serve left its worker running"
    assert server.returncode == 0, log.read_text()[-3000:]


def test_workers_wait_out_a_full_redis_with_one_line_a_restart() -> None:
    """Redis out of memory (maxmemory reached, noeviction): a supervised worker does not
    start, saying why in one line, before torch or any model loads; the supervisor starts
    it again after 1, 2, 4 s. It warmed its models first, then died on RQ's first write
    with tracebacks, and a warm-up past a minute reset the delay to 1 s at every restart."""
    with PrivateRedis() as server:
        r = redis.Redis.from_url(server.url)
        r.set("filler", b"x" * 1000)
        r.config_set("maxmemory", 1)
        env = {**os.environ, "REDIS_URL": server.url, "PYTHONPATH": str(ROOT)}
        command = [sys.executable, "-m", "service", "worker", "--processes", "1"]
        proc = subprocess.Popen(
            [*command, "--metrics-port", "0"],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        lines: list[str] = []
        try:
            while sum("restarting in" in x for x in lines) < 3 and (line := proc.stdout.readline()):
                lines.append(line)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=60)
    why = "not starting: Redis is out of memory (command not allowed when used memory > "
    assert sum(why in x for x in lines) == sum(" started" in x for x in lines) == 3, lines
    ends = [
        re.search(r"exited with status (\d+) after [\d.]+ s; restarting in (\S+) s", x)
        for x in lines
    ]
    assert [m.groups() for m in ends if m] == [("75", "1.0"), ("75", "2.0"), ("75", "4.0")]
    assert not any("Traceback" in x for x in lines), "".join(lines)
