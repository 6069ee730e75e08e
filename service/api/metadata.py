"""What the API knows of a model beyond its registry entry, for checks at the door: its
classes, vocabulary size, positions and tokenizer, read from the model's folder
(``config.json`` and ``tokenizer.json``, as transformers writes them) without torch.

A demo model's folder is ``<data_dir>/<name>`` once built (the worker builds it on first
use), a transformers model's is its ``source.path``. What is not there (a model not built
yet, a torchvision or python source) is unknown, and the worker checks it as before.

The node names of a model's captured graph come from Redis instead (``store.GRAPH``): only
a worker captures graphs, and it publishes their names at each capture."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis.asyncio as aredis

from engine.tasks import TaskName

from .. import demo, store
from ..registry import VOCABULARY_HEADS, ModelSpec, Registry

RECHECK_S = 1.0


@dataclass(frozen=True)
class ModelMeta:
    """None for what is not known."""

    num_classes: int | None = None
    # The names a request may give a class by (registry labels, then config.json's id2label);
    # empty for a model known to have none.
    labels: tuple[str, ...] | None = None
    vocab_size: int | None = None
    max_positions: int | None = None
    tokenizer: Any = None  # a ``tokenizers.Tokenizer``
    # an encoder-decoder (T5, BART): its source and its decoder's tokens each have the
    # positions, where a causal LM's prompt and new tokens share them
    encoder_decoder: bool = False
    # config.json's problem_type: multi-label and regression heads answer differently
    problem_type: str | None = None
    # whether a text model's logits keep a token axis ([B, T, C]: ``relevance.position``
    # picks the token explained) or give one prediction per text ([B, C]); None where the
    # entry does not say (a python factory's model)
    token_axis: bool | None = None
    # whether the worker pads a batch's shorter inputs on the left (the tokenizer's
    # ``padding_side``); None where the door does not know the tokenizer
    pads_left: bool | None = None
    # the token a masked LM fills in (``[MASK]``, ``<mask>``); None for other models
    mask_token: str | None = None
    # a language model (masked or causal) without labels in its entry: its classes are its
    # vocabulary, named by their tokens (``token_class``)
    token_classes: bool = False
    # how many features a row of ``inputs.features`` has (a tabular model's input width)
    features: int | None = None

    @property
    def targets(self) -> int | None:
        """How many classes ``relevance.target`` may name: a single logit decides between
        two (0 below its threshold, 1 above), as the engine explains it."""
        return 2 if self.num_classes == 1 else self.num_classes

    def count_tokens(self, text: str, pair: str | None = None) -> int | None:
        """The input's length in tokens (a pair's: both texts, with their separators), as
        the worker's tokenizer counts it."""
        if self.tokenizer is None:
            return None
        return len(self.tokenizer.encode(text, pair).ids)

    def own_tokens(self, text: str) -> int | None:
        """How many tokens the text makes without the special ones; None when the tokenizer
        is not known."""
        if self.tokenizer is None:
            return None
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def token_class(self, name: str) -> int | None:
        """The class a language model's label names, as the worker names its classes (each id by
        its token, an id past the tokenizer's tokens by its digits); None for a name that is
        none of them or where the tokenizer is not known."""
        if not self.token_classes or self.tokenizer is None:
            return None
        index = self.tokenizer.token_to_id(name)
        if index is None and name.isdigit():
            index = int(name)
            tokens = self.tokenizer.get_vocab_size(with_added_tokens=True)
            return index if tokens <= index < (self.num_classes or 0) else None
        return index if index is not None and index < (self.num_classes or 0) else None

    def separates_pairs(self) -> bool | None:
        """Whether the tokenizer marks where a pair's second text starts (more special tokens
        for a pair than for one text; a causal LM's template adds none): None when the
        tokenizer is not known."""
        if self.tokenizer is None:
            return None
        post = self.tokenizer.post_processor
        return post is not None and (
            post.num_special_tokens_to_add(True) > post.num_special_tokens_to_add(False)
        )


class ModelMetadata:
    """Each model's ``ModelMeta``, read once its folder has a ``config.json`` (until then,
    looked for again every ``RECHECK_S``: the worker may build the model meanwhile, and
    some models never have one)."""

    def __init__(self, registry: Registry, data_dir: str):
        self.registry, self.data_dir = registry, Path(data_dir)
        self.known: dict[str, ModelMeta] = {}
        self.missing: dict[str, float] = {}  # model id: when to look for its config again
        # model id: (when to read it again, the published signature or None)
        self.signatures: dict[str, tuple[float, dict[str, Any] | None]] = {}

    def get(self, spec: ModelSpec) -> ModelMeta:
        if spec.id in self.known:
            return self.known[spec.id]
        registry_only = ModelMeta(
            num_classes=_source_classes(spec),
            labels=_labels(spec, None),
            token_axis=_token_axis(spec),
        )
        if time.monotonic() < self.missing.get(spec.id, 0.0):
            return registry_only
        folder = self._folder(spec)
        if folder is None:  # nothing to read: what the registry says is all there is
            self.known[spec.id] = registry_only
            return registry_only
        config = _config(folder)
        if config is None:  # none yet, or not readable: the worker's load will say why
            self.missing[spec.id] = time.monotonic() + RECHECK_S
            return registry_only
        meta = _read(folder, config, spec)
        self.known[spec.id] = meta
        return meta

    async def complete(self, ar: aredis.Redis, spec: ModelSpec) -> ModelMeta:
        """``get``, and for a python factory's model, which has no folder to read, what its
        captured graph says once a worker has published it (``store.publish_graph``): its
        classes, whether its logits keep a token axis, its vocabulary and feature width.
        Read from Redis at most every ``RECHECK_S`` per model, and only for such models."""
        meta = self.get(spec)
        if spec.source.kind != "python":
            return meta
        now = time.monotonic()
        when, signature = self.signatures.get(spec.id, (0.0, None))
        if now >= when:
            signature = _published(await ar.get(store.GRAPH.format(spec.id)), "signature")
            signature = signature if isinstance(signature, dict) else None
            self.signatures[spec.id] = (now + RECHECK_S, signature)
        return meta if signature is None else _with_signature(meta, signature)

    async def graph_nodes(self, ar: aredis.Redis, spec: ModelSpec) -> set[str] | None:
        """The node names a worker published when it captured the model's graph; None until
        one has (or when the value is not what workers write). Read at each request that
        names layers, never cached: a worker that captures a new revision publishes anew."""
        nodes = _published(await ar.get(store.GRAPH.format(spec.id)), "nodes")
        return set(nodes) if isinstance(nodes, list) else None

    def _folder(self, spec: ModelSpec) -> Path | None:
        src = spec.source
        if src.path:
            return self.registry.resolve(src.path)
        if src.kind == "demo" and src.name:
            return self.data_dir / src.name
        return None


def _published(raw: bytes | None, key: str) -> Any:
    """``key`` of a graph a worker published (``store.publish_graph``); None where there is
    none, or the value is not what workers write."""
    try:
        return json.loads(raw)[key] if raw else None
    except (ValueError, KeyError, TypeError):
        return None


def _with_signature(meta: ModelMeta, signature: dict[str, Any]) -> ModelMeta:
    """``meta`` with what it does not know taken from a graph's signature: the classes are
    the logits' last size ([B, C], or [B, T, C] with a token axis), the vocabulary the rows
    of the table the ids index, the feature width a float input's fixed last axis [B, F]."""
    out = signature.get("output") or []
    inputs = [v for v in (signature.get("inputs") or {}).values() if isinstance(v, dict)]
    rows = next((v["ids_below"] for v in inputs if v.get("ids_below")), None)
    widths = [
        v["shape"][-1]
        for v in inputs
        if len(v.get("shape") or ()) == 2 and v.get("fixed_axis") == 1
    ]
    classes = out[-1] if len(out) in (2, 3) and isinstance(out[-1], int) else None
    return dataclasses.replace(
        meta,
        num_classes=meta.num_classes or classes,
        token_axis=meta.token_axis if meta.token_axis is not None or not classes else len(out) == 3,
        vocab_size=meta.vocab_size or rows,
        features=meta.features or (widths[0] if widths else None),
    )


def _source_classes(spec: ModelSpec) -> int | None:
    if spec.labels:
        return len(spec.labels)
    return spec.source.num_classes


# Whether a head's logits keep a token axis, by the transformers head a text model loads.
_HEAD_TOKEN_AXIS = {
    "sequence-classification": False,
    "token-classification": True,
    "causal-lm": True,
    "masked-lm": True,
}


def _token_axis(spec: ModelSpec) -> bool | None:
    """Whether the model's logits keep a token axis, from its entry: a token classifier's
    do; a text classifier's as the head it loads (a transformers source's ``head``, by
    default a sequence classifier's, or a demo's own, ``demo.HEADS``). None where the entry
    does not say: a python factory builds what it builds."""
    if spec.task == TaskName.TOKEN_CLASSIFICATION:
        return True
    src = spec.source
    if spec.task != TaskName.TEXT_CLASSIFICATION or src.kind not in ("transformers", "demo"):
        return None
    if src.kind == "demo":
        return _HEAD_TOKEN_AXIS.get(demo.HEADS.get(src.name or "", ""))
    return _HEAD_TOKEN_AXIS.get(src.head or "sequence-classification")


def _labels(spec: ModelSpec, id2label: Any) -> tuple[str, ...] | None:
    """The class names a request's ``contrast_with`` may use: the registry's labels (the
    worker maps them to indices) and the model config's (the engine reads ``label2id``).
    Empty where the model has none for sure: a torchvision model's labels are the
    registry's alone; None where they are not known (a model not built yet, a python
    source's own)."""
    names = list(spec.labels or [])
    if isinstance(id2label, dict):
        names += [str(v) for v in id2label.values()]
    if not names and spec.source.kind == "torchvision":
        return ()
    return tuple(names) if names else None


# Models whose position ids start after the padding id (transformers' RoBERTa family):
# their table has pad_token_id + 1 rows more than the tokens they take (514 for 512).
OFFSET_POSITIONS = frozenset(
    {
        "roberta",
        "xlm-roberta",
        "xlm-roberta-xl",
        "camembert",
        "data2vec-text",
        "longformer",
        "mpnet",
    }
)


def _positions(config: dict[str, Any]) -> int | None:
    """How many tokens the model's position table takes, from its ``config.json``."""
    table = config.get("n_positions") or config.get("max_position_embeddings")
    if not isinstance(table, int) or config.get("model_type") not in OFFSET_POSITIONS:
        return table if isinstance(table, int) else None
    return table - (config.get("pad_token_id") or 0) - 1


def _config(folder: Path) -> dict[str, Any] | None:
    """The folder's ``config.json``, or None without a readable one: a truncated or corrupt
    file raised out of the door, and every POST for the model was a 500 where the worker
    would have failed the job saying what is wrong with the folder."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (ValueError, OSError):
        return None
    return config if isinstance(config, dict) else None


def _read(folder: Path, config: dict[str, Any], spec: ModelSpec) -> ModelMeta:
    labels = config.get("id2label")
    classes = _source_classes(spec) or (len(labels) if isinstance(labels, dict) else None)
    names = _labels(spec, labels)
    masked = spec.source.head == "masked-lm"
    lm = spec.source.head in VOCABULARY_HEADS
    if lm:  # its classes are its vocabulary (its config's labels mean nothing)
        classes, names = config.get("vocab_size"), None
    positions = _positions(config)
    tok_config = _tokenizer_config(folder)
    return ModelMeta(
        num_classes=classes,
        labels=names,
        vocab_size=config.get("vocab_size"),
        max_positions=positions,
        tokenizer=_tokenizer(folder / "tokenizer.json"),
        encoder_decoder=bool(config.get("is_encoder_decoder")),
        problem_type=config.get("problem_type"),
        token_axis=_token_axis(spec),
        pads_left=_pads_left(tok_config),
        mask_token=_mask_token(tok_config) if masked else None,
        token_classes=lm and not spec.labels,  # the registry's labels name its classes
    )


def _tokenizer_config(folder: Path) -> dict[str, Any] | None:
    """The folder's ``tokenizer_config.json``, or None without a readable one."""
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text())
    except (ValueError, OSError):
        return None
    return config if isinstance(config, dict) else None


def _pads_left(tok_config: dict[str, Any] | None) -> bool | None:
    """Whether the tokenizer pads on the left: its config's ``padding_side``, right where it
    names none (transformers' default); None without a config."""
    return None if tok_config is None else tok_config.get("padding_side") == "left"


def _mask_token(tok_config: dict[str, Any] | None) -> str | None:
    """The mask token a masked LM fills in, as its tokenizer's config names it."""
    token = (tok_config or {}).get("mask_token")
    if isinstance(token, dict):  # an AddedToken written out
        token = token.get("content")
    return token if isinstance(token, str) else None


def _tokenizer(path: Path) -> Any:
    """The fast tokenizer (the Rust ``tokenizers`` package, no torch), or None. Without the
    padding and truncation a ``tokenizer.json`` may carry (sentence-transformers ship a fixed
    padding to 128): transformers turns them off for the worker's calls, so a prompt counts
    its own tokens here too, neither padded nor cut."""
    if not path.is_file():
        return None
    try:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(path))
    except Exception:  # noqa: BLE001 - tokenizers raises a bare Exception for a corrupt file
        return None
    tok.no_padding()
    tok.no_truncation()
    return tok
