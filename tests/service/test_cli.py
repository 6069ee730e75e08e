"""The command line (``python -m service run``) against the session's running service."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from PIL import Image

from tests.helpers.stack import ROOT


def _run(stack, *options: str) -> dict:
    """``python -m service run --url <the stack> ... --json``: the job view it prints."""
    proc = subprocess.run(
        [sys.executable, "-m", "service", "run", "--url", stack.url, *options, "--json"],
        env=stack.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_cli_run_against_a_running_service(stack, tmp_path) -> None:
    from service.demo.digits import sample_png

    img = tmp_path / "digit.png"
    img.write_bytes(sample_png(0))
    out = tmp_path / "heat.png"
    view = _run(stack, "--model", "digits-cnn", "--image", str(img), "--out", str(out))
    assert view["status"] == "finished" and view["result"]["predictions"][0]["label"] == "0"
    assert Image.open(out).size[0] > 0


def test_cli_run_sends_a_text_pair(stack, tmp_path) -> None:
    """--text-pair is the request's inputs.text_pair: a question's context reaches the
    model as the second segment, after the question's [SEP]."""
    options = ["--model", "tiny-bert-qa", "--text", "who lives in paris"]
    pair = ["--text-pair", "tom lives in paris", "--out", str(tmp_path / "heat.png")]
    view = _run(stack, *options, *pair)
    assert view["status"] == "finished", view
    (item,) = view["result"]["inputs"]
    expected = "[CLS] who lives in paris [SEP] tom lives in paris [SEP]"
    assert item["tokens"] == expected.split()


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
