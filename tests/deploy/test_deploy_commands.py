"""The `python -m service ...` commands that the Dockerfile, the compose file and the
Kubernetes manifests run exist, with the options they pass."""

import sys

import pytest
import yaml
from deploy_helpers import K8S, ROOT, load_all, run

pytest.importorskip("service.cli", reason="service/ (issue 4) not present")
dockerfile = pytest.importorskip("dockerfile", reason="pip install dockerfile")


def commands() -> list[list[str]]:
    found = []
    for c in dockerfile.parse_file(str(ROOT / "Dockerfile")):
        if c.cmd == "CMD":
            found.append(list(c.value))
        if c.cmd == "RUN" and "python -m service" in c.value[0]:
            found.append(c.value[0].split("&&")[0].split())
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    found += [s["command"] for s in compose["services"].values() if "command" in s]
    for path in K8S.glob("*.yaml"):
        for doc in load_all(path):
            if doc["kind"] in {"Deployment", "StatefulSet"}:
                found += [
                    c["command"]
                    for c in doc["spec"]["template"]["spec"]["containers"]
                    if "command" in c
                ]
    return [c for c in found if c[:3] == ["python", "-m", "service"]]


def test_commands_are_found():
    subs = {c[3] for c in commands()}
    assert subs == {"serve", "worker", "build-demo"}


@pytest.mark.parametrize("cmd", commands(), ids=lambda c: " ".join(c[3:]))
def test_service_command_accepts_its_options(cmd):
    helptext = run([sys.executable, "-m", "service", cmd[3], "--help"], cwd=ROOT).stdout
    for arg in cmd[4:]:
        if arg.startswith("--"):
            assert arg in helptext, f"{' '.join(cmd)}: {arg} unknown"


def test_api_runs_without_torch():
    """The `api` image target has no torch: the API side of the service must not import it."""
    code = (
        "import sys; import service.api, service.cli, service.registry; "
        "service.api.create_app; "
        "assert 'torch' not in sys.modules, 'service.api imports torch'"
    )
    run([sys.executable, "-c", code], cwd=ROOT)
