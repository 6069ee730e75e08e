"""The settings the deploy files give are ones the service has, with values it accepts: a
variable the code does not read is a setting that silently does nothing, and since the
service refuses a value that cannot work at startup (``service.config.SettingError``), a
value in a manifest that it refuses is a deployment that never comes up."""

from __future__ import annotations

import re

import pytest
import yaml
from deploy_helpers import K8S, ROOT

from service.config import ENV, Settings

# Variables the deploy files set for others than service.config: the image's healthcheck,
# Hugging Face, matplotlib, and compose's own substitutions.
NOT_SETTINGS = {
    "HEALTHCHECK_URL",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_HOME",
    "MPLCONFIGDIR",
    "PYTHONPATH",
    "PYTHONDONTWRITEBYTECODE",
    "PYTHONUNBUFFERED",
    "PIP_NO_CACHE_DIR",
    "PIP_DISABLE_PIP_VERSION_CHECK",
    "PATH",
}
OURS = re.compile(r"^(BACKTRACE_|REDIS_URL$|WORKER_METRICS_PORT$)")


def _k8s_env() -> dict[str, dict[str, str]]:
    """Each manifest's variables: ConfigMap data (not the registry's) and container env."""
    found: dict[str, dict[str, str]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc:
                continue
            if doc.get("kind") == "ConfigMap" and doc["metadata"]["name"] == "backtrace-config":
                found.setdefault(path.name, {}).update(doc["data"])
            spec = doc.get("spec", {}).get("template", {}).get("spec", {})
            for container in spec.get("containers", []):
                for var in container.get("env", []):
                    found.setdefault(path.name, {})[var["name"]] = str(var.get("value", ""))
    return found


def _compose_env() -> dict[str, dict[str, str]]:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return {
        f"docker-compose.yml {name}": {k: str(v) for k, v in service.get("environment", {}).items()}
        for name, service in compose["services"].items()
        if name in ("api", "worker", "worker-gpu")
    }


def _dockerfile_env() -> dict[str, dict[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    pairs = re.findall(r"^ENV (.*)$", text, flags=re.M)
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(pairs)))
    return {"Dockerfile": env}


SOURCES = {**_k8s_env(), **_compose_env(), **_dockerfile_env()}


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_every_variable_a_deploy_file_sets_is_read(source: str) -> None:
    known = set(ENV.values()) | NOT_SETTINGS
    unknown = sorted(set(SOURCES[source]) - known)
    assert not unknown, f"{source} sets {unknown}, which service.config does not read"


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_the_values_a_deploy_file_sets_are_accepted(
    source: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in SOURCES[source].items():
        if OURS.match(name):
            monkeypatch.setenv(name, value)
    Settings()


def test_the_settings_the_readme_names_exist() -> None:
    """README's and docs/deploy.md's settings are ones the code reads."""
    text = (ROOT / "README.md").read_text() + (ROOT / "docs" / "deploy.md").read_text()
    named = set(re.findall(r"`((?:BACKTRACE_[A-Z_]+)|REDIS_URL|WORKER_METRICS_PORT)`", text))
    assert named <= set(ENV.values()), sorted(named - set(ENV.values()))
