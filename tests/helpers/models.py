"""Registry models of the service tests that are not demo models: tiny BERTs (random weights,
a word-level vocabulary) for the text, token-classification and question-answering tasks, as
transformers folders the registry's ``transformers`` source loads, and a ``python``-source
model that warms slowly (it waits for a gate file), so that a test can watch a worker warm.

``write_folders`` runs in a subprocess (``python -m tests.helpers.models DIR``): test
processes, like the API, need not import torch."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.helpers.stack import ROOT

# The tiny BERT's 40 ids: BERT's five special tokens, then words.
WORDS = (
    "the a cat dog sat ran on in mat park who what where is was paris london "
    "lives city big small red blue green tom ann sees and of to it at by for with"
).split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
# The heads, by folder name: transformers class and its labels.
HEADS = {
    "tiny-bert-text": ("BertForSequenceClassification", ["negative", "positive"]),
    "tiny-bert-tokens": ("BertForTokenClassification", ["O", "B-PLACE", "I-PLACE"]),
    "tiny-bert-qa": ("BertForQuestionAnswering", ["start", "end"]),
}
# The tiny BERT has 16 positions, special tokens included.
MAX_TOKENS = 16
GATE_ENV = "TEST_WARM_GATE"
GATED_FOLDER_ENV = "TEST_GATED_FOLDER"


def write_folders(out: Path) -> None:
    """Each head of ``HEADS`` as a transformers folder under ``out`` (safetensors weights,
    config with the labels, a fast tokenizer)."""
    from transformers import BertTokenizerFast

    from tests.helpers.tiny import tiny_bert

    assert len(VOCAB) == 40, len(VOCAB)  # tiny_bert's vocabulary size
    out.mkdir(parents=True, exist_ok=True)
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(VOCAB)}, do_lower_case=True)
    for name, (cls_name, labels) in HEADS.items():
        model = tiny_bert(cls_name, len(labels))
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {label: i for i, label in enumerate(labels)}
        model.save_pretrained(out / name, safe_serialization=True)
        tok.save_pretrained(out / name)


def build_folders(out: Path) -> Path:
    """``write_folders`` in a subprocess; returns ``out``."""
    cmd = [sys.executable, "-m", "tests.helpers.models", str(out)]
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return out


def entry(model_id: str, folder: Path, task: str, **extra: Any) -> dict[str, Any]:
    """A registry entry for one of the folders (``transformers`` source)."""
    return {
        "id": model_id,
        "task": task,
        "description": f"tiny random BERT ({task}, tests)",
        "source": {"kind": "transformers", "path": str(folder)},
        "limits": {"max_tokens": MAX_TOKENS},
        "expects": f"lower-case words of its {len(WORDS)}-word vocabulary",
        **extra,
    }


def gated_text_classifier() -> Any:
    """The ``python`` source of a model that builds only once the file named by
    ``TEST_WARM_GATE`` exists (at most 10 minutes): the tiny text BERT of the folder named
    by ``TEST_GATED_FOLDER``."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from engine.tasks import TaskName
    from service.models import LoadedModel

    gate = Path(os.environ[GATE_ENV])
    deadline = time.monotonic() + 600
    while not gate.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    folder = os.environ[GATED_FOLDER_ENV]
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    labels = HEADS["tiny-bert-text"][1]
    return LoadedModel("gated", TaskName.TEXT_CLASSIFICATION, model, tok, labels)


if __name__ == "__main__":
    write_folders(Path(sys.argv[1]))
