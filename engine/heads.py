"""How each task turns a model's logits into seeds: which output is explained, and how much.

One function per task (``SEEDS``), each from the logits, the ``RelevanceParams``, the padding
mask ``[B, T]`` (``None`` where the inputs carry none) and an optional ``position``:

- text-, image- and tabular-classification explain one ``[B, C]`` decision per sample (of a
  single-label, multi-label or regression head: ``RelevanceParams.problem_type``). Text
  models whose logits keep a token axis (``[B, T, C]``: a causal LM run as a classifier, a
  token classifier) are explained at ``position`` or else at each sample's last non-padded
  token, the token a causal LM's classification head reads. Image and tabular logits of any
  other rank are an error: which of their outputs is "the decision" is not ours to guess.
- token-classification explains a ``position``'s label (one seed), or every token's label at
  once: seed k explains token k, so relevance is ``[T, B, T]``; padding tokens get no seed.
- question-answering explains the predicted answer: seed 0 the start logit at the argmax
  start, seed 1 the end logit at the argmax end (the order of ``TASKS[...].seeds``), over
  ``[B, T, 2]`` logits: the model's, or its start and end outputs stacked (``qa_logits``);
  a model that picks its answer from a fixed set (``answers_a_class``) as a classifier.

``target`` replaces the predicted label (a class index, one per sample or one for all).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, fx

from .capture import Captured
from .params import RelevanceParams
from .sweep import Seed
from .tasks import TaskName

Position = int | Sequence[int] | None
DEFAULT_THRESHOLD = 0.5  # run_task's default
aten = torch.ops.aten


class Decision(NamedTuple):
    """What a run decided and explains. ``labels`` / ``target``: the decided and the explained
    labels ([B], or [B, T] per token); ``extra``: task-specific result entries."""

    scaled: Tensor  # logits / temperature, reported as predictions
    labels: Tensor
    target: Tensor
    seed: Seed
    extra: dict[str, Any]


def classification(
    logits: Tensor, params: RelevanceParams, mask: Tensor | None, position: Position, task: str
) -> Decision:
    """Each sample's decision and the seed on the explained logit, as ``params.problem_type``
    says what the logits are: one class of several (argmax), or for a single logit its
    sigmoid against ``thresholding``; several labels each decided on its own (multi-label:
    each sigmoid against ``thresholding``, ``extra["labels_present"]`` [B, C], the most
    confident explained); or values (regression: reported unscaled, output ``target``,
    default 0, explained). In modes "contrast" and "reference" a logit decided absent (a
    single logit's "negative", a label not present) is seeded with the opposite sign: the
    evidence for its absence is the evidence against the logit."""
    where = _decision_at(logits, mask, position, task)
    batch, kind = logits.shape[0], params.problem_type
    scaled = logits.float() / (1.0 if kind == "regression" else params.temperature)
    decided = scaled[where]
    outputs = decided.reshape(batch, -1)  # [B, C]
    binary = kind is None and outputs.shape[1] == 1  # one logit: class 0 or 1
    present, extra = _present(outputs, params, binary)
    if binary:
        labels = present[:, 0].long()
    elif kind == "regression":
        labels = torch.zeros(batch, dtype=torch.long, device=logits.device)
    else:
        labels = outputs.argmax(-1)
    classes = 2 if binary else outputs.shape[1]
    explained = labels if params.target is None else _targets(params.target, labels, classes)
    sign = torch.ones(batch, device=logits.device)
    if present is not None and params.mode in ("contrast", "reference"):
        rows = torch.arange(batch, device=logits.device)
        yes = explained == 1 if binary else present[rows, explained]
        sign = torch.where(yes, 1.0, -1.0)
    index = list(where)
    if logits.dim() > len(where):
        index.append(torch.zeros_like(explained) if binary else explained)
    seed = Seed(torch.stack(index, -1)[None], (sign * params.multiplier)[None])
    if len(where) > 1:
        extra["position"] = where[1].cpu().numpy()
    return Decision(decided, labels, explained, seed, extra)


def _present(
    outputs: Tensor, params: RelevanceParams, binary: bool
) -> tuple[Tensor | None, dict[str, Any]]:
    """Which logits of ``outputs`` [B, C] are decided present by their sigmoid against the
    threshold ([B, C] bool; None where argmax decides or nothing is decided), and the result
    entries that report them (multi-label)."""
    if binary or params.problem_type == "multi_label_classification":
        present = torch.sigmoid(outputs) >= params.thresholding
        extra = {} if binary else {"labels_present": present.cpu().numpy()}
        return present, extra
    if params.problem_type is None:
        _unused_threshold(params.thresholding, outputs.shape[1])
    return None, {}


def _unused_threshold(thresholding: float, classes: int, stacklevel: int = 6) -> None:
    """A warning, not an error, where a threshold other than the default meets a model of
    several logits: the public package's examples pass ``thresholding`` to any classifier
    (there it meant something else), and they should run, but not with a silent no-op.
    ``stacklevel``: the caller of ``run_task``, from the seeding function's depth."""
    if thresholding != DEFAULT_THRESHOLD:
        warnings.warn(
            f"thresholding={thresholding} has no effect: this model returns {classes} logits, "
            "decided by argmax; thresholding decides single-logit binary classifiers",
            stacklevel=stacklevel,
        )


def _decision_at(logits: Tensor, mask: Tensor | None, position: Position, task: str) -> tuple:
    """Where each sample's decision sits in ``logits``: its row of [B, C] logits, or, for text
    logits that keep a token axis, its row at ``position`` or its last real token. Logits of
    any other rank are refused, naming what would explain them."""
    if logits.dim() == 0:
        raise ValueError(
            f"{task} explains [B, C] logits; this model returns a scalar (shape ()): return "
            "the logits, not a reduction of them (a sum or a loss has no class to explain)"
        )
    rows = torch.arange(logits.shape[0], device=logits.device)
    if logits.dim() == 3 and task == TaskName.TEXT_CLASSIFICATION:
        pos = _positions(position, mask, logits) if position is not None else _last(mask, logits)
        return rows, pos
    if position is not None and logits.dim() <= 2:
        raise ValueError(
            f"position= picks a token of [B, T, C] logits; this model returns "
            f"{tuple(logits.shape)}, one prediction per sample: leave position out"
        )
    if logits.dim() > 2:
        hint = (  # [B, T, C]: a label per position; [B, C, H, W]: a map per class
            "use task='token-classification' for one label per token, or a model that pools "
            "its output"
            if logits.dim() == 3
            else "use a model that pools its output to [B, C] (a map per class, as a "
            "segmentation model returns, is no single decision)"
        )
        raise ValueError(
            f"{task} explains [B, C] logits (text: [B, T, C] at one position); this model "
            f"returns {tuple(logits.shape)}: {hint}"
        )
    return (rows,)


def token_classification(
    logits: Tensor, params: RelevanceParams, mask: Tensor | None, position: Position, task: str
) -> Decision:
    """Seeds on ``[B, T, C]`` logits: the label at ``position`` (one seed per sample), or
    without a position every token's label (seed k on token k; padding's seed is zero)."""
    if logits.dim() != 3:
        raise ValueError(
            f"{task} explains [B, T, C] logits, one label per token; this model returns "
            f"{tuple(logits.shape)}"
        )
    batch, length = logits.shape[:2]
    rows = torch.arange(batch, device=logits.device)
    scaled = logits.float() / params.temperature
    labels = scaled.argmax(-1)  # [B, T]
    classes = logits.shape[-1]
    _unused_threshold(params.thresholding, classes, stacklevel=5)  # each token's by argmax
    explained = labels if params.target is None else _targets(params.target, labels, classes)
    if position is not None:
        pos = _positions(position, mask, logits)
        index = torch.stack([rows, pos, explained[rows, pos]], -1)[None]
        value = torch.full((1, batch), params.multiplier, device=logits.device)
        return Decision(scaled, labels, explained, Seed(index, value), {"position": pos.cpu()})
    tokens = torch.arange(length, device=logits.device)
    b, t = torch.meshgrid(rows, tokens, indexing="ij")  # [B, T]
    index = torch.stack([b, t, explained], -1).transpose(0, 1)  # [T, B, 3]: seed k on token k
    kept = torch.ones(batch, length, device=logits.device) if mask is None else mask.float()
    value = (kept * params.multiplier).transpose(0, 1)
    return Decision(scaled, labels, explained, Seed(index, value), {})


def question_answering(
    logits: Tensor, params: RelevanceParams, mask: Tensor | None, position: Position, task: str
) -> Decision:
    """Two seeds on ``[B, T, 2]`` logits: the start logit at the argmax start over unpadded
    tokens, and the end logit at the argmax end. Start and end are chosen independently, as
    the two outputs of the head are; ``answer_span`` reports both ([B, 2])."""
    if logits.dim() != 3 or logits.shape[-1] != 2:
        raise ValueError(f"{task} explains [B, T, 2] start / end logits, got {tuple(logits.shape)}")
    if position is not None or params.target is not None:
        raise ValueError(f"{task} explains the predicted answer: no position= or target=")
    scaled = logits.float() / params.temperature
    masked = scaled if mask is None else scaled.masked_fill(mask[..., None] == 0, -torch.inf)
    span = masked.argmax(1)  # [B, 2]: start, end
    rows = torch.arange(logits.shape[0], device=logits.device)
    index = torch.stack(
        [torch.stack([rows, span[:, k], torch.full_like(rows, k)], -1) for k in (0, 1)]
    )
    value = torch.full(index.shape[:2], params.multiplier, device=logits.device)
    extra = {"answer_span": span.cpu().numpy()}
    return Decision(scaled, span, span, Seed(index, value), extra)


SEEDS: dict[TaskName, Callable[..., Decision]] = {
    TaskName.TEXT_CLASSIFICATION: classification,
    TaskName.IMAGE_CLASSIFICATION: classification,
    TaskName.TABULAR_CLASSIFICATION: classification,
    TaskName.TOKEN_CLASSIFICATION: token_classification,
    TaskName.QUESTION_ANSWERING: question_answering,
}


def answers_a_class(captured: Captured) -> bool:
    """Whether a question-answering model picks its answer from a fixed set of answers (visual
    question answering: LXMERT's ``[B, C]`` answer scores) instead of a span of its text: its
    first output is ``[B, C]`` with no end logits of that shape beside it. Such a model is
    explained as a classifier of its answers: one seed at the predicted (or ``target``)
    answer, relevance ``[B, ...]``."""
    shapes = [_shape(node) for node in captured.float_outputs()]
    return len(shapes[0]) == 2 and (len(shapes) < 2 or shapes[1] != shapes[0])


def qa_logits(captured: Captured) -> fx.Node:
    """The ``[B, T, 2]`` node whose last axis holds a question-answering model's start and
    end logits: the model's first output where it is that tensor, or else its first two
    floating-point outputs ([B, T] each, however computed: split from one linear layer, or
    two products as Splinter's) stacked into one node (``stacked``), so that one sweep seeds
    both."""
    outputs = captured.float_outputs()
    shapes = [_shape(node) for node in outputs]
    if len(shapes[0]) == 3 and shapes[0][-1] == 2:
        return outputs[0]
    if len(outputs) < 2 or len(shapes[0]) != 2 or shapes[0] != shapes[1]:
        raise ValueError(
            "question-answering needs a model returning start and end logits ([B, T] each, "
            "its first two floating-point outputs) or one [B, T, 2] tensor; this model "
            f"returns {', '.join('[' + ', '.join(map(str, s)) + ']' for s in shapes)}"
        )
    return stacked(captured, outputs[:2])


def stacked(captured: Captured, nodes: Sequence[fx.Node]) -> fx.Node:
    """A node stacking ``nodes`` along a new last axis, added once to the graph before its
    output: a sweep seeded there seeds each of ``nodes``, whatever computed them, and the
    stack's rule hands each its own slice. The captured graph keeps it (``node_io`` shows it)
    with its value's shape and batch axis, so later runs find and reuse it."""
    for node in captured.nodes:
        if node.target is aten.stack.default and node.args == (list(nodes), -1):
            return node
    with captured.graph.inserting_before(captured.output):
        node = captured.graph.call_function(aten.stack.default, (list(nodes), -1))
    node.meta["val"] = torch.stack([n.meta["val"] for n in nodes], -1)
    captured.nodes.insert(captured.nodes.index(captured.output), node)
    captured.batch_axis[node] = captured.batch_axis.get(nodes[0])
    return node


def _shape(node: fx.Node) -> tuple:
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, Tensor) else ()


def _last(mask: Tensor | None, logits: Tensor) -> Tensor:
    """Each sample's last non-padded position (right or left padding alike)."""
    length = logits.shape[1]
    if mask is None:
        return torch.full((logits.shape[0],), length - 1, device=logits.device)
    tokens = torch.arange(length, device=logits.device)
    return torch.where(mask.to(logits.device) != 0, tokens, -1).amax(1).clamp(min=0)


def _positions(position: Position, mask: Tensor | None, logits: Tensor) -> Tensor:
    """``position`` per sample, checked against the sequence and its padding."""
    batch, length = logits.shape[:2]
    pos = torch.as_tensor(position, device=logits.device).long().reshape(-1)
    if pos.numel() not in (1, batch) or ((pos < 0) | (pos >= length)).any():
        raise ValueError(f"position must be one index in [0, {length}) or one per sample")
    pos = pos.expand(batch)
    if mask is not None and (mask.to(pos.device)[torch.arange(batch), pos] == 0).any():
        raise ValueError(f"position {pos.tolist()} falls on padding")
    return pos


def _targets(target: Any, labels: Tensor, classes: int) -> Tensor:
    """``target`` as labels shaped like the decided ``labels``: one for all, or one per
    sample, each a class index in [0, classes) (an index past the logits would fail deep in
    the seed, or a negative one pick a class from the end)."""
    t = torch.as_tensor(target, device=labels.device).long()
    if ((t < 0) | (t >= classes)).any():
        raise ValueError(f"target must be a class index in [0, {classes}): {t.tolist()}")
    if t.numel() == 1:
        return t.reshape(()).expand(labels.shape)
    t = t.reshape(-1)
    if t.numel() != labels.shape[0]:
        raise ValueError(
            f"target must be one label or one per sample ({labels.shape[0]}): {t.numel()}"
        )
    return t.reshape(-1, *([1] * (labels.dim() - 1))).expand(labels.shape)


def mask_positions(prepared: dict[str, Tensor], tokenizer: Any, logits: Tensor) -> Tensor | None:
    """Each sample's (first) mask token [B], where every sample has one and the logits keep
    its token axis: what a masked LM run as a text classifier explains unless told otherwise,
    the token it fills in (the last token, the default elsewhere, is a separator whose
    prediction means nothing). None otherwise."""
    mask_id = getattr(tokenizer, "mask_token_id", None)
    ids = prepared.get("input_ids")
    if mask_id is None or ids is None or logits.dim() != 3 or ids.shape != logits.shape[:2]:
        return None
    hits = ids.to(logits.device) == mask_id
    if not bool(hits.any(1).all()):
        return None
    return hits.int().argmax(1)


def padding_mask(prepared: dict[str, Tensor], logits: Tensor) -> Tensor | None:
    """The inputs' ``attention_mask`` where it masks the logits' token axis ([B, T])."""
    mask = prepared.get("attention_mask")
    if mask is None or logits.dim() < 2 or tuple(mask.shape) != tuple(logits.shape[:2]):
        return None
    return mask
