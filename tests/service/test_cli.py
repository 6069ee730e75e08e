"""The command line (``python -m service run``) against the session's running service."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
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


def test_summary_shows_token_labels_and_answers() -> None:
    """A token-classification or question-answering job's summary says what was found,
    not only its timings."""
    from service import codec
    from service.cli import summary

    tokens = ["[CLS]", "john", "paris"]
    ner = {"tokens": tokens, "labels": ["O", "B-PER", "B-LOC"], "seeds": ["token"]}
    qa = {
        "tokens": tokens,
        "seeds": ["start", "end"],
        "answer_span": [2, 2],
        "answer_tokens": ["paris"],
    }
    for item in (ner, qa):
        item["relevance"] = codec.encode(np.ones((2, 3)))
    views = [
        {"task": "token-classification", "inputs": [ner]},
        {"task": "question-answering", "inputs": [qa]},
    ]
    lines = [summary({"job_id": "j", "status": "finished", "result": r}) for r in views]
    assert "labels: [CLS]:O john:B-PER paris:B-LOC" in lines[0]
    assert "answer: paris (tokens 2 to 2)" in lines[1]
