"""The job the API enqueues by dotted path (``service.jobs.run_job``): prepare inputs, run
the engine on a cached model, stream events and store the result in Redis.

Runs inside an RQ ``SimpleWorker``. Arguments and return value go through RQ's JSON
serializer, so only plain JSON crosses the queue; arrays are written by us as raw bytes."""

from __future__ import annotations

import base64
import io
import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import torch
from rq import get_current_job

from . import __version__, batching, codec, store
from . import worker_metrics as m
from .config import Settings
from .models import ModelCache
from .registry import ModelSpec, Registry, load_registry


def _now() -> str:
    """The job's end as the result document records it: RQ sets its own ``ended_at`` only
    after the job function returns, so a poller could see the result without it."""
    return datetime.now(UTC).isoformat()


class JobCanceled(Exception):
    """Raised at a checkpoint when a client asked to cancel the running job."""


@dataclass
class WorkerState:
    settings: Settings
    registry: Registry
    cache: ModelCache
    name: str


_STATE: WorkerState | None = None


def init_worker(settings: Settings | None = None, name: str | None = None) -> WorkerState:
    """Process-wide state: the registry and the model cache (kept across jobs)."""
    global _STATE
    settings = settings or Settings()
    registry = load_registry(settings.registry_path)
    cache = ModelCache(registry, settings.data_dir, settings.cache_bytes)
    _STATE = WorkerState(settings, registry, cache, name or store.worker_id())
    return _STATE


def state() -> WorkerState:
    return _STATE or init_worker()


def warm(spec: ModelSpec) -> None:
    """Load a model, capture its graph and run it once on a sample input, so that the first
    request pays none of that (export, lazy initialisation of the rule sweep)."""
    entry, hit = state().cache.get(spec)
    if not hit:
        m.CACHE_MISSES.labels(model=spec.id).inc()
        m.LOAD.labels(model=spec.id).observe(entry.load_s)
    if spec.task == "tabular-classification":
        return  # the row width is not known before a request
    if spec.task == "image-classification":
        img = entry.dm.image or {"channels": 3, "size": 224}
        name = entry.input_name
        batch = {name: torch.zeros(1, img["channels"], img["size"], img["size"])}
    else:
        batch = _token_batch(spec, entry, {"text": "warm up"})
    batch = {k: v.to(entry.device) for k, v in batch.items()}
    dlb = entry.backtrace(batch)
    if spec.task == "generation":
        dlb.run_task(
            task="generation", inputs=batch, tokenizer=entry.dm.tokenizer, max_new_tokens=1
        )
    else:
        dlb.run_task(task=spec.task, inputs=batch, relevance_nodes="inputs")


# ---------------------------------------------------------------------- inputs


def _texts(inputs: dict[str, Any]) -> list[str]:
    text = inputs["text"]
    return [text] if isinstance(text, str) else list(text)


def _token_batch(spec: ModelSpec, entry: Any, inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
    """input_ids and attention_mask from texts or raw ids, checked against max_tokens."""
    tok = entry.dm.tokenizer
    if inputs.get("token_ids") is not None:
        ids = inputs["token_ids"]
        rows = [ids] if ids and isinstance(ids[0], int) else ids
        width = max(len(r) for r in rows)
        pad = tok.pad_token_id if tok is not None and tok.pad_token_id is not None else 0
        left = tok is not None and tok.padding_side == "left"
        ids_t = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            sl = slice(width - len(r), width) if left else slice(0, len(r))
            ids_t[i, sl] = torch.tensor(r)
            mask[i, sl] = 1
        if tok is not None and ids_t.max() >= len(tok):
            raise ValueError(f"inputs.token_ids: id {int(ids_t.max())} is not in the vocabulary")
        enc = {"input_ids": ids_t, "attention_mask": mask}
    else:
        enc = dict(tok(_texts(inputs), padding=True, return_tensors="pt"))
        enc = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    length = enc["input_ids"].shape[1]
    if length > spec.limits.max_tokens:
        raise ValueError(
            f"inputs: {length} tokens, more than max_tokens={spec.limits.max_tokens} "
            f"for model {spec.id}"
        )
    return enc


def _image_batch(entry: Any, inputs: dict[str, Any]) -> tuple[dict[str, torch.Tensor], bytes]:
    """The model's input tensor [1, C, S, S] and the resized picture (PNG) for the heatmap;
    a PNG already at the model's size and mode is kept as sent."""
    from PIL import Image

    spec = entry.dm.image or {"channels": 3, "size": 224, "mean": [0.0] * 3, "std": [1.0] * 3}
    raw = base64.b64decode(inputs["image"].split(",", 1)[-1])
    img = Image.open(io.BytesIO(raw))
    mode, size = spec.get("mode", "RGB" if spec["channels"] == 3 else "L"), spec["size"]
    if img.format == "PNG" and img.mode == mode and img.size == (size, size):
        png = raw
    else:
        img = img.convert(mode).resize((size, size), Image.Resampling.BILINEAR)
        out = io.BytesIO()
        img.save(out, format="PNG")
        png = out.getvalue()
    arr = np.asarray(img, dtype=np.float32) / 255.0
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    mean = np.asarray(spec["mean"], dtype=np.float32)[:, None, None]
    std = np.asarray(spec["std"], dtype=np.float32)[:, None, None]
    x = torch.from_numpy((arr - mean) / std)[None]
    return {entry.input_name: x}, png


# ---------------------------------------------------------------------- the job


@dataclass
class Work:
    """One job as the worker runs it. ``job`` is its RQ job (None when called directly)."""

    job_id: str
    request: dict[str, Any]
    job: Any = None
    picked: float = 0.0  # when this worker took it, for the queue wait

    @property
    def queue_wait(self) -> float | None:
        if self.job is None or self.job.enqueued_at is None:
            return None
        return max(0.0, self.picked - self.job.enqueued_at.timestamp())


def run_job(request: dict[str, Any]) -> dict[str, Any]:
    """Entry point enqueued by the API as ``service.jobs.run_job``.

    A classification job also takes the queued jobs of its batch group (``service.batching``)
    and runs them in the same engine call; it ends those itself. While more of them keep
    arriving it runs further batches of the group, up to ``BATCH_ROUNDS_S``: under steady
    load that skips RQ's own round trips between batches (about ten per job), which were most
    of the time a request waited in the queue. Every failure inside is deterministic (bad
    input, the model raised, timeout), so it is recorded with its message and not retried;
    RQ's Retry only re-runs jobs whose worker died under them. A BaseException (a cold
    shutdown of the worker) is left to RQ: the job is then abandoned and retried, and the
    claimed jobs are put back by the reaper."""
    st = state()
    job = get_current_job()
    job_id = job.id if job is not None else request.get("job_id", "local")
    r = job.connection if job is not None else store.connect(st.settings.redis_url)
    primary = Work(job_id, request, job, time.time())
    group = batching.group_key(request)
    batched = job is not None and group is not None and st.settings.max_batch > 1

    def claim(n: int) -> list[Work]:
        if not batched:
            return []
        timeout = st.settings.job_timeout + 60  # as RQ's own started-job registry
        jobs = batching.claim(r, group, job.origin, st.name, n, timeout)
        return [Work(j.id, j.kwargs["request"], j, time.time()) for j in jobs]

    outcome = _batch(st, r, [primary, *claim(st.settings.max_batch - 1)], primary)
    until = time.monotonic() + BATCH_ROUNDS_S
    while batched and time.monotonic() < until and (works := claim(st.settings.max_batch)):
        _batch(st, r, works, None)
    m.update_gpu_memory()
    if isinstance(outcome, Exception):
        if job is not None:
            job.retries_left = 0  # deterministic: a retry would fail the same way
        raise outcome
    return {"status": "finished"}


# How long a job keeps running further batches of its group that arrive meanwhile; bounded
# so that jobs of other models behind it in the queue are not starved.
BATCH_ROUNDS_S = 0.5


def _batch(
    st: WorkerState, r: Any, works: list[Work], primary: Work | None
) -> dict[str, Any] | Exception | None:
    """Run the works as one batch and store every result; the jobs claimed from the queue
    are also ended in RQ. Returns the outcome of ``primary`` (the job RQ handed out)."""
    outcomes = _run(st, r, works)
    pipe = r.pipeline(transaction=False)
    for w, o in zip(works, outcomes, strict=True):
        status = _record(st, pipe, w, o)
        if w is not primary:
            batching.settle(pipe, w.job, status, st.settings.result_ttl, st.settings.failure_ttl)
    pipe.execute()
    return outcomes[0] if primary is not None else None


def _run(st: WorkerState, r: Any, works: list[Work]) -> list[dict[str, Any] | Exception]:
    """The result document of each job, or the exception that ended it."""
    request = works[0].request
    spec = st.registry.get(request["model"])
    if spec is None:
        error = f"model {request['model']!r} is not in this worker's registry"
        return [ValueError(error) for _ in works]
    task = request.get("task") or spec.task
    ttl, maxlen = st.settings.result_ttl, st.settings.stream_maxlen
    starts = [(w.job_id, {"worker": st.name, "attempt": _attempt(w.job)}) for w in works]
    canceled = store.start(r, starts, ttl, maxlen)
    outcomes: list[dict[str, Any] | Exception | None] = [
        JobCanceled("canceled by request") if c else None for c in canceled
    ]
    live = [i for i, o in enumerate(outcomes) if o is None]
    try:
        entry, hit = _load(st, spec)
    except Exception as exc:  # noqa: BLE001 - the model cannot load: every job fails with it
        return [exc if o is None else o for o in outcomes]
    if task == "generation":
        if live:
            outcomes[0] = _one(lambda: _generate(st, spec, entry, works[0], r))
    else:
        done = _classify(st, spec, task, entry, [works[i] for i in live])
        for i, outcome in zip(live, done, strict=True):
            outcomes[i] = outcome
    ok = [i for i, o in enumerate(outcomes) if isinstance(o, dict)]
    asked = store.cancels_requested(r, [works[i].job_id for i in ok])
    for i, c in zip(ok, asked, strict=True):
        doc = outcomes[i]
        assert isinstance(doc, dict)
        if c:
            outcomes[i] = JobCanceled("canceled by request")
            continue
        doc["timings"]["load_s"] = 0.0 if hit else entry.load_s
        doc["timings"]["cache"] = "hit" if hit else "miss"
    return [o if o is not None else RuntimeError("not run") for o in outcomes]


def _one(fn: Any) -> dict[str, Any] | Exception:
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - recorded as the job's failure
        return exc


def _record(st: WorkerState, pipe: Any, w: Work, outcome: dict[str, Any] | Exception) -> str:
    """Store the job's result (or error) and its terminal event on ``pipe``; update the
    metrics; return the job's final status."""
    model_id = w.request["model"]
    spec = st.registry.get(model_id)
    task = w.request.get("task") or (spec.task if spec else "unknown")
    ttl, maxlen = st.settings.result_ttl, st.settings.stream_maxlen
    total = time.time() - w.picked
    if isinstance(outcome, dict):
        doc, status, event = outcome, "finished", "done"
        doc["timings"] = {"queue_wait_s": w.queue_wait, **doc["timings"], "total_s": total}
        doc["ended_at"] = _now()
        data = {"status": status, "summary": doc.get("summary", {}), "timings": doc["timings"]}
    else:
        status = "canceled" if isinstance(outcome, JobCanceled) else "failed"
        event = "canceled" if status == "canceled" else "error"
        data = {"type": type(outcome).__name__, "message": _message(outcome)}
        doc = {"status": status, "model": model_id, "task": task, "error": data,
               "ended_at": _now()}  # fmt: skip
    written = store.finish(pipe, w.job_id, doc, event, data, ttl, maxlen)
    if w.queue_wait is not None:
        m.QUEUE_WAIT.labels(task=task, model=model_id).observe(w.queue_wait)
    m.JOBS.labels(task=task, model=model_id, status=status).inc()
    m.RUN.labels(task=task, model=model_id).observe(total)
    m.TRACE_BYTES.labels(model=model_id).inc(written)
    return status


def _attempt(job: Any) -> int:
    if job is None or job.retries_left is None:
        return 1
    return 1 + max(0, state().settings.retries - job.retries_left)


def _message(exc: BaseException) -> str:
    if isinstance(exc, ModuleNotFoundError) and "engine.generation" in str(exc):
        return "generation is not available in this engine yet (issue 3): " + str(exc)
    if isinstance(exc, NotImplementedError):
        return f"not implemented in the engine: {exc}" if str(exc) else "not implemented"
    return str(exc) or type(exc).__name__


def _load(st: WorkerState, spec: ModelSpec) -> tuple[Any, bool]:
    entry, hit = st.cache.get(spec)
    (m.CACHE_HITS if hit else m.CACHE_MISSES).labels(model=spec.id).inc()
    if not hit:
        m.LOAD.labels(model=spec.id).observe(entry.load_s)
    return entry, hit


def _inputs(
    spec: ModelSpec, entry: Any, task: str, inputs: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], bytes | None]:
    """The model's input tensors for one request, and the resized picture of an image."""
    if task == "image-classification":
        return _image_batch(entry, inputs)
    if task == "tabular-classification":
        rows = np.asarray(inputs["features"], dtype=np.float32)
        x = torch.from_numpy(rows[None] if rows.ndim == 1 else rows)
        return {entry.input_name: x}, None
    return _token_batch(spec, entry, inputs), None


def _on_device(entry: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    first = next(entry.dm.model.parameters(), None)
    dtype = first.dtype if first is not None else torch.float32
    return {
        k: v.to(entry.device, dtype=dtype if v.is_floating_point() else v.dtype)
        for k, v in batch.items()
    }


def _params(req: dict[str, Any]) -> dict[str, Any]:
    rel = req.get("relevance", {})
    return {
        "mode": rel.get("mode", "default"),
        "multiplier": rel.get("multiplier", 100.0),
        "scaler": rel.get("scaler", 1.0),
        "thresholding": rel.get("thresholding", 0.5),
        "temperature": rel.get("temperature", 1.0),
    }


def _receipt(st: WorkerState, spec: ModelSpec, entry: Any, req: dict[str, Any]) -> dict[str, Any]:
    task = req.get("task") or spec.task
    params = {**_params(req), "relevance_nodes": req.get("output", {}).get("relevance", "inputs")}
    if params["mode"] == "reference":
        params["reference"] = req.get("relevance", {}).get("reference") or "zeros"
    if task == "generation":
        params["generation"] = req.get("generation", {})
    return {
        "model": spec.id,
        "revision": entry.revision,
        "engine_version": _engine_version(),
        "service_version": __version__,
        "torch_version": torch.__version__,
        "device": entry.device,
        "dtype": entry.dtype,
        "worker": st.name,
        "task": task,
        "parameters": params,
    }


def _classify(
    st: WorkerState, spec: ModelSpec, task: str, entry: Any, works: list[Work]
) -> list[dict[str, Any] | Exception]:
    """Run the jobs' rows as one engine batch (they share the model and every parameter); a
    job whose input is bad fails alone. If the batch cannot be formed or the engine raises
    on it, each job runs on its own, so that a failure belongs to the job that caused it."""
    outcomes: list[dict[str, Any] | Exception] = []
    prepared = []
    for w in works:
        try:
            prepared.append((w, *_inputs(spec, entry, task, w.request["inputs"])))
            outcomes.append({})
        except Exception as exc:  # noqa: BLE001 - this job's input is bad
            outcomes.append(exc)
    if not prepared:
        return outcomes
    try:
        merged, rows = _merge(entry, [b for _, b, _ in prepared])
        docs = _classify_rows(st, spec, task, entry, merged, rows, prepared)
    except Exception as exc:  # noqa: BLE001
        if len(prepared) == 1:
            docs = [exc]
        else:
            docs = [
                _one(lambda p=p: _classify_rows(st, spec, task, entry, p[1], [slice(None)], [p])[0])
                for p in prepared
            ]
    it = iter(docs)
    return [next(it) if o == {} else o for o in outcomes]


def _classify_rows(
    st: WorkerState,
    spec: ModelSpec,
    task: str,
    entry: Any,
    batch: dict[str, torch.Tensor],
    rows: list[slice],
    prepared: list[tuple[Work, dict[str, torch.Tensor], bytes | None]],
) -> list[dict[str, Any]]:
    req = prepared[0][0].request
    out, rel = req.get("output", {}), req.get("relevance", {})
    t0 = time.perf_counter()
    dlb = entry.backtrace(batch)
    capture_s = time.perf_counter() - t0
    wanted = out.get("relevance", "inputs")
    t0 = time.perf_counter()
    res = dlb.run_task(
        task=task,
        inputs=_on_device(entry, batch),
        relevance_nodes=wanted,
        target=rel.get("target"),
        reference=rel.get("reference"),
        tokenizer=entry.dm.tokenizer,
        **_params(req),
    )
    engine_s = time.perf_counter() - t0  # the engine's own time, for overhead accounting
    rows_total = int(next(iter(batch.values())).shape[0])
    docs = []
    for (w, _, png), sl in zip(prepared, rows, strict=True):
        part = {k: v[sl] for k, v in batch.items()}
        doc = _classification_doc(
            entry,
            task,
            part,
            _rows(res, sl),
            wanted,
            out.get("encoding", "base64"),
            out.get("dtype", "float16"),
            png,
        )
        doc.update(
            {
                "status": "finished",
                "model": spec.id,
                "task": task,
                "receipt": _receipt(st, spec, entry, w.request),
                "timings": {
                    "capture_s": capture_s,
                    "engine_s": engine_s,
                    "run_s": time.perf_counter() - t0,
                    "batch": {"jobs": len(prepared), "rows": rows_total},
                },
            }
        )
        docs.append(doc)
    return docs


def _merge(
    entry: Any, batches: list[dict[str, torch.Tensor]]
) -> tuple[dict[str, torch.Tensor], list[slice]]:
    """One batch from the jobs' batches, and each job's rows in it. Token inputs of unequal
    length are padded (the attention mask hides the padding, as for the rows of one
    request); other inputs must agree in shape, or a ValueError says why not."""
    sizes = [next(iter(b.values())).shape[0] for b in batches]
    starts = np.cumsum([0, *sizes])
    rows = [slice(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:], strict=True)]
    if len(batches) == 1:
        return batches[0], rows
    if "input_ids" in batches[0]:
        tok = entry.dm.tokenizer
        width = max(b["input_ids"].shape[1] for b in batches)
        pad_id = tok.pad_token_id if tok is not None and tok.pad_token_id is not None else 0
        left = tok is not None and tok.padding_side == "left"

        def pad(t: torch.Tensor, value: int) -> torch.Tensor:
            extra = width - t.shape[1]
            return torch.nn.functional.pad(t, (extra, 0) if left else (0, extra), value=value)

        return {
            "input_ids": torch.cat([pad(b["input_ids"], pad_id) for b in batches]),
            "attention_mask": torch.cat([pad(b["attention_mask"], 0) for b in batches]),
        }, rows
    merged = {}
    for name in batches[0]:
        shapes = {tuple(b[name].shape[1:]) for b in batches}
        if len(shapes) != 1:
            raise ValueError(f"inputs {name!r} differ in shape: {sorted(shapes)}")
        merged[name] = torch.cat([b[name] for b in batches])
    return merged, rows


def _rows(res: dict[str, Any], sl: slice) -> dict[str, Any]:
    """The part of a batched classification result that belongs to some rows."""
    return {
        "predictions": res["predictions"][sl],
        "predicted_labels": res["predicted_labels"][sl],
        "relevance": {k: v[sl] for k, v in res["relevance"].items()},
        "conservation": {k: np.asarray(v)[sl] for k, v in res["conservation"].items()},
    }


def _engine_version() -> str:
    import engine

    return getattr(engine, "__version__", "unknown")


def _classification_doc(
    entry: Any,
    task: str,
    batch: dict[str, torch.Tensor],
    res: dict[str, Any],
    wanted: Any,
    encoding: str,
    dtype: str,
    png: bytes | None,
) -> dict[str, Any]:
    labels = entry.dm.labels
    logits = np.asarray(res["predictions"], dtype=np.float64)
    logits = logits.reshape(logits.shape[0], -1)
    if logits.shape[1] == 1:
        p1 = 1 / (1 + np.exp(-logits[:, 0]))
        probs = np.stack([1 - p1, p1], 1)
    else:
        e = np.exp(logits - logits.max(1, keepdims=True))
        probs = e / e.sum(1, keepdims=True)
    predicted = np.asarray(res["predicted_labels"]).astype(int).reshape(-1)
    predictions = []
    for i, k in enumerate(predicted):
        names = labels or [str(j) for j in range(probs.shape[1])]
        predictions.append(
            {
                "index": int(k),
                "label": names[k] if k < len(names) else str(k),
                "score": float(probs[i, k]),
                "logits": logits[i].tolist(),
                "scores": {
                    names[j] if j < len(names) else str(j): float(probs[i, j])
                    for j in range(probs.shape[1])
                },
            }
        )
    relevance = {k: v.detach().float().cpu().numpy() for k, v in res["relevance"].items()}
    items: list[dict[str, Any]] = []
    if "input_ids" in batch:
        ids, mask = batch["input_ids"], batch["attention_mask"].bool()
        tok = entry.dm.tokenizer
        per_token = relevance.get("input_ids")
        for i in range(ids.shape[0]):
            keep = mask[i].numpy()
            row_ids = ids[i][mask[i]].tolist()
            item: dict[str, Any] = {
                "token_ids": row_ids,
                "tokens": tok.convert_ids_to_tokens(row_ids) if tok is not None else None,
            }
            if per_token is not None:
                item["relevance"] = codec.encode(per_token[i][keep], encoding, dtype)
            items.append(item)
    else:
        name = next(iter(batch))
        x_rel = relevance.get(name)
        for i in range(next(iter(batch.values())).shape[0]):
            item = {}
            if x_rel is not None:
                item["relevance"] = codec.encode(x_rel[i], encoding, dtype)
                if task == "image-classification":
                    item["relevance_map"] = codec.encode(x_rel[i].sum(0), encoding, dtype)
            items.append(item)
    doc: dict[str, Any] = {
        "predictions": predictions,
        "inputs": items,
        "conservation": {
            k: np.asarray(v).reshape(-1).tolist() for k, v in res["conservation"].items()
        },
        "summary": {
            "labels": [p["label"] for p in predictions],
            "scores": [p["score"] for p in predictions],
        },
    }
    if png is not None:
        doc["image_png_b64"] = base64.b64encode(png).decode()
    if wanted != "inputs":
        names = set(batch)
        doc["layers"] = {
            k: codec.encode(v, encoding, dtype) for k, v in relevance.items() if k not in names
        }
    return doc


def _generate(st: WorkerState, spec: ModelSpec, entry: Any, w: Work, r: Any) -> dict[str, Any]:
    """Run generation, streaming a ``prompt`` event first (the prompt's tokens, so that a
    client can label relevance before the result exists), then one ``token`` event per step
    (and ``relevance`` events when the engine hands relevance to the callback) as soon as the
    step exists. A cancel is honoured at every step."""
    req, job_id = w.request, w.job_id
    out = req.get("output", {})
    encoding, dtype = out.get("encoding", "base64"), out.get("dtype", "float16")
    host_batch = _token_batch(spec, entry, req["inputs"])
    t0 = time.perf_counter()
    dlb = entry.backtrace(host_batch)
    capture_s = time.perf_counter() - t0
    batch = _on_device(entry, host_batch)
    gen = {k: v for k, v in req.get("generation", {}).items() if v is not None}
    top_n = int(out.get("top_scores", 5))
    tok = entry.dm.tokenizer
    ttl, maxlen = st.settings.result_ttl, st.settings.stream_maxlen
    written = m.TRACE_BYTES.labels(model=spec.id)
    last = [time.perf_counter()]
    seen: set[int] = set()
    steps: list[dict[str, Any]] = []  # the token events, kept for the result too

    def on_step(
        step: int,
        token_ids: torch.Tensor,
        scores: torch.Tensor | None,
        relevance: dict[str, torch.Tensor] | None,
    ) -> None:
        # The engine calls once as the token is chosen (relevance None) and again when the
        # step's relevance is ready; in the stepwise path both come in one call.
        if step not in seen:
            seen.add(step)
            now = time.perf_counter()
            m.TOKEN.labels(model=spec.id).observe(now - last[0])
            last[0] = now
            data = _token_event(step, token_ids, scores, tok, top_n)
            store.add_event(r, job_id, "token", data, ttl, maxlen)
            written.inc(len(json.dumps(data)))
            steps.append(data)
        if relevance is not None and "input_ids" in relevance:
            arr = relevance["input_ids"].detach().float().cpu().numpy()
            rel_data = {"step": step, "input_ids": codec.encode(arr, encoding, dtype)}
            store.add_event(r, job_id, "relevance", rel_data, ttl, maxlen)
            written.inc(len(json.dumps(rel_data)))
        if store.cancel_requested(r, job_id):
            raise JobCanceled("canceled by request")

    prompt_ids = batch["input_ids"].cpu().tolist()
    prompt_tokens = [tok.convert_ids_to_tokens(row) for row in prompt_ids]
    prompt = {
        "token_ids": prompt_ids,
        "tokens": prompt_tokens,
        "text": [[tok.decode([t]) for t in row] for row in prompt_ids],
    }
    store.add_event(r, job_id, "prompt", prompt, ttl, maxlen)
    written.inc(len(json.dumps(prompt)))
    t0 = time.perf_counter()
    res = dlb.run_task(
        task="generation",
        inputs=batch,
        tokenizer=tok,
        return_relevance=True,
        return_scores=False,
        on_step=on_step,
        **_params(req),
        **gen,
    )
    run_s = time.perf_counter() - t0
    ids = torch.as_tensor(res["generated_ids"]).cpu()
    prompt_len = batch["input_ids"].shape[1]
    new = ids[:, prompt_len:] if ids.shape[1] > prompt_len else ids
    trace = [
        codec.encode(t["input_ids"].detach().float().cpu().numpy(), encoding, dtype)
        for t in res.get("relevance_trace") or []
        if t is not None and "input_ids" in t
    ]
    texts = [tok.decode(row, skip_special_tokens=True) for row in new.tolist()]
    doc = {
        "generation": {
            "generated_ids": ids.tolist(),
            "new_token_ids": new.tolist(),
            "new_tokens": [tok.convert_ids_to_tokens(row) for row in new.tolist()],
            "text": texts,
            "prompt_tokens": prompt_tokens,
            "relevance_trace": trace,
            "steps": steps,
            "conservation_trace": [
                None if c is None else {k: _floats(v) for k, v in c.items()}
                for c in res.get("conservation_trace") or []
            ],
        },
        "summary": {"text": texts},
        "status": "finished",
        "model": spec.id,
        "task": "generation",
        "receipt": _receipt(st, spec, entry, req),
        "timings": {"capture_s": capture_s, "engine_s": run_s, "run_s": run_s},
    }
    return doc


def _floats(t: Any) -> list[float]:
    """A per-row tensor (or number) as a flat list of floats, for JSON."""
    return torch.as_tensor(t).detach().float().cpu().reshape(-1).tolist()


def _token_event(
    step: int, token_ids: torch.Tensor, scores: torch.Tensor | None, tok: Any, top_n: int
) -> dict[str, Any]:
    """One ``token`` event: ids, token strings, text pieces and the top scores per row."""
    ids = [int(t) for t in torch.as_tensor(token_ids).reshape(-1).tolist()]
    data: dict[str, Any] = {
        "step": step,
        "token_ids": ids,
        "tokens": tok.convert_ids_to_tokens(ids),
        "text": [tok.decode([t]) for t in ids],
    }
    if scores is not None and top_n > 0:
        probs = torch.softmax(scores.detach().float().cpu(), -1)
        p, ix = probs.topk(min(top_n, probs.shape[-1]), -1)
        data["top"] = [
            [
                {"id": int(j), "token": tok.convert_ids_to_tokens(int(j)), "prob": float(q)}
                for q, j in zip(p[b].tolist(), ix[b].tolist(), strict=True)
            ]
            for b in range(p.shape[0])
        ]
    return data
