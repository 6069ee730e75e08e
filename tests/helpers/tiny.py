"""Tiny random-weight transformers models shared by engine and service tests."""

from __future__ import annotations

import torch


def tiny_model(config_cls: str, model_cls: str, config: dict, seed: int = 0) -> torch.nn.Module:
    """transformers' ``model_cls`` over ``config_cls(**config)`` (class names, so that a
    table of ``(config_cls, model_cls, config)`` rows can be unpacked into it), its weights
    drawn after ``torch.manual_seed(seed)``, in eval mode; transformers' warnings silenced."""
    import transformers

    transformers.logging.set_verbosity_error()
    built = getattr(transformers, config_cls)(**config)
    torch.manual_seed(seed)
    return getattr(transformers, model_cls)(built).eval()


def tiny_bert(cls_name: str, num_labels: int = 3, **config: object) -> torch.nn.Module:
    """A one-layer, width-16 BERT of transformers class ``cls_name`` (a token-classification
    or question-answering head, ...) over a 40-token vocabulary, seeded, in eval mode;
    ``config``: more of its configuration (``problem_type``, ...)."""
    sizes = dict(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=num_labels,
        **config,  # a size named again is a TypeError, as it was in BertConfig(...)
    )
    return tiny_model("BertConfig", cls_name, sizes)
