"""Exception handlers: every error body is ``{"detail": ...}`` (``schemas.ErrorBody``), and
each 422 lists its failing fields with a one-line ``message`` that names the field
(``schemas.ValidationErrorBody``), for pydantic's checks and the registry's alike."""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

import redis
from fastapi import FastAPI, HTTPException, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..schemas import ErrorBody, ValidationErrorBody, shown
from .json_body import DuplicateKey

log = logging.getLogger("service.api")
RETRY_AFTER = {"Retry-After": "5"}
# The error replies every route may give, for /docs.
UNAVAILABLE = {503: {"model": ErrorBody, "description": "Redis unavailable; retry later"}}
UNAUTHORIZED = {401: {"model": ErrorBody, "description": "missing or wrong API key"}}
INVALID = {422: {"model": ValidationErrorBody, "description": "invalid request"}}
# FastAPI's detail for a body its JSON parser failed on without a JSONDecodeError.
PARSE_FAILURE = "There was an error parsing the body"
NO_JOB = {404: {"model": ErrorBody, "description": "no such job (unknown or expired)"}}


def no_job(job_id: str) -> HTTPException:
    """The 404 of every route that reads a job id no job has (``NO_JOB``)."""
    return HTTPException(404, f"no job {job_id!r} (unknown or expired)")


# What the fields with a pattern take, in words: pydantic's "String should match pattern
# '^[A-Za-z0-9._\-/]+$'" is a regular expression.
PATTERNS = {
    "model": "a model id of the registry (GET /models): letters, digits, '.', '_', '-' and '/'",
    "job_id": "a job id: 1 to 128 letters, digits, '_' and '-'",
}


# pydantic's messages that say something else than what happened: a number past what an
# integer field takes (1e300) "Unable to parse input string as an integer".
REWORDED = {"int_parsing_size": "Input should be an integer, not a number this large"}


def invalid(loc: list[str | int], msg: str, where: str = "body") -> HTTPException:
    """A 422 shaped like FastAPI's own, with a one-line message that names the field (of the
    body, or ``where`` else: a header)."""
    field = ".".join(str(p) for p in loc)
    return HTTPException(
        422,
        detail=[
            {"loc": [where, *loc], "msg": msg, "type": "value_error", "message": f"{field}: {msg}"}
        ],
    )


async def redis_unavailable(request: Request, exc: redis.RedisError) -> JSONResponse:
    """Redis down, restarting or full is a temporary condition of this service, not a bug:
    503 with Retry-After, saying which."""
    log.warning("503 for %s %s: %s", request.method, request.url.path, exc)
    if isinstance(exc, redis.exceptions.OutOfMemoryError):  # noeviction refuses writes
        detail = "queue full: Redis is out of memory (its maxmemory), retry later"
    else:
        detail = f"queue unavailable, retry later ({type(exc).__name__})"
    return JSONResponse({"detail": detail}, 503, headers=RETRY_AFTER)


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422, each error with its ``message``; a body that is not JSON says where,
    an empty one says so, and one not sent as JSON says so (FastAPI reads it as bytes, also
    without a Content-Type, which pydantic then calls not a dictionary)."""
    if (whole := _whole_body(request, exc)) is not None:
        kind, msg = whole
        return JSONResponse(
            {"detail": [{"loc": ["body"], "msg": msg, "type": kind, "message": msg}]}, 422
        )
    errors = []
    for e in exc.errors():
        loc = [str(p) for p in e["loc"]]
        # pydantic prefixes a validator's ValueError with "Value error, ": not for people
        msg = e["msg"].removeprefix("Value error, ") if e["type"] == "value_error" else e["msg"]
        kind = e["type"]
        msg = REWORDED.get(kind, msg)
        if kind == "string_pattern_mismatch" and loc[-1] in PATTERNS:
            msg = f"{PATTERNS[loc[-1]]} (got {shown(e['input'])})"
        if (lone := _lone_surrogate(e.get("input"))) is not None:
            where, msg = lone
            loc, kind = loc + where, "string_unicode"
        message = f"{'.'.join(loc[1:] or loc)}: {msg}"
        if kind not in _SAYS_ITS_VALUE and "(got " not in msg and "input" in e:
            message += f" (got {shown(e['input'])})"
        if kind == "json_invalid":
            message = _json_error(e, exc.body)
            loc = ["body"]
        errors.append({"loc": loc, "msg": e["msg"], "type": kind, "message": message})
    return JSONResponse({"detail": errors}, 422)


# The errors whose message says what was sent, or where the value would say nothing: the
# others (pydantic's "Input should be greater than or equal to 0") get "(got -1)".
_SAYS_ITS_VALUE = frozenset(
    {
        "missing",
        "extra_forbidden",
        "value_error",
        "bool_not_number",
        "string_unicode",
        "json_invalid",
    }
)


def _whole_body(request: Request, exc: RequestValidationError) -> tuple[str, str] | None:
    """The error type and message where the body as a whole failed: none was sent, or it
    was not sent as JSON; None where its fields did."""
    whole = [e["type"] for e in exc.errors() if tuple(e["loc"]) == ("body",)]
    if not whole:
        return None
    if "missing" in whole:
        return "missing", "request body is empty: send the request as a JSON object"
    media = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
    if media == "application/json" or media.endswith("+json"):
        return None
    sent = media or "no Content-Type"
    return (
        "content_type",
        f"request body must be JSON, sent with Content-Type: application/json (got {sent})",
    )


_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _lone_surrogate(value: Any) -> tuple[list[str], str] | None:
    """Where a refused string (or list of them) holds a surrogate code point, which JSON's
    ``\\ud800`` escapes give when unpaired (a pair decodes to one character), and saying
    so: pydantic refuses such text as "not a valid string", or the text field as not
    "a non-empty string", neither of which names the cause. The path below the error's
    field (a list's index) and the message; None when there is none."""
    if isinstance(value, str):
        found = _SURROGATE.search(value)
        if found is None:
            return None
        char, at = f"\\u{ord(found.group()):04x}", found.start() + 1
        why = f"the text holds an unpaired surrogate ({char} at character {at}), not valid Unicode"
        return [], why
    if isinstance(value, list):
        for i, item in enumerate(value):
            if (inner := _lone_surrogate(item)) is not None:
                return [str(i), *inner[0]], inner[1]
    return None


def _json_error(error: dict[str, Any], body: Any) -> str:
    """Where JSON decoding stopped, as line and column (FastAPI gives the character offset
    as the error's ``loc``)."""
    why = (error.get("ctx") or {}).get("error", "JSON decode error")
    pos = error["loc"][-1]
    if not isinstance(pos, int) or not isinstance(body, str | bytes):
        return f"request body is not valid JSON: {why}"
    text = body.decode(errors="replace") if isinstance(body, bytes) else body
    return f"request body is not valid JSON: {why} at {_line_column(text, pos)}"


def _line_column(text: str, pos: int) -> str:
    """``line L column C`` of character ``pos`` of ``text``."""
    line = text.count("\n", 0, pos) + 1
    column = pos - (text.rfind("\n", 0, pos) + 1) + 1
    return f"line {line} column {column}"


async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
    """FastAPI's own reply, but for a JSON body that its parser gave up on for a reason
    FastAPI does not name (a plain 400, "There was an error parsing the body"): a 422 in
    this service's format that says why (``_unparsed``), or names the key an object has
    twice (``json_body``)."""
    if isinstance(exc.__cause__, DuplicateKey):
        kind = "json_duplicate_key"
        msg = f"request body names key {exc.__cause__.key!r} twice in one object: send it once"
    elif (why := _unparsed(exc)) is not None:
        kind, msg = "json_invalid", f"request body is not valid JSON: {why}"
    else:
        return await http_exception_handler(request, exc)
    return JSONResponse(
        {"detail": [{"loc": ["body"], "msg": msg, "type": kind, "message": msg}]}, 422
    )


def _unparsed(exc: StarletteHTTPException) -> str | None:
    """Why FastAPI could not parse the body, when ``exc`` is its parse failure: bytes that
    are not UTF-8 (or UTF-16/32, which JSON also reads; which byte, where), nesting deeper
    than the parser's recursion allows, a number longer than Python converts, or what the
    parser said otherwise; None for any other error."""
    cause = exc.__cause__
    if exc.status_code != 400 or exc.detail != PARSE_FAILURE or cause is None:
        return None
    if isinstance(cause, UnicodeDecodeError):
        before = cause.object[: cause.start].decode("utf-8", errors="replace")  # valid so far
        byte = cause.object[cause.start : cause.start + 1].hex()
        return f"not UTF-8 (byte 0x{byte} at {_line_column(before, len(before))})"
    if isinstance(cause, RecursionError):
        return f"nested too deeply (arrays and objects over {sys.getrecursionlimit()} levels)"
    if isinstance(cause, ValueError) and "integer string conversion" in str(cause):
        return f"a number has more than {sys.get_int_max_str_digits()} digits"
    return f"{type(cause).__name__}: {cause}"


def install(app: FastAPI) -> None:
    app.add_exception_handler(redis.RedisError, redis_unavailable)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
