"""Idempotency-Key: a repeat of a request with the same key (and body) gets the same job.

The first request claims the key in Redis (``SET NX``) with the job it was accepted as; a
repeat reads that job back. A request that is not accepted releases the key, so a retry with
the same key may try again. Keys are scoped to the caller's API key, so that callers cannot
see each other's jobs."""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aredis
from fastapi import HTTPException, Request

from .. import store
from .deps import presented_key
from .errors import invalid


@dataclass(frozen=True)
class IdempotentRequest:
    """The Redis key for a request's Idempotency-Key, and a fingerprint of its body."""

    key: str
    fingerprint: str

    @classmethod
    def of(
        cls, request: Request, given: str | None, body: dict[str, Any]
    ) -> IdempotentRequest | None:
        """None without the header; a 422 for a header sent with several keys (which one
        the request meant is not ours to guess)."""
        if given is None:
            return None
        keys = list(dict.fromkeys(request.headers.getlist("idempotency-key")))
        if len(keys) > 1:
            sent = " and ".join(repr(k) for k in keys[:2])
            raise invalid(
                ["Idempotency-Key"], f"sent {len(keys)} keys ({sent}): send one", "header"
            )
        scope = hashlib.sha256(f"{presented_key(request)}\0{given}".encode()).hexdigest()
        fingerprint = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        return cls(store.IDEMPOTENCY.format(scope), fingerprint)

    async def claim(
        self, ar: aredis.Redis, accepted: dict[str, Any], ttl: int
    ) -> dict[str, Any] | None:
        """Claim the key for ``accepted``; None when claimed, else the first request's
        accepted job (409 while the first is being retried, 422 when the key came with
        another body)."""
        first = {"fingerprint": self.fingerprint, "response": accepted}
        if await ar.set(self.key, json.dumps(first), nx=True, ex=ttl):
            return None
        raw = await ar.get(self.key)
        if raw is None:  # the first request failed and released the key just now
            raise HTTPException(409, "a request with this Idempotency-Key is being retried")
        first = json.loads(raw)
        if first["fingerprint"] != self.fingerprint:
            raise HTTPException(422, "Idempotency-Key was used with a different request body")
        return first["response"]

    async def release(self, ar: aredis.Redis) -> None:
        """Give the key up (best effort) after the request was not accepted."""
        with contextlib.suppress(redis.RedisError):
            await ar.delete(self.key)
