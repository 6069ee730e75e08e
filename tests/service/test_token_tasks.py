"""The tasks with several seeds per row through the service (issue 16, item 2): a job of
``token-classification`` (one seed per token, or one position) and of
``question-answering`` (the predicted start and end), posted to the real API, run by the
real worker on tiny random BERTs of the test registry (``tests.helpers.models``), read back
as clients read them. Each relevance row must add up, with its sinks, to its seed."""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np

from service.vocabulary import JobStatus
from tests.helpers.jobs import submit, wait
from tests.helpers.models import HEADS

JSON = {"encoding": "json", "dtype": "float32"}


def _run(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    output = {**JSON, **body.get("output", {})}
    view = wait(client, submit(client, {**body, "output": output})["job_id"])
    assert view["status"] == JobStatus.FINISHED, view
    return view["result"]


def _conserved(result: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seed, inputs and sinks (per seed and row), checked: inputs + sinks = seed."""
    c = {k: np.asarray(v, dtype=np.float64) for k, v in result["conservation"].items()}
    np.testing.assert_allclose(c["inputs"] + c["sinks"], c["seed"], rtol=1e-4, atol=1e-4)
    assert np.abs(c["seed"]).max() > 0, "something was explained"
    return c["seed"], c["inputs"], c["sinks"]


def test_token_classification_explains_every_token(client: httpx.Client) -> None:
    texts = ["tom lives in paris", "ann sees the big red dog in the park"]
    result = _run(client, {"model": "tiny-bert-tokens", "inputs": {"text": texts}})
    assert result["task"] == "token-classification"
    items = result["inputs"]
    assert [len(item["tokens"]) for item in items] == [6, 11]  # [CLS] words [SEP]
    assert items[0]["tokens"] == ["[CLS]", "tom", "lives", "in", "paris", "[SEP]"]
    seed, at_inputs, _ = _conserved(result)
    assert seed.shape == (11, 2)  # [K = longest row's tokens, B]
    np.testing.assert_array_equal(seed[6:, 0], 0)  # the shorter row's padding: no seed
    for b, item in enumerate(items):
        n = len(item["tokens"])
        assert item["seeds"] == ["token"]
        assert len(item["labels"]) == n and set(item["labels"]) <= set(HEADS["tiny-bert-tokens"][1])
        rel = np.asarray(item["relevance"]["values"])
        assert rel.shape == (n, n)  # seed k (token k's label) over the row's tokens
        # what reaches the tokens is what conservation counts at the inputs
        np.testing.assert_allclose(rel.sum(1), at_inputs[:n, b], rtol=1e-4, atol=1e-3)
    assert result["summary"]["labels"] == [item["labels"] for item in items]


def test_token_classification_at_one_position(client: httpx.Client) -> None:
    body = {
        "model": "tiny-bert-tokens",
        "inputs": {"text": "tom lives in paris"},
        "relevance": {"position": 4},
    }
    result = _run(client, body)
    (item,) = result["inputs"]
    assert item["position"] == 4 and item["seeds"] == ["token"]
    seed, at_inputs, _ = _conserved(result)
    assert seed.shape == (1, 1)  # one seed: the label of token 4 ("paris")
    rel = np.asarray(item["relevance"]["values"])
    assert rel.shape == (1, 6)
    np.testing.assert_allclose(rel.sum(), at_inputs.sum(), rtol=1e-4, atol=1e-3)


def test_token_classification_returns_named_layers(client: httpx.Client) -> None:
    body = {
        "model": "tiny-bert-tokens",
        "inputs": {"text": "tom lives in paris"},
        "output": {"relevance": ["linear"]},
    }
    result = _run(client, body)
    layer = np.asarray(result["layers"]["linear"]["values"])
    assert layer.shape == (6, 1, 6, 16)  # [seeds, rows, tokens, width]
    _conserved(result)


def test_question_answering_explains_start_and_end(client: httpx.Client) -> None:
    text = "who lives in paris [SEP] tom lives in paris"
    result = _run(client, {"model": "tiny-bert-qa", "inputs": {"text": text}})
    assert result["task"] == "question-answering"
    (item,) = result["inputs"]
    tokens = item["tokens"]
    assert item["seeds"] == ["start", "end"]
    start, end = item["answer_span"]
    assert 0 <= start <= end < len(tokens), item["answer_span"]
    assert item["answer_tokens"] == tokens[start : end + 1]
    assert result["summary"]["answer_tokens"] == [item["answer_tokens"]]
    # the answer as text, not the tokenizer's pieces (a byte-level BPE's 'Ġparis')
    words = item["text"][start : end + 1]
    assert item["answer"] == "".join(words).strip() and "#" not in item["answer"], item
    assert result["summary"]["answer"] == [item["answer"]]
    seed, at_inputs, _ = _conserved(result)
    assert seed.shape == (2, 1)
    rel = np.asarray(item["relevance"]["values"])
    assert rel.shape == (2, len(tokens))
    np.testing.assert_allclose(rel.sum(1), at_inputs[:, 0], rtol=1e-4, atol=1e-3)


def test_question_answering_of_a_question_and_its_context(client: httpx.Client) -> None:
    """``text_pair`` carries the context: one input of two segments, [CLS] question [SEP]
    context [SEP], whose answer is the plain forward's with the tokenizer's token_type_ids
    (the model of the test registry, built again here), explained over both texts."""
    import torch
    from transformers import BertTokenizerFast

    from tests.helpers.models import VOCAB
    from tests.helpers.tiny import tiny_bert

    question, context = "who lives in paris", "tom lives in the big city"
    body = {"model": "tiny-bert-qa", "inputs": {"text": question, "text_pair": context}}
    result = _run(client, body)
    _conserved(result)
    (item,) = result["inputs"]
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(VOCAB)}, do_lower_case=True)
    enc = tok(question, context, return_tensors="pt")
    assert item["token_ids"] == enc["input_ids"][0].tolist()
    assert item["tokens"][5:7] == ["[SEP]", "tom"] and item["tokens"][-1] == "[SEP]"
    with torch.no_grad():
        out = tiny_bert("BertForQuestionAnswering", 2)(**enc)
    expected = [int(out.start_logits.argmax()), int(out.end_logits.argmax())]
    assert item["answer_span"] == expected
    rel = np.abs(np.asarray(item["relevance"]["values"]))  # [start/end, tokens]
    second = enc["token_type_ids"][0].bool().numpy()
    assert (rel[:, ~second].sum(1) > 0).all() and (rel[:, second].sum(1) > 0).all()
    assert item["segments"] == enc["token_type_ids"][0].tolist()  # which text each token is
