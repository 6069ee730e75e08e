"""The command line (``python -m service run``) against the session's running service."""

from __future__ import annotations

import json
import subprocess
import sys

from PIL import Image

from tests.helpers.stack import ROOT


def test_cli_run_against_a_running_service(stack, tmp_path) -> None:
    from service.demo.digits import sample_png

    img = tmp_path / "digit.png"
    img.write_bytes(sample_png(0))
    out = tmp_path / "heat.png"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "service",
            "run",
            "--url",
            stack.url,
            "--model",
            "digits-cnn",
            "--image",
            str(img),
            "--out",
            str(out),
            "--json",
        ],
        env=stack.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    view = json.loads(proc.stdout)
    assert view["status"] == "finished" and view["result"]["predictions"][0]["label"] == "0"
    assert Image.open(out).size[0] > 0
