"""Explained generation as users run it through the service, on an operator's Llama-style
checkpoint (tests/helpers/user_models.py: a byte-level BPE that splits an emoji into its
bytes, 64 positions) behind a real API and worker.

What failed before: the ``text`` of the ``prompt`` and ``token`` events decoded each token
alone, so an emoji's bytes read U+FFFD each and the pieces did not join to the text; a
prompt near the model's positions was refused for ``generation.max_new_tokens`` the client
never sent (the default 16); with ``generation.steps`` a selection, the result's
``relevance_trace`` (those steps only) said nothing of which steps they were, and the
heatmap labelled its rows with the first tokens generated, not the steps explained."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tokenizers import Tokenizer

from service import codec
from service.api import render
from service.client import Client
from tests.helpers.stack import ROOT, private_stack

MODEL = "probe-llama"
EOS_MODEL = "probe-llama-eos"  # the same weights, ending at a token one row picks first
POSITIONS = 64  # user_models._llama's


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("probe-models") / "llama"
    code = "import sys, torch; from tests.helpers import user_models as u; "
    code += "from pathlib import Path; torch.manual_seed(0); u._llama(Path(sys.argv[1]))"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", code, str(out)], check=True, cwd=ROOT, env=env)
    shutil.copytree(out, out.parent / "llama-eos")  # its end token: set by the test using it
    return out


def _entry(model_id: str, folder: Path) -> dict[str, Any]:
    return {
        "id": model_id,
        "task": "generation",
        "source": {"kind": "transformers", "path": str(folder)},
    }


@pytest.fixture(scope="module")
def api(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    """The stack; the end token of ``probe-llama-eos`` is set by the test that uses it (a
    worker loads a model when a job first names it)."""
    entries = [_entry(MODEL, folder), _entry(EOS_MODEL, folder.parent / "llama-eos")]
    with private_stack(tmp_path_factory.mktemp("probe-stack"), entries) as st:
        client = Client(st.url)
        client.wait_ready(timeout=300, processes=[st.worker])
        yield client


def _events(api: Client, body: dict[str, Any]) -> tuple[list[tuple[str, dict]], dict]:
    """The job's events (name, data) to its end, and its finished result."""
    job = api.submit(body)["job_id"]
    events = [(name, data) for name, data in api.stream(job)]
    return events, api.wait(job)


def test_text_pieces_join_to_the_text(api: Client, folder: Path) -> None:
    """Each token's piece is the text it adds to its row: an emoji split over four tokens
    reads '' three times and then the emoji, and the prompt's and the tokens' pieces join to
    the decoded sequence."""
    text = "🦜 the cat ñ"
    body = {"model": MODEL, "inputs": {"text": text}, "generation": {"max_new_tokens": 4}}
    events, view = _events(api, body)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ((prompt_ids,),) = [d["token_ids"] for name, d in events if name == "prompt"]
    ((prompt_text,),) = [d["text"] for name, d in events if name == "prompt"]
    assert "".join(prompt_text) == tok.decode(prompt_ids, skip_special_tokens=False)
    assert text in "".join(prompt_text) and "\ufffd" not in "".join(prompt_text)
    new = [d["token_ids"][0] for name, d in events if name == "token"]
    pieces = [d["text"][0] for name, d in events if name == "token"]
    whole = tok.decode(prompt_ids + new, skip_special_tokens=False)
    assert "".join(prompt_text + pieces) == whole
    assert view["result"]["generation"]["prompt_text"] == [prompt_text]


def test_the_default_new_tokens_fit_the_positions_a_prompt_leaves(api: Client) -> None:
    ids = [5] * (POSITIONS - 4)
    result = api.run({"model": MODEL, "inputs": {"token_ids": ids}}, timeout=300)
    assert len(result["generation"]["new_token_ids"][0]) == 4
    resp = api.http.post(
        "/run_task", json={"model": MODEL, "inputs": {"token_ids": [5] * POSITIONS}}
    )
    assert resp.status_code == 422, resp.text
    ((error,)) = resp.json()["detail"]
    assert error["loc"] == ["body", "inputs", "token_ids"], error
    assert "fills the model's 64 positions" in error["message"]
    sent = {"model": MODEL, "inputs": {"token_ids": ids}, "generation": {"max_new_tokens": 5}}
    resp = api.http.post("/run_task", json=sent)
    assert resp.status_code == 422 and "at most 4" in resp.text, resp.text


def test_explained_steps_name_the_trace_entries_and_the_heatmap_rows(
    api: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``steps: [1, 3]``: the result's two trace entries are steps 1 and 3 (as the stream's
    ``relevance`` events, value for value), its conservation has None at 0 and 2, and the
    heatmap's rows are labelled with the tokens of steps 1 and 3."""
    body = {
        "model": MODEL,
        "inputs": {"text": ["the cat sat", "who"]},
        "generation": {"max_new_tokens": 4, "steps": [1, 3]},
        "output": {"encoding": "json", "dtype": "float32"},
    }
    events, view = _events(api, body)
    g = view["result"]["generation"]
    streamed = {d["step"]: d["input_ids"] for name, d in events if name == "relevance"}
    assert g["explained_steps"] == sorted(streamed) == [1, 3]
    for step, entry in zip(g["explained_steps"], g["relevance_trace"], strict=True):
        assert np.array_equal(codec.decode(entry), codec.decode(streamed[step]))
    assert [c is None for c in g["conservation_trace"]] == [True, False, True, False]
    drawn: dict[str, Any] = {}
    monkeypatch.setattr(render.heatmap, "token_grid", lambda *a: drawn.update(args=a) or b"")
    render.heatmap_png(view["result"])
    rows, cols, labels = drawn["args"]
    tokens = [d["text"][0] for name, d in events if name == "token"]
    assert labels == [tokens[1], tokens[3]]
    assert [len(r) for r in rows] == [
        len(g["prompt_tokens"][0]) + 1,
        len(g["prompt_tokens"][0]) + 3,
    ]


def test_a_row_that_ends_early_says_so_in_its_later_token_events(api: Client, folder: Path) -> None:
    """Two prompts; the second row's first token is made the model's end-of-sequence token
    (generation_config.json): from step 1 on its token events say ``ended`` and add no text,
    its relevance is 0 and its conservation's seed 0, while the first row goes on. Before,
    the ended row's padding streamed as tokens like any other, with nothing telling them
    apart."""
    body: dict[str, Any] = {
        "model": MODEL,
        "inputs": {"text": ["the cat sat", "who"]},
        "generation": {"max_new_tokens": 4},
        "output": {"encoding": "json", "dtype": "float32"},
    }
    rows = api.run(body, timeout=300)["generation"]["new_token_ids"]
    eos = rows[1][0]
    assert eos not in rows[0], rows  # the first row must not end too
    config = folder.parent / "llama-eos" / "generation_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "eos_token_id": eos}))
    events, view = _events(api, {**body, "model": EOS_MODEL})
    tokens = [d for name, d in events if name == "token"]
    assert [d["ended"] for d in tokens] == [[False, False]] + [[False, True]] * 3
    assert all(d["text"][1] == "" for d in tokens[1:])
    g = view["result"]["generation"]
    for step, entry in enumerate(g["relevance_trace"]):
        assert np.any(codec.decode(entry)[0]) and np.any(codec.decode(entry)[1]) == (step == 0)
    assert [c["seed"][1] != 0 for c in g["conservation_trace"]] == [True, False, False, False]
