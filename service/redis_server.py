"""A private ``redis-server`` for one machine runs and for tests, when REDIS_URL is unset."""

from __future__ import annotations

import functools
import os
import shutil
import socket
import subprocess
import tempfile
import time

import redis

from .lifeline import ending_with


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateRedis:
    """Start ``redis-server`` on a free loopback port with no persistence and noeviction (an
    evicted RQ key is a lost job); ``stop()`` (or leaving the with-block) ends it."""

    def __init__(self, port: int | None = None):
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server not found: install Redis or set REDIS_URL")
        self.exe, self.port = exe, port or free_port()
        self.dir = tempfile.mkdtemp(prefix="backtrace-redis-")
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.start()

    def start(self) -> None:
        """Start the server on its port and wait until it answers (10 s at most)."""
        self.proc = subprocess.Popen(
            [
                self.exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--maxmemory-policy",
                "noeviction",
                "--dir",
                self.dir,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # its own process group: a terminal's Ctrl-C reaches the service, which stops its
            # workers first and this server last (stop()), so workers never lose Redis mid-job
            process_group=0,
            # and it ends with the service, also one killed without a chance to stop it
            preexec_fn=functools.partial(ending_with, os.getpid()),
        )
        deadline = time.time() + 10
        while True:
            try:
                redis.Redis.from_url(self.url).ping()
                break
            except redis.ConnectionError:
                if time.time() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PrivateRedis:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
