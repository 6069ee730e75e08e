"""An operator's registry mistakes fail the job with what is wrong in the entry: a local
transformers path that is not a folder (transformers took it for a hub id), a torchvision
architecture that does not exist."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.models import load_model
from service.registry import ModelSpec, Registry


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (
            {"kind": "transformers", "path": "models/nope"},
            r"registry entry m: source.path .*models/nope is not a folder",
        ),
        (
            {"kind": "torchvision", "arch": "resnet9000", "weights": "w.safetensors"},
            r"registry entry m: torchvision has no architecture 'resnet9000'",
        ),
    ],
)
def test_a_wrong_source_names_the_entry(tmp_path: Path, source: dict, expected: str) -> None:
    spec = ModelSpec(id="m", task="image-classification", source=source)
    with pytest.raises((FileNotFoundError, ValueError), match=expected):
        load_model(spec, Registry([spec], tmp_path), str(tmp_path))
