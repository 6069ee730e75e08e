"""Demo models that work offline on a fresh machine, built reproducibly in seconds.

``build_demo_model(model_id)`` returns a :class:`service.models.LoadedModel` (model,
tokenizer or image spec, labels), as the registry's other source kinds do. The first call
trains/derives the model and caches it under ``data_dir/<model_id>`` (safetensors + JSON);
later calls only load it. The faithfulness benchmark imports this too,
so the models here are the same ones the service explains.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # service.models imports this package, and torch
    from ..models import LoadedModel

DEMO_IDS = ("minilm-sentiment", "digits-cnn", "tiny-lookup-lm", "gpt2-small-config")
# The transformers head each text demo is built with (a registry ``transformers`` source's
# ``head``), for the API, which does not load the models: what their logits look like.
HEADS = {
    "minilm-sentiment": "sequence-classification",
    "tiny-lookup-lm": "causal-lm",
    "gpt2-small-config": "causal-lm",
}


def default_data_dir() -> Path:
    return Path(os.environ.get("BACKTRACE_DATA_DIR", "var/models"))


def _builders() -> dict[str, tuple[Callable[[Path], dict], Callable[[Path], LoadedModel]]]:
    # Imported lazily: each builder pulls in torch/transformers.
    from . import digits, lookup, sentiment

    return {
        "minilm-sentiment": (sentiment.build, sentiment.load),
        "digits-cnn": (digits.build, digits.load),
        "tiny-lookup-lm": (lookup.build_lookup, lookup.load_lm),
        "gpt2-small-config": (lookup.build_gpt2_small, lookup.load_lm),
    }


def ensure_built(model_id: str, data_dir: str | Path | None = None) -> Path:
    """Build ``model_id`` into ``data_dir/model_id`` unless it is there already.

    Several workers may start at once: a file lock serialises the build, and the result is
    written to a temporary folder and renamed, so a reader never sees half a model."""
    if model_id not in DEMO_IDS:
        raise KeyError(f"unknown demo model {model_id!r}; known: {', '.join(DEMO_IDS)}")
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    root.mkdir(parents=True, exist_ok=True)
    target = root / model_id
    if (target / "build.json").exists():
        return target
    with open(root / f".{model_id}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "build.json").exists():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{model_id}-", dir=root))
        try:
            info = _builders()[model_id][0](tmp)
            (tmp / "build.json").write_text(json.dumps({"model_id": model_id, **info}, indent=1))
            os.chmod(tmp, 0o755)  # mkdtemp makes 0700: other users (a service user) must read
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_demo_model(path: str | Path, model_id: str) -> LoadedModel:
    """Load an already built demo model from ``path`` (no training, no network)."""
    return _builders()[model_id][1](Path(path))


def build_demo_model(model_id: str, data_dir: str | Path | None = None) -> LoadedModel:
    """Build (first time) and load one demo model: ``model, tokenizer, labels`` and more."""
    return load_demo_model(ensure_built(model_id, data_dir), model_id)
