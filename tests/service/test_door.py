"""Validation at the door: what a model cannot take is a 422 at submit that names the field,
the value and what is allowed, in words a person can read, never a job that fails in the
worker with a Python error or runs ignoring part of the request.

The API runs in process on the session's Redis, with the demo registry and a data folder
holding only tiny-lookup-lm's metadata (config.json and a word-level tokenizer.json, as a
built model has them): no worker, no torch."""

from __future__ import annotations

import base64
import json
import struct
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.api import create_app
from service.config import Settings

LOOKUP_VOCAB = ["<pad>", "<eos>", "<unk>", "?", "a3", "c1", "a", "c"]


def _lookup_model(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder.mkdir(parents=True)
    vocab = {w: i for i, w in enumerate(LOOKUP_VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    # fewer positions than the real model's 32, so that max_tokens + max_new_tokens overflow
    config = {"model_type": "gpt2", "vocab_size": 102, "n_positions": 28}
    (folder / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def api(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    data = tmp_path_factory.mktemp("door")
    _lookup_model(data / "tiny-lookup-lm")
    # A queue of its own: a worker of another test on the session's Redis would take the
    # jobs accepted here, and a job this module expects queued would be running.
    queue = f"door-{uuid.uuid4().hex[:8]}"
    settings = Settings(redis_url=redis_url, registry_path=None, data_dir=str(data), queue=queue)
    with TestClient(create_app(settings)) as client:
        yield client


def _png_header(width: int, height: int) -> str:
    """A PNG that claims ``width`` x ``height`` (Pillow reads the header only)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    raw = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0"))
    return base64.b64encode(raw + chunk(b"IEND", b"")).decode()


def _message(resp) -> str:
    assert resp.status_code == 422, resp.text
    (error,) = resp.json()["detail"]
    return error["message"]


LOOKUP = {"model": "tiny-lookup-lm", "inputs": {"text": "a3 c1 ? a"}}
SENTIMENT = {"model": "minilm-sentiment", "inputs": {"text": "fine"}}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            {"model": "digits-cnn", "inputs": {"image": _png_header(20000, 20000)}},
            "inputs.image: too many pixels; at most 512 pixels a side",
        ),
        (
            {"model": "digits-cnn", "inputs": {"image": base64.b64encode(b"junk").decode()}},
            "inputs.image: not a base64 PNG or JPEG image (unreadable image data)",
        ),
        (
            {**SENTIMENT, "relevance": {"target": 7}},
            "relevance.target: 7 is not a class of minilm-sentiment: 0 to 1 (negative, positive)",
        ),
        (
            {**LOOKUP, "inputs": {"token_ids": [-1, 3]}},
            "inputs.token_ids: id -1 is not a token id (0 to 101)",
        ),
        (
            {**LOOKUP, "inputs": {"token_ids": [3, 500]}},
            "inputs.token_ids: id 500 is not a token id (0 to 101)",
        ),
        (
            {**LOOKUP, "inputs": {"text": " ".join(["a3"] * 30)}},
            "inputs.text: 30 tokens, more than max_tokens=24",
        ),
        (
            {**LOOKUP, "inputs": {"token_ids": [4] * 22}, "generation": {"max_new_tokens": 8}},
            "generation.max_new_tokens: 8 after a 22-token prompt is more than the model's 28 "
            "positions: at most 6",
        ),
        ({**SENTIMENT, "inputs": {"text": "  \n\t"}}, "inputs.text: is blank"),
        ({**SENTIMENT, "inputs": {"text": ["ok", " "]}}, "inputs.text.1: is blank"),
        (
            {**SENTIMENT, "generation": {"num_beams": 2}},
            "generation: num_beams: generation settings, but minilm-sentiment does",
        ),
        (
            {**LOOKUP, "generation": {"steps": [99]}},
            "generation.steps: 99 is not a step: -8 to 7 with max_new_tokens=8",
        ),
        (
            {**LOOKUP, "generation": {"steps": -3}},
            "generation.steps: -3: a number of steps (the first N) is 0 to max_new_tokens=8; a "
            "list counts from the end ([-1] is the last step)",
        ),
        (
            {**LOOKUP, "generation": {"steps": 99, "max_new_tokens": 4}},
            "generation.steps: 99 is more than generation.max_new_tokens=4",
        ),
        (
            {**LOOKUP, "generation": {"num_beams": 2, "do_sample": True}},
            "generation.num_beams: 2 beams with sampling (do_sample): beam search does not "
            "sample; send num_beams 1 to sample, or leave do_sample out",
        ),
        (
            {**LOOKUP, "generation": {"num_beams": 2, "top_p": 0.5}},
            "generation.num_beams: 2 beams with sampling (generation.top_p)",
        ),
        (
            {**LOOKUP, "generation": {"seed": 3}},
            "generation.seed: 3 shapes sampling, but this decode is greedy (nothing asks for "
            "sampling): set generation.do_sample true, or leave generation.seed out",
        ),
        (
            {**LOOKUP, "generation": {"top_k": 5, "do_sample": False}},
            "generation.top_k: 5 shapes sampling, but this decode is greedy (do_sample is false)",
        ),
        (
            {**LOOKUP, "relevance": {"temperature": 0.5}, "generation": {"do_sample": False}},
            "relevance.temperature: 0.5 shapes sampling, but this decode is greedy",
        ),
        (
            {**SENTIMENT, "inputs": {"text": ""}},
            "inputs.text: must be a non-empty string or a list of them",
        ),
        (
            {**LOOKUP, "generation": {"steps": "first"}},
            "generation.steps: must be all, none, a number N (the first N steps) or a list of "
            'steps (got "first")',
        ),
        (
            {**SENTIMENT, "output": {"relevance": []}},
            "output.relevance: must be inputs, all, or a non-empty list of layer names (got [])",
        ),
        (
            {**SENTIMENT, "relevance": {"mode": "contrast", "contrast_with": ""}},
            "relevance.contrast_with: must be runner-up, rest, a class index or a label (1 to "
            '200 characters) (got "")',
        ),
        (
            {**SENTIMENT, "inputs": {"text": ["ok"] * 65}},
            "inputs.text: must be a non-empty string or a list of them (at most 64 texts of at "
            "most 20000 characters) (got a list of 65 items)",
        ),
        (
            {"model": "digits-cnn", "inputs": {"image": ""}},
            "inputs.image: String should have at least 1 character",
        ),
        (
            {**SENTIMENT, "output": {"top_scores": 3}},
            "output.top_scores: 3: top_scores sets the top tokens of each generation step, but "
            "minilm-sentiment does text-classification; leave top_scores out",
        ),
        (
            {**LOOKUP, "relevance": {"thresholding": 0.3}},
            "relevance.thresholding: 0.3: thresholding sets a classifier's decision by its "
            "logits' sigmoid, but tiny-lookup-lm does generation; leave thresholding out",
        ),
        (
            {**LOOKUP, "relevance": {"target": 3}},
            "relevance.target: generation explains each step's generated token: it takes no target",
        ),
        (
            {**LOOKUP, "relevance": {"position": 0}},
            "relevance.position: generation explains each step's generated token",
        ),
        (
            {**SENTIMENT, "relevance": {"position": 1}},
            "relevance.position: text-classification explains one prediction per text "
            "(minilm-sentiment is a sequence classifier): it takes no position",
        ),
        (
            {
                "model": "digits-cnn",
                "inputs": {"image": _png_header(16, 16)},
                "relevance": {"position": 1},
            },
            "relevance.position: image-classification explains one prediction per image: it "
            "takes no position",
        ),
        (
            {**LOOKUP, "relevance": {"mode": "contrast", "contrast_with": "hello"}},
            "relevance.contrast_with: 'hello' is not for generation: runner-up, rest or a token "
            "id (0 to 101)",
        ),
        (
            {**LOOKUP, "relevance": {"mode": "contrast", "contrast_with": 500}},
            "relevance.contrast_with: 500 is not a token id of tiny-lookup-lm: 0 to 101",
        ),
        (
            {**SENTIMENT, "relevance": {"mode": "contrast", "contrast_with": "neutral"}},
            "relevance.contrast_with: 'neutral' is not a label of minilm-sentiment: runner-up, "
            "rest, a class index or one of negative, positive",
        ),
        (
            {**SENTIMENT, "relevance": {"mode": "contrast", "contrast_with": 2}},
            "relevance.contrast_with: 2 is not a class of minilm-sentiment: 0 to 1 (negative, "
            "positive)",
        ),
        (
            {**SENTIMENT, "relevance": {"mode": "contrast", "contrast_with": 1, "target": 1}},
            "relevance.contrast_with: 1 is the class relevance.target explains (1): contrast it "
            "with another class, runner-up or rest",
        ),
        (
            {
                **SENTIMENT,
                "relevance": {"mode": "contrast", "contrast_with": "negative", "target": 0},
            },
            "relevance.contrast_with: 'negative' is the class relevance.target explains (0)",
        ),
        (
            {**LOOKUP, "inputs": {"text": "a3 c1", "text_pair": "a"}},
            "inputs.text_pair: generation takes one text per input: text_pair is for "
            "text-classification, token-classification, question-answering",
        ),
        (
            {**SENTIMENT, "inputs": {"text": ["ok", "fine"], "text_pair": ["so"]}},
            "inputs.text_pair: has 1 texts for 2 in text: give one per text",
        ),
        (
            {**SENTIMENT, "inputs": {"text": "ok", "text_pair": ["so"]}},
            "inputs.text_pair: must be a string with one text, a list with a list",
        ),
        (
            {**SENTIMENT, "inputs": {"token_ids": [3, 4], "text_pair": "so"}},
            "inputs.text_pair: is the second text of a pair: give the first in text",
        ),
        ({**SENTIMENT, "inputs": {"text": "ok", "text_pair": " "}}, "inputs.text_pair: is blank"),
        (
            {**SENTIMENT, "relevance": {"thresholding": 0.9}},
            "relevance.thresholding: 0.9: thresholding decides a single-logit classifier, or "
            "each label of a multi-label one; minilm-sentiment decides by argmax among its "
            "classes; leave thresholding out",
        ),
    ],
)
def test_refused_at_the_door(api: TestClient, body: dict, expected: str) -> None:
    message = _message(api.post("/run_task", json=body))
    assert message.startswith(expected), message
    assert "<" not in message and "|" not in message, message


def test_json_error_says_where(api: TestClient) -> None:
    body = '{"model": "tiny-lookup-lm",\n "inputs": }'
    resp = api.post("/run_task", content=body, headers={"Content-Type": "application/json"})
    assert _message(resp) == "request body is not valid JSON: Expecting value at line 2 column 12"


def test_a_body_not_utf8_says_which_byte(api: TestClient) -> None:
    """Invalid UTF-8 in a JSON body is a 422 in the service's format naming the byte and
    where, not FastAPI's plain 400 "There was an error parsing the body"; other errors keep
    their replies."""
    body = b'{"model": "m",\n "inputs": {"text": "\xff"}}'
    resp = api.post("/run_task", content=body, headers={"Content-Type": "application/json"})
    expected = "request body is not valid JSON: not UTF-8 (byte 0xff at line 2 column 22)"
    assert _message(resp) == expected
    assert resp.json()["detail"][0]["loc"] == ["body"]
    resp = api.post("/run_task", json={**SENTIMENT, "model": "nosuchmodel"})
    assert resp.status_code == 404 and resp.json()["detail"].startswith("model 'nosuchmodel'")


def test_what_the_model_takes_passes(api: TestClient) -> None:
    contrast = [
        {**SENTIMENT, "relevance": {"mode": "contrast", "contrast_with": alt, "target": 0}}
        for alt in ("positive", 1, "rest")
    ]
    lm_contrast = {**LOOKUP, "relevance": {"mode": "contrast", "contrast_with": 101}}
    sampled = {**LOOKUP, "generation": {"top_k": 3, "seed": 7}}
    beams = {**LOOKUP, "generation": {"num_beams": 2, "top_k": 0, "top_p": 1.0}}
    for body in (
        LOOKUP,
        sampled,
        beams,
        {**LOOKUP, "inputs": {"token_ids": [4, 3, 6]}},
        SENTIMENT,
        *contrast,
        lm_contrast,
    ):
        resp = api.post("/run_task", json=body)
        assert resp.status_code == 202, resp.text
        api.delete(f"/jobs/{resp.json()['job_id']}")


@pytest.mark.parametrize(
    ("path", "body", "expected"),
    [
        (
            "/run_task",
            {**SENTIMENT, "model": "mini lm"},
            "model: a model id of the registry (GET /models): letters, digits, '.', '_', '-' "
            "and '/' (got \"mini lm\")",
        ),
        (
            "/jobs/a b",
            None,
            "job_id: a job id: 1 to 128 letters, digits, '_' and '-' (got \"a b\")",
        ),
    ],
)
def test_a_pattern_in_words(api: TestClient, path: str, body: dict | None, expected: str) -> None:
    """A model or job id of characters it cannot have says which it may, not the regular
    expression (``String should match pattern '^[A-Za-z0-9._\\-/]+$'``)."""
    resp = api.post(path, json=body) if body else api.get(path)
    assert _message(resp) == expected


def test_heatmap_of_no_job_is_404(api: TestClient) -> None:
    resp = api.get("/jobs/nosuchjob/heatmap.png")
    assert resp.status_code == 404 and resp.json()["detail"].startswith("no job 'nosuchjob'")


def test_no_heatmap_says_where_the_job_is(api: TestClient) -> None:
    """A job with no heatmap yet says whether it is queued or was canceled (a canceled or
    failed job "had not finished", as if it might)."""
    job_id = api.post("/run_task", json=SENTIMENT).json()["job_id"]
    resp = api.get(f"/jobs/{job_id}/heatmap.png")
    assert resp.json()["detail"] == "no heatmap: the job is queued, not finished"
    api.delete(f"/jobs/{job_id}")
    resp = api.get(f"/jobs/{job_id}/heatmap.png")
    assert resp.status_code == 404
    assert resp.json()["detail"] == "no heatmap: the job was canceled"


def test_prompt_counted_without_the_tokenizers_padding(tmp_path: Path) -> None:
    """A tokenizer.json saved with padding to a fixed length and truncation on (as
    sentence-transformers checkpoints ship) counts a prompt's own tokens, as the worker's
    tokenizer does: not the padded 16, nor the truncated 16 of a longer one."""
    from service.api.metadata import ModelMetadata
    from service.registry import ModelSpec, Registry

    folder = tmp_path / "lm"
    _lookup_model(folder)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.enable_padding(length=16, pad_id=0, pad_token="<pad>")
    tok.enable_truncation(max_length=16)
    tok.save(str(folder / "tokenizer.json"))
    spec = ModelSpec.model_validate(
        {"id": "lm", "task": "generation", "source": {"kind": "transformers", "path": "lm"}}
    )
    meta = ModelMetadata(Registry([spec], tmp_path), str(tmp_path)).get(spec)
    assert meta.count_tokens("a3 c1 ? a") == 4
    assert meta.count_tokens(" ".join(["a3"] * 30)) == 30


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "no Content-Type"]
)
def test_a_body_not_sent_as_json_says_so(api: TestClient, content_type: str) -> None:
    """JSON sent with another Content-Type (curl -d sends a form's), or with none (FastAPI
    reads no JSON then either), is not read as JSON: the 422 says what to send, not that
    the body should be a dictionary."""
    headers = {} if content_type == "no Content-Type" else {"Content-Type": content_type}
    resp = api.post("/run_task", content=json.dumps(SENTIMENT), headers=headers)
    expected = "request body must be JSON, sent with Content-Type: application/json"
    assert _message(resp) == f"{expected} (got {content_type})"


def test_an_empty_body_says_so(api: TestClient) -> None:
    """No body at all is not "body: Field required"."""
    resp = api.post("/run_task", content=b"", headers={"Content-Type": "application/json"})
    assert _message(resp) == "request body is empty: send the request as a JSON object"


INTEGER, NUMBER = (
    "Input should be a valid integer, not true or false",
    "Input should be a valid number",
)


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("relevance", {"target": True}, f"relevance.target: {INTEGER}"),
        ("relevance", {"position": False}, f"relevance.position: {INTEGER}"),
        (
            "relevance",
            {"mode": "contrast", "contrast_with": True},
            "relevance.contrast_with: Input",
        ),
        ("relevance", {"multiplier": True}, f"relevance.multiplier: {NUMBER}"),
        ("inputs", {"token_ids": [[3], [True, 3]]}, f"inputs.token_ids: {INTEGER}"),
        ("inputs", {"features": [1.0, False]}, f"inputs.features: {NUMBER}"),
        ("generation", {"steps": [True]}, f"generation.steps: {INTEGER}"),
        ("generation", {"seed": False}, f"generation.seed: {INTEGER}"),
        ("output", {"top_scores": True}, f"output.top_scores: {INTEGER}"),
    ],
)
def test_booleans_are_not_numbers(api: TestClient, field: str, value: dict, expected: str) -> None:
    """true and false where a class, a token or any number is meant are refused, not read
    as 1 and 0 (``target: true`` explained class 1)."""
    body = {**LOOKUP, "relevance": {}, field: value}
    assert _message(api.post("/run_task", json=body)).startswith(expected)


@pytest.mark.parametrize("value", [0, 1, "true", "yes", "false", 1.0])
def test_flags_are_booleans(api: TestClient, value: Any) -> None:
    """do_sample takes true or false, not what pydantic's lax mode reads as them (1,
    "yes", "true"): a client sending a number or a string has a bug the 422 shows."""
    body = {**LOOKUP, "generation": {"do_sample": value}}
    assert _message(api.post("/run_task", json=body)) == (
        f"generation.do_sample: Input should be a valid boolean (got {json.dumps(value)})"
    )


def _boolean_fields(schemas: dict, name: str, prefix: str = "") -> Iterator[str]:
    """The dotted path of each boolean field of the request's schema ``name``."""
    for field, prop in schemas[name]["properties"].items():
        for kind in prop.get("anyOf", [prop]):
            if kind.get("type") == "boolean":
                yield f"{prefix}{field}"
            elif "$ref" in kind:
                yield from _boolean_fields(schemas, kind["$ref"].rsplit("/", 1)[1], f"{field}.")


def test_every_flag_of_the_request_is_strict(api: TestClient) -> None:
    """Each boolean field of the request, however many are added, refuses 1 for true."""
    schemas = api.get("/openapi.json").json()["components"]["schemas"]
    fields = list(_boolean_fields(schemas, "RunTaskRequest"))
    assert "generation.do_sample" in fields
    for path in fields:
        section, name = path.split(".")
        body = {**LOOKUP, section: {**LOOKUP.get(section, {}), name: 1}}
        message = _message(api.post("/run_task", json=body))
        assert message == f"{path}: Input should be a valid boolean (got 1)"
        body[section][name] = True
        assert api.post("/run_task", json=body).status_code == 202


def test_numbers_keep_their_bounds_in_the_schema(api: TestClient) -> None:
    """The refusal of booleans leaves each field's bounds in the OpenAPI schema (a
    validator on the int of ``int | None`` would turn ``minimum`` into an unknown ``ge``)."""
    schemas = api.get("/openapi.json").json()["components"]["schemas"]
    target = schemas["RelevanceParams"]["properties"]["target"]["anyOf"][0]
    assert target == {"type": "integer", "minimum": 0, "exclusiveMaximum": 2**63}
    assert schemas["GenerationParams"]["properties"]["num_beams"]["maximum"] == 64


@pytest.mark.parametrize(
    ("field", "value"),
    [("relevance", {"multiplier": "NaN"}), ("generation", {"top_p": "Infinity"})],
)
def test_numbers_are_finite(api: TestClient, field: str, value: dict) -> None:
    """NaN and Infinity (which Python's JSON reads) are not numbers a setting can take."""
    name, literal = next(iter(value.items()))
    body = json.dumps({**LOOKUP, field: {name: 0.5}}).replace("0.5", literal)
    resp = api.post("/run_task", content=body, headers={"Content-Type": "application/json"})
    assert _message(resp) == f"{field}.{name}: Input should be a finite number (got {literal})"


@pytest.mark.parametrize("features", ["[1.0, NaN]", "[[1.0], [Infinity]]"])
def test_features_are_finite(api: TestClient, features: str) -> None:
    body = json.dumps({"model": LOOKUP["model"], "inputs": {"features": 0}})
    body = body.replace("0}", features + "}")
    resp = api.post("/run_task", content=body, headers={"Content-Type": "application/json"})
    assert resp.status_code == 422
    assert _message(resp).startswith("inputs.features: must be a list of finite numbers")


def _pair_meta(tmp_path: Path, pairs: bool) -> tuple[Any, Any]:
    """A text classifier of max_tokens 8 and what the door knows of it: a word-level
    tokenizer whose template separates a pair as BERT's does ([CLS] a [SEP] b [SEP]), or
    one without a template (texts run together, as a causal LM's tokenizer does)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    from service.api.metadata import ModelMeta
    from service.registry import ModelSpec

    vocab = {w: i for i, w in enumerate(["[UNK]", "[CLS]", "[SEP]", "a", "b"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if pairs:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", 1), ("[SEP]", 2)],
        )
    source = {"kind": "transformers", "path": str(tmp_path)}
    spec = {"id": "nli", "task": "text-classification", "source": source}
    meta = ModelMeta(tokenizer=tok)
    return ModelSpec.model_validate({**spec, "limits": {"max_tokens": 8}}), meta


@pytest.mark.parametrize(
    ("pairs", "inputs", "expected"),
    [
        (True, {"text": "a b", "text_pair": "a b a"}, None),  # 3 + 5 = 8 tokens
        (
            True,
            {"text": ["a", "a b"], "text_pair": ["b", "a b a b"]},
            "inputs.text_pair.1: 9 tokens with its text, more than max_tokens=8",
        ),
        (
            False,
            {"text": "a", "text_pair": "b"},
            "inputs.text_pair: the tokenizer of nli puts no separator between the two texts",
        ),
    ],
)
def test_a_pair_counted_and_separated(
    tmp_path: Path, pairs: bool, inputs: dict, expected: str | None
) -> None:
    """Both texts of a pair count against max_tokens, separators included, where the door
    knows the tokenizer; a tokenizer with no separator for pairs takes none."""
    from fastapi import HTTPException

    from service.api import door
    from service.schemas import RunTaskRequest

    spec, meta = _pair_meta(tmp_path, pairs)
    req = RunTaskRequest.model_validate({"model": "nli", "inputs": inputs})
    if expected is None:
        door.check(spec, spec.task, req, meta)
        return
    with pytest.raises(HTTPException) as caught:
        door.check(spec, spec.task, req, meta)
    assert caught.value.detail[0]["message"].startswith(expected)


@pytest.mark.parametrize(
    ("labels", "alt", "expected"),
    [
        (None, "cat", "relevance.contrast_with: 'cat': resnet has no labels (its registry entry "
         "gives none): give a class index (0 to 2), runner-up or rest"),
        (None, 1, None),
        (None, "rest", None),
        (["cat", "dog", "bird"], "dog", None),
    ],
)  # fmt: skip
def test_a_label_of_a_model_without_labels(
    tmp_path: Path, labels: list[str] | None, alt: str | int, expected: str | None
) -> None:
    """A torchvision model's labels are its registry entry's: without them a label in
    contrast_with is refused at the door, saying so (the worker failed with "(labels: [])");
    a class index still passes."""
    from fastapi import HTTPException

    from service.api import door
    from service.api.metadata import ModelMetadata
    from service.registry import ModelSpec, Registry
    from service.schemas import RunTaskRequest

    source = {"kind": "torchvision", "arch": "resnet18", "weights": "w.safetensors"}
    entry = {"id": "resnet", "task": "image-classification", "labels": labels}
    spec = ModelSpec.model_validate({**entry, "source": {**source, "num_classes": 3}})
    meta = ModelMetadata(Registry([spec], tmp_path), str(tmp_path)).get(spec)
    relevance = {"mode": "contrast", "contrast_with": alt}
    req = RunTaskRequest.model_validate(
        {"model": "resnet", "inputs": {"image": _png_header(8, 8)}, "relevance": relevance}
    )
    if expected is None:
        door.check(spec, spec.task, req, meta)
        return
    with pytest.raises(HTTPException) as caught:
        door.check(spec, spec.task, req, meta)
    assert caught.value.detail[0]["message"] == expected


@pytest.mark.parametrize("target, refused", [(0, False), (1, False), (2, True)])
def test_a_single_logit_takes_either_decision_as_target(target: int, refused: bool) -> None:
    """A model with one logit decides between two classes (below and above its threshold),
    and the engine explains either as ``target`` 0 or 1: the door refused 1 ("0 to 0")."""
    from fastapi import HTTPException

    from service.api import door
    from service.api.metadata import ModelMeta
    from service.registry import load_registry
    from service.schemas import RunTaskRequest

    spec = load_registry(None).get("minilm-sentiment")
    req = RunTaskRequest.model_validate(
        {"model": spec.id, "inputs": {"text": "fine"}, "relevance": {"target": target}}
    )
    meta = ModelMeta(num_classes=1)
    if not refused:
        door._check_target(spec, spec.task, req, meta)
        return
    with pytest.raises(HTTPException) as caught:
        door._check_target(spec, spec.task, req, meta)
    assert "2 is not a class of minilm-sentiment: 0 to 1" in str(caught.value.detail)


def _refused(check: Any) -> str:
    """The message of the 422 ``check()`` raises, or "" when it lets the request through."""
    from fastapi import HTTPException

    try:
        check()
    except HTTPException as exc:
        assert exc.status_code == 422
        return exc.detail[0]["message"]
    return ""


def test_an_encoder_decoders_source_and_decoder_have_the_positions_each() -> None:
    """A causal LM's prompt and new tokens share its positions; an encoder-decoder's source
    has them to itself, and its decoder's start token and new tokens have them too: a
    16-token source with 15 new tokens fits 16 positions there (it was refused as a causal
    LM's 31 tokens), 16 new tokens do not, nor does a 17-token source."""
    from engine.tasks import TaskName
    from service.api import door
    from service.api.metadata import ModelMeta
    from service.registry import ModelSpec
    from service.schemas import RunTaskRequest

    source = {"kind": "transformers", "path": "bart-like"}
    spec = ModelSpec(id="bart-like", task="generation", source=source)
    gen = TaskName.GENERATION

    def request(n: int, new: int) -> RunTaskRequest:
        body = {"inputs": {"token_ids": [5] * n}, "generation": {"max_new_tokens": new}}
        return RunTaskRequest(model=spec.id, **body)

    seq2seq, causal = ModelMeta(max_positions=16, encoder_decoder=True), ModelMeta(max_positions=16)
    assert _refused(lambda: door.check(spec, gen, request(16, 15), seq2seq)) == ""
    assert _refused(lambda: door.check(spec, gen, request(16, 16), seq2seq)) == (
        "generation.max_new_tokens: 16 after the decoder's start token is more than the "
        "model's 16 positions: at most 15"
    )
    assert _refused(lambda: door.check(spec, gen, request(17, 1), seq2seq)) == (
        "inputs.token_ids: 17 tokens, more than the 16 positions of bart-like (its config.json)"
    )
    assert _refused(lambda: door.check(spec, gen, request(8, 9), causal)).startswith(
        "generation.max_new_tokens: 9 after a 8-token prompt is more than"
    )


def _tagger(tmp_path: Path, task: str, source: dict) -> tuple[Any, Any]:
    """A text model of ``task`` from ``source`` and what the door knows of it: its entry's
    token axis and a tokenizer that adds [CLS] and [SEP] ("a b" is 4 tokens)."""
    from service.api.metadata import ModelMetadata
    from service.registry import ModelSpec, Registry

    spec = ModelSpec.model_validate({"id": "tagger", "task": task, "source": source})
    axis = ModelMetadata(Registry([spec], tmp_path), str(tmp_path)).get(spec).token_axis
    _, meta = _pair_meta(tmp_path, pairs=True)
    return spec, replace(meta, token_axis=axis)


TRANSFORMERS = {"kind": "transformers", "path": "m"}
PAST_THE_END = (
    "relevance.position: 4 is past the last token of the input: 4 tokens, special ones "
    "included (0 to 3)"
)


@pytest.mark.parametrize(
    ("task", "source", "inputs", "position", "expected"),
    [
        ("token-classification", TRANSFORMERS, {"text": "a b"}, 3, ""),
        ("token-classification", TRANSFORMERS, {"text": "a b"}, 4, PAST_THE_END),
        ("token-classification", TRANSFORMERS, {"token_ids": [1, 3, 4, 2]}, 4, PAST_THE_END),
        (
            "token-classification",
            TRANSFORMERS,
            {"text": ["a", "a b a"]},
            5,
            "relevance.position: 5 is past the last token of the longest input: 5 tokens",
        ),
        ("text-classification", {**TRANSFORMERS, "head": "causal-lm"}, {"text": "a b"}, 3, ""),
        (
            "text-classification",
            {**TRANSFORMERS, "head": "causal-lm"},
            {"text": "a b"},
            4,
            PAST_THE_END,
        ),
        (
            "text-classification",
            {**TRANSFORMERS, "head": "sequence-classification"},
            {"text": "a b"},
            0,
            "relevance.position: text-classification explains one prediction per text (tagger "
            "is a sequence classifier): it takes no position",
        ),
        (
            "text-classification",
            TRANSFORMERS,
            {"text": "a b"},
            0,
            "relevance.position: text-classification explains one prediction per text",
        ),
        ("text-classification", {"kind": "python", "factory": "m:f"}, {"text": "a b"}, 3, ""),
        (
            "text-classification",
            {"kind": "python", "factory": "m:f"},
            {"text": "a b"},
            2**63 - 1,
            "relevance.position: 9223372036854775807 is past the last token an input may "
            "have: 0 to 127 (max_tokens=128)",
        ),
    ],
)
def test_a_position_picks_a_token(
    tmp_path: Path, task: str, source: dict, inputs: dict, position: int, expected: str
) -> None:
    """A position is refused at the door where the model's logits have no token axis (a
    sequence classifier: the job failed in the worker with "position= picks a token of [B,
    T, C] logits") or where it is past the input's tokens (the job failed with "position
    must be one index in [0, 4)"); a python factory's model is left to the worker, but for a
    position past max_tokens (it failed with "Overflow when unpacking long long")."""
    from service.api import door
    from service.schemas import RunTaskRequest

    spec, meta = _tagger(tmp_path, task, source)
    body = {"model": "tagger", "inputs": inputs, "relevance": {"position": position}}
    req = RunTaskRequest.model_validate(body)
    message = _refused(lambda: door.check(spec, spec.task, req, meta))
    assert message.startswith(expected) if expected else message == "", message


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            {**LOOKUP, "generation": {"seed": 2**64, "do_sample": True}},
            "generation.seed: Input should be less than 18446744073709551616 (got "
            "18446744073709551616)",
        ),
        (
            {**SENTIMENT, "relevance": {"target": 2**63}},
            "relevance.target: Input should be less than 9223372036854775808 (got "
            "9223372036854775808)",
        ),
        (
            {**SENTIMENT, "relevance": {"mode": "contrast", "contrast_with": 2**63}},
            "relevance.contrast_with: contrast_with must be a class index (0 to "
            "9223372036854775807) or a label",
        ),
    ],
)
def test_numbers_past_what_torch_holds(api: TestClient, body: dict, expected: str) -> None:
    """A seed past torch's (2**64 - 1) or an index past a long's is refused, whatever the
    door knows of the model: such jobs failed in the worker with "Overflow when unpacking
    long long"."""
    assert _message(api.post("/run_task", json=body)) == expected


def test_a_token_id_past_a_long_when_the_vocabulary_is_not_known() -> None:
    """Without the model's vocabulary size (a model not built yet), an id past a long is
    still no token id (the job failed with "Overflow when unpacking long long")."""
    from service.api import door
    from service.api.metadata import ModelMeta
    from service.registry import load_registry
    from service.schemas import RunTaskRequest

    spec = load_registry(None).get("tiny-lookup-lm")
    req = RunTaskRequest(model=spec.id, inputs={"token_ids": [3, 2**63]})
    assert _refused(lambda: door.check(spec, spec.task, req, ModelMeta())) == (
        "inputs.token_ids: id 9223372036854775808 is not a token id (0 to the vocabulary size - 1)"
    )


@pytest.mark.parametrize("mode", ["contrast", "reference"])
def test_question_answering_has_no_contrast(tmp_path: Path, mode: str) -> None:
    """A question-answering model's start and end are no alternatives to contrast: mode
    contrast was a 202 whose job failed ('mode "contrast" is not defined for
    question-answering'); mode reference is its signed mode."""
    from service.api import door
    from service.schemas import RunTaskRequest

    spec, meta = _tagger(tmp_path, "question-answering", TRANSFORMERS)
    inputs = {"text": "a", "text_pair": "a b"}
    req = RunTaskRequest(model="tagger", inputs=inputs, relevance={"mode": mode})
    expected = (
        "relevance.mode: contrast: question-answering explains the predicted answer's start "
        "and end, which are not alternatives of one another; use default or reference"
    )
    message = _refused(lambda: door.check(spec, spec.task, req, meta))
    assert message == (expected if mode == "contrast" else "")


@pytest.mark.parametrize(
    ("features", "expected"),
    [
        (
            [[1.0, 2.0], [1.0]],
            "inputs.features: row 1 has 1 features, row 0 2: give every row as many",
        ),
        (
            [1e300, 1.0],
            "inputs.features: 1e+300 (row 0, feature 0) is past float32's range (at most "
            "3.402823e+38 either way), which the model reads as infinity",
        ),
        ([[1.0, 2.0], [3.0, -1e39]], "inputs.features: -1e+39 (row 1, feature 1) is past"),
        ([[3e38, -3e38], [0.0, 1e-320]], ""),
    ],
)
def test_features_a_model_can_read(features: list, expected: str) -> None:
    """Rows as wide as each other, of numbers a float32 holds: ragged rows failed in the
    worker with numpy's "setting an array element with a sequence", and 1e300 with "input
    holds 1 NaN or inf value(s)" (the cast to float32 made it infinite)."""
    from service.api import validation
    from service.registry import ModelSpec
    from service.schemas import RunTaskRequest

    source = {"kind": "python", "factory": "m:f"}
    spec = ModelSpec(id="tab", task="tabular-classification", source=source)
    req = RunTaskRequest(model="tab", inputs={"features": features})
    message = _refused(lambda: validation.check_inputs(spec, req))
    assert message.startswith(expected) if expected else message == "", message


@pytest.mark.parametrize(
    ("left", "position", "expected"),
    [
        (False, 2, ""),
        (
            False,
            3,
            "relevance.position: 3 falls on the padding of inputs.text.0 (3 tokens, padded on "
            "the right to 5): positions 0 to 2 are tokens of every input",
        ),
        (True, 4, ""),
        (
            True,
            1,
            "relevance.position: 1 falls on the padding of inputs.text.0 (3 tokens, padded on "
            "the left to 5): positions 2 to 4 are tokens of every input",
        ),
    ],
)
def test_a_position_on_every_input_of_a_batch(
    tmp_path: Path, left: bool, position: int, expected: str
) -> None:
    """One position for a batch is a token of every input, as the tokenizer pads them (its
    tokenizer_config.json's padding_side): one on a shorter input's padding was a 202 whose
    job failed with "position [3, 3] falls on padding"."""
    from service.api import door, metadata
    from service.schemas import RunTaskRequest

    side = {"padding_side": "left"} if left else {}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(side))
    spec, meta = _tagger(tmp_path, "token-classification", TRANSFORMERS)
    meta = replace(meta, pads_left=metadata._pads_left(metadata._tokenizer_config(tmp_path)))
    inputs = {"text": ["a", "a b a"]}  # 3 and 5 tokens with [CLS] and [SEP]
    req = RunTaskRequest(model="tagger", inputs=inputs, relevance={"position": position})
    message = _refused(lambda: door.check(spec, spec.task, req, meta))
    assert message == expected


def test_one_idempotency_key_a_request(api: TestClient) -> None:
    """Two Idempotency-Key headers with different keys (a proxy's and the client's) were a
    202 keyed by one of them, silently; the same key twice is one key."""
    headers = [("Idempotency-Key", "order-1"), ("Idempotency-Key", "order-2")]
    resp = api.post("/run_task", json=SENTIMENT, headers=headers)
    assert _message(resp) == "Idempotency-Key: sent 2 keys ('order-1' and 'order-2'): send one"
    assert resp.json()["detail"][0]["loc"] == ["header", "Idempotency-Key"]
    twice = [("Idempotency-Key", "order-3")] * 2
    resp = api.post("/run_task", json=SENTIMENT, headers=twice)
    assert resp.status_code == 202, resp.text
    api.delete(f"/jobs/{resp.json()['job_id']}")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "\x01\x02",
            'inputs.text: "\\u0001\\u0002" holds no token: the tokenizer of tagger drops each',
        ),
        ("\u200b", 'inputs.text: "\u200b" holds no token'),
        ("a \x01", ""),
    ],
)
def test_text_the_tokenizer_drops_whole(tmp_path: Path, text: str, expected: str) -> None:
    """Text of characters a BERT tokenizer drops (control, zero-width) is no input: the job
    explained [CLS] and [SEP] alone, and its answer meant nothing."""
    from tokenizers import normalizers

    from service.api import door
    from service.schemas import RunTaskRequest

    spec, meta = _tagger(tmp_path, "text-classification", TRANSFORMERS)
    meta.tokenizer.normalizer = normalizers.BertNormalizer()
    req = RunTaskRequest(model="tagger", inputs={"text": text})
    message = _refused(lambda: door.check(spec, spec.task, req, meta))
    assert message.startswith(expected) if expected else message == "", message


def test_base64_wrapped_in_lines_is_taken(api: TestClient) -> None:
    """Base64 as the base64 tool writes it, in lines of 76 characters (MIME), is an image:
    it was refused as "not valid base64", though the worker's decoder drops line breaks."""
    b64 = _png_header(16, 16)
    wrapped = "\n".join(b64[i : i + 76] for i in range(0, len(b64), 76)) + "\n"
    assert "\n" in wrapped.strip()
    resp = api.post("/run_task", json={"model": "digits-cnn", "inputs": {"image": wrapped}})
    assert resp.status_code == 202, resp.text
    api.delete(f"/jobs/{resp.json()['job_id']}")


def test_a_refusal_names_at_most_twenty_labels() -> None:
    """A model of 1000 classes: a label it lacks, or a target past them, is refused naming
    twenty labels and how many more, not a message of every one."""
    from service.api import door
    from service.api.metadata import ModelMeta
    from service.registry import ModelSpec
    from service.schemas import RunTaskRequest

    labels = [f"class{i}" for i in range(1000)]
    source = {"kind": "torchvision", "arch": "resnet18", "weights": "w.safetensors"}
    spec = ModelSpec(id="big", task="image-classification", source=source, labels=labels)
    meta = ModelMeta(num_classes=1000, labels=tuple(labels))
    image = {"image": _png_header(8, 8)}
    for relevance, field in (
        ({"target": 1000}, "target"),
        ({"contrast_with": "cat"}, "contrast_with"),
    ):
        req = RunTaskRequest(model="big", inputs=image, relevance={"mode": "contrast", **relevance})
        message = _refused(lambda req=req: door.check(spec, "image-classification", req, meta))
        assert message.startswith(f"relevance.{field}: "), message
        assert "class19 and 980 more" in message and "class20" not in message, message
