"""What the workers write to Redis is JSON every client can parse (``store.dumps``)."""

from __future__ import annotations

import json

import numpy as np

from service import store
from service.vocabulary import Event, JobStatus


def test_nan_and_infinity_are_written_as_null():
    """``json.dumps`` wrote NaN and Infinity, which ``JSON.parse`` in browsers refuses: a
    result with one of them could not be shown at all."""
    raw = store.dumps({"score": float("nan"), "logits": [float("inf"), -float("inf"), 1.5]})
    assert json.loads(raw, parse_constant=lambda c: _refuse(c)) == {
        "score": None,
        "logits": [None, None, 1.5],
    }


def test_numpy_values_and_vocabulary_are_written_as_their_values():
    raw = store.dumps(
        {
            "status": JobStatus.FINISHED,
            "event": Event.DONE,
            "values": np.arange(3, dtype=np.float32),
            "index": np.int64(2),
            1: "a key that is not a string",
        }
    )
    assert json.loads(raw) == {
        "status": "finished",
        "event": "done",
        "values": [0.0, 1.0, 2.0],
        "index": 2,
        "1": "a key that is not a string",
    }


def _refuse(constant: str) -> None:
    raise AssertionError(f"not JSON: {constant}")
