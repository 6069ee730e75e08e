"""Helpers the test packages share, so that no test module imports another one (or a
conftest): ``stack`` (the session's processes: paths, the ``Stack`` record, extra API
processes), ``jobs`` (submitting, polling and streaming jobs over HTTP), ``inputs`` (request
payloads), ``cluster`` (the fault tests' own Redis, workers and SSE listeners) and ``browser``
(artefacts of the page tests). Fixtures stay in the conftest files."""
