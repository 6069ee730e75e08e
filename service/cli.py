"""``python -m service serve|worker|run|build-demo``.

``serve --all-in-one`` is the one-command start on one machine: a private redis-server when
REDIS_URL is unset, worker process(es) restarted when they die (service.supervisor), and the
API on port 8000 with the demo registry. ``worker --processes N`` supervises N workers the same
way. ``run`` is one request end to end (against --url, or a throwaway all-in-one stack): it
prints the result and writes the heatmap. A reply of 4xx/5xx or an unreachable server ends a
command with the reason on one line and exit status 1, not a traceback."""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import redis

from .client import JobFailed, NotTheService, ServiceExited
from .config import SettingError, Settings
from .lifeline import end_with_parent
from .liveness import HeartbeatProbe
from .registry import RegistryError
from .supervisor import Supervisor, describe_exit
from .vocabulary import Event, JobStatus, WorkerExit

log = logging.getLogger("service")


def _settings(**overrides: Any) -> Settings:
    s = Settings()
    return dataclasses.replace(s, **{k: v for k, v in overrides.items() if v is not None})


def api_command(port: int) -> list[str]:
    """The command that starts the API alone on ``port`` (for tools that run it as a child)."""
    return [sys.executable, "-m", "service", "serve", "--port", str(port), "--log-level", "warning"]


def worker_command(metrics_port: int, *options: str) -> list[str]:
    """The command of one worker process (a supervised child) with its /metrics port; it
    ends when this process, its supervisor, dies (``--parent-pid``)."""
    return [
        sys.executable,
        "-m",
        "service",
        "worker",
        "--metrics-port",
        str(metrics_port),
        "--parent-pid",
        str(os.getpid()),
        *options,
    ]


class Stack:
    """Redis (private unless REDIS_URL is set) and N supervised worker processes (a dead one is
    restarted: service.supervisor), stopped together."""

    def __init__(self, workers: int = 1, metrics_port: int = 9101, warm: str | None = None):
        from .redis_server import PrivateRedis, free_port

        self.redis = None
        self._stopped = threading.Event()
        url = os.environ.get("REDIS_URL")
        if not url:
            self.redis = PrivateRedis()
            url = self.redis.url
            log.info("private redis-server at %s", url)
        self.url = url
        env = {**os.environ, "REDIS_URL": url, "HF_HUB_OFFLINE": "1"}
        if warm is not None:
            env["BACKTRACE_WARM_MODELS"] = warm
        options = ["--no-warm"] if warm == "" else []
        commands = [
            worker_command(metrics_port + i if metrics_port else free_port(), *options)
            for i in range(workers)
        ]
        self.workers = Supervisor(commands, env=env, probe=worker_probe(url)).start().watch()
        if self.redis is not None:
            threading.Thread(target=self._keep_redis, name="redis", daemon=True).start()

    def _keep_redis(self, every: float = 1.0) -> None:
        """Start the private redis-server again, on its port, when it dies (the OOM killer, a
        crash). Nothing else did: the API answered 503 and the workers waited for good.
        Its data is gone (no persistence): open streams end with an error saying so, and
        the workers reconnect by themselves."""
        server = self.redis
        assert server is not None
        while not self._stopped.wait(every):
            if server.proc.poll() is None:
                continue
            how = describe_exit(server.proc.returncode)
            log.error("private redis-server %s; starting it again", how)
            try:
                server.start()
            except RuntimeError:
                log.exception("could not start redis-server again")

    def stop(self) -> None:
        self.workers.stop()
        self._stopped.set()  # after the workers: they keep Redis until their jobs end
        if self.redis is not None:
            self.redis.stop()

    def wind_down(self) -> None:
        """Before the API drains its streams: stop the workers (each finishes its running job
        within the supervisor's grace, so its clients get its ending), then, with a private
        Redis, which is gone once the service stops, end every job left unfinished as
        failed, saying so. Before, the API drained first: clients of a running job were told
        to reconnect to a service that was stopping, and queued jobs vanished with the
        private Redis, their streams ended without a final event."""
        self.workers.stop()
        if self.redis is None:  # a shared Redis keeps the queued jobs for the next workers
            return
        from . import reaper, store

        why, ttl = "the service stopped before the job ended", Settings().result_ttl
        try:
            ended = reaper.end_unfinished(store.connect(self.url), why, ttl)
        except redis.RedisError:
            log.warning("could not end the unfinished jobs", exc_info=True)
            return
        if ended:
            log.warning("ended %d unfinished jobs as failed: the service stops", len(ended))


def cmd_serve(a: argparse.Namespace) -> None:
    from .api import create_app
    from .api.server import Server

    stack = None
    if a.all_in_one:
        # uvicorn re-raises SIGTERM after its graceful shutdown; turn it into SystemExit so
        # the finally below still stops the workers and the private redis-server.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        stack = Stack(a.workers, a.metrics_port)
        os.environ["REDIS_URL"] = stack.url
    try:
        settings = _settings(redis_url=os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0")
        Server(
            create_app(settings),
            before_drain=stack.wind_down if stack is not None else None,
            host=a.host,
            port=a.port,
            log_level=a.log_level,
            access_log=a.log_level == "debug",
        ).run()
    finally:
        if stack is not None:
            stack.stop()


def cmd_worker(a: argparse.Namespace) -> None:
    """One worker in this process (a container's), or with --processes N a supervisor of N.
    A worker does not start while Redis refuses writes for want of memory: it says so in
    one line and exits with ``WorkerExit.TEMPFAIL`` before loading torch or any model, and its
    supervisor (or the kubelet) starts it again after a growing delay. Started anyway, it
    warmed its models (a minute and more on a small machine, past the supervisor's
    ``healthy_s``, which reset the delay to 1 s), then RQ's first write failed it, with a
    traceback from each thread: every restart cost a warm-up, at full CPU, for good."""
    if a.processes is not None:
        supervise_workers(a)
        return
    if a.parent_pid is not None and not end_with_parent(a.parent_pid):
        sys.exit(f"worker: its supervisor (pid {a.parent_pid}) is gone")
    url = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
    if (why := redis_full(url)) is not None:
        log.error(
            "worker: not starting: Redis is out of memory (%s); exit for a later restart", why
        )
        sys.exit(WorkerExit.TEMPFAIL)
    from .worker import run_worker

    settings = _settings(redis_url=url)
    run_worker(
        settings,
        burst=a.burst,
        max_jobs=a.max_jobs,
        metrics_port=a.metrics_port,
        warm=() if a.no_warm else None,
    )


# A key the check of ``redis_full`` writes (and Redis drops within a second).
WRITABLE = "bt:writable"


def redis_full(url: str) -> str | None:
    """Redis's refusal when it is out of memory (maxmemory reached, noeviction: writes
    refused), or None: it takes a write, or it cannot be reached (a worker rides that out
    with its own retries, as before)."""
    r = redis.Redis.from_url(url, socket_connect_timeout=5)
    try:
        r.set(WRITABLE, b"", ex=1)
    except redis.exceptions.OutOfMemoryError as exc:
        return str(exc).rstrip(".")
    except redis.RedisError:
        return None
    finally:
        r.close()
    return None


def supervise_workers(a: argparse.Namespace) -> None:
    """N worker children with consecutive /metrics ports (none with --metrics-port 0),
    restarted when they die, stopped on SIGTERM or SIGINT."""
    port = Settings().metrics_port if a.metrics_port is None else a.metrics_port
    options = ["--no-warm"] if a.no_warm else []
    if a.max_jobs is not None:
        options += ["--max-jobs", str(a.max_jobs)]
    commands = [worker_command(port + i if port else 0, *options) for i in range(a.processes)]
    url = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
    Supervisor(commands, probe=worker_probe(url)).start().run_until_signal()


def worker_probe(redis_url: str) -> HeartbeatProbe:
    """The supervisor's liveness probe of workers on ``redis_url`` (``service.liveness``)."""
    return HeartbeatProbe(redis_url, Settings().heartbeat_ttl)


def cmd_build_demo(a: argparse.Namespace) -> None:
    """Build every demo model into --out and write --out/registry.yaml pointing at them
    (relative paths, so the folder can be copied into an image)."""
    from .demo import DEMO_IDS, ensure_built
    from .registry import DEMO_REGISTRY, dump_registry

    out = Path(a.out)
    try:  # an --out that cannot be written was a traceback from deep in the first build
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".writable"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        sys.exit(f"python -m service build-demo: cannot write to --out {out}: {exc.strerror}")
    entries = []
    for model_id in DEMO_IDS:
        started = time.monotonic()
        ensure_built(model_id, out)
        took = time.monotonic() - started
        print(f"built {model_id} -> {out / model_id} ({took:.1f} s)", flush=True)
    for entry in DEMO_REGISTRY:
        entries.append({**entry, "source": {**entry["source"], "path": entry["id"]}})
    (out / "registry.yaml").write_text(dump_registry(entries))
    print(f"wrote {out / 'registry.yaml'}")


def cmd_run(a: argparse.Namespace) -> None:
    from .client import Client

    inputs: dict[str, Any]
    if a.image:
        inputs = {"image": a.image}
    elif a.features:
        inputs = {"features": a.features}
    else:
        inputs = {"text": a.text}
    if a.text_pair is not None:  # sent whatever the first input is: the API says what fits
        inputs["text_pair"] = a.text_pair
    body: dict[str, Any] = {"model": a.model, "inputs": inputs}
    if a.max_new_tokens:
        body["generation"] = {"max_new_tokens": a.max_new_tokens}
    stack, server = None, None
    url = a.url
    if url is None:
        from .redis_server import free_port

        stack = Stack(1, 0, warm=a.model)
        port = free_port()
        env = {**os.environ, "REDIS_URL": stack.url}
        server = subprocess.Popen(api_command(port), env=env)
        url = f"http://127.0.0.1:{port}"
    try:
        client = Client(url)
        if stack is not None:
            client.wait_ready(timeout=600, processes=[server, *stack.workers.procs])
        if not run_job(client, body, a):
            sys.exit(1)
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)
        if stack is not None:
            stack.stop()


def run_job(client: Any, body: dict[str, Any], a: argparse.Namespace) -> bool:
    """Submit, stream a generation's tokens to stderr, print the result, write the heatmap;
    whether the job finished."""
    from .client import ServiceError

    job = client.submit(body)
    if job.get("task") == "generation":
        for event, data in client.stream(job["job_id"]):
            if event == Event.TOKEN:
                print(data["text"][0], end="", flush=True, file=sys.stderr)
        print(file=sys.stderr)
    view = client.wait(job["job_id"], timeout=a.timeout)
    print(json.dumps(view, indent=1) if a.json else summary(view))
    if view["status"] != JobStatus.FINISHED:
        return False
    if a.out:
        try:
            Path(a.out).write_bytes(client.heatmap(job["job_id"]))
            print(f"heatmap: {a.out}", file=sys.stderr)
        except ServiceError as exc:
            print(f"no heatmap: {exc}", file=sys.stderr)
    return True


def _image(path: str) -> str:
    """--image: the file as base64 (argparse reports a missing file as a usage error)."""
    try:
        return base64.b64encode(Path(path).read_bytes()).decode()
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {exc.strerror}") from None


def _whole(least: int, most: int | None = None) -> Callable[[str], int]:
    """An option's whole number from ``least`` to ``most``: argparse reports another as a
    usage error (a port of 99999 was a traceback from bind(), 0 workers a service never
    ready)."""
    span = f"from {least} to {most}" if most is not None else f"of at least {least}"

    def whole(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < least or (most is not None and value > most):
            raise argparse.ArgumentTypeError(f"{text!r}: give a whole number {span}")
        return value

    return whole


def _url(text: str) -> str:
    """--url: http(s)://host[:port][/prefix] (httpx's InvalidURL was a traceback; a URL
    without its scheme was "cannot reach" with a protocol named after the host)."""
    try:
        url = httpx.URL(text)
    except httpx.InvalidURL as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a URL: {exc}") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give the API's http:// or https:// URL, e.g. http://127.0.0.1:8000"
        )
    return text


def _numbers(text: str) -> list[float]:
    """--features: comma-separated numbers."""
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not comma-separated numbers: {text!r}") from None


def summary(view: dict[str, Any]) -> str:
    """A few readable lines: the prediction or generated text, relevance per token."""
    from . import codec

    if view["status"] != JobStatus.FINISHED:
        return f"{view['status']}: {(view.get('error') or {}).get('message')}"
    res = view["result"]
    lines = [f"job {view['job_id']} finished ({res['task']})"]
    for pred, item in zip(res.get("predictions", []), res.get("inputs", []), strict=False):
        lines.append(f"prediction: {pred['label']} ({pred['score']:.3f})")
        if item.get("tokens") and "relevance" in item:
            rel = codec.decode(item["relevance"])
            lines.append(
                "relevance: "
                + " ".join(
                    f"{t}:{v:+.1f}" for t, v in zip(item["tokens"], rel.tolist(), strict=False)
                )
            )
    lines += [_found(item) for item in res.get("inputs", []) if "seeds" in item]
    if "generation" in res:
        g = res["generation"]
        lines.append(f"generated: {g['text'][0]!r} tokens {g['new_tokens'][0]}")
    t = res.get("timings", {})
    lines.append(
        f"timings: total {t.get('total_s', 0):.3f}s, engine {t.get('engine_s', 0):.3f}s, "
        f"cache {t.get('cache')}"
    )
    return "\n".join(lines)


def _found(item: dict[str, Any]) -> str:
    """What a token task found in one text: each token's label, or the answer span."""
    if "answer_span" in item:
        start, end = item["answer_span"]
        answer = item.get("answer") or " ".join(map(str, item["answer_tokens"]))
        return f"answer: {answer} (tokens {start} to {end})"
    tokens = [str(t) for t in item.get("tokens") or item.get("token_ids", [])]
    return "labels: " + " ".join(
        f"{t}:{lab}" for t, lab in zip(tokens, item["labels"], strict=False)
    )


def _configured(model: str | None = None) -> None:
    """The settings and the registry they name, read before any process or port is
    started: ``SettingError`` or ``RegistryError`` for one that cannot be served, or
    ``BACKTRACE_WARM_MODELS`` naming a model the registry lacks (each worker logged it and
    warmed nothing in its place, so the first job of the model meant to be warm paid the
    load)."""
    from .registry import load_registry

    settings = Settings()
    registry = load_registry(settings.registry_path)
    if model is not None and registry.get(model) is None:  # run's private stack warms it
        raise RegistryError(
            f"--model {model!r} is not in the registry; its ids: {', '.join(registry.models)}"
        )
    unknown = [m for m in settings.warm_models if registry.get(m) is None]
    if unknown:
        raise SettingError(
            f"BACKTRACE_WARM_MODELS={','.join(settings.warm_models)!r}: "
            f"{', '.join(map(repr, unknown))} not in the registry; its ids: "
            f"{', '.join(registry.models)}"
        )


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    p = argparse.ArgumentParser(prog="python -m service")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="the HTTP API (and, with --all-in-one, redis + workers)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=_whole(1, 65535), default=8000)
    s.add_argument(
        "--all-in-one",
        action="store_true",
        help="also start redis-server (when REDIS_URL is unset) and workers",
    )
    s.add_argument("--workers", type=_whole(1), default=1)
    s.add_argument(
        "--metrics-port", type=_whole(0, 65535), default=9101, help="first worker's /metrics"
    )
    s.add_argument("--log-level", default="info")
    s.set_defaults(fn=cmd_serve)
    w = sub.add_parser("worker", help="an RQ SimpleWorker with a model cache")
    w.add_argument(
        "--metrics-port",
        type=_whole(0, 65535),
        default=None,
        help="/metrics port (WORKER_METRICS_PORT, 9101); 0 for none",
    )
    w.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    w.add_argument("--max-jobs", type=_whole(1), default=None, help="exit after N jobs (recycling)")
    w.add_argument("--no-warm", action="store_true", help="load models on first use only")
    w.add_argument(
        "--parent-pid",
        type=int,
        default=None,
        help="end (after the running job) when this process, the worker's supervisor, dies",
    )
    w.add_argument(
        "--processes",
        type=_whole(1),
        default=None,
        help="supervise N worker processes (restarted when they die; metrics ports from "
        "--metrics-port on)",
    )
    w.set_defaults(fn=cmd_worker)
    b = sub.add_parser("build-demo", help="build the demo models and their registry.yaml")
    b.add_argument("--out", default="var/models")
    b.set_defaults(fn=cmd_build_demo)
    r = sub.add_parser("run", help="one request end to end; prints the result")
    r.add_argument("--model", required=True)
    r.add_argument("--text", default=None, help="the text (a question-answering's question)")
    r.add_argument(
        "--text-pair",
        default=None,
        help="the second text of a pair with --text (inputs.text_pair): a question-answering "
        "model's context, a sentence-pair classifier's second sentence",
    )
    r.add_argument("--image", type=_image, default=None, help="path to a PNG or JPEG")
    r.add_argument("--features", type=_numbers, default=None, help="comma-separated numbers")
    r.add_argument("--max-new-tokens", type=_whole(1), default=None)
    r.add_argument(
        "--url", type=_url, default=None, help="a running API (default: start a private one)"
    )
    r.add_argument("--out", default="heatmap.png")
    r.add_argument("--timeout", type=float, default=600)
    r.add_argument("--json", action="store_true", help="print the whole job view as JSON")
    r.set_defaults(fn=cmd_run)
    a = p.parse_args(argv)
    if a.cmd == "worker" and a.processes is not None and (a.burst or a.processes < 1):
        p.error("worker --processes takes N >= 1 and cannot be combined with --burst")
    try:
        if a.cmd in ("serve", "worker"):
            _configured()
        elif a.cmd == "run" and a.url is None:
            _configured(a.model)
        a.fn(a)
    except (SettingError, RegistryError) as exc:  # before anything started: one line
        sys.exit(f"{p.prog} {a.cmd}: {exc}")
    except httpx.HTTPStatusError as exc:  # the server's message (service.client.ServiceError)
        sys.exit(f"{p.prog} {a.cmd}: {exc}")
    except httpx.TimeoutException as exc:
        if isinstance(exc, httpx.ConnectTimeout):
            sys.exit(f"{p.prog} {a.cmd}: cannot reach {exc.request.url}: {exc}")
        sys.exit(f"{p.prog} {a.cmd}: no reply from {exc.request.url} in time: {exc}")
    except httpx.TransportError as exc:
        sys.exit(f"{p.prog} {a.cmd}: cannot reach {exc.request.url}: {exc}")
    except (TimeoutError, JobFailed, NotTheService, ServiceExited) as exc:  # the client's own
        sys.exit(f"{p.prog} {a.cmd}: {exc}")
