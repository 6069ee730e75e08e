"""deploy/k8s: every resource validated offline against the Kubernetes schemas that
kubernetes-validate ships, the KEDA ScaledObject against tests/deploy/schemas, and the links
between the manifests (names, ports, queue, grace period)."""

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from deploy_helpers import K8S, load_all

kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
jsonschema = pytest.importorskip("jsonschema")

VERSIONS = ["1.28.0", "1.37.0"]
CRDS = {("keda.sh/v1alpha1", "ScaledObject"): "keda-scaledobject.json"}
SCHEMAS = Path(__file__).parent / "schemas"
MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def resources() -> list[tuple[str, dict]]:
    return [(p.name, d) for p in MANIFESTS for d in load_all(p)]


def find(kind: str, name: str) -> dict:
    for _, d in resources():
        if d["kind"] == kind and d["metadata"]["name"] == name:
            return d
    raise AssertionError(f"no {kind}/{name} in deploy/k8s")


@pytest.mark.parametrize("version", VERSIONS)
def test_resources_validate_against_kubernetes_schemas(version):
    checked = 0
    for fname, doc in resources():
        if (doc["apiVersion"], doc["kind"]) in CRDS:
            continue
        try:
            kv.validate(doc, version, strict=True)
        except Exception as e:  # noqa: BLE001 - report which file and resource failed
            pytest.fail(f"{fname} {doc['kind']}/{doc['metadata']['name']}: {e}")
        checked += 1
    assert checked >= 9


def test_validator_rejects_mistakes():
    doc = find("Deployment", "backtrace-worker")
    bad = json.loads(json.dumps(doc))
    bad["spec"]["template"]["spec"]["terminationGracePeriod"] = 660
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, VERSIONS[-1], strict=True)


def test_crds_validate_against_local_schemas():
    found = 0
    for _fname, doc in resources():
        schema_file = CRDS.get((doc["apiVersion"], doc["kind"]))
        if schema_file:
            schema = json.loads((SCHEMAS / schema_file).read_text())
            jsonschema.validate(doc, schema)
            found += 1
    assert found == 1


def test_keda_schema_rejects_mistakes():
    schema = json.loads((SCHEMAS / "keda-scaledobject.json").read_text())
    so = find("ScaledObject", "backtrace-worker")
    bad = json.loads(json.dumps(so))
    bad["spec"]["triggers"][0]["metadata"]["listLength"] = 2  # must be a string
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    bad = json.loads(json.dumps(so))
    bad["spec"]["triggers"][0]["metadata"]["list_name"] = "x"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_kustomization_lists_every_manifest():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kust["resources"]) == sorted(p.name for p in MANIFESTS)


def config() -> dict:
    return find("ConfigMap", "backtrace-config")["data"]


def test_worker_requests_a_gpu_and_outlives_the_job_timeout():
    spec = find("Deployment", "backtrace-worker")["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["resources"]["requests"]["nvidia.com/gpu"] == 1
    timeout = int(config()["BACKTRACE_JOB_TIMEOUT"])
    assert spec["terminationGracePeriodSeconds"] > timeout


def test_keda_scales_the_worker_on_the_rq_queue():
    so = find("ScaledObject", "backtrace-worker")["spec"]
    assert so["scaleTargetRef"]["name"] == "backtrace-worker"
    (trigger,) = so["triggers"]
    assert trigger["type"] == "redis"
    assert trigger["metadata"]["listName"] == f"rq:queue:{config()['BACKTRACE_QUEUE']}"
    redis_host = config()["REDIS_URL"].split("//")[1].split("/")[0]
    assert trigger["metadata"]["address"] == redis_host
    assert so["cooldownPeriod"] > int(config()["BACKTRACE_JOB_TIMEOUT"])


def test_redis_never_evicts():
    conf = find("ConfigMap", "backtrace-redis-config")["data"]["redis.conf"].split("\n")
    assert "maxmemory-policy noeviction" in conf
    assert "appendonly yes" in conf
    svc = find("Service", "backtrace-redis")
    assert config()["REDIS_URL"].startswith(f"redis://{svc['metadata']['name']}.")


def test_pods_reference_existing_configmaps_and_scrape_their_ports():
    configmaps = {d["metadata"]["name"] for _, d in resources() if d["kind"] == "ConfigMap"}
    for name in ("backtrace-api", "backtrace-worker"):
        tpl = find("Deployment", name)["spec"]["template"]
        for v in tpl["spec"].get("volumes", []):
            if "configMap" in v:
                assert v["configMap"]["name"] in configmaps
        (c,) = tpl["spec"]["containers"]
        for ref in c.get("envFrom", []):
            assert ref["configMapRef"]["name"] in configmaps
        ports = {p["containerPort"] for p in c["ports"]}
        ann = tpl["metadata"]["annotations"]
        assert ann["prometheus.io/scrape"] == "true"
        assert int(ann["prometheus.io/port"]) in ports
        assert tpl["spec"]["securityContext"]["runAsNonRoot"] is True
    registry = find("ConfigMap", "backtrace-registry")["data"]
    mount = "/etc/backtrace/"
    assert config()["BACKTRACE_REGISTRY"] == mount + next(iter(registry))


def test_service_selects_the_api_pods():
    svc = find("Service", "backtrace-api")["spec"]
    labels = find("Deployment", "backtrace-api")["spec"]["template"]["metadata"]["labels"]
    assert svc["selector"].items() <= labels.items()


def test_embedded_scrape_config_passes_promtool(promtool, tmp_path):
    cm = yaml.safe_load(find("ConfigMap", "backtrace-prometheus-scrape")["data"]["prometheus.yml"])
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(cm))
    proc = subprocess.run([promtool, "check", "config", str(path)], capture_output=True, text=True)
    if "kubernetes_sd_configs not found" in proc.stdout + proc.stderr:
        # Debian builds promtool without Kubernetes service discovery: check everything else
        # (relabelling rules included) with the discovery swapped for a static target.
        for job in cm["scrape_configs"]:
            assert job.pop("kubernetes_sd_configs")[0]["role"] == "pod"
            job["static_configs"] = [{"targets": ["pod:9101"]}]
        path.write_text(yaml.safe_dump(cm))
        proc = subprocess.run(
            [promtool, "check", "config", str(path)], capture_output=True, text=True
        )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_worker_metrics_port_matches_its_annotation():
    tpl = find("Deployment", "backtrace-worker")["spec"]["template"]
    (c,) = tpl["spec"]["containers"]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["WORKER_METRICS_PORT"] == tpl["metadata"]["annotations"]["prometheus.io/port"]


def test_worker_liveness_follows_its_heartbeat():
    """The worker's liveness probe is /livez (its heartbeat, tests/service/test_worker_livez),
    not /metrics, which answers while the worker cannot beat; and it rides out a Redis
    restart (workers retry about 25 s) before the kubelet restarts the pod."""
    (c,) = find("Deployment", "backtrace-worker")["spec"]["template"]["spec"]["containers"]
    probe = c["livenessProbe"]
    assert probe["httpGet"]["path"] == "/livez"
    assert probe["httpGet"]["port"] == "metrics"
    assert probe["periodSeconds"] * probe["failureThreshold"] > 25


def test_registry_configmap_loads_with_the_service(tmp_path):
    registry = pytest.importorskip("service.registry", reason="service/ not importable yet")
    path = tmp_path / "registry.yaml"
    path.write_text(find("ConfigMap", "backtrace-registry")["data"]["registry.yaml"])
    reg = registry.load_registry(path)
    demo_ids = {m["id"] for m in registry.DEMO_REGISTRY}
    assert set(reg.models) == demo_ids
    for spec in reg.models.values():
        assert spec.source.path == f"/opt/backtrace/demo/{spec.source.name}"


MONITORING = K8S / "monitoring"
OPERATOR_SCHEMAS = {"PodMonitor": "podmonitor.json", "PrometheusRule": "prometheusrule.json"}


def monitoring() -> dict[str, dict]:
    docs = [
        d
        for p in sorted(MONITORING.glob("*.yaml"))
        if p.name != "kustomization.yaml"
        for d in load_all(p)
    ]
    return {d["kind"]: d for d in docs}


def test_operator_resources_validate_and_are_listed():
    docs = monitoring()
    assert set(docs) == set(OPERATOR_SCHEMAS)
    for kind, doc in docs.items():
        jsonschema.validate(doc, json.loads((SCHEMAS / OPERATOR_SCHEMAS[kind]).read_text()))
    kust = yaml.safe_load((MONITORING / "kustomization.yaml").read_text())
    assert sorted(kust["resources"]) == ["podmonitor.yaml", "prometheusrule.yaml"]


def test_prometheusrule_equals_alerts_yml():
    from deploy_helpers import PROMETHEUS

    alerts = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    assert monitoring()["PrometheusRule"]["spec"] == alerts


def test_podmonitor_scrapes_the_named_ports_of_both_pods():
    pm = monitoring()["PodMonitor"]["spec"]
    ports = {e["port"] for e in pm["podMetricsEndpoints"]}
    for name in ("backtrace-api", "backtrace-worker"):
        tpl = find("Deployment", name)["spec"]["template"]
        assert pm["selector"]["matchLabels"].items() <= tpl["metadata"]["labels"].items()
        (c,) = tpl["spec"]["containers"]
        assert ports & {p["name"] for p in c["ports"]}, name
