"""The one table of tasks: names, the inputs each takes, how the engine runs it, and which
named references fit it. The engine, the service's schemas, registry, batching and API all
read it. No torch here (the API process imports this module), so ``engine/__init__`` imports
its torch-backed names lazily."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class TaskName(StrEnum):
    """Task names, as the public package spells them."""

    AUTO = "auto"
    TEXT_CLASSIFICATION = "text-classification"
    IMAGE_CLASSIFICATION = "image-classification"
    TABULAR_CLASSIFICATION = "tabular-classification"
    TOKEN_CLASSIFICATION = "token-classification"
    QUESTION_ANSWERING = "question-answering"
    GENERATION = "generation"


class EngineCall(StrEnum):
    """Which engine path runs a task: one sweep over a classifier's logits, or decoding with
    one seed per generated token."""

    CLASSIFY = "classify"
    GENERATE = "generate"


@dataclass(frozen=True)
class Task:
    """One task. ``inputs``: the request input kinds the service accepts for it (``text``,
    ``token_ids``, ``image``, ``features``); ``references``: the named references
    (``engine.references``) that make sense for those inputs; ``batchable``: whether the
    service may run several requests of it as one batch; ``seeds``: what the leading axis of
    its relevance holds when one run explains several outputs of a sample (question answering:
    the start, then the end; token classification: one seed per token, ``("token",)``); empty
    where one output is explained and the result drops that axis. ``pairs``: whether a text
    input may be a pair of texts, tokenized as two segments (a question and its context, two
    sentences); generation continues one prompt."""

    name: TaskName
    call: EngineCall
    inputs: tuple[str, ...]
    references: tuple[str, ...]
    batchable: bool
    seeds: tuple[str, ...] = ()
    pairs: bool = False


TASKS: dict[TaskName, Task] = {
    t.name: t
    for t in (
        Task(
            TaskName.TEXT_CLASSIFICATION,
            EngineCall.CLASSIFY,
            ("text", "token_ids"),
            ("zeros", "mask"),
            True,
            pairs=True,
        ),
        Task(
            TaskName.IMAGE_CLASSIFICATION,
            EngineCall.CLASSIFY,
            ("image",),
            ("zeros", "mean", "blur"),
            True,
        ),
        Task(
            TaskName.TABULAR_CLASSIFICATION,
            EngineCall.CLASSIFY,
            ("features",),
            ("zeros",),
            True,
        ),
        Task(
            TaskName.TOKEN_CLASSIFICATION,
            EngineCall.CLASSIFY,
            ("text", "token_ids"),
            ("zeros", "mask"),
            False,
            ("token",),
            pairs=True,
        ),
        Task(
            TaskName.QUESTION_ANSWERING,
            EngineCall.CLASSIFY,
            ("text", "token_ids"),
            ("zeros", "mask"),
            False,
            ("start", "end"),
            pairs=True,
        ),
        Task(TaskName.GENERATION, EngineCall.GENERATE, ("text", "token_ids"), ("zeros",), False),
    )
}

# Task names a model can be registered for (``auto`` is resolved from the model at run time).
MODEL_TASKS = tuple(TASKS)
CLASSIFICATION_TASKS = tuple(t.name for t in TASKS.values() if t.call is EngineCall.CLASSIFY)
# The tasks that decide one prediction per sample (``engine.heads.classification``: no seed
# axis); a classifier's ``problem_type`` is theirs.
ONE_DECISION_TASKS = tuple(
    t.name for t in TASKS.values() if t.call is EngineCall.CLASSIFY and not t.seeds
)
# The tasks whose text may come in pairs (``Task.pairs``).
PAIR_TASKS = tuple(t.name for t in TASKS.values() if t.pairs)
# What ``run_task(task=...)`` accepts.
TASK_NAMES = (TaskName.AUTO, *TASKS)

# The relevance modes of the engine (``engine.rules`` implements one method per mode).
MODES = ("default", "contrast", "reference")
# What a classifier's logits are, as transformers' ``config.problem_type`` names it: one
# class of C (softmax; argmax decides), each of C labels on its own (a sigmoid each; those
# above the threshold are present), or C values (regression: no classes, nothing decided).
PROBLEM_TYPES = ("single_label_classification", "multi_label_classification", "regression")
# Named references (``engine.references``); each task lists those that fit its inputs.
REFERENCE_NAMES = ("zeros", "mean", "blur", "mask")
