"""Generation with its events streamed as they exist: a ``prompt`` event first (the prompt's
tokens, so that a client can label relevance before the result exists), then one ``token``
event per step as the token is chosen, and ``relevance`` events when the engine hands a
step's relevance to its callback (the inputs' only: named layers, ``output.relevance``, come
in the result document, ``documents.generation``). A cancel is honoured at every step.

An encoder-decoder LM (T5, BART) is laid out as a causal LM is: its prompt is the source and
the decoder's start token, and each step's relevance covers both, then the tokens generated
before the step (``one_sequence``)."""

from __future__ import annotations

import time
from typing import Any

import redis
import torch

from engine.generation import find_causal_lm
from engine.params import special_ids
from engine.seq2seq import decoder_start, find_seq2seq_lm
from engine.tasks import TaskName

from .. import codec, layer_names, store
from .. import worker_metrics as m
from ..models import node_names
from ..schemas import OutputOptions
from ..vocabulary import Event
from . import documents, inputs
from .context import JobCanceled, Run, Work, engine_relevance, leave_handed_on
from .pieces import Pieces


class _Stream:
    """The engine's ``on_step`` for one job: writes its events to the job's stream."""

    def __init__(self, run: Run, job_id: str, r: redis.Redis, output: OutputOptions, new: int):
        self.r, self.job_id, self.output, self.max_new_tokens = r, job_id, output, new
        self.worker, self.fence = run.state.name, run.state.fence
        self.tok = run.entry.loaded.tokenizer
        self.ttl, self.maxlen = run.state.settings.result_ttl, run.state.settings.stream_maxlen
        self.written = m.TRACE_BYTES.labels(model=run.spec.id)
        self.token_s = m.TOKEN.labels(model=run.spec.id)
        self.last = time.perf_counter()
        self.seen: set[int] = set()
        self.steps: list[dict[str, Any]] = []  # the token events, kept for the result too
        self.pieces = Pieces(self.tok)  # each row's text, from its prompt on
        self.eos = _eos_ids(run)
        self.ended: list[bool] = []  # each row: it chose an end-of-sequence token

    def add(self, event: Event, data: dict[str, Any], pipe: Any = None) -> None:
        """Append one event (on ``pipe`` when given: sent with the step's other writes),
        counting the bytes written; behind the worker's fence (``leave_handed_on``)."""
        raw = store.dumps(data)
        where = self.r if pipe is None else pipe
        entry = store.add_event(where, self.job_id, event, raw, self.ttl, self.maxlen, self.fence)
        if pipe is None and entry is None:
            leave_handed_on(self.worker)
        self.written.inc(len(raw))

    def __call__(
        self,
        step: int,
        token_ids: torch.Tensor,
        scores: torch.Tensor | None,
        relevance: dict[str, torch.Tensor] | None,
    ) -> None:
        """Write the step's events and read whether a cancel was asked, in one round trip."""
        # The engine calls once as the token is chosen (relevance None) and again when the
        # step's relevance is ready; in the stepwise path both come in one call.
        pipe = self.r.pipeline(transaction=False)
        if step not in self.seen:
            self.seen.add(step)
            now = time.perf_counter()
            self.token_s.observe(now - self.last)
            self.last = now
            last = step == self.max_new_tokens - 1
            ids = torch.as_tensor(token_ids).reshape(-1).tolist()
            ended = self.ended or [False] * len(ids)
            data = documents.token_event(
                step, token_ids, scores, self.tok, self.output.top_scores, self.pieces, ended, last
            )
            self.ended = [e or t in self.eos for e, t in zip(ended, ids, strict=True)]
            self.add(Event.TOKEN, data, pipe)
            self.steps.append(data)
        if relevance is not None and "input_ids" in relevance:
            arr = documents.numpy(one_sequence(relevance)["input_ids"])
            encoded = codec.encode(arr, self.output.encoding, self.output.dtype)
            self.add(Event.RELEVANCE, {"step": step, "input_ids": encoded}, pipe)
        pipe.exists(store.CANCEL.format(self.job_id))
        *written, canceled = pipe.execute()
        if any(x is None for x in written):
            leave_handed_on(self.worker)
        if canceled:
            raise JobCanceled()


def generate(run: Run, work: Work, r: redis.Redis) -> documents.Doc:
    """Run generation for one job, streaming its events; returns its result document."""
    req = work.req
    tok = run.entry.loaded.tokenizer
    host_batch = inputs.tokens(run.entry, run.spec, req.inputs)
    t0 = time.perf_counter()
    dlb = run.entry.backtrace(inputs.taken(run.entry, host_batch))
    capture_s = time.perf_counter() - t0
    # As for classification (service.work.classify): a cold model's first job is checked
    # here, on the graph just captured (the engine skips unknown names).
    layer_names.check(run.spec.id, req.output.relevance, node_names(dlb))
    batch = inputs.on_device(run.entry, host_batch)
    stream = _Stream(run, work.job_id, r, req.output, req.generation.max_new_tokens or 0)
    start = _decoder_start(run)
    prompt_ids = batch["input_ids"]
    if start is not None:  # the decoder's start token is read after the source
        prompt_ids = torch.cat([prompt_ids, torch.full_like(prompt_ids[:, :1], start)], 1)
    prompt = documents.prompt_event(tok, prompt_ids.cpu().tolist(), stream.pieces)
    stream.add(Event.PROMPT, prompt)
    t0 = time.perf_counter()
    res = dlb.run_task(
        task=TaskName.GENERATION,
        inputs=batch,
        tokenizer=tok,
        return_relevance=True,
        return_scores=False,
        on_step=stream,
        memory_budget=_budget(run.state.settings.memory_budget),
        relevance_nodes=req.output.relevance,
        **engine_relevance(req, None),
        **req.generation.model_dump(exclude_none=True),
    )
    run_s = time.perf_counter() - t0
    if start is not None:
        res = _source_then_decoder(res, batch["input_ids"])
    doc = documents.generation(tok, prompt, res, stream.steps, host_batch, req.output)
    timings = {"capture_s": capture_s, "engine_s": run_s, "run_s": run_s}
    missed = _steps_not_reached(req.generation.steps, len(stream.steps))
    doc = documents.warned(doc, run.entry.loaded.warnings + missed)
    return {**doc, **documents.finished(run, req, timings)}


def _steps_not_reached(steps: Any, done: int) -> list[str]:
    """A warning for listed steps the decode never reached (it ended at an end-of-sequence
    token after ``done`` tokens): they are not explained, and the result said nothing of
    them. A negative step counts from the last token generated, as the engine explains it."""
    if not isinstance(steps, list):
        return []
    missed = [s for s in dict.fromkeys(steps) if not -done <= s < done]
    if not missed:
        return []
    return [
        f"generation.steps {', '.join(map(str, missed))} not explained: the decode ended "
        f"after {done} tokens, at an end-of-sequence token"
    ]


def _eos_ids(run: Run) -> frozenset[int]:
    """The ids that end a row's decode, as the engine reads them (``params.special_ids``)."""
    model = run.entry.loaded.model
    lm = find_seq2seq_lm(model) or find_causal_lm(model)
    return frozenset(special_ids(lm, run.entry.loaded.tokenizer)[0] if lm is not None else ())


def _decoder_start(run: Run) -> int | None:
    """The decoder's start token of an encoder-decoder LM (None for a causal LM)."""
    lm = find_seq2seq_lm(run.entry.loaded.model)
    return None if lm is None else decoder_start(lm)


def one_sequence(relevance: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A step's relevance with an encoder-decoder's two token inputs as one row of tokens:
    the source's, then the decoder's (its start token and the tokens generated before the
    step), as a causal LM's prompt and previous tokens lie in ``input_ids``: the stream,
    the document and the heatmap then read both kinds of model alike."""
    if "decoder_input_ids" not in relevance:
        return relevance
    rest = {k: v for k, v in relevance.items() if k != "decoder_input_ids"}
    both = (relevance["input_ids"], relevance["decoder_input_ids"])
    return {**rest, "input_ids": torch.cat(both, -1)}


def _source_then_decoder(res: dict[str, Any], source: torch.Tensor) -> dict[str, Any]:
    """An encoder-decoder's result laid out as a causal LM's (``one_sequence``): the
    generated ids after the source, each step's relevance over both."""
    trace = res.get("relevance_trace") or []
    return {
        **res,
        "generated_ids": torch.cat(
            [source.to(res["generated_ids"].device), res["generated_ids"]], 1
        ),
        "relevance_trace": [None if t is None else one_sequence(t) for t in trace],
    }


def _budget(setting: str) -> str | None:
    """The worker's memory budget for ``run_task`` (``BACKTRACE_MEMORY_BUDGET``; "none": no
    budget, the engine's default cap of seeds per sweep, ``StepPlan.max_seeds_per_sweep``)."""
    return None if setting.strip().lower() in ("", "none") else setting
