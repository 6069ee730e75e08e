"""docker-compose.yml: compose-spec schema, `docker compose config` where a compose CLI exists,
and the properties the issue asks for."""

import re
import subprocess

import pytest
import yaml
from deploy_helpers import DEPLOY, ROOT, run, tool

COMPOSE = ROOT / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _compose_cli() -> list[str] | None:
    docker = tool("docker")
    if docker:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True)
        if probe.returncode == 0:
            return [docker, "compose"]
    return None


def test_compose_spec_schema():
    checker = tool("check-jsonschema")
    if not checker:
        pytest.skip("check-jsonschema not installed (pip install check-jsonschema)")
    run([checker, "--builtin-schema", "vendor.compose-spec", str(COMPOSE)])


def test_docker_compose_config():
    cli = _compose_cli()
    if not cli:
        pytest.skip(
            "no `docker compose` plugin on this machine; the compose-spec schema "
            "test and the checks below cover the file"
        )
    run(
        [*cli, "-f", str(COMPOSE), "--profile", "gpu", "--profile", "tools", "config", "-q"],
        cwd=ROOT,
    )


def test_services(compose):
    services = compose["services"]
    assert {"redis", "api", "worker", "prometheus", "grafana", "rq-dashboard"} <= set(services)
    assert services["rq-dashboard"]["profiles"] == ["tools"]
    assert "gpu" in services["worker-gpu"]["profiles"]
    for name in ("redis", "api", "worker", "worker-gpu", "prometheus", "grafana"):
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"


def test_redis_never_evicts_and_keeps_an_aof(compose):
    cmd = " ".join(compose["services"]["redis"]["command"])
    assert re.search(r"--maxmemory-policy\s+noeviction", cmd)
    assert re.search(r"--appendonly\s+yes", cmd)
    assert any(v.endswith(":/data") for v in compose["services"]["redis"]["volumes"])


def _seconds(text: str) -> int:
    m = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", str(text))
    return int(m.group(1) or 0) * 60 + int(m.group(2) or 0)


def test_workers_outlive_the_job_timeout(compose):
    for name in ("worker", "worker-gpu"):
        svc = compose["services"][name]
        timeout = int(svc["environment"]["BACKTRACE_JOB_TIMEOUT"])
        assert _seconds(svc["stop_grace_period"]) > timeout
        assert svc["environment"]["WORKER_METRICS_PORT"] == "9101"
        assert svc["healthcheck"]["test"][-1].count(":9101/livez") == 1


def test_gpu_worker_reserves_a_gpu_and_builds_cuda(compose):
    svc = compose["services"]["worker-gpu"]
    assert svc["build"]["args"]["TORCH_VARIANT"].startswith("${BACKTRACE_CUDA_VARIANT:-cu")
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]


def test_bind_mounts_exist(compose):
    for name, svc in compose["services"].items():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("./"):
                assert (ROOT / src).exists(), f"{name}: {src} missing"


def test_grafana_is_provisioned(compose):
    vols = compose["services"]["grafana"]["volumes"]
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in vols
    prov = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/backtrace.yml").read_text())
    path = prov["providers"][0]["options"]["path"]
    assert f"./deploy/grafana/dashboards:{path}:ro" in vols
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert ds["datasources"][0]["uid"] == "prometheus"
    assert ds["datasources"][0]["url"] == "http://prometheus:9090"


def test_prometheus_mounts_its_config(compose):
    svc = compose["services"]["prometheus"]
    assert "./deploy/prometheus:/etc/prometheus:ro" in svc["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in svc["command"]
