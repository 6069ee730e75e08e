"""Which architectures the coverage run tries, and how each is built small.

transformers architectures come from the auto mappings (one model class per model type), each
built from its own configuration class with every size attribute it has shrunk (layers,
width, heads, vocabulary, image and patch size); torchvision classifiers come from
``list_models`` with ``weights=None``. Weights are random, the model is in eval mode, float32.
Nothing is downloaded: a model that needs a checkpoint or a tokenizer file fails to build,
which the run reports as ``not-built`` (not the engine's failure).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TOKENS = 9  # prompt / sentence length
PAD, BOS, EOS = 0, 1, 2
VOCAB = 128

# transformers auto mappings the run covers, by the name the CLI takes
HF_MAPPINGS = {
    "sequence-classification": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "token-classification": "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
    "question-answering": "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES",
    "image-classification": "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
    "causal-lm": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "seq2seq-lm": "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
}
GENERATING = ("causal-lm", "seq2seq-lm")
TORCHVISION = "torchvision"
MAPPINGS = (*HF_MAPPINGS, TORCHVISION)

# Scalar size attributes, by the names configurations use for them. Only those a
# configuration already has are set.
_LAYERS = 2
_LAYER_NAMES = (
    "num_hidden_layers num_layers n_layer n_layers encoder_layers decoder_layers "
    "num_encoder_layers num_decoder_layers l_layers x_layers r_layers"
).split()
_EXPERTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
_SCALARS: dict[str, int] = {
    **dict.fromkeys(_LAYER_NAMES, _LAYERS),
    **dict.fromkeys(("hidden_size", "d_model", "n_embd", "embed_dim", "dim"), 32),
    **dict.fromkeys(("hidden_size_global",), 32),  # BLT's local models: the global width
    **dict.fromkeys(("embedding_size", "word_embed_proj_dim", "projection_dim"), 32),
    **dict.fromkeys(
        "num_attention_heads n_head n_heads num_heads encoder_attention_heads "
        "decoder_attention_heads linear_num_heads".split(),
        4,
    ),
    **dict.fromkeys(("num_key_value_heads", "num_kv_heads", "multi_query_group_num"), 2),
    **dict.fromkeys(("head_dim", "kv_channels", "attention_head_size", "linear_head_dim"), 8),
    **dict.fromkeys(
        "intermediate_size ffn_dim d_ff n_inner d_inner encoder_ffn_dim decoder_ffn_dim "
        "ffn_hidden_size".split(),
        48,
    ),
    **dict.fromkeys(
        ("moe_intermediate_size", "shared_expert_intermediate_size", "expert_intermediate_size"),
        24,
    ),  # fmt: skip
    **dict.fromkeys(_EXPERTS, 4),
    **dict.fromkeys(
        ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "top_k_experts", "moe_k"), 2
    ),
    **dict.fromkeys(
        ("n_shared_experts", "num_shared_experts", "n_group", "num_expert_group", "topk_group"), 1
    ),
    **dict.fromkeys(("kv_lora_rank", "q_lora_rank"), 16),
    **dict.fromkeys(("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"), 8),
    **dict.fromkeys(("vocab_size", "n_vocab", "unpadded_vocab_size"), VOCAB),
    **dict.fromkeys(("encoder_hash_byte_group_vocab",), VOCAB),  # BLT's n-gram hashes
    **dict.fromkeys(("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len"), 64),
    **dict.fromkeys(("d_latents", "num_latents"), 32),  # Perceiver
    **dict.fromkeys(("num_self_attends_per_block", "num_blocks"), 1),
    **dict.fromkeys(("image_size",), 32),
    **dict.fromkeys(("patch_size",), 8),
}
# ids the inputs use for padding and special tokens (inside the shrunk vocabulary)
_SPECIAL = {"pad_token_id": PAD, "bos_token_id": BOS, "eos_token_id": EOS}
# list-valued sizes (one entry per stage of a hierarchical model)
_DEPTH_LISTS = ("depths", "num_hidden_layers_per_stage", "block_repeats")
_WIDTH_LISTS = ("hidden_sizes", "embed_dims", "dims", "embed_dim_per_stage")


@dataclass(frozen=True)
class Arch:
    """One architecture: the mapping it comes from, its name there, and its model class."""

    mapping: str
    name: str
    model_class: str

    @property
    def key(self) -> str:
        return f"{self.mapping}/{self.name}"


def list_architectures(mapping: str) -> list[Arch]:
    """Every architecture of a mapping (the first model class where a type lists several)."""
    if mapping == TORCHVISION:
        import torchvision

        names = torchvision.models.list_models(module=torchvision.models)
        return [Arch(mapping, n, n) for n in sorted(names)]
    from transformers.models.auto import modeling_auto

    table = getattr(modeling_auto, HF_MAPPINGS[mapping])
    return [
        Arch(mapping, name, cls if isinstance(cls, str) else cls[0])
        for name, cls in sorted(table.items())
    ]


class NotBuilt(Exception):
    """The architecture cannot be built here (configuration, checkpoint or data missing)."""


def build(arch: Arch) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A small random instance of ``arch`` and its inputs (batch of 2), checked to run eager.

    transformers: the fully shrunk configuration first, then the same with as many key-value
    heads as heads (multi-head latent attention takes no grouped heads), then kept consistent
    where the generic shrink breaks the configuration's checks, then with only the
    depth shrunk (some models tie sizes together in ways a generic shrink misses), else
    ``NotBuilt``."""
    if arch.mapping == TORCHVISION:
        return _torchvision(arch.name)
    errors = []
    for shrink in (_shrunk, _ungrouped, _consistent, _shallow):
        try:
            return _transformers(arch, shrink)
        except Exception as e:  # noqa: BLE001 - any failure here is the build's, reported
            errors.append(f"{type(e).__name__}: {first_line(e)}")
    raise NotBuilt(errors[0])


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else ""


# ------------------------------------------------------------------ transformers


def _config(config_cls: Any, sizes: Callable[[Any], dict[str, Any]]) -> Any:
    """The default configuration of ``config_cls`` rebuilt with ``sizes`` applied, nested
    configurations (text, vision) included."""
    default = config_cls()
    return config_cls(**_overrides(default, sizes))


def _overrides(config: Any, sizes: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
    from transformers import PretrainedConfig

    out = sizes(config)
    out.update(_EXTRAS.get(type(config).__name__, {}))
    for key, value in vars(config).items():
        if isinstance(value, PretrainedConfig):
            sub = value.to_dict()
            sub.update(_overrides(value, sizes))
            out[key] = sub
    return out


def _shrunk(config: Any) -> dict[str, Any]:
    """Every known size attribute of ``config`` made small, and what derives from them."""
    have = vars(config)
    out: dict[str, Any] = {k: v for k, v in _SCALARS.items() if isinstance(have.get(k), int)}
    unset = ["head_dim", "num_key_value_heads"]  # some defaults leave them unset
    if any(isinstance(have.get(k), int) for k in _EXPERTS):  # and the routing of experts
        unset += ["num_experts_per_tok", "n_group", "topk_group"]
    for key in unset:
        if key in have and have[key] is None:
            out[key] = _SCALARS[key]
    out.update(_shallow(config))
    for key in _DEPTH_LISTS:
        if isinstance(have.get(key), list | tuple):
            out[key] = [1] * len(have[key])
    for key in _WIDTH_LISTS:
        if isinstance(have.get(key), list | tuple):
            out[key] = [16 * 2 ** min(i, 2) for i in range(len(have[key]))]
    if isinstance(have.get("num_heads"), list | tuple):
        out["num_heads"] = [1] * len(have["num_heads"])
    if isinstance(have.get("image_size"), list | tuple):
        out["image_size"] = [32] * len(have["image_size"])
    if isinstance(have.get("patch_size"), list | tuple):
        out["patch_size"] = [8] * len(have["patch_size"])
    out.update(_special_inside(have))
    return out


def _special_inside(have: dict[str, Any]) -> dict[str, int]:
    """Special token ids the shrunk vocabulary no longer holds, moved inside it (Marian's
    padding, which also starts its decoder, is id 58100 of 58101)."""
    ids = {**_SPECIAL, "decoder_start_token_id": PAD}
    return {k: v for k, v in ids.items() if isinstance(have.get(k), int) and have[k] >= VOCAB}


def _ungrouped(config: Any) -> dict[str, Any]:
    """``_shrunk`` with one key-value head per head, where the configuration groups them."""
    out = _shrunk(config)
    heads = next((out[k] for k in ("num_attention_heads", "n_head") if k in out), None)
    for key in ("num_key_value_heads", "num_kv_heads"):
        if key in out and heads is not None:
            out[key] = heads
    return out


def _consistent(config: Any) -> dict[str, Any]:
    """``_ungrouped`` kept consistent where the generic shrink breaks a configuration's
    checks: per-layer settings cut to the layers kept (``_per_layer``), state-space heads that
    fill the expanded width, the sizes, vocabulary and decoder start the default leaves unset
    (Dots1's experts, ESM, T5), and nothing the configuration derives itself
    (``_settable``); RoPE parameters per layer type where the default leaves them empty
    (Cohere Compass)."""
    have = _with_derived(config)
    out = _ungrouped(config)
    out.update({k: v for k, v in _SCALARS.items() if k in have and have[k] is None})
    out.update({k: v for k, v in _PER_LAYER_INPUTS.items() if (have.get(k) or 0) > 0})
    if "vocab_size" in have and have["vocab_size"] is None:
        out.update(_SPECIAL)
    if have.get("is_encoder_decoder") and have.get("decoder_start_token_id") is None:
        out["decoder_start_token_id"] = PAD  # T5's default leaves it unset; checkpoints don't
    depth = next((k for k in ("num_hidden_layers", "num_layers", "n_layer") if k in out), None)
    if depth is not None:
        kept, layers = _per_layer(have, have[depth])
        out.update(layers)
        if kept is not None:
            out[depth] = len(kept)
    out.update(_ssm_heads(have, out))
    types = out.get("layer_types", have.get("layer_types"))
    if have.get("rope_parameters") == {} and isinstance(types, list | tuple):
        out["rope_parameters"] = {t: {"rope_type": "default", "rope_theta": 10000.0} for t in types}
    if "num_channels" in have:  # a vision model
        out.update(_coarse(have, out))
    return _settable(config, out)


def _coarse(have: dict[str, Any], out: dict[str, Any]) -> dict[str, Any]:
    """Default patch size and stage widths, with an image of 64 pixels or four patches a
    side (MobileViT-v2 unfolds 2-pixel patches after a 32-fold downsampling): for vision
    models whose stem downsamples by a fixed factor whatever the patch size says
    (LeViT: four stride-2 convolutions against its attention's 16-pixel patches), or whose
    stage widths are several lists that must agree (HGNet-V2: ``hidden_sizes`` and
    ``stage_out_channels``)."""
    patch = have.get("patch_size")
    fixed: dict[str, Any] = {k: have[k] for k in ("patch_size", *_WIDTH_LISTS) if k in out}
    if isinstance(patch, int) and isinstance(have["image_size"], int):
        fixed["image_size"] = max(64, 4 * patch)
    return fixed


# Gemma 3n's per-layer input embeddings: a second vocabulary of 262144 by 256 per layer
_PER_LAYER_INPUTS = {"vocab_size_per_layer_input": VOCAB, "hidden_size_per_layer_input": 8}


def _with_derived(config: Any) -> dict[str, Any]:
    """The configuration's attributes and what it serialises without keeping it as one: Gemma
    4's ``per_layer_config`` (the full-attention layers' own head width), held as a
    heterogeneity spec and written out keyed by the default's layer numbers, which a nested
    configuration gets back with its other settings and must be cut with the layers."""
    derived = {k: v for k, v in config.to_dict().items() if k.startswith("per_layer")}
    return {**derived, **vars(config)}


# Per-model settings where no rule fits, by configuration class: the defaults of these fail
# in transformers' own code, and the values are those of their checkpoints (or the smallest
# that keep the model's kinds of layer).
_EXTRAS: dict[str, dict[str, Any]] = {
    # hybrids whose default has no attention layer, which transformers' mask creation
    # cannot run (``get_seq_length`` on a cache of linear-attention layers only); their
    # checkpoints interleave attention layers (Bamba-9B: 9, 18, 27)
    "BambaConfig": {"attn_layer_indices": [1]},
    "GraniteMoeHybridConfig": {
        "num_hidden_layers": 2,
        "layer_types": ["linear_attention", "full_attention"],
    },
    # the default leaves the layer types unset, which the model indexes per layer: conv and
    # attention layers as LFM2's, the first dense and the rest mixtures of experts
    "Lfm2MoeConfig": {
        "num_hidden_layers": 3,
        "layer_types": ["conv", "full_attention", "conv"],
        "num_dense_layers": 1,
    },
    # every fourth layer indexes (QSA), and the default leaves the indexer unset
    "Qwen4ExpTextConfig": {
        "indexer_n_heads": 2,
        "indexer_kv_heads": 1,
        "indexer_head_dim": 8,
        "indexer_budget": 4,
        "indexer_compress_ratio": 2,
    },
    # the attention reads ``attn_config.rope_theta``, which only checkpoints' files set, and
    # clamps to ``clip_qkv``, which the default leaves unset (DBRX's checkpoints: 8)
    "DbrxAttentionConfig": {"rope_theta": 10000.0, "clip_qkv": 8.0},
    # the layout's sinusoids are derived from the hidden size (a quarter of it over the 8
    # box coordinates, in sine-cosine pairs): 32 leaves one per coordinate, which fails
    "BrosConfig": {"hidden_size": 64},
    # the axial position embeddings' widths sum to the hidden size and their shape
    # multiplies to the (shrunk) maximum length
    "ReformerConfig": {
        "axial_pos_embds_dim": [16, 16],
        "axial_pos_shape": [8, 8],
    },
    # a prompt with an image: its special tokens inside the shrunk vocabulary, and as many
    # image tokens as the projector pools the 4 x 4 patches to (2 x 2)
    "ShieldGemma2Config": {
        "mm_tokens_per_image": 4,
        "boi_token_index": 3,
        "eoi_token_index": 4,
        "image_token_index": 5,
        "yes_token_index": 6,
        "no_token_index": 7,
    },
    # the forward builds its cache from the top configuration, which has no layer count
    # (its four parts have): transformers fails with a cache, so BLT runs without
    "BltConfig": {"use_cache": False},
    # generate starts every codebook's delay pattern with the decoder start (the default's
    # bos, 2048, outside the shrunk vocabulary)
    "MusicgenDecoderConfig": {"decoder_start_token_id": BOS},
    "MusicgenMelodyDecoderConfig": {"decoder_start_token_id": BOS},
}


def _settable(config: Any, out: dict[str, Any]) -> dict[str, Any]:
    """``out`` without what the configuration derives itself (an attribute of the default
    that is no field): passed in, it would override the value derived from the shrunk sizes
    (Mistral 4 derives ``head_dim`` from its query widths; set to the generic 8, its rotary
    halves no longer match)."""
    import dataclasses

    if not dataclasses.is_dataclass(config):
        return out
    fields = {f.name for f in dataclasses.fields(config)}
    return {k: v for k, v in out.items() if k in fields or k not in vars(config)}


# (expansion, heads, head width) of state-space layers, which must satisfy
# ``expansion * hidden_size == heads * head width``
_SSM_HEADS = (
    ("expand", "num_heads", "head_dim"),
    ("mamba_expand", "mamba_n_heads", "mamba_d_head"),
)


def _ssm_heads(have: dict[str, Any], out: dict[str, Any]) -> dict[str, Any]:
    """The state-space heads that fill the shrunk expanded width (Mamba 2, Bamba)."""
    hidden = out.get("hidden_size")
    fixed = {}
    for expand, heads, width in _SSM_HEADS:
        sizes = (expand, heads, width)
        if isinstance(hidden, int) and all(isinstance(have.get(k), int) for k in sizes):
            fixed[heads] = max(1, have[expand] * hidden // out.get(width, have[width]))
    return fixed


def _shallow(config: Any) -> dict[str, Any]:
    """Only the depth, the vocabulary and the special ids: small, and hard to get wrong."""
    have = vars(config)
    out: dict[str, Any] = {k: _LAYERS for k in _LAYER_NAMES if isinstance(have.get(k), int)}
    if isinstance(have.get("vocab_size"), int):
        out["vocab_size"] = VOCAB
        out.update(_SPECIAL)
    depth = next((k for k in ("num_hidden_layers", "num_layers") if k in out), None)
    types = next((k for k in ("layer_types", "block_types") if have.get(k)), None)
    if depth is not None and types is not None and isinstance(have[types], list | tuple):
        out[types] = _mixed(list(have[types]), _LAYERS)
        out[depth] = len(out[types])
    return out


def _mixed(types: list[Any], n: int) -> list[Any]:
    """The first ``n`` layer types, or more so that every kind of layer (hybrid models:
    linear and full attention, mamba) appears once."""
    kinds = [t for i, t in enumerate(types) if t not in types[:i]]
    kept = types[:n]
    return kept + [t for t in kinds if t not in kept]


# lists of one entry per layer that say what kind the layer is
_TYPE_LISTS = ("layer_types", "block_types", "layers_block_type")


def _per_layer(have: dict[str, Any], depth: int) -> tuple[list[int] | None, dict[str, Any]]:
    """The per-layer settings of a ``depth``-layer configuration cut to the layers kept (the
    first ones and the first of every kind, see ``_kept``), so that they stay one per layer:
    lists as long as the depth (layer types, Gemma 3n's per-layer widths), dicts and lists of
    layer indices (Gemma 4's ``per_layer_config``, Bamba's attention layers), counts of layers
    in proportion (Gemma 3n's layers sharing key-value caches), run lengths of
    layer patterns (GPT-Neo's ``[[["global", "local"], 12]]``, one run each) and layer periods
    (Jamba: attention every 8th layer). Returns the layers kept (``None``: all) and the
    settings."""
    runs = {k: v for k, v in have.items() if _is_runs(v)}
    if runs:
        patterns = {k: [[kinds, 1] for kinds, _ in v] for k, v in runs.items()}
        first = next(iter(patterns.values()))
        return list(range(sum(len(kinds) for kinds, _ in first))), patterns
    if depth <= _LAYERS:
        return None, {}
    kept = _kept(have, depth)
    out: dict[str, Any] = _partition(have, depth, len(kept))
    for key, value in have.items():
        if key in out:
            continue
        if isinstance(value, list | tuple) and len(value) == depth:
            out[key] = [value[i] for i in kept]
        elif _is_indices(key, value, depth) and isinstance(value, dict):
            out[key] = {kept.index(i): v for k, v in value.items() if (i := int(k)) in kept}
        elif _is_indices(key, value, depth):
            out[key] = [kept.index(i) for i in value if i in kept]
        elif _is_count(key, value, depth):
            out[key] = value * len(kept) // depth
        elif key.endswith("_layer_period") and isinstance(value, int) and value > _LAYERS:
            out[key] = _LAYERS
            offset = key.replace("_period", "_offset")
            if isinstance(have.get(offset), int):
                out[offset] = have[offset] % _LAYERS
    return kept, out


def _kept(have: dict[str, Any], depth: int) -> list[int]:
    """The layers a shrunk model keeps: the first ``_LAYERS``, the first and the last layer of
    every kind a type list names (hybrid models: linear and full attention, mamba; Zamba ties
    the weights of its hybrid layers, so it needs two; Gemma 3n's last layers share caches)
    and the first of every list of layer indices, in order."""
    kept = set(range(_LAYERS))
    for key in _TYPE_LISTS:
        types = have.get(key)
        if isinstance(types, list | tuple) and len(types) == depth:
            kept |= {types.index(t) for t in types}
            kept |= {len(types) - 1 - types[::-1].index(t) for t in types}
    for key, value in have.items():
        if _is_indices(key, value, depth) and value:
            kept.add(min(int(i) for i in value))
    return sorted(kept)


def _partition(have: dict[str, Any], depth: int, n: int) -> dict[str, int]:
    """Counts of layers that split the depth into parts (Dory's 8 input, 20 recurrent and 8
    output layers of 36) redistributed over the ``n`` layers kept: in proportion, at least
    one each, so that they still add up."""
    parts = {
        k: v
        for k, v in have.items()
        if k.endswith("_layers") and k not in _LAYER_NAMES and isinstance(v, int) and v > 0
    }
    if len(parts) < 2 or sum(parts.values()) != depth or n < len(parts):
        return {}
    out = {k: max(1, v * n // depth) for k, v in parts.items()}
    largest = max(out, key=out.__getitem__)
    out[largest] += n - sum(out.values())
    return out if out[largest] > 0 else {}


def _is_indices(key: str, value: Any, depth: int) -> bool:
    """Whether ``value`` is a list or dict of layer indices (its name says layers)."""
    if "layer" not in key or not isinstance(value, list | tuple | dict) or len(value) >= depth:
        return False
    if isinstance(value, dict):  # keys written out as text ("05") where serialised
        value = [int(i) if isinstance(i, str) and i.isdigit() else i for i in value]
    return all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < depth for i in value)


def _is_count(key: str, value: Any, depth: int) -> bool:
    """Whether ``value`` counts some of the layers (Gemma 3n's ``num_kv_shared_layers``)."""
    named = key.startswith("num_") and key.endswith("_layers") and key not in _LAYER_NAMES
    return named and isinstance(value, int) and 0 < value < depth


def _is_runs(value: Any) -> bool:
    """Whether ``value`` is a run-length list of layer patterns: ``[[kinds, repeats], ...]``."""
    return (
        isinstance(value, list | tuple)
        and bool(value)
        and all(
            isinstance(v, list | tuple)
            and len(v) == 2
            and isinstance(v[0], list | tuple)
            and isinstance(v[1], int)
            for v in value
        )
    )


def _transformers(arch: Arch, shrink: Callable[[Any], dict[str, Any]]):
    import transformers

    transformers.logging.set_verbosity_error()
    model_cls = getattr(transformers, arch.model_class)
    config = _config(_config_class(arch, model_cls), shrink)
    if arch.mapping == "causal-lm" and arch.name in _AS_DECODER:
        config.is_decoder = True
    config.num_labels = 2 if arch.mapping == "question-answering" else 3  # QA: start, end
    if hasattr(config, "use_cache") and arch.mapping not in GENERATING:
        config.use_cache = False
    torch.manual_seed(0)
    model = model_cls(config).float().eval()
    _no_zero_heads(model)
    if hasattr(model, "set_default_language"):  # X-MOD adapters are chosen per language
        model.set_default_language(config.languages[0])
    inputs = _inputs(arch, model)
    with torch.no_grad():
        out = model(**_with_decoder(arch, config, inputs))  # it must run eager, or the
        # configuration is at fault
        if _largest(out) < 1e-6 and _calibrate_batch_norms(model, _inputs(arch, model, 16)):
            out = model(**inputs)
    if _largest(out) < 1e-6:
        raise ValueError(f"the random model's outputs vanish (max {_largest(out):.2g})")
    return model, inputs


def _with_decoder(arch: Arch, config: Any, inputs: dict[str, torch.Tensor]) -> dict:
    """An encoder-decoder LM's inputs with a decoder start token to run eager; the engine is
    given the source alone, as people give it (``DLBacktrace`` adds the start tokens)."""
    if arch.mapping != "seq2seq-lm" or "input_ids" not in inputs:
        return inputs
    start = getattr(config, "decoder_start_token_id", None)
    start = getattr(config, "bos_token_id", None) if start is None else start
    ids = inputs["input_ids"]
    return {**inputs, "decoder_input_ids": torch.full_like(ids[:, :1], start or 0)}


# encoders whose LM head refuses to run unless the configuration says decoder (its other
# heads keep the encoder)
_AS_DECODER = {"reformer"}


def _largest(out: Any) -> float:
    """The largest magnitude of the model's first output (infinite where it is no float)."""
    first = next(t for t in torch.utils._pytree.tree_leaves(out) if torch.is_tensor(t))
    return float(first.abs().max()) if first.is_floating_point() else float("inf")


def _calibrate_batch_norms(model: nn.Module, inputs: dict[str, torch.Tensor]) -> bool:
    """Batch norms that normalise, as training leaves them: running statistics of the
    activations on ``inputs``, unit scale. A random model's statistics are zero mean and unit
    variance while its convolutions (initialised with a deviation of 0.02) shrink each
    activation about 25-fold, and some initialise the scale so too (EfficientNet): after
    MobileNet's 50 convolutions nothing is left (max 6e-23). Returns whether the model has
    batch norms."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_parameters()  # unit scale, no shift, statistics reset
        norm.momentum = None  # a cumulative average: one pass sets the statistics
        norm.train()
    model(**inputs)
    for norm in norms:
        norm.eval()
    return bool(norms)


def _config_class(arch: Arch, model_cls: Any) -> Any:
    """The type's configuration, or the part of it the model class takes: a causal LM of a
    multimodal type takes the text configuration (Qwen3_5ForCausalLM's ``config_class`` is
    Qwen3_5TextConfig, the type's Qwen3_5Config holds one as ``text_config``)."""
    from transformers import CONFIG_MAPPING

    config_cls = CONFIG_MAPPING[arch.name]
    own = getattr(model_cls, "config_class", None)
    if own is None or own is config_cls:
        return config_cls
    return own if own in {type(v) for v in vars(config_cls()).values()} else config_cls


def _inputs(arch: Arch, model: nn.Module, images: int = 2) -> dict[str, torch.Tensor]:
    """The inputs: a padded batch of two texts, or ``images`` random images (seed 0), in the
    form the model's forward takes them (``_shaped``), with what it cannot run without
    (``_EXTRA_INPUTS``)."""
    import inspect

    config = model.config
    takes = inspect.signature(model.forward).parameters
    if arch.mapping == "image-classification" and "pixel_values" in takes:
        size = _image_size(config)
        channels = getattr(config, "num_channels", 3)
        g = torch.Generator().manual_seed(0)
        inputs = {"pixel_values": torch.randn(images, channels, size, size, generator=g)}
    elif arch.mapping == "image-classification":  # ImageGPT: an image as colour-cluster ids
        g = torch.Generator().manual_seed(0)
        length = min(getattr(config, "n_positions", 64), 64)
        ids = torch.randint(0, _vocab(config) - 1, (images, length), generator=g)
        return {"input_ids": ids}
    else:
        # generation by a decoder (the seq2seq mapping holds some: audio-text LMs) and
        # models that classify from the last token pad on the left
        decoder = arch.mapping in GENERATING and not getattr(config, "is_encoder_decoder", False)
        left = decoder or config.model_type == "xlnet"
        inputs = text_inputs(_vocab(config), left_pad=left)
    inputs = _shaped(config, takes, inputs)
    extra = _EXTRA_INPUTS.get(arch.key) or _EXTRA_INPUTS.get(arch.name, {})
    g = torch.Generator().manual_seed(1)
    for name, make in extra.items():
        inputs[name] = make(config, inputs, g)
    return inputs


def _shaped(config: Any, takes: Any, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Images cut into flattened patches with their mask and grid where the forward takes
    ``spatial_shapes`` (SigLIP 2's native resolution)."""
    if "spatial_shapes" in takes and "pixel_values" in inputs:
        x = inputs["pixel_values"]
        patch = getattr(getattr(config, "vision_config", config), "patch_size", 8)
        b, c, h, w = x.shape
        grid = (h // patch, w // patch)
        x = x.reshape(b, c, grid[0], patch, grid[1], patch).permute(0, 2, 4, 3, 5, 1)
        inputs = {
            "pixel_values": x.reshape(b, grid[0] * grid[1], patch * patch * c),
            "pixel_attention_mask": torch.ones(b, grid[0] * grid[1], dtype=torch.long),
            "spatial_shapes": torch.tensor([grid] * b),
        }
    return inputs


def _bbox(config: Any, inputs: dict[str, torch.Tensor], g: torch.Generator) -> torch.Tensor:
    """One box per token, (x0, y0, x1, y1) in [0, 1] with x0 <= x1 and y0 <= y1 (BROS)."""
    ids = inputs["input_ids"]
    corners = torch.rand(*ids.shape, 2, 2, generator=g).sort(dim=-2).values
    return corners.transpose(-1, -2).reshape(*ids.shape, 4)


def _visual_feats(config: Any, inputs: dict[str, torch.Tensor], g: torch.Generator):
    """Region features of 4 detected objects per image (LXMERT's Faster R-CNN features)."""
    return torch.randn(inputs["input_ids"].shape[0], 4, config.visual_feat_dim, generator=g)


def _visual_pos(config: Any, inputs: dict[str, torch.Tensor], g: torch.Generator):
    """The 4 objects' boxes, normalised."""
    return _bbox(config, {"input_ids": torch.zeros(inputs["input_ids"].shape[0], 4)}, g)


def _global_attention(config: Any, inputs: dict[str, torch.Tensor], g: torch.Generator):
    """Global attention on the first token: what Longformer's QA head otherwise finds
    from the question's separator tokens (and refuses to run without three of them)."""
    mask = torch.zeros_like(inputs["input_ids"])
    mask[:, 0] = 1
    return mask


def _image_prompt(config: Any, inputs: dict[str, torch.Tensor], g: torch.Generator):
    """A prompt around each image: BOS, the image's tokens between its begin and end tokens,
    then text (ShieldGemma 2 classifies an image by the prompt's next token)."""
    images = inputs["pixel_values"].shape[0]
    image = [config.boi_token_index] + [config.image_token_index] * config.mm_tokens_per_image
    text = torch.randint(EOS + 3, VOCAB, (images, TOKENS), generator=g)
    head = torch.tensor([BOS, *image, config.eoi_token_index]).expand(images, -1)
    return torch.cat([head, text], dim=1)


def _codebook_ids(config: Any, inputs: dict[str, torch.Tensor], g: torch.Generator):
    """Token ids one row per codebook (MusicGen predicts several: ``[batch * codebooks,
    tokens]``); the mask stays one row per sample, the pads where the sample's are."""
    pads = inputs["input_ids"].repeat_interleave(config.num_codebooks, 0) == PAD
    ids = torch.randint(EOS + 3, min(_vocab(config), VOCAB), pads.shape, generator=g)
    return ids.masked_fill(pads, PAD)


# inputs a model's forward cannot run without (or takes in its own layout), by the mapping's
# model type (or mapping/model type)
_EXTRA_INPUTS: dict[str, dict[str, Callable[..., torch.Tensor]]] = {
    "bros": {"bbox": _bbox},
    "lxmert": {"visual_feats": _visual_feats, "visual_pos": _visual_pos},
    "question-answering/longformer": {"global_attention_mask": _global_attention},
    "shieldgemma2": {"input_ids": _image_prompt},
    "musicgen": {"input_ids": _codebook_ids},
    "musicgen_melody": {"input_ids": _codebook_ids},
}


def _vocab(config: Any) -> int:
    for c in (config, getattr(config, "text_config", None)):
        if isinstance(getattr(c, "vocab_size", None), int):
            return c.vocab_size
    return VOCAB


def _image_size(config: Any) -> int:
    for c in (config, getattr(config, "vision_config", None)):
        size = getattr(c, "image_size", None)
        if isinstance(size, int):
            return size
        if isinstance(size, list | tuple) and size:
            return int(size[0])
    return 32


def text_inputs(vocab: int, left_pad: bool) -> dict[str, torch.Tensor]:
    """Two sequences, the second padded by three pad tokens on the given side. Right-padded
    (classifier) rows end with EOS, as tokenizers make them (BART-style heads read it)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(EOS + 3, min(vocab, VOCAB), (2, TOKENS), generator=g)
    mask = torch.ones_like(ids)
    pad = slice(0, 3) if left_pad else slice(TOKENS - 3, TOKENS)
    ids[1, pad], mask[1, pad] = PAD, 0
    if not left_pad:
        ids[0, -1], ids[1, TOKENS - 4] = EOS, EOS
    return {"input_ids": ids, "attention_mask": mask}


def _no_zero_heads(model: nn.Module) -> None:
    """Heads initialised to zero (ViT's, some classifiers') have nothing to explain."""
    for module in model.modules():
        if isinstance(module, nn.Linear) and not module.weight.any():
            nn.init.normal_(module.weight, std=0.02)


# ------------------------------------------------------------------ torchvision

_SIZES = (32, 64, 96, 128, 160, 224, 299, 384, 518)


def _torchvision(name: str) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The model with 10 classes, at the smallest input of ``_SIZES`` it runs on eager."""
    import torchvision

    torch.manual_seed(0)
    kwargs: dict[str, Any] = {"weights": None, "num_classes": 10}
    if name in ("inception_v3", "googlenet"):
        kwargs["aux_logits"] = False
        kwargs["init_weights"] = True
    model = torchvision.models.get_model(name, **kwargs).eval()
    _no_zero_heads(model)
    last: Exception | None = None
    for size in _SIZES:
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
        try:
            with torch.no_grad():
                model(x)
        except Exception as e:  # noqa: BLE001 - too small for this model: try the next size
            last = e
            continue
        return model, {"x": x}
    raise NotBuilt(f"no input size in {_SIZES} runs: {type(last).__name__}: {first_line(last)}")
