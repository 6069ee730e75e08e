"""An operator's registry mistakes fail the job with what is wrong in the entry: a local
transformers path that is not a folder (transformers took it for a hub id), a torchvision
architecture that does not exist; a device torch has no name for, when the registry is read."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from service.models import AUTO_CLASSES, load_model
from service.registry import HEAD_TASKS, ModelSpec, Registry, RegistryError, load_registry


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


def _registry_with_device(tmp_path: Path, device: str) -> Registry:
    entry = {"id": "m", "task": "text-classification", "source": {"kind": "demo", "name": "x"}}
    path = tmp_path / "registry.yaml"
    path.write_text(yaml.safe_dump({"models": [{**entry, "device": device}]}))
    return load_registry(path)


@pytest.mark.parametrize("device", ["gpu", "cuda:", "cuda:-1", "cuda:01", "CPU", "cuda0", " cpu"])
def test_a_device_torch_has_no_name_for_is_refused_when_read(tmp_path: Path, device: str) -> None:
    """The registry is refused where it is read (the API and each worker starting), naming the
    entry and the forms a device takes, not at the job's load with torch's own words."""
    with pytest.raises(RegistryError) as caught:
        _registry_with_device(tmp_path, device)
    assert str(caught.value) == (
        f"registry {tmp_path / 'registry.yaml'}: models[0] (id 'm'): device "
        f"{device!r} is not one torch knows: give auto (cuda where there is one), cpu, cuda, "
        "cuda:N (the GPU of index N) or mps"
    )


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12", "mps"])
def test_the_devices_torch_knows_are_read(tmp_path: Path, device: str) -> None:
    assert _registry_with_device(tmp_path, device).get("m").device == device


@pytest.mark.parametrize(
    ("task", "head", "expected"),
    [
        ("text-classification", "fill-mask", "Input should be 'sequence-classification'"),
        (
            "generation",
            "image-classification",
            "registry entry m: source.head image-classification does not serve task "
            "generation; for generation: causal-lm, seq2seq-lm",
        ),
    ],
)
def test_a_head_that_cannot_serve_the_task_is_refused_when_read(
    task: str, head: str, expected: str
) -> None:
    """Both loaded the model at the first job and failed it: a head the worker has no
    class for with KeyError('fill-mask'), an image head for generation deep in decoding."""
    source = {"kind": "transformers", "path": "m", "head": head}
    with pytest.raises(ValidationError) as caught:
        ModelSpec(id="m", task=task, source=source)
    assert expected in caught.value.errors()[0]["msg"]


def test_every_head_has_the_class_that_loads_it() -> None:
    assert set(AUTO_CLASSES) == set(HEAD_TASKS)
    assert ModelSpec(id="m", task="text-classification", source={"kind": "transformers",
                     "path": "m", "head": "causal-lm"}).source.head == "causal-lm"  # fmt: skip
