"""An operator's misconfiguration is one line at startup naming the setting or the registry
entry and field, the value and what is allowed: never a traceback, never a service that
starts and then fails every request. Each case here was a traceback (``int('abc')``, YAML's
parser, ``'list' object has no attribute 'get'``) or started a service that could not work
(a negative TTL, a limit of 0, two entries of one id, a misspelt ``models:`` key)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.client import Client, NotTheService
from service.config import SettingError, Settings
from service.redis_server import free_port
from service.registry import ModelSpec, Registry, RegistryError, load_registry
from tests.helpers import models as tiny_berts
from tests.helpers.stack import ROOT

ENTRY = "{id: a, task: text-classification, source: {kind: demo, name: minilm-sentiment}}"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"BACKTRACE_MAX_BATCH": "abc"}, "BACKTRACE_MAX_BATCH='abc' is not a whole number"),
        ({"BACKTRACE_MAX_BATCH": "0"}, "BACKTRACE_MAX_BATCH=0: must be a whole number of at least"),
        ({"BACKTRACE_RESULT_TTL": "-5"}, "BACKTRACE_RESULT_TTL=-5: must be a whole number of at"),
        ({"BACKTRACE_HEARTBEAT_TTL": "0"}, "BACKTRACE_HEARTBEAT_TTL=0: must be a whole number"),
        ({"BACKTRACE_SSE_KEEPALIVE": "x"}, "BACKTRACE_SSE_KEEPALIVE='x' is not a number"),
        ({"BACKTRACE_SSE_KEEPALIVE": "0"}, "BACKTRACE_SSE_KEEPALIVE=0.0: must be seconds above 0"),
        ({"WORKER_METRICS_PORT": "70000"}, "WORKER_METRICS_PORT=70000: must be a port"),
        ({"BACKTRACE_TORCH_THREADS": "many"}, "BACKTRACE_TORCH_THREADS='many' is not a whole"),
        (
            {"BACKTRACE_MEMORY_BUDGET": "lots"},
            "BACKTRACE_MEMORY_BUDGET='lots': must be auto, none, or a size such as",
        ),
        (
            {"REDIS_URL": "http://user:secret@redis:6379/0"},
            "REDIS_URL='http://user:***@redis:6379/0': must be a URL of redis://, rediss://",
        ),
    ],
)
def test_a_setting_that_cannot_work_is_named(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SettingError) as caught:
        Settings()
    assert str(caught.value).startswith(message), caught.value


def test_settings_that_work_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "BACKTRACE_MAX_QUEUE": "0",
        "BACKTRACE_MEMORY_BUDGET": "1.5GiB",
        "REDIS_URL": "unix:///run/redis.sock",
        "BACKTRACE_TORCH_THREADS": "2",
        "WORKER_METRICS_PORT": "0",
    }.items():
        monkeypatch.setenv(name, value)
    s = Settings()
    assert (s.max_queue, s.memory_budget, s.torch_threads, s.metrics_port) == (0, "1.5GiB", 2, 0)


def _registry(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "registry.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("models: [a: b", "not valid YAML at line 1 column 14: expected ',' or ']'"),
        ("", "the file is empty; it must be a mapping with one key, models: a list of entries"),
        ("- id: x\n", "the file is a list; it must be a mapping with one key, models"),
        ("{}", "no models key; it must be a mapping"),
        (f"modles:\n- {ENTRY}\n", "unknown key modles; it must be a mapping"),
        ("models: []", "models lists no entries; it must be a list of entries"),
        ("models: [7]", "models[0] is 7; an entry is a mapping"),
        (f"models:\n- {ENTRY}\n- {ENTRY}\n", "models[1] has id 'a', as models[0] has"),
        (
            "models:\n- {id: a, task: text-classification, source: {kind: demo}, bogus: 1}",
            "models[0] (id 'a'): bogus: unknown field; the fields: id, task, description",
        ),
        (
            "models:\n- {id: a, task: text-classification, source: {kind: demo, nme: x}}",
            "models[0] (id 'a'): source.nme: unknown field; the fields: kind, name, path",
        ),
        (
            "models:\n- {id: a, task: text-classification, source: {kind: demo}, "
            "limits: {max_tokens: 0}}",
            "models[0] (id 'a'): limits.max_tokens: 0: Input should be greater than or equal to 1",
        ),
        (
            "models:\n- {id: a, task: text-classification, source: {kind: demo}, "
            "limits: {max_new_tokens: -3}}",
            "limits.max_new_tokens: -3: Input should be greater than or equal to 1",
        ),
        (
            "models:\n- {id: a, task: image-classification, source: {kind: demo}, "
            "image: {channels: 3, mean: [0.5]}}",
            "models[0] (id 'a'): image: {'channels': 3, 'mean': [0.5]}: mean [0.5] and std "
            "[1.0, 1.0, 1.0]: need 3 values each (channels 3)",
        ),
        (
            "models:\n- {id: a, task: image-classification, source: {kind: demo}, "
            "image: {channels: 1, std: [0]}}",
            "std [0.0]: each value must be above 0",
        ),
        (
            "models:\n- {id: a, task: image-classification, source: {kind: demo}, "
            "image: {channels: 1, mode: RGB}}",
            "mode RGB gives 3 channels, not 1 (channels): give mode L",
        ),
        ("models:\n- {task: generation, source: {kind: demo}}", "models[0]: id: missing"),
        (
            "models:\n- {id: a, task: generation, source: {kind: transformers}}",
            "models[0] (id 'a'): source: {'kind': 'transformers'}: kind transformers needs "
            "path or hub_id",
        ),
        (
            "models:\n- {id: a, task: image-classification, source: {kind: torchvision, "
            "arch: resnet18}}",
            "source: {'kind': 'torchvision', 'arch': 'resnet18'}: kind torchvision needs weights",
        ),
        (
            "models:\n- {id: a, task: image-classification, source: {kind: torchvision, "
            "arch: resnet18, weights: w.safetensors, num_classes: 0}}",
            "source.num_classes: 0: Input should be greater than or equal to 1",
        ),
        (
            "models:\n- {id: a, task: generation, source: {kind: python, factory: mymodels}}",
            "source.factory: 'mymodels': String should match pattern",
        ),
        (
            "models:\n- {id: a, task: generation, source: {kind: demo}, device: gpu}",
            "models[0] (id 'a'): device 'gpu' is not one torch knows",
        ),
    ],
)
def test_a_registry_that_cannot_be_served_is_one_line(
    tmp_path: Path, text: str, message: str
) -> None:
    path = _registry(tmp_path, text)
    with pytest.raises(RegistryError) as caught:
        load_registry(path)
    said = str(caught.value)
    assert said.startswith(f"registry {path}: ") and message in said, said
    assert "\n" not in said


def test_a_missing_registry_file_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="BACKTRACE_REGISTRY='.*nowhere.yaml': cannot read"):
        load_registry(tmp_path / "nowhere.yaml")


def _command(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("BACKTRACE_")}
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        env={**environ, "REDIS_URL": "redis://127.0.0.1:1/0", **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("command", [["serve", "--port", "1"], ["worker", "--metrics-port", "0"]])
def test_the_commands_refuse_a_misconfiguration_before_starting(
    tmp_path: Path, command: list[str]
) -> None:
    """The API and the worker: exit status 1 and the reason on one line, before any port is
    bound or model loaded (a worker used to warm its models first)."""
    bad_setting = _command({"BACKTRACE_MAX_BATCH": "abc"}, *command)
    bad_registry = _command({"BACKTRACE_REGISTRY": str(_registry(tmp_path, "- a\n"))}, *command)
    for done, reason in [
        (bad_setting, "BACKTRACE_MAX_BATCH='abc' is not a whole number"),
        (bad_registry, "the file is a list"),
    ]:
        assert done.returncode == 1, done.stderr
        assert "Traceback" not in done.stderr
        (line,) = done.stderr.strip().splitlines()
        assert line.startswith(f"python -m service {command[0]}: ") and reason in line


class _Queued(BaseHTTPRequestHandler):
    """An API whose one job stays queued; ``/hang`` never answers."""

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self._reply(202, {"job_id": "q", "status": "queued", "task": "text-classification"})

    def do_GET(self) -> None:  # noqa: N802
        self._reply(200, {"job_id": "q", "status": "queued"})

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def queued_api() -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", 0), _Queued)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


@pytest.fixture
def silent_api() -> Iterator[str]:
    """A port that takes connections and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


def _run(url: str, *args: str) -> subprocess.CompletedProcess:
    return _command({}, "run", "--url", url, "--model", "m", "--text", "hi", *args)


def test_cli_run_past_its_timeout_is_one_line(queued_api: str) -> None:
    """A job still queued at ``--timeout`` was a traceback of the client's TimeoutError."""
    done = _run(queued_api, "--timeout", "0.5")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip() == "python -m service run: job q still queued after 0.5s"


def test_cli_run_against_a_server_that_never_answers(silent_api: str) -> None:
    """A server that takes the connection and never replies was reported as one that
    cannot be reached."""
    done = _run(silent_api)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip() == (
        f"python -m service run: no reply from {silent_api}/run_task in time: timed out"
    )


def test_a_stream_gives_up_on_a_server_gone_for_good() -> None:
    """``Client.stream`` reconnected to a server that was down forever, every half second."""
    client = Client(f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()
    with pytest.raises(httpx.ConnectError):
        list(client.stream_with_ids("j", give_up_s=1.0))
    assert time.monotonic() - started < 10


@pytest.fixture(scope="module")
def berts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_berts.build_folders(tmp_path_factory.mktemp("berts"))


def _load(tmp_path: Path, **entry: Any) -> None:
    from service.models import load_model

    spec = ModelSpec.model_validate({"id": "m", **entry})
    load_model(spec, Registry([spec], tmp_path), str(tmp_path))


def test_a_text_model_saved_without_its_tokenizer_is_refused(tmp_path: Path, berts: Path) -> None:
    """transformers made a tokenizer of BERT's special tokens alone from config.json, and
    the model served: every word was [UNK]."""
    from service.models import EntryError

    folder = tmp_path / "no-tokenizer"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(berts / "tiny-bert-text" / name, folder / name)
    source = {"kind": "transformers", "path": str(folder)}
    with pytest.raises(EntryError, match=rf"registry entry m: {folder} has no tokenizer files"):
        _load(tmp_path, task="text-classification", source=source)


def test_a_factory_of_the_wrong_type_is_named(tmp_path: Path) -> None:
    """It failed as "'int' object has no attribute 'model_id'"."""
    from service.models import EntryError

    with pytest.raises(EntryError) as caught:
        _load(
            tmp_path,
            task="tabular-classification",
            source={"kind": "python", "factory": "os:getpid"},
        )
    assert str(caught.value) == (
        "registry entry m: source.factory os:getpid returned int, not a service.models.LoadedModel"
    )


def test_labels_not_one_per_class_are_refused_at_load(tmp_path: Path, berts: Path) -> None:
    """A 2-class model registered with 3 labels served, offering a class it has not."""
    from service.models import EntryError

    source = {"kind": "transformers", "path": str(berts / "tiny-bert-text")}
    with pytest.raises(EntryError) as caught:
        _load(tmp_path, task="text-classification", source=source, labels=["a", "b", "c"])
    assert str(caught.value) == (
        "registry entry m: labels has 3 names, but the model has 2 classes (config.json); "
        "give one label per class, or none"
    )


def three_classes() -> Any:
    """A python source's model of 3 classes (its classes are known from its first capture)."""
    import torch

    from service.models import LoadedModel

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3)).eval()
    return LoadedModel("x", "tabular-classification", model, labels=["a", "b"])


def test_labels_not_one_per_class_are_refused_at_the_first_capture(tmp_path: Path) -> None:
    """A model whose classes only its output tells: a class past the labels was named by
    its index in the result. The model leaves the cache (no heartbeat counts it warm) and
    is reported as a failed load, which GET /models shows."""
    import torch

    from service.models import EntryError, ModelCache

    factory = "tests.service.test_operator_probe:three_classes"
    source = {"kind": "python", "factory": factory}
    spec = ModelSpec(id="m", task="tabular-classification", source=source)
    failures: list[tuple[str, str]] = []
    cache = ModelCache(
        Registry([spec], tmp_path),
        str(tmp_path),
        1 << 30,
        on_failure=lambda model_id, exc: failures.append((model_id, str(exc))),
    )
    entry, _ = cache.get(spec)
    message = (
        "registry entry m: labels has 2 names, but the model has 3 classes (its output is "
        "[None, 3]); give one label per class, or none"
    )
    with pytest.raises(EntryError) as caught:
        entry.backtrace({"input": torch.zeros(1, 4)})
    assert str(caught.value) == message
    assert cache.warm_ids() == [] and failures == [("m", message)]


def test_a_worker_without_redis_says_so_in_lines(tmp_path: Path) -> None:
    """Redis unreachable: the worker leaves with ``WorkerExit.TEMPFAIL`` (75) to be started
    again, each line of its log a sentence; the heartbeat's failure was a traceback."""
    registry = _registry(tmp_path, f"models:\n- {ENTRY}\n")
    env = {"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0", "BACKTRACE_REGISTRY": str(registry)}
    done = _command(env, "worker", "--metrics-port", "0", "--no-warm")
    assert done.returncode == 75, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert "RQ's loop ended on a Redis error (Error 111 connecting to" in done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["serve", "--port", "99999"], "argument --port: '99999': give a whole number from 1 to"),
        (["serve", "--all-in-one", "--workers", "0"], "argument --workers: '0': give a whole"),
        (["worker", "--metrics-port", "99999"], "argument --metrics-port: '99999': give a whole"),
        (["worker", "--max-jobs", "-1"], "argument --max-jobs: '-1': give a whole number of at"),
    ],
)
def test_options_out_of_range_are_usage_errors(args: list[str], message: str) -> None:
    """A port past 65535 was a traceback from bind() (the worker) or a server that never
    listened (the API); 0 workers a service never ready."""
    done = _command({}, *args)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert message in done.stderr.strip().splitlines()[-1]


def test_a_warm_model_the_registry_lacks_is_refused(tmp_path: Path) -> None:
    """Each worker logged "cannot warm" and came up without it."""
    registry = _registry(tmp_path, f"models:\n- {ENTRY}\n")
    env = {"BACKTRACE_REGISTRY": str(registry), "BACKTRACE_WARM_MODELS": "a,nope"}
    done = _command(env, "worker", "--metrics-port", "0")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip() == (
        "python -m service worker: BACKTRACE_WARM_MODELS='a,nope': 'nope' not in the "
        "registry; its ids: a"
    )


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("localhost:8000", "'localhost:8000': give the API's http:// or https:// URL"),
        ("http://[::1", "'http://[::1' is not a URL: Invalid port"),
    ],
)
def test_cli_run_a_url_that_is_none_is_a_usage_error(url: str, message: str) -> None:
    """httpx's InvalidURL was a traceback; a URL without its scheme was 'cannot reach'."""
    done = _run(url)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert f"argument --url: {message}" in done.stderr


def test_torchvision_weights_of_other_classes_name_num_classes(tmp_path: Path) -> None:
    """It was torch's report of many lines, in the job's error and in GET /models."""
    import torchvision
    from safetensors.torch import save_file

    from service.models import EntryError

    save_file(torchvision.models.resnet18(num_classes=3).state_dict(), tmp_path / "w.safetensors")
    source = {
        "kind": "torchvision",
        "arch": "resnet18",
        "weights": "w.safetensors",
        "num_classes": 5,
    }
    with pytest.raises(EntryError) as caught:
        _load(tmp_path, task="image-classification", source=source)
    assert str(caught.value) == (
        f"registry entry m: the weights file {tmp_path / 'w.safetensors'} does not fit "
        "torchvision resnet18 with num_classes 5: size mismatch for fc.weight: copying a param "
        "with shape torch.Size([3, 512]) from checkpoint, the shape in current model is "
        "torch.Size([5, 512]) (and 1 more)"
    )


def test_torchvision_entries_of_one_folder_have_their_own_revisions(tmp_path: Path) -> None:
    """A result's receipt names the weights that produced it: each entry's revision was
    the hash of the first .safetensors file of its weights' folder, so that every entry
    whose file shares the folder reported the first one's."""
    import torchvision
    from safetensors.torch import save_file

    from service.models import load_model

    revisions = {}
    for classes in (2, 3):
        save_file(
            torchvision.models.squeezenet1_1(num_classes=classes).state_dict(),
            tmp_path / f"squeeze-{classes}.safetensors",
        )
        source = {"kind": "torchvision", "arch": "squeezenet1_1", "num_classes": classes}
        source["weights"] = f"squeeze-{classes}.safetensors"
        spec = ModelSpec.model_validate({"id": f"s{classes}", "task": "image-classification",
                                         "source": source})  # fmt: skip
        revisions[classes] = load_model(spec, Registry([spec], tmp_path), str(tmp_path))[1]
    assert revisions[2] != revisions[3], revisions


def test_a_url_that_reaches_another_server_is_named() -> None:
    """A proxy's page with 200 was a JSONDecodeError traceback."""
    client = Client("http://service.test")
    page = httpx.Response(
        200, text="<html>Welcome to nginx!</html>", headers={"content-type": "text/html"}
    )
    client.http = httpx.Client(
        base_url="http://service.test", transport=httpx.MockTransport(lambda _: page)
    )
    with pytest.raises(NotTheService) as caught:
        client.submit({"model": "m"})
    assert str(caught.value) == (
        "POST http://service.test/run_task answered 200 with text/html, not the service's "
        "JSON: is this the backtrace API?"
    )


def test_a_worker_whose_metrics_port_is_taken_says_so(tmp_path: Path) -> None:
    """It was bind()'s traceback, at every restart of the supervisor."""
    registry = _registry(tmp_path, f"models:\n- {ENTRY}\n")
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        env = {"BACKTRACE_REGISTRY": str(registry)}
        done = _command(env, "worker", "--metrics-port", str(port), "--no-warm")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"worker: cannot serve /metrics and /livez on port {port}: Address already in use; "
        "set WORKER_METRICS_PORT or --metrics-port to a free port, or 0 for none"
    )


def test_build_demo_into_a_folder_it_cannot_write(tmp_path: Path) -> None:
    """It was a traceback from deep in the first model's build."""
    blocked = tmp_path / "file"
    blocked.write_text("")
    done = _command({}, "build-demo", "--out", str(blocked / "models"))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip() == (
        f"python -m service build-demo: cannot write to --out {blocked / 'models'}: Not a directory"
    )


def test_run_without_url_names_a_model_the_registry_lacks(tmp_path: Path) -> None:
    """``run`` warms its model in a private stack: a model the registry lacks is said before
    anything starts (the worker would refuse the warm id and the wait end unexplained)."""
    registry = _registry(tmp_path, f"models:\n- {ENTRY}\n")
    done = _command({"BACKTRACE_REGISTRY": str(registry)}, "run", "--model", "typo", "--text", "x")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip() == (
        "python -m service run: --model 'typo' is not in the registry; its ids: a"
    )
