"""Worker side: load registry models (a :class:`LoadedModel`, whatever the source kind) and
keep them, with their captured graphs (a :class:`CachedModel`), in an LRU cache bounded by
bytes of parameters.

Capturing with ``torch.export`` costs seconds; a warm entry serves the next request in
milliseconds. The cache lives in the worker process, which is why workers are RQ
``SimpleWorker``s (no fork per job)."""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.tasks import TaskName

from .demo import ensure_built, load_demo_model
from .registry import VOCABULARY_HEADS, ImageSpec, ModelSpec, Registry

log = logging.getLogger("service.models")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    """A model as a registry source gives it (demo, transformers, torchvision or an
    operator's factory): what the worker, or a benchmark, needs to run and explain it."""

    model_id: str
    task: TaskName
    model: Any  # torch.nn.Module, eval mode
    tokenizer: Any = None  # a transformers tokenizer for text models
    labels: list[str] | None = None
    image: ImageSpec | None = None  # how an image model's input is made from a picture
    info: dict[str, Any] = field(default_factory=dict)  # build report (accuracies, seconds)
    # What every result of the model says about the model itself (an untrained head)
    warnings: list[str] = field(default_factory=list)


class DeviceUnavailable(RuntimeError):
    """A registry entry asks for a device this worker does not have: the entry's or the
    worker's configuration, not the job's input (torch would say only "Found no NVIDIA
    driver on your system", at the first tensor moved there)."""


def pick_device(spec: ModelSpec) -> str:
    """Where the model runs: ``auto`` is cuda where there is one; an entry that names a
    CUDA device this worker lacks raises ``DeviceUnavailable`` before anything loads."""
    if spec.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(spec.device)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            has = "no GPU (torch sees no CUDA device)"
            fix = "on a worker with a GPU, or set device auto or cpu"
        elif device.index is not None and device.index >= count:
            names = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
            has = f"{count} GPU{'s' if count > 1 else ''} ({names})"
            fix = f"on a worker with {device}, or set device cuda, auto or cpu"
        else:
            return spec.device
        raise DeviceUnavailable(
            f"model {spec.id} asks for device {spec.device} (its registry entry), but this "
            f"worker has {has}: run it {fix}"
        )
    return spec.device


def _revision(files: list[Path]) -> str:
    """The hash of the weights files a model loads, in order, or "unversioned" without any
    (a python factory's, a hub id's): each torchvision entry's own file (they hashed the
    first .safetensors file of its folder, so that entries whose weights share a folder all
    reported one revision) and every shard of a sharded checkpoint."""
    if not files:
        return "unversioned"
    h = hashlib.sha256()
    for path in files:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()[:16]


class EntryError(ValueError):
    """A registry entry's own mistake, found by the loader (a path that is not a folder, an
    architecture torchvision does not have): its message names the entry and the field."""


class ModelLoadError(RuntimeError):
    """A registry model that did not load, saying which model, which file and why: the
    loaders' own errors name neither (safetensors says "Error while deserializing header:
    header too large", whichever model's file it read)."""


def load_model(spec: ModelSpec, registry: Registry, data_dir: str) -> tuple[LoadedModel, str]:
    """The model for a registry entry and its revision (``_revision``); a
    ``ModelLoadError`` when it does not load."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        loaded = _load(spec, registry, data_dir)
    except EntryError:
        raise
    except Exception as exc:
        raise ModelLoadError(
            _not_loaded(spec, _weights_files(spec, registry, data_dir), exc)
        ) from exc
    return loaded, _revision(_weights_files(spec, registry, data_dir))


def _weights_files(spec: ModelSpec, registry: Registry, data_dir: str) -> list[Path]:
    """The weights files a registry entry loads (a python factory's are its own business)."""
    src = spec.source
    if src.kind == "torchvision":
        weights = registry.resolve(src.weights)
        return [weights] if weights is not None else []
    if src.kind == "demo":
        folder = registry.resolve(src.path) or Path(data_dir) / (src.name or spec.id)
    elif src.kind == "transformers" and src.path:
        folder = registry.resolve(src.path)
    else:
        return []
    return sorted(folder.glob("*.safetensors")) if folder and folder.is_dir() else []


def _not_loaded(spec: ModelSpec, files: list[Path], exc: Exception) -> str:
    """Why ``spec`` did not load: the first of its weights files that is missing or that
    safetensors cannot open, with safetensors' reason; else the loader's error, with the
    files it loaded from."""
    for path in files:
        if (why := _unreadable(path)) is not None:
            return f"model {spec.id} cannot load: its weights file {path} {why}"
    source = f" from {', '.join(map(str, files))}" if files else ""
    return f"model {spec.id} cannot load{source}: {type(exc).__name__}: {exc}"


def _unreadable(path: Path) -> str | None:
    """Why safetensors cannot open the file at ``path`` (reading its header, which it
    checks against the file's size), or None."""
    from safetensors import safe_open

    if not path.is_file():
        return "does not exist"
    try:
        with safe_open(str(path), "pt"):
            return None
    except Exception as exc:  # noqa: BLE001 - the reason is the answer
        return f"is unreadable ({type(exc).__name__}: {exc})"


def _load(spec: ModelSpec, registry: Registry, data_dir: str) -> LoadedModel:
    """The model as its source kind loads it."""
    src = spec.source
    if src.kind == "demo":
        name = src.name or spec.id
        loaded = load_demo_model(registry.resolve(src.path) or ensure_built(name, data_dir), name)
    elif src.kind == "transformers":
        loaded = _load_transformers(spec, registry)
    elif src.kind == "torchvision":
        loaded = _load_torchvision(spec, registry)
    else:
        module, _, fn = (src.factory or "").partition(":")
        loaded = getattr(importlib.import_module(module), fn)()
        if not isinstance(loaded, LoadedModel):  # it failed later, on a missing attribute
            raise EntryError(
                f"registry entry {spec.id}: source.factory {src.factory} returned "
                f"{type(loaded).__name__}, not a service.models.LoadedModel"
            )
    loaded.model_id = spec.id
    loaded.labels = spec.labels or loaded.labels
    loaded.image = spec.image or loaded.image
    return loaded


# The tasks whose classes the entry's ``labels`` name, one per class of the model's output.
LABELLED = (
    TaskName.TEXT_CLASSIFICATION,
    TaskName.IMAGE_CLASSIFICATION,
    TaskName.TABULAR_CLASSIFICATION,
    TaskName.TOKEN_CLASSIFICATION,
)


def check_labels(loaded: LoadedModel, classes: int | None, found: str) -> None:
    """``EntryError`` where the entry's labels are not one per class of the model (known
    from the model's config or the registry's ``num_classes`` at load, else from the
    output of its first capture, ``found``): labels short of the classes named a class
    past them by its index, labels past them offered targets the model does not have."""
    labels = loaded.labels
    if labels is None or classes is None or loaded.task not in LABELLED:
        return
    if len(labels) != classes:
        raise EntryError(
            f"registry entry {loaded.model_id}: labels has {len(labels)} names, but the model "
            f"has {classes} classes ({found}); give one label per class, or none"
        )


# The transformers class that loads each head a source may name (``registry.HEAD_TASKS``).
AUTO_CLASSES = {
    "sequence-classification": "AutoModelForSequenceClassification",
    "image-classification": "AutoModelForImageClassification",
    "causal-lm": "AutoModelForCausalLM",
    "seq2seq-lm": "AutoModelForSeq2SeqLM",
    "token-classification": "AutoModelForTokenClassification",
    "question-answering": "AutoModelForQuestionAnswering",
    "masked-lm": "AutoModelForMaskedLM",
}

# The transformers head a task loads when the registry's source names none.
_DEFAULT_HEADS = {
    TaskName.GENERATION: "causal-lm",
    TaskName.TOKEN_CLASSIFICATION: "token-classification",
    TaskName.QUESTION_ANSWERING: "question-answering",
    TaskName.IMAGE_CLASSIFICATION: "image-classification",
}


def _default_head(spec: ModelSpec, config: Any) -> str:
    """The head the entry's task implies; for generation, an encoder-decoder's (T5, BART,
    Marian) where the folder's config.json says it is one."""
    if spec.task == TaskName.GENERATION and getattr(config, "is_encoder_decoder", False):
        return "seq2seq-lm"
    return _DEFAULT_HEADS.get(spec.task, "sequence-classification")


def _load_transformers(spec: ModelSpec, registry: Registry) -> LoadedModel:
    import transformers as tf

    src = spec.source
    where = registry.resolve(src.path) or src.hub_id
    if where is None:
        raise EntryError(f"registry entry {spec.id}: transformers source needs path or hub_id")
    local = src.path is not None
    if local and not Path(where).is_dir():  # else transformers reads it as a hub id
        raise EntryError(f"registry entry {spec.id}: source.path {where} is not a folder")
    kw = {"local_files_only": local, "trust_remote_code": False, "use_safetensors": True}
    head = src.head or _default_head(spec, tf.AutoConfig.from_pretrained(where, **kw))
    model, report = getattr(tf, AUTO_CLASSES[head]).from_pretrained(
        where, output_loading_info=True, **kw
    )
    model.eval()
    tok = (
        None
        if spec.task == TaskName.IMAGE_CLASSIFICATION
        else tf.AutoTokenizer.from_pretrained(where, **kw)
    )
    _has_vocabulary(spec, tok, where)
    labels = spec.labels or _labels(model, tok, head)
    image = None
    if spec.task == TaskName.IMAGE_CLASSIFICATION:
        image = _folder_image(spec, model.config, _image_processor(where, kw))
    loaded = LoadedModel(spec.id, spec.task, model, tok, labels, image)
    if head not in VOCABULARY_HEADS:  # an LM's classes are its vocabulary
        check_labels(loaded, getattr(model.config, "num_labels", None), "config.json")
    loaded.warnings = _untrained(spec, model, report.get("missing_keys"))
    return loaded


def _has_vocabulary(spec: ModelSpec, tok: Any, where: str | Path) -> None:
    """``EntryError`` for a tokenizer of special tokens alone: a folder saved without its
    tokenizer files gets one from config.json's model type, which reads every word as the
    unknown token, so that each text was explained as [CLS] [UNK] ... [SEP]."""
    if tok is None or len(tok) > len(set(tok.all_special_tokens)):
        return
    raise EntryError(
        f"registry entry {spec.id}: {where} has no tokenizer files (tokenizer.json, or the "
        f"vocabulary of {type(tok).__name__}): its tokenizer would have only the special "
        f"tokens {', '.join(tok.all_special_tokens)}; save the model's tokenizer there "
        "(tokenizer.save_pretrained)"
    )


def _labels(model: Any, tok: Any, head: str) -> list[str]:
    """A model's class names: its config's, or a language model's vocabulary (its classes
    are the tokens it may fill in or read next; a row past the tokenizer's is named by its
    index). A causal LM registered as a text classifier had its config's default two labels,
    so that every job failed at the first capture on "labels has 2 names, but the model
    has V classes", labels its entry never gave."""
    if head not in VOCABULARY_HEADS:
        return [model.config.id2label[i] for i in range(len(model.config.id2label))]
    tokens = tok.convert_ids_to_tokens(list(range(min(len(tok), model.config.vocab_size))))
    return tokens + [str(i) for i in range(len(tokens), model.config.vocab_size)]


def _untrained(spec: ModelSpec, model: Any, missing: Any) -> list[str]:
    """A warning for every result where the checkpoint lacks weights the head needs (a base
    model, or one fine-tuned for another task, registered for a classifier): transformers
    starts them at random, so the answers, and what explains them, are noise that changes
    with every load. Not refused: a random head is still a model the engine can explain,
    and an operator may mean it (a smoke test); it must not pass for a trained one."""
    names = sorted(missing or ())
    if not names:
        return []
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    message = (
        f"{spec.id}: its checkpoint has no trained weights for {shown} of "
        f"{type(model).__name__} (transformers initialised them at random): its predictions "
        "are noise; register a checkpoint fine-tuned for this task, or another source.head"
    )
    log.warning("%s", message)
    return [message]


def _image_processor(where: str | Path, kw: dict[str, Any]) -> Any:
    """The model's image processor (``preprocessor_config.json``), or None without one."""
    import transformers as tf

    try:
        return tf.AutoImageProcessor.from_pretrained(where, **kw)
    except (OSError, ValueError):
        return None


def _folder_image(spec: ModelSpec, config: Any, proc: Any) -> ImageSpec:
    """How pictures become this transformers model's input, from its folder: channels and
    size from ``config.json`` (a ViT takes no other), rescaling and normalisation from its
    image processor. Without this every such model got the default 224 x 224, mean 0, std
    1: a ViT of another size failed each job inside torch.export, and one of size 224 gave
    a silently wrong answer on pixels not normalised as it was trained. A registry
    ``image`` wins, but must have the model's channels."""
    channels = getattr(config, "num_channels", 3)
    if channels not in (1, 3):
        raise EntryError(f"registry entry {spec.id}: config.json num_channels {channels}: 1 or 3")
    if spec.image is not None:
        if spec.image.channels != channels:
            raise EntryError(
                f"registry entry {spec.id}: image.channels {spec.image.channels}, but the "
                f"model's config.json has num_channels {channels}"
            )
        return spec.image
    size = getattr(config, "image_size", None) or _processor_side(proc) or 224
    if isinstance(size, list | tuple):
        if len(set(size)) != 1:
            raise EntryError(
                f"registry entry {spec.id}: config.json image_size {size} is not square; "
                "give the registry entry an image block"
            )
        size = size[0]
    return ImageSpec(channels=channels, size=int(size), **_normalisation(spec, channels, proc))


def _processor_side(proc: Any) -> int | None:
    """The side an image processor resizes to (``height``, ``shortest_edge`` or a number)."""
    size = getattr(proc, "size", None)
    if isinstance(size, dict):
        return size.get("height") or size.get("shortest_edge")
    return size if isinstance(size, int) else None


def _normalisation(spec: ModelSpec, channels: int, proc: Any) -> dict[str, list[float]]:
    """``mean`` and ``std`` for pixels in [0, 1] that give the processor's values: it
    rescales 0..255 by ``rescale_factor`` (when ``do_rescale``), then normalises (when
    ``do_normalize``)."""
    if proc is None:
        return {}
    scale = 255.0 * (getattr(proc, "rescale_factor", 1 / 255) if proc.do_rescale else 1.0)
    normalize = getattr(proc, "do_normalize", False)
    mean = _per_channel(proc.image_mean, channels) if normalize else [0.0] * channels
    std = _per_channel(proc.image_std, channels) if normalize else [1.0] * channels
    if len(mean) != channels or len(std) != channels:
        raise EntryError(
            f"registry entry {spec.id}: preprocessor_config.json image_mean/image_std have "
            f"{len(mean)}/{len(std)} values, the model's num_channels is {channels}; give the "
            "registry entry an image block"
        )
    return {"mean": [m / scale for m in mean], "std": [s / scale for s in std]}


def _per_channel(value: Any, channels: int) -> list[float]:
    """A processor's mean or std as a list (some configs give one number for all)."""
    return [float(value)] * channels if isinstance(value, int | float) else list(value)


def _load_torchvision(spec: ModelSpec, registry: Registry) -> LoadedModel:
    import torchvision
    from safetensors.torch import load_file

    src = spec.source
    build = getattr(torchvision.models, src.arch or "", None)
    if not callable(build):
        raise EntryError(f"registry entry {spec.id}: torchvision has no architecture {src.arch!r}")
    model = build(weights=None, num_classes=src.num_classes)
    weights = registry.resolve(src.weights)
    if weights is None:
        raise EntryError(f"registry entry {spec.id}: torchvision source needs weights")
    state = load_file(str(weights))
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:  # torch's report: a line per tensor that does not fit
        raise EntryError(
            f"registry entry {spec.id}: the weights file {weights} does not fit torchvision "
            f"{src.arch} with num_classes {src.num_classes}: {_first_mismatch(exc)}"
        ) from exc
    image = spec.image or ImageSpec(
        channels=3, size=224, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]
    )
    loaded = LoadedModel(spec.id, spec.task, model.eval(), None, spec.labels, image)
    check_labels(loaded, src.num_classes, "source.num_classes")
    return loaded


def _first_mismatch(exc: RuntimeError) -> str:
    """The first tensor of torch's load_state_dict report, and how many more."""
    lines = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
    if not lines:
        return str(exc)
    more = f" (and {len(lines) - 1} more)" if len(lines) > 1 else ""
    return lines[0].rstrip(".") + more


# The nodes whose relevance a request can ask for by name (``output.relevance``): the graph's
# inputs and operations, not its constants (``get_attr``) or its output.
RELEVANCE_OPS = ("placeholder", "call_function", "call_method", "call_module")
# Told the node names of a model's graphs and its first graph's signature (model id, revision,
# names, ``graph_signature``) after each capture.
OnCapture = Callable[[str, str, list[str], dict[str, Any]], None]


def node_names(dlb: Any) -> list[str]:
    """The names ``output.relevance`` may use for a captured graph (``RELEVANCE_OPS``)."""
    return sorted(n.name for n in dlb.graph.nodes if n.op in RELEVANCE_OPS)


def graph_signature(dlb: Any) -> dict[str, Any]:
    """What the model's first captured graph takes and gives (``engine.validate.signature``):
    the API checks a request against it at the door where nothing else tells it the
    model's classes, feature width or vocabulary (a python factory's model)."""
    from engine import validate

    c = dlb.captured
    return validate.signature(c.nodes, c.input_names, c.constants, c.explained_output())


@dataclass
class CachedModel:
    """One model in the cache: the loaded model, where it runs, and its engine object
    (captured graphs) per input signature. ``on_capture`` hears of every capture, whether a
    worker warms the model or a job finds it cold, so that the API can check layer names
    from the model's first job on."""

    loaded: LoadedModel
    revision: str
    device: str
    dtype: str
    nbytes: int
    load_s: float
    backtraces: dict[tuple, Any] = field(default_factory=dict)
    on_capture: OnCapture | None = None
    # Told (model id, why) when the first capture shows the model cannot serve its entry.
    on_unusable: Callable[[str, Exception], None] | None = None
    # What the first graph takes and gives (``graph_signature``), set at its capture.
    signature: dict[str, Any] = field(default_factory=dict)

    @functools.cached_property
    def input_name(self) -> str:
        """The name of forward's first argument: the engine names the input node after it
        (read once: ``inspect.signature`` is not free per request)."""
        params = inspect.signature(self.loaded.model.forward).parameters
        return next(iter(params)) if params else "x"

    @functools.cached_property
    def arguments(self) -> frozenset[str] | None:
        """The names forward takes; None where it takes any (``**kwargs``, ``*args``)."""
        params = inspect.signature(self.loaded.model.forward).parameters.values()
        if any(p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) for p in params):
            return None
        return frozenset(p.name for p in params)

    @functools.cached_property
    def segments(self) -> bool:
        """Whether the model's token inputs carry ``token_type_ids``: its tokenizer makes
        them and its forward takes them (a BERT), so that the second text of a pair reaches
        the model as segment 1. Not for generation, which decodes one prompt."""
        tok, model = self.loaded.tokenizer, self.loaded.model
        return (
            self.loaded.task != TaskName.GENERATION
            and tok is not None
            and "token_type_ids" in getattr(tok, "model_input_names", ())
            and "token_type_ids" in inspect.signature(model.forward).parameters
        )

    def backtrace(self, inputs: dict[str, torch.Tensor]) -> Any:
        """The DLBacktrace for these input names and ranks, captured on first use. The engine
        marks batch and sequence dims dynamic, so one capture serves all lengths."""
        from engine import DLBacktrace

        key = tuple((k, v.dim()) for k, v in inputs.items())
        if key not in self.backtraces:
            dlb = DLBacktrace(self.loaded.model, inputs, device=self.device)
            if not self.backtraces:  # a demo's or a factory's classes are known from here
                self.signature = graph_signature(dlb)
                output = self.signature["output"] or [None]
                try:
                    check_labels(self.loaded, output[-1], f"its output is {output}")
                except EntryError as exc:
                    if self.on_unusable is not None:
                        self.on_unusable(self.loaded.model_id, exc)
                    raise
            self.backtraces[key] = dlb
            if self.on_capture is not None:
                names = sorted({n for dlb in self.backtraces.values() for n in node_names(dlb)})
                self.on_capture(self.loaded.model_id, self.revision, names, self.signature)
        return self.backtraces[key]


class ModelCache:
    """LRU over registry ids, evicting least recently used models beyond ``max_bytes``;
    each entry tells ``on_capture`` of its captures (``CachedModel``)."""

    def __init__(
        self,
        registry: Registry,
        data_dir: str,
        max_bytes: int,
        on_capture: OnCapture | None = None,
        on_failure: Callable[[str, Exception], None] | None = None,
    ):
        self.registry, self.data_dir, self.max_bytes = registry, data_dir, max_bytes
        self.on_capture, self.on_failure = on_capture, on_failure
        self.entries: OrderedDict[str, CachedModel] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, spec: ModelSpec) -> tuple[CachedModel, bool]:
        """(entry, hit). Loads on a miss and evicts to stay within the byte bound (the entry
        just loaded always stays, even if it alone is over the bound)."""
        with self.lock:
            if spec.id in self.entries:
                self.entries.move_to_end(spec.id)
                return self.entries[spec.id], True
        t0 = time.perf_counter()
        device = pick_device(spec)
        loaded, revision = load_model(spec, self.registry, self.data_dir)
        loaded.model = loaded.model.to(device=device, dtype=DTYPES[spec.dtype]).eval()
        nbytes = sum(t.numel() * t.element_size() for t in loaded.model.state_dict().values())
        load_s = time.perf_counter() - t0
        entry = CachedModel(
            loaded, revision, device, spec.dtype, nbytes, load_s, {}, self.on_capture, self.unusable
        )
        with self.lock:
            self.entries[spec.id] = entry
            while len(self.entries) > 1 and self.total_bytes() > self.max_bytes:
                self.entries.popitem(last=False)
        if device == "cuda":
            torch.cuda.empty_cache()
        return entry, False

    def unusable(self, model_id: str, exc: Exception) -> None:
        """A model loaded but cannot serve its entry (its first capture said so): out of the
        cache, so that no heartbeat counts it warm, and reported as a failed load
        (``on_failure``), so that GET /models shows it failed and why."""
        with self.lock:
            self.entries.pop(model_id, None)
        if self.on_failure is not None:
            self.on_failure(model_id, exc)

    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def warm_ids(self) -> list[str]:
        return list(self.entries)
