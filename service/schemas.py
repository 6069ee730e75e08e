"""The API's wire format: the request body, with bounds, and every reply's shape.

The request is validated once, by ``RunTaskRequest``: pydantic names the failing field in each
422, limits that depend on the model (max tokens, image size, ...) are checked against the
registry entry in ``service.api.validation``, and the worker validates the job's stored body
with the same model. The reply models give ``/docs`` each answer's shape; the routes return
exactly these, leaving out the keys they leave unset. Task names, modes and references come
from ``engine.tasks`` (no torch)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from engine.tasks import MODES, PAIR_TASKS, REFERENCE_NAMES, TASK_NAMES, TaskName

from .registry import Limits
from .vocabulary import JobStatus

# A request names its task as one of these strings (a Literal of the values, not the enum, so
# that an unknown task is pydantic's literal_error, listing the names).
RequestTask = Literal[tuple(t.value for t in TASK_NAMES)]


def _no_booleans(number: str) -> BeforeValidator:
    """Refuses true and false where numbers are meant (``number``: "integer" or "number"),
    also inside lists: pydantic's lax mode reads them as 1 and 0, so that ``target: true``
    explained class 1 and ``multiplier: true`` seeded with 1. Put on the whole field's type,
    so that the field's bounds stay in its JSON schema (``minimum``)."""

    def refuse(value: Any) -> Any:
        if _holds_boolean(value):
            raise PydanticCustomError(
                "bool_not_number", f"Input should be a valid {number}, not true or false"
            )
        return value

    return BeforeValidator(refuse)


def _holds_boolean(value: Any) -> bool:
    return isinstance(value, bool) or (
        isinstance(value, list) and any(_holds_boolean(v) for v in value)
    )


INTEGERS = _no_booleans("integer")
NUMBERS = _no_booleans("number")
# A request's true or false: strict, as lax mode reads 0, 1, "yes" and "true" as booleans,
# so a client's number or string would switch a setting instead of being refused.
Flag = Annotated[bool, Strict()]
Text = Annotated[str, Field(min_length=1, max_length=20000)]
Row = Annotated[
    list[Annotated[float, Field(allow_inf_nan=False)]], Field(min_length=1, max_length=4096)
]
Ids = Annotated[list[int], Field(min_length=1, max_length=4096)]
Batch = 64  # rows per request, before the model's own max_batch
# Past the indices a tensor holds (torch's long): a class, token or position from here on is
# no index of anything, and the worker failed such jobs with "Overflow when unpacking long
# long". Exclusive bounds, which the OpenAPI schema's floats hold exactly.
INDEX_END = 2**63
SEED_END = 2**64  # torch's seeds: 0 to 2**64 - 1


def _one_sentence(message: str) -> WrapValidator:
    """A union's failure as one sentence saying what is allowed and what was sent, instead of
    pydantic's error per member of the union (``inputs.text.constrained-str: ... |
    inputs.text.list[constrained-str]: ...``)."""

    def validate(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError as exc:
            raise PydanticCustomError(
                "invalid_input", message + " (got {got})", {"got": shown(value)}
            ) from exc

    return WrapValidator(validate)


def listed(items: Sequence[Any], most: int, show: Callable[[Any], str] = str) -> str:
    """The first ``most`` items (each as ``show`` writes it) and how many more: a message
    about a list of thousands (a model's 1000 labels, a request's 20000 layer names) stays
    a line."""
    more = len(items) - most
    return ", ".join(map(show, items[:most])) + (f" and {more} more" if more > 0 else "")


def shown(value: Any, width: int = 60) -> str:
    """``value`` as JSON, or where that is longer than ``width``, its size: a text's
    characters, a list's items (too many, or too long, is the usual fault there)."""
    try:  # an unpaired surrogate (JSON's "\\ud800") as that escape: not UTF-8 else
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    text = text.encode("utf-8", "backslashreplace").decode()
    if len(text) <= width:
        return text
    if isinstance(value, str | list):
        what = "a text" if isinstance(value, str) else "a list"
        return f"{what} of {len(value)} {'characters' if isinstance(value, str) else 'items'}"
    return text[: width - 3] + "..."


TextInput = Annotated[
    Text | Annotated[list[Text], Field(min_length=1, max_length=Batch)] | None,
    _one_sentence(
        f"must be a non-empty string or a list of them (at most {Batch} texts of at most "
        "20000 characters)"
    ),
]
FeaturesInput = Annotated[
    Row | Annotated[list[Row], Field(min_length=1, max_length=Batch)] | None,
    _one_sentence(
        "must be a list of finite numbers or a list of such rows (at most "
        f"{Batch} rows of 1 to 4096 numbers)"
    ),
    NUMBERS,
]
TokenIdsInput = Annotated[
    Ids | Annotated[list[Ids], Field(min_length=1, max_length=Batch)] | None,
    _one_sentence(
        "must be a list of token ids (integers) or a list of such lists (at most "
        f"{Batch} rows of 1 to 4096 ids)"
    ),
    INTEGERS,
]


def position_refusal(kind: str, pos: int, lengths: list[int], left: bool | None) -> str | None:
    """Why ``relevance.position`` picks no token of every input of ``inputs.<kind>``, each
    of ``lengths`` tokens padded to the longest (on the left where ``left``; None where the
    side is not known), or None where it does (the door's and the worker's words: a
    python factory's tokenizer is the worker's alone, and the engine said only "position
    [1, 1] falls on padding")."""
    longest, shortest = max(lengths), min(lengths)
    if pos >= longest:
        what = "the input" if len(lengths) == 1 else "the longest input"
        return (
            f"{pos} is past the last token of {what}: {longest} tokens, special ones included "
            f"(0 to {longest - 1})"
        )
    if left is None:
        return None
    first, last = (longest - shortest, longest - 1) if left else (0, shortest - 1)
    if first <= pos <= last:
        return None
    return (
        f"{pos} falls on the padding of inputs.{kind}.{lengths.index(shortest)} ({shortest} "
        f"tokens, padded on the {'left' if left else 'right'} to {longest}): positions {first} "
        f"to {last} are tokens of every input"
    )


def pair_refusal(task: str) -> str:
    """Why a task takes no ``text_pair`` (the door's and the worker's words)."""
    return f"{task} takes one text per input: text_pair is for {', '.join(PAIR_TASKS)}"


def no_separator(model_id: str) -> str:
    """Why a model takes no ``text_pair``: its tokenizer would run the texts together."""
    return (
        f"the tokenizer of {model_id} puts no separator between the two texts of a pair, "
        "so the model cannot tell them apart: send one text"
    )


def no_labels(model_id: str, count: int | None) -> str:
    """Why a label names no class of a model (the door's and the worker's words)."""
    indices = f" (0 to {count - 1})" if count else ""
    return (
        f"{model_id} has no labels (its registry entry gives none): give a class "
        f"index{indices}, runner-up or rest"
    )


class Inputs(BaseModel):
    """Exactly one of: text (or a list of texts), a base64 PNG/JPEG image, a tabular row (or
    rows) of numbers, or raw token ids (a list, or a list of lists); with text, optionally
    the second text of each pair (``text_pair``: a question's context, an NLI hypothesis),
    which the tokenizer joins to the first as its own segment."""

    model_config = ConfigDict(extra="forbid")
    text: TextInput = None
    text_pair: TextInput = Field(
        default=None,
        description="the second text of each pair, tokenized with `text` as one input "
        "(`tokenizer(text, text_pair)`: separators and token_type_ids as the model was "
        "trained with): question-answering's context after the question in `text`, a "
        "sentence-pair classifier's second sentence. A string with one text, or a list with "
        "one per text. For question-answering, text-classification and token-classification "
        "models whose tokenizer separates pairs; both texts count against max_tokens",
    )
    image: str | None = Field(
        default=None, min_length=1, description="base64 PNG or JPEG (data: URL ok)"
    )
    features: FeaturesInput = None
    token_ids: TokenIdsInput = None

    @model_validator(mode="after")
    def exactly_one(self) -> Inputs:
        given = [k for k in ("text", "image", "features", "token_ids") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of text, image, features, token_ids"
                + (f" (got {', '.join(given)})" if given else "")
            )
        return self

    @field_validator("text_pair")
    @classmethod
    def _one_per_text(cls, pair: str | list[str] | None, info: ValidationInfo) -> Any:
        """A second text for each first text: a string for a string, a list as long as the
        list (a string for a list would leave open which text it pairs with)."""
        if pair is None or "text" not in info.data:  # text itself is invalid: that error says
            return pair
        text = info.data["text"]
        if text is None:
            raise ValueError("is the second text of a pair: give the first in text")
        if isinstance(text, str) != isinstance(pair, str):
            raise ValueError("must be a string with one text, a list with a list of texts")
        if isinstance(text, list) and len(text) != len(pair):
            raise ValueError(f"has {len(pair)} texts for {len(text)} in text: give one per text")
        return pair

    def pairs(self) -> list[tuple[str, str | None]]:
        """Each text with its second text (None without ``text_pair``)."""
        texts = [self.text] if isinstance(self.text, str) else list(self.text or [])
        seconds = self.text_pair
        others = [seconds] if isinstance(seconds, str) else list(seconds or [None] * len(texts))
        return list(zip(texts, others, strict=True))

    def kind(self) -> str:
        return next(k for k in ("text", "image", "features", "token_ids") if getattr(self, k))


class RelevanceParams(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    mode: Literal[MODES] = Field(
        default="default",
        description="default: the non-negative |z| rule; contrast: why the target and not its "
        "alternative (`contrast_with`), signed: positive toward the target, negative toward "
        "the alternative, adding up to the seed; reference: signed change from the input "
        "named by `reference` (default zeros), the most faithful mode in bench.faithfulness "
        "with the removal baseline (blur, mask), at about twice the cost",
    )
    multiplier: Annotated[float, NUMBERS] = Field(default=100.0, gt=0, le=1e6)
    scaler: Annotated[float, NUMBERS] = Field(default=1.0, gt=0, le=1e6)
    thresholding: Annotated[float, NUMBERS] = Field(default=0.5, ge=0, le=1)
    # At least the web page's 0.01: the logits are divided by it in float32, where a tiny
    # one (1e-39) is no number and a small one (1e-37) makes them infinite; the job failed
    # ("probability tensor contains either inf, nan"), or a classifier's scores were null.
    temperature: Annotated[float, NUMBERS] = Field(default=1.0, ge=0.01, le=100)
    target: Annotated[int | None, INTEGERS] = Field(
        default=None, ge=0, lt=INDEX_END, description="explain this class"
    )
    position: Annotated[int | None, INTEGERS] = Field(
        default=None,
        ge=0,
        lt=INDEX_END,
        description="token-classification: explain this token's label (default: every "
        "token's, one relevance row per token)",
    )
    reference: Literal[REFERENCE_NAMES] | None = Field(
        default=None,
        description='modes "reference" and "contrast": what the input with its features removed '
        "is (contrast explains the change from it). "
        "zeros (the default): zero pixels, zero embeddings for tokens; mean: each image's "
        "mean colour; blur: the image blurred; mask: every token but the special ones "
        "replaced by the mask (or unknown) token. The mode is only as faithful as this "
        "choice (bench/README.md, Faithfulness)",
    )

    contrast_with: Annotated[
        int | Annotated[str, Field(min_length=1, max_length=200)] | None,
        _one_sentence("must be runner-up, rest, a class index or a label (1 to 200 characters)"),
        INTEGERS,
    ] = Field(
        default=None,
        description='mode "contrast" only: what the target is explained against. runner-up '
        "(the default; in generation, each step's runner-up token), rest (the other classes, "
        "weighted by their softmax), a class index, or one of the model's labels",
    )

    @field_validator("contrast_with")
    @classmethod
    def _contrast_with_needs_its_mode(cls, value: Any, info: ValidationInfo) -> Any:
        if "mode" in info.data and value is not None and info.data["mode"] != "contrast":
            raise ValueError(f'contrast_with is for mode "contrast", not {info.data["mode"]!r}')
        if isinstance(value, int) and not 0 <= value < INDEX_END:
            raise ValueError(
                f"contrast_with must be a class index (0 to {INDEX_END - 1}) or a label"
            )
        return value

    @field_validator("reference")
    @classmethod
    def _reference_needs_its_mode(cls, value: str | None, info: ValidationInfo) -> str | None:
        if "mode" not in info.data:  # mode itself is invalid: that error says enough
            return value
        mode = info.data["mode"]
        if value is not None and mode not in ("reference", "contrast"):
            raise ValueError(f'reference is for modes "reference" and "contrast", not {mode!r}')
        return value


class GenerationParams(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    max_new_tokens: Annotated[int | None, INTEGERS] = Field(
        default=None, ge=1, le=4096, description="default: min(16, the model's limit)"
    )
    top_k: Annotated[int | None, INTEGERS] = Field(default=None, ge=0, le=1000)
    top_p: Annotated[float | None, NUMBERS] = Field(default=None, gt=0, le=1)
    num_beams: Annotated[int, INTEGERS] = Field(default=1, ge=1, le=64)
    seed: Annotated[int | None, INTEGERS] = Field(default=None, ge=0, lt=SEED_END)
    do_sample: Flag | None = Field(default=None, description="default: sample when top_k/top_p")
    steps: Annotated[
        Literal["all", "none"] | int | list[int],
        _one_sentence("must be all, none, a number N (the first N steps) or a list of steps"),
        INTEGERS,
    ] = Field(default="all", description="which steps to explain: all, none, first N, or a list")
    path: Literal["batched", "stepwise"] = Field(
        default="batched",
        description="batched: one sweep after decoding; stepwise: relevance as tokens appear",
    )


class OutputOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    relevance: Annotated[
        Literal["inputs", "all"]
        | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)],
        _one_sentence("must be inputs, all, or a non-empty list of layer names"),
    ] = Field(default="inputs", description="'inputs' (per token / pixel), 'all', or layer names")
    encoding: Literal["base64", "json"] = "base64"
    dtype: Literal["float16", "float32"] = "float16"
    top_scores: Annotated[int, INTEGERS] = Field(
        default=5, ge=0, le=50, description="top tokens per generation step"
    )


class RunTaskRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._\-/]+$")
    task: RequestTask = TaskName.AUTO.value
    inputs: Inputs
    relevance: RelevanceParams = Field(default_factory=RelevanceParams)
    generation: GenerationParams = Field(default_factory=GenerationParams)
    output: OutputOptions = Field(default_factory=OutputOptions)


# ------------------------------------------------------------------ replies


class JobUrls(BaseModel):
    """Where to follow a job. ``heatmap`` only for tasks that have a picture."""

    self: str
    events: str = Field(description="Server-Sent Events; resume with Last-Event-ID")
    cancel: str = Field(description="DELETE this to cancel")
    heatmap: str | None = Field(default=None, description="the relevance as a PNG")


class JobAccepted(BaseModel):
    """POST /run_task's 202: the job was queued (or, with the same Idempotency-Key, it is
    the first request's job again)."""

    job_id: str
    status: JobStatus
    model: str
    task: TaskName
    urls: JobUrls


class JobError(BaseModel):
    """Why a job failed or was canceled: the exception's class name and its message."""

    model_config = ConfigDict(extra="allow")
    type: str
    message: str


class JobView(BaseModel):
    """GET /jobs/{id}: the job's status, timings and result. Keys not known are left out:
    the queue's timestamps once the queue has let the job go, ``result`` and ``timings``
    before it finished, ``error`` unless it failed or was canceled, ``workers_alive`` once
    it is over."""

    job_id: str
    status: JobStatus
    model: str | None = None
    task: str | None = Field(default=None, description="a task name; unknown when no model")
    enqueued_at: str | None = Field(default=None, description="ISO 8601")
    started_at: str | None = Field(default=None, description="ISO 8601")
    ended_at: str | None = Field(default=None, description="ISO 8601")
    result: dict[str, Any] | None = Field(
        default=None, description="the result document: predictions, relevance, receipt"
    )
    timings: dict[str, Any] | None = Field(default=None, description="seconds per phase")
    error: JobError | None = None
    workers_alive: int | None = Field(
        default=None, description="while queued or started: workers whose heartbeat is live"
    )
    note: str | None = Field(default=None, description="why a job may not move on, for people")
    urls: JobUrls


class CancelReply(BaseModel):
    """DELETE /jobs/{id}: ``canceled`` (200) for a job still queued, ``canceling`` (202) for
    one running, which stops at its next checkpoint."""

    job_id: str
    status: Literal[JobStatus.CANCELED, "canceling"]


ModelStatus = Literal["warm", "cold", "failed"]


class LoadFailure(BaseModel):
    """Why a worker could not load a model, as it reported it (``service.load_failures``)."""

    message: str = Field(description="which model, which file and why")
    worker: str = Field(description="the worker that tried")
    at: float = Field(description="when, in Unix seconds")


class ModelInfo(BaseModel):
    """A registry entry as clients see it, whether a live worker holds it loaded, and
    whether the last load a worker tried failed."""

    id: str
    task: TaskName
    description: str
    expects: str = Field(default="", description="what the model expects of its input")
    labels: list[str] | None
    limits: Limits
    warm: bool = Field(description="a live worker has it loaded")
    workers_warm: int = Field(description="how many live workers have it loaded")
    status: ModelStatus = Field(
        description="warm: a live worker has it loaded; failed: not loaded, and the last "
        "load a worker tried failed (load_error says why); cold: loads on first use"
    )
    load_error: LoadFailure | None = Field(
        default=None,
        description="the last failed load, until a worker loads the model (or a day passes)",
    )


class ModelList(BaseModel):
    models: list[ModelInfo]


class Health(BaseModel):
    status: Literal["ok"]
    version: str


class Readiness(BaseModel):
    """Ready when Redis answers and a worker that takes jobs has a live heartbeat;
    ``workers`` (those), ``warming`` (live, still warming their models) and ``stuck`` (live,
    but stuck in a job past its timeout: ``service.reaper``) when Redis answered,
    ``error`` when it did not."""

    ready: bool
    redis: bool
    workers: int | None = None
    warming: int | None = None
    stuck: int | None = None
    error: str | None = None


class ErrorBody(BaseModel):
    """Any error but a validation error: what went wrong, in one line."""

    detail: str


class FieldError(BaseModel):
    """One failing field: FastAPI's ``loc``, ``msg``, ``type``, and ``message``, one line
    that names the field (``inputs.text: ...``)."""

    loc: list[str | int]
    msg: str
    type: str
    message: str


class ValidationErrorBody(BaseModel):
    """422: the failing fields (or, for a reused Idempotency-Key, one line)."""

    detail: list[FieldError] | str
