"""What clients read of a job: its result document (predictions and relevance of a
classification, the tokens and relevance trace of a generation), the receipt that says what
ran it, a failure's document, and the ``prompt`` and ``token`` events of a generation.

Arrays go through ``service.codec`` (raw bytes in base64, or JSON numbers when asked)."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from typing import Any

import numpy as np
import torch

from engine import __version__ as engine_version
from engine.tasks import TaskName

from .. import __version__, codec
from ..schemas import OutputOptions, RunTaskRequest
from ..vocabulary import JobStatus
from .context import Run, requested_relevance
from .inputs import Batch, Tensors
from .pieces import Pieces

Doc = dict[str, Any]


def now() -> str:
    """The job's end as the result document records it: RQ sets its own ``ended_at`` only
    after the job function returns, so a poller could see the result without it."""
    return datetime.now(UTC).isoformat()


def message(exc: BaseException) -> str:
    if isinstance(exc, NotImplementedError):
        return f"not implemented in the engine: {exc}" if str(exc) else "not implemented"
    return str(exc) or type(exc).__name__


def failure(model: str, task: str | None, status: JobStatus, exc: BaseException) -> Doc:
    """The document of a job that failed or was canceled (its ``error`` is also the data of
    its terminal event)."""
    error = {"type": type(exc).__name__, "message": message(exc)}
    return {"status": status, "model": model, "task": task, "error": error, "ended_at": now()}


def receipt(run: Run, req: RunTaskRequest) -> Doc:
    """What produced a result: model revision, versions, device, and every parameter."""
    params = {**requested_relevance(req), "relevance_nodes": req.output.relevance}
    if req.relevance.mode in ("reference", "contrast"):
        params["reference"] = req.relevance.reference or "zeros"  # the engine's default
    if req.relevance.position is not None:
        params["position"] = req.relevance.position
    if run.task == TaskName.GENERATION:
        params["generation"] = req.generation.model_dump(mode="json")
    entry = run.entry
    return {
        "model": run.spec.id,
        "revision": entry.revision,
        "engine_version": engine_version,
        "service_version": __version__,
        "torch_version": torch.__version__,
        "device": entry.device,
        "dtype": entry.dtype,
        "worker": run.state.name,
        "task": run.task,
        "parameters": params,
    }


def finished(run: Run, req: RunTaskRequest, timings: dict[str, Any]) -> Doc:
    """The fields every finished job's document has, besides its result."""
    return {
        "status": JobStatus.FINISHED,
        "model": run.spec.id,
        "task": run.task,
        "receipt": receipt(run, req),
        "timings": timings,
    }


def warned(doc: Doc, warnings: list[str]) -> Doc:
    """``doc`` with ``warnings`` added to its own, and to its summary's (the stream's
    ``done`` event carries the summary)."""
    if warnings:
        doc["warnings"] = doc.get("warnings", []) + warnings
        doc["summary"]["warnings"] = doc["warnings"]
    return doc


def rows(res: dict[str, Any], sl: slice) -> dict[str, Any]:
    """The part of a batched classification result that belongs to some rows."""
    part = {
        "predictions": res["predictions"][sl],
        "predicted_labels": res["predicted_labels"][sl],
        "relevance": {k: v[sl] for k, v in res["relevance"].items()},
        "conservation": {k: np.asarray(v)[sl] for k, v in res["conservation"].items()},
    }
    if "problem_type" in res:  # a multi-label or regression head (``engine.heads``)
        part["problem_type"] = res["problem_type"]
    if "labels_present" in res:
        part["labels_present"] = res["labels_present"][sl]
    return part


def classification(
    run: Run, batch: Batch, res: dict[str, Any], output: OutputOptions, tensors: Tensors
) -> Doc:
    """A classification's result for the rows of ``batch`` (``res`` is theirs, ``rows``):
    predictions with scores, relevance per input (and per named layer when asked for), the
    conservation check, the picture the heatmap is drawn over, and warnings about the input
    (also in the summary, so that the stream's ``done`` event carries them)."""
    predictions = _predictions(run.entry.loaded.labels, res)
    score = "value" if res.get("problem_type") == "regression" else "score"
    relevance = {k: v.detach().float().cpu().numpy() for k, v in res["relevance"].items()}
    doc: Doc = {
        "predictions": predictions,
        "inputs": _items(run, batch, relevance, output),
        "conservation": {
            k: np.asarray(v).reshape(-1).tolist() for k, v in res["conservation"].items()
        },
        "summary": {
            "labels": [p["label"] for p in predictions],
            f"{score}s": [p[score] for p in predictions],
        },
    }
    if tensors.png is not None:
        doc["image_png_b64"] = base64.b64encode(tensors.png).decode()
    warned(doc, tensors.warnings + _little_reached(doc["conservation"]))
    if output.relevance != "inputs":
        doc["layers"] = _layers(relevance, batch, output)
    return doc


# Below this share of the seed reaching the inputs a result says so: the rest went to sinks,
# and what is left would be drawn as if it explained the output. The demo models put 42-100 %
# of it on their inputs (MiniLM 42 % in mode default, the digits CNN 75 %); a random
# mobilenet whose logits are about 1e-11 put none there in modes contrast and reference.
LITTLE_REACHED = 0.1


def _little_reached(conservation: dict[str, list[float]]) -> list[str]:
    """A warning when, in some row, under ``LITTLE_REACHED`` of the seed reached the inputs."""
    seed, inputs = (np.abs(np.asarray(conservation[k], dtype=float)) for k in ("seed", "inputs"))
    rows = np.flatnonzero((seed > 0) & (inputs < LITTLE_REACHED * seed))
    if not rows.size:
        return []
    least = float((inputs[rows] / seed[rows]).min())
    return [
        f"row(s) {', '.join(map(str, rows))}: under {LITTLE_REACHED:.0%} of the explained "
        f"output reached the inputs (the least: {least:.2%}); the rest is in sinks (biases, "
        "normalisation constants, the reference), so this relevance says little about the input"
    ]


def _segments(batch: Batch, row: int, mask: Any) -> Doc:
    """``segments``: which text of a pair (``inputs.text_pair``) each real token of ``row``
    belongs to, 0 or 1 (``token_type_ids``); nothing for a row of one text."""
    types = batch.get("token_type_ids")
    if types is None or not bool(types[row].any()):
        return {}
    return {"segments": types[row][mask[row]].tolist()}


def _layers(relevance: dict[str, Any], batch: Batch, output: OutputOptions) -> Doc:
    """The relevance of the named layers (every node for "all"): what is not an input."""
    return {
        k: codec.encode(numpy(v), output.encoding, output.dtype)
        for k, v in relevance.items()
        if k not in batch
    }


def numpy(t: Any) -> np.ndarray:
    """A relevance tensor (any dtype or device) or array as a float numpy array, for the codec."""
    if isinstance(t, torch.Tensor):
        return t.detach().float().cpu().numpy()
    return np.asarray(t)


def per_token(run: Run, batch: Batch, res: dict[str, Any], output: OutputOptions) -> Doc:
    """The result of a task with several seeds per row (``engine.tasks``: one per token for
    token-classification, start and end for question-answering). Per row, over its real
    tokens: the tokens, what was predicted (each token's label, or the answer span as
    indices into those tokens), and relevance [seeds, tokens] with the seeds' names
    (``seeds``; "token": seed k explains real token k). Token classification at one
    ``position`` has one seed, that token's label (``position``: its index among the real
    tokens); the engine drops the seed axis there, and it is put back here. Named layers
    (``output.relevance``) come whole, [seeds, rows, ...] (a position: [rows, ...])."""
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    loaded = run.entry.loaded
    relevance = res["relevance"].get("input_ids")  # [K, B, T]
    conservation = {k: np.asarray(v) for k, v in res["conservation"].items()}  # [K, B]
    at_position = "position" in res
    if at_position:
        relevance = None if relevance is None else relevance[None]
        conservation = {k: v[None] for k, v in conservation.items()}
    items: list[Doc] = []
    for i in range(ids.shape[0]):
        real = mask[i].numpy()
        row_ids = ids[i][mask[i]].tolist()
        seed_names = ["token"] if at_position else list(res["seeds"])
        item: Doc = {"token_ids": row_ids, **_tokens(loaded.tokenizer, row_ids)}
        item.update(seeds=seed_names, **_segments(batch, i, mask))
        tokens = item["tokens"]
        seeds = real
        if at_position:
            item["position"] = int((np.cumsum(real) - 1)[int(res["position"][i])])
            seeds = np.ones(1, dtype=bool)
        if run.task == TaskName.QUESTION_ANSWERING:
            span = (np.cumsum(real) - 1)[np.asarray(res["answer_span"][i])]
            item["answer_span"] = span.tolist()
            item["answer_tokens"] = (tokens or row_ids)[span[0] : span[1] + 1]
            # what people read: 'Ġparis' is a byte-level BPE's token for ' paris'
            answer_ids = row_ids[span[0] : span[1] + 1]
            item["answer"] = loaded.tokenizer.decode(answer_ids).strip() if tokens else None
            seeds = np.ones(len(res["seeds"]), dtype=bool)
        else:
            names = loaded.labels or []
            picked = np.asarray(res["predicted_labels"][i])[real]
            item["labels"] = [names[k] if k < len(names) else str(k) for k in picked.tolist()]
        if relevance is not None:
            r = relevance[:, i].detach().float().cpu().numpy()[seeds][:, real]
            item["relevance"] = codec.encode(r, output.encoding, output.dtype)
        items.append(item)
    key = "labels" if run.task == TaskName.TOKEN_CLASSIFICATION else "answer_tokens"
    doc: Doc = {
        "inputs": items,
        "conservation": {k: v.tolist() for k, v in conservation.items()},
        "summary": {key: [item[key] for item in items]},
    }
    if run.task == TaskName.QUESTION_ANSWERING:
        doc["summary"]["answer"] = [item["answer"] for item in items]
    if output.relevance != "inputs":  # [seeds, rows, ...] per layer, padding included
        layers = {k: v.detach().float().cpu().numpy() for k, v in res["relevance"].items()}
        doc["layers"] = _layers(layers, batch, output)
    return doc


def _predictions(labels: list[str] | None, res: dict[str, Any]) -> list[Doc]:
    """Per row: the predicted class with its score, every logit (not of ``MANY_CLASSES``),
    and every class's score (``_listed``: of many, the most probable): a softmax, a sigmoid
    for a single-logit binary classifier, or for a multi-label one a sigmoid per label, with
    the labels present (``labels``); a regression's are its values (``value``, ``values``).
    ``explained`` names the class (or output) the relevance explains: the prediction, or
    the ``relevance.target`` asked for, which a row's ``label`` alone did not say."""
    logits = np.asarray(res["predictions"], dtype=np.float64)
    logits = logits.reshape(logits.shape[0], -1)
    kind = res.get("problem_type")
    scores = logits if kind == "regression" else _probabilities(logits, kind)
    names = labels or [str(j) for j in range(scores.shape[1])]

    def name(j: int) -> str:
        return names[j] if j < len(names) else str(j)

    one, every = ("value", "values") if kind == "regression" else ("score", "scores")
    predicted = np.asarray(res["predicted_labels"]).astype(int).reshape(-1)
    explained = np.asarray(res.get("target", predicted)).astype(int).reshape(-1)
    if explained.shape != predicted.shape:  # not one explained class per row
        explained = predicted
    rows = []
    for i, k in enumerate(predicted):
        row = {"index": int(k), "label": name(k), one: float(scores[i, k])}
        t = int(explained[i])
        row["explained"] = {"index": t, "label": name(t)}
        if logits.shape[1] <= MANY_CLASSES:  # a vocabulary's would be megabytes per row
            row["logits"] = logits[i].tolist()
        row[every] = {name(j): float(scores[i, j]) for j in _listed(scores[i])}
        if kind == "multi_label_classification":
            row["labels"] = [name(j) for j in np.flatnonzero(res["labels_present"][i])]
        rows.append(row)
    return rows


# A model of more classes than this (a masked LM's vocabulary) lists its TOP_LISTED most
# probable in ``scores`` (every class of an ImageNet classifier is listed).
MANY_CLASSES = 1000
TOP_LISTED = 10


def _listed(scores: np.ndarray) -> list[int]:
    """The classes a row's ``scores`` list: all, or for many the most probable first."""
    if scores.shape[0] <= MANY_CLASSES:
        return list(range(scores.shape[0]))
    return np.argsort(-scores, kind="stable")[:TOP_LISTED].tolist()


def _probabilities(logits: np.ndarray, kind: str | None) -> np.ndarray:
    """Each class's probability [B, C] from the logits [B, C] (for one logit: both classes)."""
    if kind == "multi_label_classification":
        return 1 / (1 + np.exp(-logits))
    if logits.shape[1] == 1:
        p1 = 1 / (1 + np.exp(-logits[:, 0]))
        return np.stack([1 - p1, p1], 1)
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _items(
    run: Run, batch: Batch, relevance: dict[str, np.ndarray], output: OutputOptions
) -> list[Doc]:
    """Per row: the tokens and their relevance (padding left out), or the input's relevance
    (and, for an image, its map summed over channels)."""

    def encode(a: np.ndarray) -> Doc:
        return codec.encode(a, output.encoding, output.dtype)

    items: list[Doc] = []
    if "input_ids" in batch:
        ids, mask = batch["input_ids"], batch["attention_mask"].bool()
        tok = run.entry.loaded.tokenizer
        per_token = relevance.get("input_ids")
        for i in range(ids.shape[0]):
            row_ids = ids[i][mask[i]].tolist()
            item: Doc = {"token_ids": row_ids, **_tokens(tok, row_ids), **_segments(batch, i, mask)}
            if per_token is not None:
                item["relevance"] = encode(per_token[i][mask[i].numpy()])
            items.append(item)
        return items
    x_rel = relevance.get(next(iter(batch)))
    for i in range(next(iter(batch.values())).shape[0]):
        item = {}
        if x_rel is not None:
            item["relevance"] = encode(x_rel[i])
            if run.task == TaskName.IMAGE_CLASSIFICATION:
                item["relevance_map"] = encode(x_rel[i].sum(0))
        items.append(item)
    return items


def _tokens(tok: Any, row_ids: list[int]) -> Doc:
    """A text's tokens as its tokenizer writes them, and the text each adds to it
    (``text``, as a generation's prompt has it: ' cat' for a byte-level BPE's 'Ġcat', an
    emoji on the token that completes its bytes, '' on the others), which people read (the
    heatmap labels its cells with them; they were the token strings, mojibake for
    CJK and emoji)."""
    if tok is None:
        return {"tokens": None}
    return {"tokens": tok.convert_ids_to_tokens(row_ids), "text": Pieces(tok).prompt([row_ids])[0]}


def prompt_event(tok: Any, prompt_ids: list[list[int]], pieces: Pieces) -> Doc:
    """The ``prompt`` event: the prompt's tokens, so that a client can label relevance
    before the result exists, and the text each adds (``pieces``: a row's join to its
    text)."""
    return {
        "token_ids": prompt_ids,
        "tokens": [tok.convert_ids_to_tokens(row) for row in prompt_ids],
        "text": pieces.prompt(prompt_ids),
    }


def token_event(
    step: int,
    token_ids: torch.Tensor,
    scores: torch.Tensor | None,
    tok: Any,
    top_n: int,
    pieces: Pieces,
    ended: list[bool],
    last: bool = False,
) -> Doc:
    """One ``token`` event: ids, token strings, the text each adds to its row (``pieces``,
    which follows the rows from their prompt; the ``last`` step's with the bytes held),
    which rows ``ended`` before this step (at an end-of-sequence token: their token is
    padding, their relevance 0) and the top scores per row."""
    ids = [int(t) for t in torch.as_tensor(token_ids).reshape(-1).tolist()]
    data: Doc = {
        "step": step,
        "token_ids": ids,
        "tokens": tok.convert_ids_to_tokens(ids),
        "text": pieces.step(ids, ended, last),
        "ended": ended,
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


def generation(
    tok: Any,
    prompt: Doc,
    res: dict[str, Any],
    steps: list[Doc],
    batch: Batch,
    output: OutputOptions,
) -> Doc:
    """A generation's result: the generated ids and text, the relevance per explained step
    (``explained_steps``: the step of each entry of ``relevance_trace``, which holds those
    steps only, where ``conservation_trace`` has a None for each step not explained), the
    ``token`` events as they were streamed, and the conservation check per step.

    Named layers (``output.relevance``) come in ``layers_trace``, one entry per entry of
    ``relevance_trace`` (explained steps): {node name: relevance in the node's own shape, cut
    to the positions that step saw}, e.g. [B, prompt_len + i, hidden] for a hidden state, so
    that summed over ``hidden`` the token embedding's gives the entry of ``relevance_trace``.
    Only here, not in the stream's ``relevance`` events: a layer is ``hidden`` times the
    size of the inputs' relevance per step ("all": every node's), too much for events sent
    per token and kept in a capped stream, and a client reads the document once."""
    ids = torch.as_tensor(res["generated_ids"]).cpu()
    prompt_len = len(prompt["token_ids"][0])
    new = ids[:, prompt_len:] if ids.shape[1] > prompt_len else ids
    full = res.get("relevance_trace") or []
    at = [i for i, t in enumerate(full) if t is not None and "input_ids" in t]
    explained = [full[i] for i in at]
    trace = [codec.encode(numpy(t["input_ids"]), output.encoding, output.dtype) for t in explained]
    texts = [tok.decode(row, skip_special_tokens=True) for row in new.tolist()]
    doc: Doc = {
        "generation": {
            "generated_ids": ids.tolist(),
            "new_token_ids": new.tolist(),
            "new_tokens": [tok.convert_ids_to_tokens(row) for row in new.tolist()],
            "text": texts,
            "prompt_tokens": prompt["tokens"],
            "prompt_text": prompt["text"],
            "relevance_trace": trace,
            "explained_steps": at,
            "steps": steps,
            "conservation_trace": [
                None if c is None else {k: _floats(v) for k, v in c.items()}
                for c in res.get("conservation_trace") or []
            ],
        },
        "summary": {"text": texts},
    }
    if output.relevance != "inputs":
        doc["generation"]["layers_trace"] = [_layers(t, batch, output) for t in explained]
    return doc


def _floats(t: Any) -> list[float]:
    """A per-row tensor (or number) as a flat list of floats, for JSON."""
    return torch.as_tensor(t).detach().float().cpu().reshape(-1).tolist()
