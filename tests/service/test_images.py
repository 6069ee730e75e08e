"""Images as people send them (the registry's image spec): the digit demo reads a digit drawn
in black on white as it reads the same digit in white on black (it was trained on the latter,
and a light background is inverted), at another size and as RGB; a blank page is answered with
a warning that there is nothing to read, in the result and in the stream's ``done`` event."""

from __future__ import annotations

import base64
import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from service.demo.digits import dataset, sample_png
from service.registry import ImageSpec, load_registry
from service.schemas import Inputs
from service.work import inputs
from tests.helpers.jobs import events, submit, wait

NEARLY_UNIFORM = "nearly uniform"


def _b64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _classify(client, image: str) -> dict:
    job = submit(client, {"model": "digits-cnn", "inputs": {"image": image}})["job_id"]
    view = wait(client, job)
    assert view["status"] == "finished", view
    return view["result"]


@pytest.mark.parametrize("index", [0, 1, 2])
def test_a_black_on_white_digit_reads_as_its_inversion(client, index: int) -> None:
    digit = Image.open(io.BytesIO(sample_png(index)))
    on_paper = ImageOps.invert(digit).resize((64, 64)).convert("RGB")  # as drawn on paper
    label = str(int(dataset()[1][index]))
    white_ink = _classify(client, _b64(digit))["predictions"][0]
    black_ink = _classify(client, _b64(on_paper))
    assert white_ink["label"] == label
    assert black_ink["predictions"][0]["label"] == label
    assert "warnings" not in black_ink


def test_a_blank_page_is_answered_with_a_warning(client) -> None:
    page = _b64(Image.new("L", (200, 280), 250))
    job = submit(client, {"model": "digits-cnn", "inputs": {"image": page}})["job_id"]
    done = events(client, job)[-1]
    assert done[1] == "done" and NEARLY_UNIFORM in " ".join(done[2]["summary"]["warnings"])
    result = wait(client, job)["result"]
    assert any(NEARLY_UNIFORM in w for w in result["warnings"])


def test_the_registry_says_what_the_digit_model_expects() -> None:
    spec = load_registry(None).get("digits-cnn")
    assert spec is not None and spec.image is not None and spec.image.invert == "auto"
    assert "white ink on black" in spec.expects and "inverted" in spec.expects


def _tensor(image: str, spec: ImageSpec) -> torch.Tensor:
    """The model input ``service.work.inputs.image`` makes of a picture for ``spec``."""
    entry = SimpleNamespace(loaded=SimpleNamespace(image=spec), input_name="x")
    return inputs.image(entry, Inputs(image=image)).batch["x"]


@pytest.mark.parametrize("channels", [1, 3])
def test_a_16_bit_png_reads_as_its_8_bit_copy(channels: int) -> None:
    """A 16-bit grey PNG (scans, medical and scientific pictures) has the same content as
    its 8-bit copy, not its values clipped at 255 (a white page)."""
    grey = np.random.default_rng(0).integers(0, 65536, (40, 40), dtype=np.uint16)
    deep = _b64(Image.fromarray(grey))
    shallow = _b64(Image.fromarray((grey // 257).astype(np.uint8)))
    spec = ImageSpec(channels=channels, size=40)
    assert torch.allclose(_tensor(deep, spec), _tensor(shallow, spec), atol=1.5 / 255)


def test_a_truncated_image_fails_naming_the_input() -> None:
    raw = base64.b64decode(_b64(Image.effect_noise((64, 64), 50)))
    with pytest.raises(ValueError, match=r"^inputs.image: .*truncated"):
        _tensor(base64.b64encode(raw[:200]).decode(), ImageSpec(size=16))


@pytest.mark.parametrize(
    "orientation, upright",
    [
        (3, Image.Transpose.ROTATE_180),
        (6, Image.Transpose.ROTATE_270),
        (8, Image.Transpose.ROTATE_90),
    ],
)
def test_a_photo_stored_sideways_reads_upright(orientation: int, upright: Image.Transpose) -> None:
    """A camera stores the pixels as the sensor saw them and the turn in its EXIF
    orientation tag; viewers (and transformers' ``load_image``) apply it. The model reads the
    picture as its sender saw it: the same input as the upright pixels sent plainly."""
    pixels = Image.fromarray(np.random.default_rng(1).integers(0, 256, (24, 40, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = orientation  # EXIF Orientation
    sideways = io.BytesIO()
    pixels.save(sideways, format="JPEG", quality=95, exif=exif)
    upright_png = _b64(Image.open(io.BytesIO(sideways.getvalue())).transpose(upright))
    spec = ImageSpec(channels=3, size=24)
    got = _tensor(base64.b64encode(sideways.getvalue()).decode(), spec)
    assert torch.allclose(got, _tensor(upright_png, spec), atol=1e-6)
    assert not torch.allclose(got, _tensor(_b64(pixels), spec), atol=0.1)


def test_a_png_at_the_models_size_and_mode_is_kept_as_sent() -> None:
    """The resized picture of a PNG the model takes as it is (its size and mode) is the PNG
    itself, not decoded and encoded again (EXIF handling lost its format, and every such
    picture was re-encoded)."""
    spec = ImageSpec(channels=1, size=16)
    entry = SimpleNamespace(loaded=SimpleNamespace(image=spec), input_name="x")
    stored = io.BytesIO()  # uncompressed: encoding it again would give other bytes
    Image.open(io.BytesIO(sample_png(0))).save(stored, format="PNG", compress_level=0)
    raw = stored.getvalue()
    made = inputs.image(entry, Inputs(image=base64.b64encode(raw).decode()))
    assert made.png == raw


def test_data_that_is_no_image_is_named_so() -> None:
    """Pillow's own message for such data names a BytesIO object and its address."""
    with pytest.raises(ValueError, match=r"^inputs.image: not a PNG or JPEG image$"):
        _tensor(base64.b64encode(b"GIF89a" + bytes(64)).decode(), ImageSpec(size=16))
