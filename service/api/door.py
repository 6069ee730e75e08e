"""Checks at the door that need the model's metadata (``service.api.metadata``) or look at
several fields together: what the worker would otherwise accept and then fail on with a
Python error (a class the model does not have, a token id outside its vocabulary, a prompt
longer than it takes) or silently ignore (blank text, generation settings sent to a
classifier, steps past the last generated token). Each failure is a 422 naming the field,
the value and what is allowed.

Layer names in ``output.relevance`` need the model's graph, which only a worker captures:
``check_layers`` reads the names it publishes when it captures the model's graph."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aredis

from engine.tasks import CLASSIFICATION_TASKS, ONE_DECISION_TASKS, TaskName

from .. import layer_names
from ..registry import ModelSpec
from ..schemas import (
    INDEX_END,
    RunTaskRequest,
    listed,
    no_labels,
    no_separator,
    position_refusal,
    shown,
)
from .errors import invalid
from .metadata import ModelMeta, ModelMetadata


def check(spec: ModelSpec, task: TaskName, req: RunTaskRequest, meta: ModelMeta) -> None:
    """Every check of this module, in the order of the request's fields."""
    _check_text(spec, task, req, meta)
    _check_token_ids(spec, task, req, meta)
    _check_fill_in(spec, req, meta)
    _check_feature_width(spec, req, meta)
    _check_mode(task, req)
    _check_head(spec, task, req, meta)
    _check_selection(spec, task, req, meta)
    _check_target(spec, task, req, meta)
    _check_contrast_with(spec, task, req, meta)
    _check_contrast_target(spec, req, meta)
    _check_unread(spec, task, req)
    if task == TaskName.GENERATION:
        _check_positions(req, meta)
        _check_steps(req)
        _check_decoding(req)
    elif req.generation.model_fields_set:
        given = ", ".join(sorted(req.generation.model_fields_set))
        raise invalid(
            ["generation"],
            f"{given}: generation settings, but {spec.id} does {task}; leave generation out",
        )


async def check_layers(
    ar: aredis.Redis, spec: ModelSpec, req: RunTaskRequest, metadata: ModelMetadata
) -> None:
    """Layer names in ``output.relevance`` are node names of the model's captured graph, as
    the worker that captured it published them (``service.models``). Until a worker has (no
    job has run on the model yet, nor has a worker warmed it), the names are accepted and the
    worker checks them on the graph it captures, in the same words (``service.layer_names``).
    Only a request that names layers reads Redis."""
    names = req.output.relevance
    if not isinstance(names, list) or not names:
        return
    nodes = await metadata.graph_nodes(ar, spec)
    if nodes is None:
        return
    try:
        layer_names.check(spec.id, names, nodes)
    except layer_names.UnknownNodes as exc:
        raise invalid(list(exc.loc), exc.msg) from None


def _check_feature_width(spec: ModelSpec, req: RunTaskRequest, meta: ModelMeta) -> None:
    """Rows as wide as the model's input [B, F] (its captured graph's, ``metadata``): the
    worker failed other widths with the engine's message, after the queue. Every row is as
    wide as the first (``validation``)."""
    rows = req.inputs.features
    if not rows or meta.features is None:
        return
    width = len(rows[0]) if isinstance(rows[0], list) else len(rows)
    if width != meta.features:
        raise invalid(
            ["inputs", "features"],
            f"rows of {width} features, but {spec.id} takes {meta.features} a row",
        )


def _token_bound(spec: ModelSpec, task: TaskName, meta: ModelMeta) -> tuple[int, str]:
    """The most tokens one input may have, and what sets it: the entry's ``max_tokens``, or
    the model's positions where it has fewer (the registry's default of 128 is more than a
    small model's table: such texts failed in the worker, after the queue). A causal LM's
    prompt's positions are checked with its new tokens (``_check_positions``); an
    encoder-decoder's source has the positions to itself."""
    bound = spec.limits.max_tokens
    positions = meta.max_positions
    alone = task != TaskName.GENERATION or meta.encoder_decoder
    if alone and positions is not None and positions < bound:
        return positions, f"the {positions} positions of {spec.id} (its config.json)"
    return bound, f"max_tokens={bound}"


def _check_text(spec: ModelSpec, task: TaskName, req: RunTaskRequest, meta: ModelMeta) -> None:
    """No blank text, and no text (or pair of texts) longer in tokens than the model takes,
    where the door knows its tokenizer (else the worker counts, and fails the job with the
    same words); a pair only for a tokenizer that separates its texts."""
    bound, why = _token_bound(spec, task, meta)
    one = isinstance(req.inputs.text, str)
    if req.inputs.text_pair is not None and meta.separates_pairs() is False:
        raise invalid(["inputs", "text_pair"], no_separator(spec.id))
    for i, (text, pair) in enumerate(req.inputs.pairs()):
        loc = ["inputs", "text"] if one else ["inputs", "text", i]
        pair_loc = ["inputs", "text_pair"] if one else ["inputs", "text_pair", i]
        for where, value in ((loc, text), (pair_loc, pair)):
            if value is not None:
                _check_words(spec, where, value, meta)
        n = meta.count_tokens(text, pair)
        if n is not None and n > bound:
            counted = " with its text" if pair else ""
            raise invalid(pair_loc if pair else loc, f"{n} tokens{counted}, more than {why}")


def _check_words(spec: ModelSpec, loc: list[str | int], text: str, meta: ModelMeta) -> None:
    """Text with something to explain: not blank, and, where the door knows the tokenizer,
    not only characters it drops (control, zero-width or lone combining characters: a BERT
    tokenizer leaves none, and the job explained its special tokens alone)."""
    if not text.strip():
        raise invalid(loc, "is blank (only whitespace); send some text")
    if meta.own_tokens(text) == 0:
        raise invalid(
            loc,
            f"{shown(text)} holds no token: the tokenizer of {spec.id} drops each of its "
            "characters (control, zero-width or lone combining characters); send some text",
        )


def _check_token_ids(spec: ModelSpec, task: TaskName, req: RunTaskRequest, meta: ModelMeta) -> None:
    """Ids are indices into the vocabulary: 0 to vocab_size - 1; a row no longer than the
    model takes (``_token_bound``)."""
    ids = req.inputs.token_ids
    if not ids:
        return
    rows = ids if isinstance(ids[0], list) else [ids]
    bound, why = _token_bound(spec, task, meta)
    if (longest := max(len(row) for row in rows)) > bound:
        raise invalid(["inputs", "token_ids"], f"{longest} tokens, more than {why}")
    flat = [i for row in rows for i in row]
    top = f"{meta.vocab_size - 1}" if meta.vocab_size else "the vocabulary size - 1"
    end = meta.vocab_size or INDEX_END  # past a tensor's index, where not known
    bad = next((i for i in flat if not 0 <= i < end), None)
    if bad is not None:
        raise invalid(["inputs", "token_ids"], f"id {bad} is not a token id (0 to {top})")


def _check_fill_in(spec: ModelSpec, req: RunTaskRequest, meta: ModelMeta) -> None:
    """A masked LM explains the token it fills in: every input holds its mask token (the
    worker would explain the last token instead, a separator whose prediction means
    nothing)."""
    token = meta.mask_token
    if token is None:
        return
    ids = req.inputs.token_ids
    if ids:
        mask_id = meta.tokenizer.token_to_id(token) if meta.tokenizer is not None else None
        rows = ids if isinstance(ids[0], list) else [ids]
        missing = [i for i, row in enumerate(rows) if mask_id is not None and mask_id not in row]
        where, what, put = ["inputs", "token_ids"], f"{token} (id {mask_id})", f"id {mask_id}"
    else:
        texts = [text for text, _ in req.inputs.pairs()]
        missing = [i for i, text in enumerate(texts) if token not in text]
        where, what, put = ["inputs", "text"], token, token
    if missing:
        loc = where if isinstance(req.inputs.text or ids[0], str | int) else [*where, missing[0]]
        raise invalid(
            loc,
            f"has no {what}: {spec.id} is a masked LM and explains the token it fills in; "
            f"put {put} where the word to predict goes",
        )


def _check_target(spec: ModelSpec, task: TaskName, req: RunTaskRequest, meta: ModelMeta) -> None:
    """A classifier's target is one of its classes; a regression's, one of its outputs (a
    single one is a value, not a logit that decides between two classes: target 1 failed
    in the engine with "target must be a class index in [0, 1)")."""
    target = req.relevance.target
    if target is None or task not in CLASSIFICATION_TASKS or meta.targets is None:
        return
    regression = meta.problem_type == "regression" and task in ONE_DECISION_TASKS
    count = meta.num_classes if regression else meta.targets
    if count is None or target < count:
        return
    if regression:
        raise invalid(
            ["relevance", "target"],
            f"{target} is not an output of {spec.id}: it is a regression of {count} "
            f"output{'s' if count > 1 else ''} (its config.json), target 0 to {count - 1}",
        )
    raise invalid(["relevance", "target"], _not_a_class(spec, target, count))


# How many of a model's labels a refusal names (an ImageNet model has 1000).
LABELS_LISTED = 20


def _not_a_class(spec: ModelSpec, index: int, count: int) -> str:
    names = f" ({listed(spec.labels, LABELS_LISTED)})" if spec.labels else ""
    return f"{index} is not a class of {spec.id}: 0 to {count - 1}{names}"


# What a task explains, where it takes no ``target`` or ``position`` to choose otherwise (the
# job would fail on them, or generation would run ignoring them).
_EXPLAINS = {
    TaskName.GENERATION: ("each step's generated token", ("target", "position")),
    TaskName.QUESTION_ANSWERING: ("the predicted answer's start and end", ("target", "position")),
    TaskName.IMAGE_CLASSIFICATION: ("one prediction per image", ("position",)),
    TaskName.TABULAR_CLASSIFICATION: ("one prediction per row", ("position",)),
}


def _check_mode(task: TaskName, req: RunTaskRequest) -> None:
    """Mode contrast needs alternatives to the explained output: question-answering's start
    and end are not alternatives of one another (the worker failed the job, saying so)."""
    if task == TaskName.QUESTION_ANSWERING and req.relevance.mode == "contrast":
        raise invalid(
            ["relevance", "mode"],
            f"contrast: {task} explains {_EXPLAINS[task][0]}, which are not alternatives of "
            "one another; use default or reference",
        )


def _check_head(spec: ModelSpec, task: TaskName, req: RunTaskRequest, meta: ModelMeta) -> None:
    """What a classifier's head (config.json's ``problem_type``, its count of classes) has no
    meaning for, as the engine refuses or ignores it: a regression's values have no
    alternative class to contrast with, a multi-label head decides each label on its own (a
    label's contrast is its absence), and a threshold decides only a single logit or the
    labels of a multi-label head (argmax decides among several classes: it was ignored)."""
    rel, kind = req.relevance, meta.problem_type
    if task not in ONE_DECISION_TASKS:  # the engine reads no problem_type for the others
        return
    if kind == "regression" and rel.mode == "contrast":
        raise invalid(
            ["relevance", "mode"],
            f"contrast: {spec.id} is a regression (its outputs are values, with no "
            "alternative class to explain against); use default or reference",
        )
    if kind == "multi_label_classification" and rel.contrast_with is not None:
        raise invalid(
            ["relevance", "contrast_with"],
            f"{spec.id} decides each label on its own (multi-label): mode contrast explains a "
            f"label against its absence; leave contrast_with out (got {rel.contrast_with!r})",
        )
    argmax = kind is None and meta.num_classes is not None and meta.num_classes > 1
    if "thresholding" in rel.model_fields_set and (argmax or kind == "regression"):
        how = "is a regression" if argmax is False else "decides by argmax among its classes"
        raise invalid(
            ["relevance", "thresholding"],
            f"{rel.thresholding}: thresholding decides a single-logit classifier, or each "
            f"label of a multi-label one; {spec.id} {how}; leave thresholding out",
        )


def _check_selection(spec: ModelSpec, task: TaskName, req: RunTaskRequest, meta: ModelMeta) -> None:
    """No ``target`` or ``position`` where the task has nothing for them to pick, nor a
    ``position`` for a text classifier known to give one prediction per text (its logits
    have no token axis: the worker failed the job); a position on a token of the input."""
    explains, unused = _EXPLAINS.get(task, ("", ()))
    if task == TaskName.TEXT_CLASSIFICATION and meta.token_axis is False:
        explains = f"one prediction per text ({spec.id} is a sequence classifier)"
        unused = ("position",)
    for name in unused:
        if getattr(req.relevance, name) is not None:
            raise invalid(["relevance", name], f"{task} explains {explains}: it takes no {name}")
    if req.relevance.position is not None and meta.token_axis is not False:
        _check_position(spec, task, req, meta)


def _check_position(spec: ModelSpec, task: TaskName, req: RunTaskRequest, meta: ModelMeta) -> None:
    """A position picks a token of the padded input: none past the most tokens an input may
    have, nor, where the door counts the tokens, past the longest input's last token, nor
    in a batch on a shorter input's padding where the door knows the padding side."""
    pos, (bound, why) = req.relevance.position, _token_bound(spec, task, meta)
    if pos >= bound:
        raise invalid(
            ["relevance", "position"],
            f"{pos} is past the last token an input may have: 0 to {bound - 1} ({why})",
        )
    lengths = _lengths(req, meta)
    if lengths is None:
        return
    if refusal := position_refusal(req.inputs.kind(), pos, lengths, meta.pads_left):
        raise invalid(["relevance", "position"], refusal)


# Settings some tasks never read: where they sit, what they are for, and the tasks that read
# them. Sent to another task, the job ran ignoring them.
_READ_BY = (
    (
        ("output", "top_scores"),
        "the top tokens of each generation step",
        (TaskName.GENERATION,),
    ),
    (
        ("relevance", "thresholding"),
        "a classifier's decision by its logits' sigmoid",
        ONE_DECISION_TASKS,
    ),
)


def _check_unread(spec: ModelSpec, task: TaskName, req: RunTaskRequest) -> None:
    """No setting the task never reads (``_READ_BY``): top_scores outside generation,
    thresholding where labels are chosen by argmax or the answer by its span."""
    for (section, name), what, readers in _READ_BY:
        given = getattr(req, section)
        if name in given.model_fields_set and task not in readers:
            raise invalid(
                [section, name],
                f"{getattr(given, name)}: {name} sets {what}, but {spec.id} does {task}; "
                f"leave {name} out",
            )


def _check_contrast_with(
    spec: ModelSpec, task: TaskName, req: RunTaskRequest, meta: ModelMeta
) -> None:
    """An alternative the model has: a class index or label of a classifier, a token id of
    a generation model (its classes are its vocabulary; its config's labels mean nothing)."""
    alt, loc = req.relevance.contrast_with, ["relevance", "contrast_with"]
    if alt is None or alt in ("runner-up", "rest"):
        return
    generation = task == TaskName.GENERATION
    count = meta.vocab_size if generation else meta.num_classes
    if generation and isinstance(alt, str):
        top = count - 1 if count else "the vocabulary size - 1"
        raise invalid(
            loc, f"{alt!r} is not for generation: runner-up, rest or a token id (0 to {top})"
        )
    if isinstance(alt, int) and count is not None and alt >= count:
        if generation:
            raise invalid(loc, f"{alt} is not a token id of {spec.id}: 0 to {count - 1}")
        raise invalid(loc, _not_a_class(spec, alt, count))
    if isinstance(alt, str) and meta.token_classes and meta.tokenizer is not None:
        if meta.token_class(alt) is None:
            raise invalid(loc, _not_a_token(spec, alt, meta))
        return
    if isinstance(alt, str) and meta.labels == ():
        raise invalid(loc, f"{alt!r}: {no_labels(spec.id, count)}")
    if isinstance(alt, str) and meta.labels is not None and alt not in meta.labels:
        raise invalid(
            loc,
            f"{alt!r} is not a label of {spec.id}: runner-up, rest, a class index or one of "
            + listed(list(dict.fromkeys(meta.labels)), LABELS_LISTED),
        )


def _not_a_token(spec: ModelSpec, alt: str, meta: ModelMeta) -> str:
    """Why a label names no class of a language model (its classes are its tokens), with
    the tokens its tokenizer makes of it: a word it splits, or writes otherwise (``Ġsat``)."""
    top = meta.num_classes - 1 if meta.num_classes else "the vocabulary size - 1"
    pieces = meta.tokenizer.encode(alt, add_special_tokens=False).tokens
    reads = f"; its tokenizer reads {alt!r} as {', '.join(map(repr, pieces))}" if pieces else ""
    kind = "masked" if spec.source.head == "masked-lm" else "causal"
    return (
        f"{alt!r} is not a token of {spec.id} (a {kind} LM: its classes are the tokens of "
        f"its vocabulary): runner-up, rest, a token id (0 to {top}) or one token as its "
        f"tokenizer writes it{reads}"
    )


def _check_contrast_target(spec: ModelSpec, req: RunTaskRequest, meta: ModelMeta) -> None:
    """The alternative is another class than the target: a class against itself contrasts
    nothing (the worker failed the job: "contrast_with=3 is the explained class itself").
    A label is the class the worker maps it to: its index among the registry's labels,
    else the model's."""
    alt, target = req.relevance.contrast_with, req.relevance.target
    if target is None or alt is None:
        return
    names = spec.labels or meta.labels or ()
    index = names.index(alt) if isinstance(alt, str) and alt in names else alt
    if isinstance(alt, str) and meta.token_classes:
        index = meta.token_class(alt)
    if index == target:
        raise invalid(
            ["relevance", "contrast_with"],
            f"{alt!r} is the class relevance.target explains ({target}): contrast it with "
            "another class, runner-up or rest",
        )


def _lengths(req: RunTaskRequest, meta: ModelMeta) -> list[int] | None:
    """Each input's length in tokens (a pair's: both texts, with their separators); None
    when the tokenizer is not known."""
    ids = req.inputs.token_ids
    if ids:
        return [len(r) for r in ids] if isinstance(ids[0], list) else [len(ids)]
    counts = [meta.count_tokens(text, pair) for text, pair in req.inputs.pairs()]
    return None if None in counts or not counts else counts


def _prompt_length(req: RunTaskRequest, meta: ModelMeta) -> int | None:
    """The longest prompt in tokens; None when the tokenizer is not known."""
    lengths = _lengths(req, meta)
    return None if lengths is None else max(lengths)


def _check_positions(req: RunTaskRequest, meta: ModelMeta) -> None:
    """The prompt and the generated tokens together fit the model's positions; for an
    encoder-decoder, the decoder's start token and the generated tokens do (its source is
    bounded by ``_token_bound``). The default number of new tokens (none sent) is lowered
    to what fits: a prompt near the positions was refused for a setting it never sent. A
    prompt that fills the positions is refused on the prompt, new tokens sent or not: with
    them sent it was refused on max_new_tokens, "at most 0", which no value fits."""
    n = 1 if meta.encoder_decoder else _prompt_length(req, meta)
    new = req.generation.max_new_tokens or 0
    if meta.max_positions is None or n is None or n + new <= meta.max_positions:
        return
    if n >= meta.max_positions:  # the prompt's fault, whatever max_new_tokens says
        raise invalid(
            ["inputs", "token_ids" if req.inputs.token_ids else "text"],
            f"a {n}-token prompt fills the model's {meta.max_positions} positions: none is "
            f"left for a generated token; send at most {meta.max_positions - 1} tokens",
        )
    if "max_new_tokens" not in req.generation.model_fields_set:  # the default: what fits
        req.generation.max_new_tokens = meta.max_positions - n
        return
    after = "the decoder's start token" if meta.encoder_decoder else f"a {n}-token prompt"
    raise invalid(
        ["generation", "max_new_tokens"],
        f"{new} after {after} is more than the model's {meta.max_positions} "
        f"positions: at most {meta.max_positions - n}",
    )


def _check_steps(req: RunTaskRequest) -> None:
    """A number of steps is 0 to max_new_tokens (a negative one explained none, silently);
    a list's steps name generated tokens: 0 to max_new_tokens - 1 (negative: from the end)."""
    steps, n = req.generation.steps, req.generation.max_new_tokens or 0
    if isinstance(steps, int) and steps > n:
        raise invalid(
            ["generation", "steps"], f"{steps} is more than generation.max_new_tokens={n}"
        )
    if isinstance(steps, int) and steps < 0:
        raise invalid(
            ["generation", "steps"],
            f"{steps}: a number of steps (the first N) is 0 to max_new_tokens={n}; a list "
            "counts from the end ([-1] is the last step)",
        )
    if isinstance(steps, list):
        bad = [s for s in steps if not -n <= s < n]
        if bad:
            raise invalid(
                ["generation", "steps"],
                f"{bad[0]} is not a step: -{n} to {n - 1} with max_new_tokens={n}",
            )


# The generation settings that shape sampling, each with its value that changes nothing.
_SAMPLING = (("top_k", 0), ("top_p", 1.0), ("seed", None))


def _sampling_settings(req: RunTaskRequest) -> list[tuple[list[str], Any]]:
    """Where and what each setting that shapes sampling is, where it is set to change it:
    top_k, top_p, the seed, and the decode's temperature (``relevance.temperature``)."""
    found = [
        (["generation", name], value)
        for name, off in _SAMPLING
        if (value := getattr(req.generation, name)) not in (None, off)
    ]
    if req.relevance.temperature != 1.0:
        found.append((["relevance", "temperature"], req.relevance.temperature))
    return found


def _check_decoding(req: RunTaskRequest) -> None:
    """Whether the decode samples as the engine decides it (``do_sample``, else whether
    top_k, top_p or temperature asks for it): beam search does not sample (the worker failed
    the job: "beam sampling is not supported"), and a greedy decode would ignore the
    settings of sampling (a seed, or top_k with do_sample false)."""
    g, settings = req.generation, _sampling_settings(req)
    asking = [".".join(loc) for loc, _ in settings if loc[-1] != "seed"]
    sampling = g.do_sample if g.do_sample is not None else bool(asking)
    if sampling and g.num_beams > 1:
        why = "do_sample" if g.do_sample else ", ".join(asking)
        raise invalid(
            ["generation", "num_beams"],
            f"{g.num_beams} beams with sampling ({why}): beam search does not sample; "
            f"send num_beams 1 to sample, or leave {why} out",
        )
    if not sampling and settings:
        (loc, value), name = settings[0], ".".join(settings[0][0])
        how = "do_sample is false" if g.do_sample is False else "nothing asks for sampling"
        raise invalid(
            loc,
            f"{value} shapes sampling, but this decode is greedy ({how}): set "
            f"generation.do_sample true, or leave {name} out",
        )
