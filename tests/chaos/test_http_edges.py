"""Bodies that FastAPI's JSON parsing gives up on, or that are not what they say, against
the session's shared stack: each a 4xx whose message names the problem (they were a 422
about UTF-8 for a gzipped body, and a plain 400 "There was an error parsing the body")."""

from __future__ import annotations

import gzip
import json
import sys

import httpx
import pytest

JSON = {"content-type": "application/json"}
BODY = json.dumps({"model": "minilm-sentiment", "inputs": {"text": "fine"}}).encode()


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "GZIP"])
def test_compressed_bodies_are_415_naming_the_encoding(client: httpx.Client, encoding: str) -> None:
    headers = {**JSON, "content-encoding": encoding}
    resp = client.post("/run_task", content=gzip.compress(BODY), headers=headers)
    assert resp.status_code == 415, resp.text
    assert resp.json()["detail"] == (
        f"Content-Encoding {encoding} is not supported: send the body as is"
    )


def test_identity_encoding_is_taken(client: httpx.Client) -> None:
    resp = client.post("/run_task", content=BODY, headers={**JSON, "content-encoding": "identity"})
    assert resp.status_code == 202, resp.text


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (
            b'{"model": "minilm-sentiment", "inputs": {"text": ' + b"[" * 50000 + b"]" * 50000,
            f"nested too deeply (arrays and objects over {sys.getrecursionlimit()} levels)",
        ),
        (
            b'{"model": "digits-cnn", "inputs": {"features": [' + b"9" * 5000 + b"]}}",
            f"a number has more than {sys.get_int_max_str_digits()} digits",
        ),
    ],
    ids=["deep", "long-number"],
)
def test_bodies_the_parser_gives_up_on_are_422_saying_why(
    client: httpx.Client, body: bytes, why: str
) -> None:
    resp = client.post("/run_task", content=body, headers=JSON)
    assert resp.status_code == 422, resp.text
    (error,) = resp.json()["detail"]
    assert error["message"] == f"request body is not valid JSON: {why}"
    assert error["loc"] == ["body"] and error["type"] == "json_invalid"
