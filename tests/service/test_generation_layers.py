"""Named layers in a generation job (issue 17, point 5: ``output.relevance`` was accepted and
ignored there). On a cold model a name that is not a node fails the job with the reason the
door gives once the graph is published; a real node's relevance comes back for every
explained step in the result's ``generation.layers_trace``, and nowhere in the stream.

Its own stack (``private_stack``): a private redis-server, an API process and one real
worker whose registry has one tiny random GPT-2 (``tiny_gpt2`` below, a ``python`` source),
not warm, so that the first job captures its graph."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from service import codec
from service.vocabulary import JobStatus
from tests.helpers.jobs import events, refused_layers, submit, wait
from tests.helpers.stack import private_stack

MODEL = "tiny-gpt2"
WIDTH = 16
NEW = 3
PROMPT = "the cat"
# The token embedding's output: it passes its relevance on to the token ids unchanged, so
# summed over the hidden axis it equals the inputs' relevance of the same step.
LAYER = "embedding"


def tiny_gpt2() -> Any:
    """The registry's ``python`` source: a one-layer, width-16 GPT-2 with seeded random
    weights over a character vocabulary (the demo's tokenizer kind, built without download)."""
    import string

    import torch

    from engine.tasks import TaskName
    from service.demo.lookup import SPECIALS, _gpt2, _tokenizer
    from service.models import LoadedModel

    vocab = SPECIALS + list(string.ascii_lowercase + " ")
    torch.manual_seed(0)
    model = _gpt2(len(vocab), layers=1, width=WIDTH, heads=2, positions=32).eval()
    return LoadedModel(MODEL, TaskName.GENERATION, model, _tokenizer(vocab, "chars"))


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("generation-layers")
    entry = {
        "id": MODEL,
        "task": "generation",
        "description": "tiny random GPT-2 (tests)",
        "source": {"kind": "python", "factory": f"{__name__}:tiny_gpt2"},
        "limits": {"max_tokens": 16, "max_new_tokens": 4},
    }
    with private_stack(tmp, [entry]) as stack:
        yield stack.url


def _job(names: list[str]) -> dict[str, Any]:
    return {
        "model": MODEL,
        "inputs": {"text": PROMPT},
        "generation": {"max_new_tokens": NEW},
        "output": {"relevance": names, "encoding": "json", "dtype": "float32"},
    }


def test_unknown_layer_fails_the_job_then_the_door_refuses_it(url: str) -> None:
    with httpx.Client(base_url=url, timeout=30) as client:
        reason = refused_layers(client, _job([LAYER, "embeding"]))
    assert reason.startswith(f"output.relevance: 'embeding' is not a node of {MODEL}'s graph (")
    assert "closest: embedding" in reason, reason


def test_a_named_layer_comes_back_for_every_step(url: str) -> None:
    with httpx.Client(base_url=url, timeout=30) as client:
        job = submit(client, _job([LAYER]))["job_id"]
        stream = events(client, job)
        view = wait(client, job)
    assert view["status"] == JobStatus.FINISHED, view
    gen = view["result"]["generation"]
    prompt_len = len(gen["prompt_tokens"][0])
    assert len(gen["new_token_ids"][0]) == NEW, gen["new_token_ids"]
    assert len(gen["layers_trace"]) == len(gen["relevance_trace"]) == NEW
    for i, (layers, inputs) in enumerate(
        zip(gen["layers_trace"], gen["relevance_trace"], strict=True)
    ):
        assert set(layers) == {LAYER}
        rel, ids_rel = codec.decode(layers[LAYER]), codec.decode(inputs)
        assert rel.shape == (1, prompt_len + i, WIDTH), (i, rel.shape)
        assert np.isfinite(rel).all() and np.abs(rel).sum() > 1.0, (i, rel)
        np.testing.assert_allclose(rel.sum(-1), ids_rel, rtol=1e-4, atol=1e-4)
    # the stream's per-step events stay small: the inputs' relevance only
    relevance_events = [data for _, event, data in stream if event == "relevance"]
    assert len(relevance_events) == NEW
    assert all(set(data) == {"step", "input_ids"} for data in relevance_events)
