import subprocess

import pytest
from deploy_helpers import tool


@pytest.fixture(scope="session")
def promtool() -> str:
    path = tool("promtool")
    if not path:
        pytest.skip("promtool not found on PATH: `apt-get install -y prometheus` provides it")
    return path


def run(cmd, **kw) -> subprocess.CompletedProcess:
    """Run a command; on failure, the assertion message carries its output."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc
