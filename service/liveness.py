"""The supervisor's liveness probe of its worker processes, read from the heartbeats in
Redis (``service.supervisor`` kills what it names, then starts a replacement as for any
death). No torch.

A process is named when the reaper marked its worker stuck (a job it could not stop at its
timeout: ``service.reaper``), or when its heartbeat stopped while the process lives on: a
SIGSTOPped worker, or one hung with the GIL held. Both were left running for good, counted
by nothing and replaced by nothing; and a stopped worker that was resumed went on writing to
a job the reaper had already handed to another. Kubernetes does the same with a liveness
probe on the worker's container."""

from __future__ import annotations

import logging
import socket
import time

import redis

from . import store
from .reaper import STUCK

log = logging.getLogger("service.supervisor")


class HeartbeatProbe:
    """``probe(pids)``: the pids of these worker processes (on this host) to kill, each
    with why. A process that has not sent its first heartbeat yet is still starting and is
    left alone. A heartbeat counts as stopped only after ``grace`` seconds in which this
    probe ran and read Redis: a Redis outage, or a pause of this process (the machine
    stalled), restarts the count instead of killing workers that could not beat."""

    def __init__(self, redis_url: str, heartbeat_ttl: int, host: str | None = None):
        self.r = store.connect(redis_url)
        self.grace = 2 * heartbeat_ttl
        self.host = host or socket.gethostname()
        self.seen: dict[int, float] = {}
        self.last: float | None = None

    def __call__(self, pids: list[int]) -> dict[int, str]:
        now = time.monotonic()
        paused = self.last is not None and now - self.last > self.grace
        self.last = now
        try:
            names, stuck = self._read(pids)
        except redis.RedisError:
            paused = True
        if paused:  # no evidence either way: count from now
            self.seen = dict.fromkeys(pids, now)
            return {}
        self.seen = {pid: self.seen[pid] for pid in pids if pid in self.seen}
        self.seen.update(dict.fromkeys(names, now))
        verdicts = {pid: f"is stuck ({stuck[n]})" for pid, n in names.items() if n in stuck}
        for pid in set(self.seen) - set(names):
            if (silent := now - self.seen[pid]) > self.grace:
                verdicts[pid] = f"sent no heartbeat for {silent:.0f} s (hung or stopped)"
        return verdicts

    def _read(self, pids: list[int]) -> tuple[dict[int, str], dict[str, str]]:
        """The worker names of these pids with a live heartbeat, and the stuck marks of
        those names."""
        names = {}
        for info in store.live_workers(self.r):
            pid, name = info.get("pid"), str(info.get("name", ""))
            if pid in pids and name.startswith(f"{self.host}.{pid}."):
                names[pid] = name
        if not names:
            return names, {}
        marks = self.r.mget([STUCK.format(n) for n in names.values()])
        stuck = {
            n: m.decode(errors="replace") for n, m in zip(names.values(), marks, strict=True) if m
        }
        return names, stuck
