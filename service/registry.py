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
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
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

# The devices an entry may name: "auto" and the strings torch.device takes for the devices the
# worker runs on, written as torch writes them (no "cuda:01"), matched here because the API,
# which reads the registry too, never imports torch.
DEVICE = re.compile(r"auto|cpu|mps|cuda(:(0|[1-9][0-9]*))?")


class Limits(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_tokens: int = 128
    max_image_size: int = 1024  # pixels, each side, of the uploaded image
    max_new_tokens: int = 64
    max_beams: int = 4
    max_batch: int = 8
    max_features: int = 512


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
    num_classes: int | None = None
    factory: str | None = None


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
        self.mode = self.mode or ("L" if self.channels == 1 else "RGB")
        self.mean = self.mean or [0.0] * self.channels
        self.std = self.std or [1.0] * self.channels
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"image: mean and std need {self.channels} values (channels)")
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


def load_registry(path: str | Path | None = None) -> Registry:
    """The registry at ``path``, or the built-in demo registry when ``path`` is None."""
    if path is None:
        return Registry([ModelSpec.model_validate(m) for m in DEMO_REGISTRY])
    p = Path(path)
    doc = yaml.safe_load(p.read_text()) or {}
    return Registry(
        [ModelSpec.model_validate(m) for m in doc.get("models", [])], p.parent.resolve()
    )


def dump_registry(specs: list[dict[str, Any]]) -> str:
    return yaml.safe_dump({"models": specs}, sort_keys=False)
