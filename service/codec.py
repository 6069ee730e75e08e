"""Arrays in JSON without pickle: raw little-endian float16/float32 bytes in base64 with their
shape and dtype beside them (about 5x smaller than floats as text), or plain JSON numbers
when a client asks for them. numpy only, so the API can decode for heatmaps."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

DTYPES = {"float16": "<f2", "float32": "<f4"}


def encode(a: Any, encoding: str = "base64", dtype: str = "float16") -> dict[str, Any]:
    arr = np.asarray(a, dtype=np.float32)
    if encoding == "json":
        return {"shape": list(arr.shape), "dtype": "float32", "values": arr.tolist()}
    raw = np.ascontiguousarray(arr.astype(DTYPES[dtype])).tobytes()
    return {"shape": list(arr.shape), "dtype": dtype, "b64": base64.b64encode(raw).decode()}


def decode(d: dict[str, Any]) -> np.ndarray:
    if "values" in d:
        return np.asarray(d["values"], dtype=np.float32).reshape(d["shape"])
    raw = base64.b64decode(d["b64"])
    return np.frombuffer(raw, dtype=DTYPES[d["dtype"]]).astype(np.float32).reshape(d["shape"])
