"""Planted evidence: models trained here, in seconds, on tasks whose answer depends on known
input positions. Relevance must find those positions."""

from __future__ import annotations

import torch
from torch import nn

from engine import DLBacktrace

SIDE, PATCH = 16, 4


def patch_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noise images; label 1 images hold a bright PATCH x PATCH square at a random place."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, SIDE, SIDE, generator=g) * 0.5
    y = torch.randint(0, 2, (n,), generator=g)
    where = torch.randint(0, SIDE - PATCH + 1, (n, 2), generator=g)
    mask = torch.zeros(n, 1, SIDE, SIDE, dtype=torch.bool)
    for i in range(n):
        if y[i]:
            r, c = where[i].tolist()
            mask[i, :, r : r + PATCH, c : c + PATCH] = True
    x = torch.where(mask, 2.0 + 0.2 * x, x)
    return x, y, mask


def train(model: nn.Module, x, y, steps: int, lr: float, batch: int = 64) -> nn.Module:
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        i = torch.randint(0, len(y), (batch,), generator=torch.Generator().manual_seed(step))
        out = (
            model(x[i]) if isinstance(x, torch.Tensor) else model(**{k: v[i] for k, v in x.items()})
        )
        logits = out if isinstance(out, torch.Tensor) else out.logits
        loss = nn.functional.cross_entropy(logits, y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_cnn_relevance_lands_on_the_bright_patch():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 2),
    )
    x, y, _ = patch_images(2000, seed=1)
    train(model, x, y, steps=300, lr=3e-3)
    test_x, test_y, test_mask = patch_images(200, seed=2)
    with torch.no_grad():
        accuracy = (model(test_x).argmax(1) == test_y).float().mean()
    assert accuracy > 0.95
    positives = test_y == 1
    dlb = DLBacktrace(model, test_x[:2])
    res = dlb.run_task(inputs=test_x[positives], relevance_nodes="inputs", target=1)
    rel = res["relevance"]["input"].clamp(min=0)
    inside = (rel * test_mask[positives]).flatten(1).sum(1) / rel.flatten(1).sum(1)
    assert (inside > 0.5).float().mean() >= 0.9, inside


VOCAB, LENGTH, KEYWORD, CLS = 30, 10, 3, 1


def keyword_sentences(n: int, seed: int):
    """Random words after a [CLS]; label 1 sentences hold the keyword once, at a random place."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (n, LENGTH), generator=g)
    ids[:, 0] = CLS
    y = torch.randint(0, 2, (n,), generator=g)
    where = torch.randint(1, LENGTH, (n,), generator=g)
    ids[y == 1, where[y == 1]] = KEYWORD
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, y, where


def test_transformer_ranks_the_keyword_first():
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=2,
        max_position_embeddings=LENGTH,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    x, y, _ = keyword_sentences(4000, seed=1)
    train(model, x, y, steps=400, lr=2e-3)
    test_x, test_y, test_where = keyword_sentences(200, seed=2)
    with torch.no_grad():
        accuracy = (model(**test_x).logits.argmax(1) == test_y).float().mean()
    assert accuracy > 0.95
    positives = test_y == 1
    inputs = {k: v[positives] for k, v in test_x.items()}
    dlb = DLBacktrace(model, inputs)
    rel = dlb.run_task(inputs=inputs, relevance_nodes="inputs", target=1)["relevance"]
    words = rel["input_ids"][:, 1:]  # rank the words, not the [CLS] slot the head reads
    hits = (words.argmax(1) + 1 == test_where[positives]).float().mean()
    assert hits >= 0.9, hits
