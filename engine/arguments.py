"""Checks of ``run_task``'s arguments that ``RelevanceParams`` cannot make alone: those that
need the model (a target given as a label) or its captured graph (node names), and the ranges
the service's schema already holds its callers to (a positive multiplier, a threshold that is
a probability). Without them a wrong argument surfaced as torch's ``new(): invalid data type
'str'``, was silently truncated (``target=1.5`` explained class 1), or was silently ignored (a
misspelt node name in ``relevance_nodes`` returned no relevance for it)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, fx

from .heads import DEFAULT_THRESHOLD
from .params import RelevanceParams
from .tasks import ONE_DECISION_TASKS, TaskName


def check_ranges(params: RelevanceParams) -> None:
    """``multiplier`` is the seed's size and ``scaler`` a factor on what is reported: both
    positive (0 reports nothing, and a negative one turns every sign without saying so), as
    the service's schema has them. (``thresholding`` outside [0, 1] is allowed: it decides
    every input alike, which is how one asks for "all negative", since a float32 sigmoid
    reaches 1.0.)"""
    if params.multiplier <= 0:
        raise ValueError(
            f"multiplier must be > 0 (the seed's size: inputs + sinks add up to it), "
            f"got {params.multiplier}"
        )
    if params.scaler <= 0:
        raise ValueError(
            f"scaler must be > 0 (it multiplies every reported value), got {params.scaler}"
        )


def check_generation(reference: Any, target: Any, position: Any, thresholding: float) -> None:
    """What generation has no use for is named, not dropped: each step explains the token it
    emitted, at the position whose logits chose it, against zero embeddings. A ``target`` or
    ``position`` would otherwise be ignored without a word (the generated token explained
    instead of the one asked for), as would a ``thresholding``, which decides nothing there
    (a warning, as for a classifier decided by argmax: the keyword is in the public API)."""
    if reference is not None:
        raise ValueError("generation explains against zero embeddings: no reference=")
    given = {"target": target, "position": position}
    asked = [name for name, value in given.items() if value is not None]
    if asked:
        raise ValueError(
            f"generation explains each generated token at the position that chose it: no "
            f"{' or '.join(f'{name}=' for name in asked)} (to explain another token at a "
            "position, run task='text-classification' with position= and target=)"
        )
    if thresholding != DEFAULT_THRESHOLD:
        warnings.warn(
            f"thresholding={thresholding} has no effect on generation: each step's token is "
            "the decode's choice; thresholding decides single-logit binary classifiers",
            stacklevel=3,
        )


def check_task_inputs(task: str | None, prepared: dict[str, Tensor]) -> None:
    """An image classifier reads pixels, floating-point values: asked of token ids alone,
    ``image-classification`` ran as a text classifier under the wrong name, and the wrong
    task was never said."""
    if task != TaskName.IMAGE_CLASSIFICATION:
        return
    if not any(v.is_floating_point() for v in prepared.values()):
        shapes = ", ".join(f"{k} {tuple(v.shape)} {v.dtype}" for k, v in prepared.items())
        raise ValueError(
            f"image-classification explains images, a float input [B, C, H, W]; these inputs "
            f"are integer ids ({shapes}): task='text-classification'"
        )


def target_classes(target: Any, model: torch.nn.Module) -> Tensor | None:
    """``target`` as class indices (a LongTensor, one or one per sample): integers as given
    (int, numpy or tensor, or a list), labels looked up in the model's ``config.label2id``.
    Booleans, fractions and other types are errors naming ``target``."""
    if target is None:
        return None
    if isinstance(target, str) or (
        isinstance(target, Sequence) and target and all(isinstance(t, str) for t in target)
    ):
        labels = [target] if isinstance(target, str) else list(target)
        return torch.tensor([_label_index(label, model) for label in labels])
    if isinstance(target, bool) or (
        isinstance(target, Tensor | np.ndarray) and target.dtype == bool
    ):
        raise TypeError(f"target must be a class index or a label, got {target!r}")
    try:
        values = torch.as_tensor(np.asarray(target) if not isinstance(target, Tensor) else target)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"target must be class indices or labels, got {target!r}") from exc
    if values.is_complex() or not (values.is_floating_point() or _integral(values)):
        raise TypeError(f"target must be class indices or labels, got {target!r}")
    if values.is_floating_point() and not bool((values == values.round()).all()):
        raise ValueError(f"target must be whole class indices, got {values.tolist()}")
    return values.long()


def _integral(values: Tensor) -> bool:
    return not values.is_floating_point() and values.dtype != torch.bool


def _label_index(label: str, model: torch.nn.Module) -> int:
    label2id = getattr(getattr(model, "config", None), "label2id", None) or {}
    if label not in label2id:
        known = f"its labels are {sorted(label2id)}" if label2id else "it has no config.label2id"
        raise ValueError(f"target={label!r} is not a label of this model ({known})")
    return int(label2id[label])


def check_relevance_nodes(params: RelevanceParams, captured: Any) -> None:
    """Every node named in ``relevance_nodes`` is a node of the graph that runs: a misspelt or
    foreign name would otherwise return no relevance for it, without a word."""
    nodes = params.relevance_nodes
    if isinstance(nodes, str):
        return
    names = {node.name for node in captured.nodes if isinstance(node, fx.Node)}
    missing = [name for name in nodes if not isinstance(name, str) or name not in names]
    if missing:
        example = [n.name for n in captured.nodes if n.op == "call_function"][:5]
        raise ValueError(
            f"relevance_nodes: {missing} are not nodes of the captured graph; names are those "
            f"of the result's node_io (or dlb.graph), e.g. {example}, or 'all' / 'inputs'"
        )


def problem_type(given: str | None, model: torch.nn.Module, task: TaskName) -> str | None:
    """What the classifier's logits are: ``given``, else the model's ``config.problem_type``
    (transformers writes it into a classifier's config when it trains one: a multi-label or
    regression head decided by argmax would report a wrong answer with softmax scores).
    None for a single-label classifier (argmax decides), and for the tasks that do not
    decide one prediction per sample (token labels, answer spans, generated tokens)."""
    if task not in ONE_DECISION_TASKS:
        if given is not None:
            raise ValueError(f"problem_type is for {', '.join(ONE_DECISION_TASKS)}, not {task}")
        return None
    config = getattr(model, "config", None)
    kind = given if given is not None else getattr(config, "problem_type", None)
    return None if kind == "single_label_classification" else kind
