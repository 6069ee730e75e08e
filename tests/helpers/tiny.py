"""Tiny random-weight transformers models shared by engine and service tests."""

from __future__ import annotations

import torch


def tiny_bert(cls_name: str, num_labels: int = 3, **config: object) -> torch.nn.Module:
    """A one-layer, width-16 BERT of transformers class ``cls_name`` (a token-classification
    or question-answering head, ...) over a 40-token vocabulary, seeded, in eval mode;
    ``config``: more of its configuration (``problem_type``, ...)."""
    import transformers

    config = transformers.BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=num_labels,
        **config,
    )
    torch.manual_seed(0)
    return getattr(transformers, cls_name)(config).eval()
