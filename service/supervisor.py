"""Keep N worker processes alive on one machine (``serve --all-in-one``, ``worker --processes``).

Without it a worker killed by the OOM killer stayed a zombie of the API process, nothing was
logged, and new jobs stayed queued until someone started a worker by hand. The supervisor
waits for every child it started (so none stays a zombie), logs how each one ended, and starts
a replacement after a backoff: 1 s, doubling up to 30 s while workers keep dying young, back
to 1 s once one has lived 60 s. A child that exits with status 0 ended on purpose (``--max-jobs``
recycling) and is replaced at once. The job a dead worker held is the reaper's business
(``service.reaper``): retried or failed as before.

Children run in their own process group, so a terminal's Ctrl-C reaches only the supervisor,
which stops each child once: SIGTERM (RQ's warm shutdown lets a running job finish), then
SIGKILL for what is still alive after the grace period. A liveness ``probe`` names children
that live but do not work (``service.liveness``: a stopped heartbeat, a worker stuck in a job
past its timeout): they are killed, then replaced. On Kubernetes there is no supervisor: one
worker per container, restarted by the kubelet. No torch."""

from __future__ import annotations

import logging
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO

log = logging.getLogger("service.supervisor")


# A liveness probe: given the pids of the live children, those to kill, each with why.
Probe = Callable[[list[int]], dict[int, str]]


@dataclass(frozen=True)
class Backoff:
    """Restart delays: ``first``, doubled after each early death up to ``limit``; back to
    ``first`` once a child has lived ``healthy_s``."""

    first: float = 1.0
    limit: float = 30.0
    healthy_s: float = 60.0


@dataclass
class Child:
    """One supervised slot: its command, its current process, and when to restart it."""

    command: list[str]
    delay: float
    proc: subprocess.Popen | None = None
    started: float = 0.0
    restart_at: float | None = None


def describe_exit(returncode: int) -> str:
    """'killed by SIGKILL' or 'exited with status 1' (Popen's negative codes are signals)."""
    if returncode >= 0:
        return f"exited with status {returncode}"
    try:
        return f"killed by {signal.Signals(-returncode).name}"
    except ValueError:
        return f"killed by signal {-returncode}"


class Supervisor:
    """Start one process per command, and restart each one that dies until ``stop``."""

    def __init__(
        self,
        commands: Sequence[Sequence[str]],
        env: Mapping[str, str] | None = None,
        name: str = "worker",
        backoff: Backoff = Backoff(),
        output: IO | None = None,
        probe: Probe | None = None,
        probe_every: float = 2.0,
    ):
        self.children = [Child(list(c), backoff.first) for c in commands]
        self.env, self.name, self.backoff, self.output = env, name, backoff, output
        self.probe, self.probe_every, self._probed = probe, probe_every, 0.0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def procs(self) -> list[subprocess.Popen]:
        """The current process of each slot (a dead one until its restart)."""
        return [c.proc for c in self.children if c.proc is not None]

    def start(self) -> Supervisor:
        with self._lock:
            for child in self.children:
                self._spawn(child)
        return self

    def check(self) -> None:
        """One round: wait for the children that exited (no zombies), log how they ended,
        and restart those whose backoff has passed; then, every ``probe_every`` seconds,
        kill the live children that the liveness probe names (the next round restarts
        them as any other death)."""
        self._restart()
        self._probe()

    def _restart(self) -> None:
        with self._lock:
            now = time.monotonic()
            for child in self.children:
                if self._stopping.is_set():
                    return
                if child.restart_at is None and child.proc and child.proc.poll() is not None:
                    self._schedule(child, now)
                if child.restart_at is not None and now >= child.restart_at:
                    self._spawn(child)

    def _probe(self) -> None:
        """Ask the probe about the live children, outside the lock (it may wait on I/O);
        a probe that fails kills nothing."""
        now = time.monotonic()
        if self.probe is None or now - self._probed < self.probe_every:
            return
        self._probed = now
        live = {c.proc.pid: c.proc for c in self.children if c.proc and c.proc.poll() is None}
        try:
            verdicts = self.probe(list(live))
        except Exception:  # noqa: BLE001 - supervision goes on without the probe's verdict
            log.warning("liveness probe failed", exc_info=True)
            return
        for pid, reason in verdicts.items():
            if pid in live and not self._stopping.is_set():
                log.error("%s %d %s: killing it", self.name, pid, reason)
                live[pid].kill()

    def watch(self, interval: float = 0.5) -> Supervisor:
        """``check`` every ``interval`` seconds in a daemon thread until ``stop`` (beside
        uvicorn in ``serve --all-in-one``)."""

        def loop() -> None:
            while not self._stopping.wait(interval):
                self.check()

        self._thread = threading.Thread(target=loop, name="supervisor", daemon=True)
        self._thread.start()
        return self

    def run_until_signal(self, interval: float = 0.5) -> None:
        """In the foreground (``worker --processes``): ``check`` every ``interval`` seconds
        until SIGTERM or SIGINT, then ``stop``."""
        received: list[int] = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, _: received.append(signum))
        while not received:
            self.check()
            time.sleep(interval)
        log.info(
            "%s: stopping %d %ss", signal.Signals(received[0]).name, len(self.children), self.name
        )
        self.stop()

    def stop(self, grace: float = 30.0) -> None:
        """No more restarts; SIGTERM each live child once, SIGKILL those still alive after
        ``grace`` seconds, and wait for all of them."""
        with self._lock:
            self._stopping.set()
            live = [c.proc for c in self.children if c.proc and c.proc.poll() is None]
        for proc in live:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in live:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s %d still running after %.0f s: SIGKILL", self.name, proc.pid, grace)
                proc.kill()
                proc.wait()
            log.info("%s %d stopped (%s)", self.name, proc.pid, describe_exit(proc.returncode))
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _schedule(self, child: Child, now: float) -> None:
        proc = child.proc
        assert proc is not None
        lived = now - child.started
        if lived >= self.backoff.healthy_s:
            child.delay = self.backoff.first
        delay = 0.0 if proc.returncode == 0 else child.delay
        alive = sum(1 for c in self.children if c.proc and c.proc.poll() is None)
        log.warning(
            "%s %d %s after %.1f s; restarting in %.1f s (%d of %d alive)",
            self.name,
            proc.pid,
            describe_exit(proc.returncode),
            lived,
            delay,
            alive,
            len(self.children),
        )
        child.restart_at = now + delay
        if delay:
            child.delay = min(self.backoff.limit, child.delay * 2)

    def _spawn(self, child: Child) -> None:
        child.proc = subprocess.Popen(
            child.command,
            env=self.env,
            stdout=self.output,
            stderr=subprocess.STDOUT if self.output is not None else None,
            process_group=0,
        )
        child.started, child.restart_at = time.monotonic(), None
        log.info("%s %d started", self.name, child.proc.pid)
