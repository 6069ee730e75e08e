"""Classification for the jobs of one batch: their rows run as one engine call (they share
the model and every parameter, and the engine gives each row the relevance it gets alone),
then each job gets the document of its own rows."""

from __future__ import annotations

import time
from dataclasses import dataclass

from engine.tasks import TASKS

from .. import layer_names
from ..models import node_names
from ..schemas import position_refusal
from . import documents, inputs
from .context import Outcome, Run, Work, engine_relevance, one
from .inputs import Batch, Tensors


@dataclass
class Prepared:
    """A job whose inputs are tensors (its rows of the batch, its resized picture, what to
    warn about its input)."""

    work: Work
    tensors: Tensors

    @property
    def inputs(self) -> Batch:
        return self.tensors.batch


def classify(run: Run, works: list[Work]) -> list[Outcome]:
    """Run the jobs' rows as one engine batch; a job whose input is bad fails alone. If the
    batch cannot be formed or the engine raises on it, each job runs on its own, so that a
    failure belongs to the job that caused it."""
    outcomes: list[Outcome | None] = []
    prepared = []
    for w in works:
        try:
            tensors = inputs.for_task(run.entry, run.spec, run.task, w.req.inputs)
            _check_position(w, tensors.batch)
        except Exception as exc:  # noqa: BLE001 - this job's input is bad
            outcomes.append(exc)
            continue
        prepared.append(Prepared(w, tensors))
        outcomes.append(None)
    if not prepared:
        return [o for o in outcomes if o is not None]
    try:
        merged, rows = inputs.merge(run.entry, [p.inputs for p in prepared])
        docs: list[Outcome] = list(_explain(run, merged, rows, prepared))
    except Exception as exc:  # noqa: BLE001
        if len(prepared) == 1:
            docs = [exc]
        else:
            docs = [
                one(lambda p=p: _explain(run, p.inputs, [slice(None)], [p])[0]) for p in prepared
            ]
    it = iter(docs)
    return [next(it) if o is None else o for o in outcomes]


def _explain(
    run: Run, batch: Batch, rows: list[slice], prepared: list[Prepared]
) -> list[documents.Doc]:
    """One engine call on ``batch``; the document of each job's ``rows``."""
    req = prepared[0].work.req  # relevance and output options are the batch group's
    t0 = time.perf_counter()
    # Captured on the input as the model runs it (its dtype and device), as a warmed model
    # is: a float32 picture would not go through a float16 model's first layer.
    on_device = inputs.on_device(run.entry, batch)
    dlb = run.entry.backtrace(on_device)
    capture_s = time.perf_counter() - t0
    # The API checks the names once a graph of the model is published; a cold model's first
    # job is checked here, on the graph just captured (the engine skips unknown names).
    layer_names.check(run.spec.id, req.output.relevance, node_names(dlb))
    t0 = time.perf_counter()
    res = dlb.run_task(
        task=run.task,
        inputs=on_device,
        relevance_nodes=req.output.relevance,
        target=req.relevance.target,
        position=_positions(req.relevance.position, batch, rows, prepared),
        reference=req.relevance.reference,
        tokenizer=run.entry.loaded.tokenizer,
        **engine_relevance(req, run.entry.loaded.labels),
    )
    engine_s = time.perf_counter() - t0  # the engine's own time, for overhead accounting
    rows_total = int(next(iter(batch.values())).shape[0])
    docs = []
    for p, sl in zip(prepared, rows, strict=True):
        part = {k: v[sl] for k, v in batch.items()}
        if TASKS[run.task].seeds:  # never batched (engine.tasks): the result is the job's
            doc = documents.per_token(run, part, res, req.output)
        else:
            doc = documents.classification(
                run, part, documents.rows(res, sl), req.output, p.tensors
            )
        timings = {
            "capture_s": capture_s,
            "engine_s": engine_s,
            "run_s": time.perf_counter() - t0,
            "batch": {"jobs": len(prepared), "rows": rows_total},
        }
        doc = documents.warned(doc, run.entry.loaded.warnings)
        docs.append({**doc, **documents.finished(run, p.work.req, timings)})
    return docs


def _check_position(work: Work, batch: Batch) -> None:
    """A position on a token of each of the job's inputs as the worker tokenized them, in
    the door's words (``schemas.position_refusal``): the door checks it only where it
    knows the tokenizer, which a python factory's model keeps to itself. The padding side
    is read from the mask (left padding leaves a shorter input's first columns empty)."""
    pos = work.req.relevance.position
    if pos is None or "attention_mask" not in batch:
        return
    mask = batch["attention_mask"].bool()
    lengths = mask.sum(1).tolist()
    left = None if min(lengths) == max(lengths) else bool((~mask[:, 0]).any())
    if refusal := position_refusal(work.req.inputs.kind(), pos, lengths, left):
        raise ValueError(f"relevance.position: {refusal}")


def _positions(
    position: int | None, batch: Batch, rows: list[slice], prepared: list[Prepared]
) -> int | list[int] | None:
    """Each row's ``relevance.position`` in the merged batch. A job's position picks a token
    of its input as padded alone; merged with longer inputs it is padded further, and where
    the tokenizer pads on the left its tokens move right by as much: a job batched with a
    longer one explained another token than alone, with another prediction (or failed
    over to running alone, where the position fell on the new padding). The shift is read
    from the masks: a job padded on the left has none of its tokens in the added columns."""
    if position is None or len(prepared) == 1 or "attention_mask" not in batch:
        return position
    mask, width = batch["attention_mask"], batch["attention_mask"].shape[1]
    positions = []
    for p, sl in zip(prepared, rows, strict=True):
        added = width - p.inputs["attention_mask"].shape[1]
        shift = added if added and not mask[sl, :added].any() else 0
        positions += [position + shift] * (sl.stop - sl.start)
    return positions
