import pytest
from deploy_helpers import tool


@pytest.fixture(scope="session")
def promtool() -> str:
    path = tool("promtool")
    if not path:
        pytest.skip("promtool not found on PATH: `apt-get install -y prometheus` provides it")
    return path
