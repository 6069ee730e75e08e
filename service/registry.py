"""The model registry: the server-side allow-list of models a client may name.

A client only ever sends a registry id; sources (local folders, hub ids, torchvision
architectures with safetensors weights, or the built-in demo models) are written here by the
operator. Relative paths are resolved against the registry file's folder, so a registry and
its models can be copied together (``python -m service build-demo --out DIR``)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from engine.tasks import MODEL_TASKS

# A task a model is registered for (engine.tasks; not "auto"), as plain strings so that an
# operator's error names them as written in the registry file.
ModelTask = Literal[tuple(t.value for t in MODEL_TASKS)]

# The transformers heads a source may load (``Source.head``) and the tasks each can serve: a
# text classifier may also read a causal LM's or a token classifier's logits at one token.
HEAD_TASKS: dict[str, tuple[str, ...]] = {
    "sequence-classification": ("text-classification",),
    "token-classification": ("token-classification", "text-classification"),
    "question-answering": ("question-answering",),
    "image-classification": ("image-classification",),
    "causal-lm": ("generation", "text-classification"),
    "seq2seq-lm": ("generation",),
    "masked-lm": ("text-classification",),  # fill-mask: the mask token's prediction
}
Head = Literal[tuple(HEAD_TASKS)]
# The heads of language models: their classes are the tokens of their vocabulary (its
# config.json's id2label, two LABEL_N by default, names none of them).
VOCABULARY_HEADS = ("causal-lm", "masked-lm")

# The devices an entry may name: "auto" and the strings torch.device takes for the devices the
# worker runs on, written as torch writes them (no "cuda:01"), matched here because the API,
# which reads the registry too, never imports torch.
DEVICE = re.compile(r"auto|cpu|mps|cuda(:(0|[1-9][0-9]*))?")


class Limits(BaseModel):
    """Each at least 1: a limit of 0 or below started a service that refused every request
    of the model at the door."""

    model_config = ConfigDict(extra="forbid")
    max_tokens: int = Field(default=128, ge=1)
    max_image_size: int = Field(default=1024, ge=1)  # pixels, each side, of the uploaded image
    max_new_tokens: int = Field(default=64, ge=1)
    max_beams: int = Field(default=4, ge=1)
    max_batch: int = Field(default=8, ge=1)
    max_features: int = Field(default=512, ge=1)


# ``module:function`` of a python source's factory, dotted names both.
FACTORY = r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$"


class Source(BaseModel):
    """Where the worker gets the model. ``kind``:

    - ``demo``: a built-in demo model (``name``); ``path`` is a prebuilt copy, else it is built
      under the data dir on first use.
    - ``transformers``: ``path`` (a local folder) or ``hub_id`` (only where a hub is reachable);
      ``head`` is one of ``HEAD_TASKS``, serving the entry's task (default: the one the
      task implies; for generation, ``seq2seq-lm`` where config.json says the model is an
      encoder-decoder).
    - ``torchvision``: ``arch`` and a safetensors ``weights`` file, ``num_classes``.
    - ``python``: ``factory`` (``module:function``) returning a ``service.models.LoadedModel``;
      for operators' own code (and the tests' failing model). Never reachable from a request.
    """

    model_config = ConfigDict(extra="forbid")
    kind: Literal["demo", "transformers", "torchvision", "python"]
    name: str | None = None
    path: str | None = None
    hub_id: str | None = None
    head: Head | None = None
    arch: str | None = None
    weights: str | None = None
    num_classes: int | None = Field(default=None, ge=1)
    factory: str | None = Field(default=None, pattern=FACTORY)

    @model_validator(mode="after")
    def _what_the_kind_needs(self) -> Source:
        """The fields each kind loads from, checked where the registry is read: a missing
        one failed every job of the model at its load."""
        needs = {
            "transformers": ["path or hub_id"] if not (self.path or self.hub_id) else [],
            "torchvision": [f for f in ("arch", "weights") if getattr(self, f) is None],
            "python": ["factory"] if self.factory is None else [],
        }.get(self.kind, [])
        if needs:
            raise ValueError(f"kind {self.kind} needs {' and '.join(needs)}")
        return self


class ImageSpec(BaseModel):
    """How an uploaded picture becomes an image model's input: converted to ``mode`` (``L``
    for one channel, ``RGB`` for three), resized to ``size`` x ``size``, scaled to [0, 1],
    inverted as ``invert`` says, then normalised with ``mean`` and ``std`` per channel.

    ``invert`` is the ink polarity: a model trained on white ink on black (``auto``) reads a
    light picture (mean intensity above 0.5, as people photograph or draw on paper)
    inverted; ``always`` inverts every picture, ``never`` none."""

    model_config = ConfigDict(extra="forbid")
    channels: Literal[1, 3] = 3
    size: int = Field(default=224, ge=1)
    mean: list[float] | None = None  # default: 0 per channel
    std: list[float] | None = None  # default: 1 per channel
    mode: Literal["L", "RGB"] | None = None  # default: from channels
    invert: Literal["auto", "never", "always"] = "never"

    @model_validator(mode="after")
    def _per_channel(self) -> ImageSpec:
        """Defaults that follow ``channels``, and a mean and std of one value per channel."""
        fits = "L" if self.channels == 1 else "RGB"
        if self.mode not in (None, fits):  # every picture became the wrong channel count
            raise ValueError(
                f"mode {self.mode} gives {4 - self.channels} channels, not {self.channels} "
                f"(channels): give mode {fits}"
            )
        self.mode = fits
        self.mean = self.mean or [0.0] * self.channels
        self.std = self.std or [1.0] * self.channels
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(
                f"mean {self.mean} and std {self.std}: need {self.channels} values each "
                f"(channels {self.channels})"
            )
        if not all(s > 0 for s in self.std):  # a pixel divided by 0 is inf: every job fails
            raise ValueError(f"std {self.std}: each value must be above 0")
        return self


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    task: ModelTask
    description: str = ""
    source: Source
    labels: list[str] | None = None
    limits: Limits = Field(default_factory=Limits)
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: str = "auto"  # auto: cuda when there is one
    # Load and capture when a worker starts, before it reports itself ready (its heartbeat).
    warm: bool = False
    image: ImageSpec | None = None
    # What the model expects of its input, for people (``/models``, the page).
    expects: str = ""

    @model_validator(mode="after")
    def _head_serves_the_task(self) -> ModelSpec:
        """A head that can answer the entry's task, refused where the registry is read and
        naming the entry: an image head registered for generation failed each job at load."""
        head = self.source.head
        if head is not None and self.task not in HEAD_TASKS[head]:
            fits = [h for h, tasks in HEAD_TASKS.items() if self.task in tasks]
            raise PydanticCustomError(
                "head",
                "registry entry {entry}: source.head {head} does not serve task {task}; "
                "for {task}: {fits}",
                {"entry": self.id, "head": head, "task": self.task, "fits": ", ".join(fits)},
            )
        return self

    @field_validator("device")
    @classmethod
    def _a_torch_device(cls, device: str, info: ValidationInfo) -> str:
        """Refused where the registry is read, naming the entry: torch would say only
        "Expected one of cpu, cuda, ..." when the job loads the model."""
        if not DEVICE.fullmatch(device):
            raise PydanticCustomError(
                "device",
                "registry entry {entry}: device {device} is not one torch knows: give auto "
                "(cuda where there is one), cpu, cuda, cuda:N (the GPU of index N) or mps",
                {"entry": info.data.get("id", "?"), "device": repr(device)},
            )
        return device


DEMO_REGISTRY: list[dict[str, Any]] = [
    {
        "id": "minilm-sentiment",
        "task": "text-classification",
        "description": "Sentiment (negative/positive) on the real MiniLM-L6 encoder with a head "
        "fitted on a built-in corpus",
        "source": {"kind": "demo", "name": "minilm-sentiment"},
        "labels": ["negative", "positive"],
        "limits": {"max_tokens": 128},
        "expects": "English text (a sentence or a short review), up to 128 tokens",
        "warm": True,
    },
    {
        "id": "digits-cnn",
        "task": "image-classification",
        "description": "Handwritten digit (0-9) CNN trained on scikit-learn's digits, 16x16 grey",
        "source": {"kind": "demo", "name": "digits-cnn"},
        "labels": [str(d) for d in range(10)],
        "limits": {"max_image_size": 512},
        "image": {
            "channels": 1,
            "size": 16,
            "mean": [0.0],
            "std": [1.0],
            "mode": "L",
            "invert": "auto",
        },
        "expects": "a single handwritten digit, centred, white ink on black "
        "(a light background is inverted); resized to 16x16 grey",
        "warm": True,
    },
    {
        "id": "tiny-lookup-lm",
        "task": "generation",
        "description": "1-layer GPT-2 trained on key-value lookup: 'a3 c1 f9 h0 ? c' -> '1'",
        "source": {"kind": "demo", "name": "tiny-lookup-lm"},
        "limits": {"max_tokens": 24, "max_new_tokens": 8},
        "expects": "key-value pairs and a query key, e.g. 'a3 c1 f9 h0 ? c', up to 24 tokens",
        "warm": True,
    },
    {
        "id": "gpt2-small-config",
        "task": "generation",
        "description": "GPT-2 architecture, 6 layers, width 256, random weights, char tokenizer",
        "source": {"kind": "demo", "name": "gpt2-small-config"},
        "limits": {"max_tokens": 128, "max_new_tokens": 64},
        "expects": "any text (characters); the weights are random, so is the continuation",
        "warm": True,
    },
]


class Registry:
    """Registry entries by id, plus the folder relative paths are resolved against."""

    def __init__(self, specs: list[ModelSpec], base_dir: Path | None = None):
        self.models = {s.id: s for s in specs}
        self.base_dir = base_dir

    def get(self, model_id: str) -> ModelSpec | None:
        return self.models.get(model_id)

    def resolve(self, path: str | None) -> Path | None:
        if path is None:
            return None
        p = Path(path)
        return p if p.is_absolute() or self.base_dir is None else self.base_dir / p

    def missing_files(self, spec: ModelSpec) -> str | None:
        """Why ``spec``'s files cannot be where its source says (a folder or weights file that
        does not exist), or None: read where a worker starts, so that a mistyped path is said
        then and shown by ``GET /models``, not found by the model's first job. A stat, no
        load: a file that exists but does not load is found when it is loaded."""
        src = spec.source
        wanted = {"torchvision": ("weights", src.weights, Path.is_file),
                  "transformers": ("path", src.path, Path.is_dir),
                  "demo": ("path", src.path, Path.is_dir)}.get(src.kind)  # fmt: skip
        if wanted is None or wanted[1] is None:
            return None
        field, value, exists = wanted
        where = self.resolve(value)
        if exists(where):
            return None
        kind = "file" if exists is Path.is_file else "folder"
        return f"registry entry {spec.id}: source.{field} {where} is not a {kind} on this machine"


class RegistryError(ValueError):
    """A registry file that cannot be served: one line naming the file, the entry and the
    field, the value and what is allowed, printed at startup (``service.cli``) in place of
    the traceback of YAML's parser or pydantic's report of many lines."""


def load_registry(path: str | Path | None = None) -> Registry:
    """The registry at ``path``, or the built-in demo registry when ``path`` is None;
    ``RegistryError`` for a file that is missing, not YAML, not a ``models:`` list, lists no
    model, gives two entries one id, or has an entry that is not valid."""
    if path is None:
        return Registry([ModelSpec.model_validate(m) for m in DEMO_REGISTRY])
    p = Path(path)
    entries = _entries(p, _document(p))
    specs = [_spec(p, i, entry) for i, entry in enumerate(entries)]
    seen: dict[str, int] = {}
    for i, spec in enumerate(specs):
        if spec.id in seen:
            raise RegistryError(
                f"registry {p}: models[{i}] has id {spec.id!r}, as models[{seen[spec.id]}] "
                "has: each entry needs its own id"
            )
        seen[spec.id] = i
    return Registry(specs, p.parent.resolve())


def _document(p: Path) -> Any:
    """The parsed YAML of the registry file."""
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise RegistryError(f"BACKTRACE_REGISTRY={str(p)!r}: cannot read it: {why}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RegistryError(f"registry {p}: not valid YAML{at}: {problem}") from None


def _entries(p: Path, doc: Any) -> list[Any]:
    """The ``models:`` list of the document, which is the file's only key."""
    form = "a mapping with one key, models: a list of entries (id, task, source, ...)"
    if not isinstance(doc, dict):
        what = "empty" if doc is None else f"a {type(doc).__name__}"
        raise RegistryError(f"registry {p}: the file is {what}; it must be {form}")
    if set(doc) != {"models"}:
        other = ", ".join(sorted(map(str, set(doc) - {"models"})))
        what = f"unknown key {other}" if other else "no models key"
        raise RegistryError(f"registry {p}: {what}; it must be {form}")
    entries = doc["models"]
    if not isinstance(entries, list) or not entries:
        got = "lists no entries" if not entries else f"is a {type(entries).__name__}"
        raise RegistryError(f"registry {p}: models {got}; it must be a list of entries")
    return entries


def _spec(p: Path, i: int, entry: Any) -> ModelSpec:
    """Entry ``i`` validated; its first mistake as one line (the field, the value, the
    rule), and how many more there are."""
    if not isinstance(entry, dict):
        raise RegistryError(f"registry {p}: models[{i}] is {entry!r}; an entry is a mapping")
    try:
        return ModelSpec.model_validate(entry)
    except ValidationError as exc:
        errors = exc.errors()
        name = f"models[{i}] (id {entry['id']!r})" if "id" in entry else f"models[{i}]"
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise RegistryError(f"registry {p}: {name}: {_mistake(errors[0])}{more}") from None


# The model of each part of an entry, for the fields an unknown one is told of.
_FIELDS: dict[tuple[str, ...], type[BaseModel]] = {
    (): ModelSpec,
    ("source",): Source,
    ("limits",): Limits,
    ("image",): ImageSpec,
}


def _mistake(error: Any) -> str:
    """One pydantic error as ``field: value: rule``; the registry's own messages (device,
    head) say it their way."""
    field_path = ".".join(str(part) for part in error["loc"])
    if error["type"] in ("device", "head"):  # "registry entry X: ...": the entry is named
        return error["msg"].split(": ", 1)[1]
    if error["type"] == "missing":
        return f"{field_path}: missing; it is required"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        *parent, _ = error["loc"]
        known = _FIELDS.get(tuple(parent))
        fields = f"; the fields: {', '.join(known.model_fields)}" if known else ""
        return f"{field_path}: unknown field{fields}"
    shown = repr(error["input"])
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return f"{field_path or 'entry'}: {shown}: {message}"


def dump_registry(specs: list[dict[str, Any]]) -> str:
    return yaml.safe_dump({"models": specs}, sort_keys=False)
