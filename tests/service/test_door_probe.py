"""Requests a hostile or careless client sends, each refused at the door with a 422 that
names the field, the value and what is allowed, where the door can see the problem: never a
202 whose job fails in the worker for a reason the door could have seen, nor a 500.

The API runs in process on the session's Redis, as in tests/service/test_door.py (its
``api`` fixture: the demo registry, no worker, no torch); checks that need a model's
folder build one here and ask the door's own metadata reader."""

from __future__ import annotations

import base64
import io
import json
import struct
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.service.test_door import SENTIMENT, _message, _refused, api  # noqa: F401 - api: a fixture


def _encoded(mode: str, fmt: str, size: tuple[int, int] = (64, 64), **options: Any) -> bytes:
    """A picture of ``mode`` saved as ``fmt`` by Pillow, with noise so that its image data
    spans many bytes."""
    img = Image.effect_noise(size, 64).convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


def _digit(raw: bytes) -> dict[str, Any]:
    return {"model": "digits-cnn", "inputs": {"image": base64.b64encode(raw).decode()}}


def _with_thumbnail(jpeg: bytes, thumbnail: bytes) -> bytes:
    """``jpeg`` with an EXIF APP1 segment right after its SOI that holds ``thumbnail`` (IFD1's
    JPEGInterchangeFormat), as a camera writes it: a whole JPEG, its own SOI to EOI, inside a
    segment of the main image's header."""
    ifd1 = 8 + 6  # after the TIFF header and an empty IFD0 (count, next IFD's offset)
    data = ifd1 + 2 + 2 * 12 + 4
    tiff = b"MM\0*" + struct.pack(">I", 8) + struct.pack(">HI", 0, ifd1)
    tiff += struct.pack(">H", 2)
    tiff += struct.pack(">HHII", 0x0201, 4, 1, data) + struct.pack(
        ">HHII", 0x0202, 4, 1, len(thumbnail)
    )
    tiff += struct.pack(">I", 0) + thumbnail
    payload = b"Exif\0\0" + tiff
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


PNG_CUT = "inputs.image: truncated PNG (it ends before its IEND chunk)"
JPEG_CUT = "inputs.image: truncated JPEG (it ends before its end-of-image marker, FFD9)"


@pytest.mark.parametrize(
    ("mode", "fmt", "options", "expected"),
    [
        ("L", "PNG", {}, PNG_CUT),
        ("RGB", "PNG", {}, PNG_CUT),
        ("P", "PNG", {}, PNG_CUT),
        ("L", "JPEG", {}, JPEG_CUT),
        ("RGB", "JPEG", {"progressive": True}, JPEG_CUT),
        ("CMYK", "JPEG", {}, JPEG_CUT),
    ],
)
def test_a_truncated_image_is_refused(
    api: TestClient,  # noqa: F811 - the fixture
    mode: str,
    fmt: str,
    options: dict,
    expected: str,
) -> None:
    """A PNG without its IEND chunk, a JPEG without its end-of-image marker: their headers
    pass, and the job failed in the worker ("image file is truncated"). Whole, with bytes
    after the end (as phones append), or cut within the end marker's CRC, they pass."""
    whole = _encoded(mode, fmt, **options)
    assert api.post("/run_task", json=_digit(whole)).status_code == 202
    assert api.post("/run_task", json=_digit(whole + b"appended")).status_code == 202
    last = 9 if fmt == "PNG" else 1  # into the end marker: IEND's type, FFD9's D9
    for cut in (len(whole) // 2, len(whole) - 12, len(whole) - last):
        assert _message(api.post("/run_task", json=_digit(whole[:cut]))) == expected
    if fmt == "PNG":  # IEND's CRC is not read
        assert api.post("/run_task", json=_digit(whole[:-4])).status_code == 202


def test_a_jpegs_thumbnail_is_not_its_end(api: TestClient) -> None:  # noqa: F811
    """An EXIF thumbnail is a whole JPEG inside the main image's APP1 segment, end marker
    included: the main image cut short is still truncated."""
    whole = _with_thumbnail(_encoded("L", "JPEG"), _encoded("L", "JPEG", (4, 4)))
    with Image.open(io.BytesIO(whole)) as img:
        img.load()  # a file Pillow reads whole
    assert api.post("/run_task", json=_digit(whole)).status_code == 202
    assert _message(api.post("/run_task", json=_digit(whole[:-40]))) == JPEG_CUT


# A BERT-like masked LM's vocabulary: WordPiece, lower-case words and their pieces.
MLM_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "z", "##eb"]


def _masked_lm(folder: Path, vocab_size: int) -> Any:
    """The registry entry of a masked LM (``head: masked-lm``) whose folder holds what
    ``save_pretrained`` writes for the door: config.json (``vocab_size`` rows, more than the
    tokenizer's tokens where larger), tokenizer.json and tokenizer_config.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    from service.registry import ModelSpec

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {w: i for i, w in enumerate(MLM_VOCAB)}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tok.save(str(folder / "tokenizer.json"))
    config = {"model_type": "distilbert", "vocab_size": vocab_size}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer_config.json").write_text(json.dumps({"mask_token": "[MASK]"}))
    source = {"kind": "transformers", "path": str(folder), "head": "masked-lm"}
    return ModelSpec.model_validate({"id": "mlm", "task": "text-classification", "source": source})


NOT_A_TOKEN = (
    "relevance.contrast_with: {!r} is not a token of mlm (a masked LM: its classes are the "
    "tokens of its vocabulary): runner-up, rest, a token id (0 to 11) or one token as its "
    "tokenizer writes it"
)


@pytest.mark.parametrize(
    ("alt", "target", "expected"),
    [
        ("sat", None, ""),
        ("##eb", None, ""),
        ("[UNK]", None, ""),
        ("11", None, ""),  # a row past the tokenizer's tokens, named by its id
        ("runner-up", None, ""),
        (5, None, ""),
        ("zeb", None, NOT_A_TOKEN.format("zeb") + "; its tokenizer reads 'zeb' as 'z', "
         "'##eb'"),
        ("Sat", None, NOT_A_TOKEN.format("Sat") + "; its tokenizer reads 'Sat' as '[UNK]'"),
        ("9", None, NOT_A_TOKEN.format("9") + "; its tokenizer reads '9' as '[UNK]'"),
        ("12", None, NOT_A_TOKEN.format("12") + "; its tokenizer reads '12' as '[UNK]'"),
        ("sat", 7, "relevance.contrast_with: 'sat' is the class relevance.target explains (7)"),
        ("11", 11, "relevance.contrast_with: '11' is the class relevance.target explains (11)"),
    ],
)  # fmt: skip
def test_a_masked_lms_alternative_is_a_token(
    tmp_path: Path, alt: Any, target: int | None, expected: str
) -> None:
    """A masked LM's classes are its vocabulary, named by their tokens (a row past the
    tokenizer's by its id): a contrast_with that names none failed in the worker, with the
    engine's "not a label of this model (labels: [...])" listing its config's labels, which
    mean nothing for it; one that names the target, with "the explained class itself"."""
    from service.api import door
    from service.api.metadata import ModelMetadata
    from service.registry import Registry
    from service.schemas import RunTaskRequest

    spec = _masked_lm(tmp_path / "mlm", vocab_size=12)
    meta = ModelMetadata(Registry([spec], tmp_path), str(tmp_path)).get(spec)
    relevance = {"mode": "contrast", "contrast_with": alt, "target": target}
    req = RunTaskRequest.model_validate(
        {"model": spec.id, "inputs": {"text": "the cat [MASK]"}, "relevance": relevance}
    )
    assert _refused(lambda: door.check(spec, spec.task, req, meta)).startswith(expected)


@pytest.mark.parametrize(
    ("value", "taken"),
    [("0-", False), ("7-", False), ("9" * 5000, False), ("0" * 128, False), ("0" * 127, True)],
)
def test_a_last_event_id_redis_cannot_read_starts_over(
    redis_url: str, value: str, taken: bool
) -> None:
    """A Last-Event-ID is a stream id Redis reads, or the stream starts from the beginning:
    "0-" (no sequence) and 128 characters were Redis's refusal of the first read, a 503
    that EventSource retried for good; 5000 digits were Python's refusal to read a number
    that long, a 500."""
    import redis

    from service.api.sse import is_stream_id

    assert is_stream_id(value) is taken
    if taken:
        redis.Redis.from_url(redis_url).xread({"ids:probe": value}, count=1)
        return
    with pytest.raises(redis.ResponseError):
        redis.Redis.from_url(redis_url).xread({"ids:probe": value}, count=1)


@pytest.mark.parametrize(
    ("problem_type", "target", "expected"),
    [
        ("regression", 0, ""),
        (
            "regression",
            1,
            "relevance.target: 1 is not an output of stars: it is a regression of 1 output "
            "(its config.json), target 0 to 0",
        ),
        (None, 1, ""),  # a single logit decides between two classes
        ("single_label_classification", 2, "relevance.target: 2 is not a class of stars"),
    ],
)
def test_a_regressions_target_is_one_of_its_outputs(
    problem_type: str | None, target: int, expected: str
) -> None:
    """A regression's single output is a value, not a logit deciding between two classes:
    target 1 was a 202 whose job failed with the engine's "target must be a class index in
    [0, 1): 1"."""
    from service.api import door
    from service.api.metadata import ModelMeta
    from service.registry import ModelSpec
    from service.schemas import RunTaskRequest

    source = {"kind": "transformers", "path": "stars"}
    spec = ModelSpec.model_validate(
        {"id": "stars", "task": "text-classification", "source": source}
    )
    meta = ModelMeta(num_classes=1, problem_type=problem_type, token_axis=False)
    req = RunTaskRequest.model_validate(
        {"model": "stars", "inputs": {"text": "fine"}, "relevance": {"target": target}}
    )
    assert _refused(lambda: door.check(spec, spec.task, req, meta)).startswith(expected)


def test_a_multi_picture_jpeg_is_a_jpeg(api: TestClient) -> None:  # noqa: F811
    """A phone's multi-picture JPEG (MPO: a photo, then its depth map or second view) is a
    JPEG whose first picture the worker reads; it was refused as "format MPO is not PNG or
    JPEG". Cut within its first picture, it is a truncated JPEG."""
    pictures = [Image.effect_noise((64, 64), 64).convert("RGB") for _ in range(2)]
    buf = io.BytesIO()
    pictures[0].save(buf, "MPO", save_all=True, append_images=pictures[1:])
    whole = buf.getvalue()
    with Image.open(io.BytesIO(whole)) as img:
        assert img.format == "MPO"
    assert api.post("/run_task", json=_digit(whole)).status_code == 202
    first = whole.index(b"\xff\xd9") + 2  # the first picture's end
    assert _message(api.post("/run_task", json=_digit(whole[: first - 100]))) == JPEG_CUT


@pytest.mark.parametrize(
    ("temperature", "expected"),
    [
        (1e-39, "relevance.temperature: Input should be greater than or equal to 0.01 (got 1e-39)"),
        (0.001, "relevance.temperature: Input should be greater than or equal to 0.01 (got 0.001)"),
        (0.01, ""),
    ],
)
def test_a_temperature_the_logits_can_be_divided_by(
    api: TestClient,  # noqa: F811
    temperature: float,
    expected: str,
) -> None:
    """The logits are divided by the temperature in float32: 1e-39 is none there, and 1e-37
    made a small model's logits infinite; the job failed with torch's "probability tensor
    contains either inf, nan or element < 0", or a classifier's scores were null. At least
    0.01, the web page's bound."""
    body = {
        "model": "tiny-lookup-lm",
        "inputs": {"text": "a3 c1"},
        "relevance": {"temperature": temperature},
        "generation": {"do_sample": True},
    }
    resp = api.post("/run_task", json=body)
    if not expected:
        assert resp.status_code == 202, resp.text
        return
    assert _message(resp) == expected


@pytest.mark.parametrize(
    ("relevance", "output", "expected"),
    [
        (
            {"multiplier": 1e6},
            {},
            "relevance.multiplier: 1e+06 (times scaler 1: 1e+06): the relevance adds up to "
            "that, past the largest float16 (65504) of output.dtype, so it would come back "
            "infinite; send output.dtype float32, or a multiplier times scaler of at most 65504",
        ),
        (
            {"scaler": 1000},
            {},
            "relevance.scaler: 1000 (times multiplier 100: 100000): the relevance adds up to "
            "that, past the largest float16 (65504)",
        ),
        ({"multiplier": 1e6}, {"dtype": "float32"}, ""),
        ({"multiplier": 1e6}, {"encoding": "json"}, ""),
        ({"multiplier": 65504}, {}, ""),
        (
            {"multiplier": 1e-300},
            {"dtype": "float32"},
            "relevance.multiplier: 1e-300 (times scaler 1: 1e-300): the relevance adds up to "
            "that, below float32's smallest normal number (1.17549e-38), so it would come back "
            "0; send a larger multiplier",
        ),
        ({"multiplier": 1e-3, "scaler": 1e-3}, {}, ""),
    ],
)
def test_relevance_the_output_dtype_holds(
    api: TestClient,  # noqa: F811
    relevance: dict,
    output: dict,
    expected: str,
) -> None:
    """The relevance adds up to multiplier times scaler: past float16's 65504, the default
    output (base64 float16) came back infinite, every value of it (multiplier 1e6 was
    allowed); under float32's smallest normal number, all 0."""
    body = {**SENTIMENT, "relevance": relevance, "output": output}
    resp = api.post("/run_task", json=body)
    if not expected:
        assert resp.status_code == 202, resp.text
        return
    assert _message(resp).startswith(expected)


@pytest.mark.parametrize(
    ("relevance", "expected"),
    [
        ({"target": -1}, "relevance.target: Input should be greater than or equal to 0 (got -1)"),
        (
            {"target": 1e300},
            "relevance.target: Input should be an integer, not a number this large (got 1e+300)",
        ),
        (
            {"mode": None},
            "relevance.mode: Input should be 'default', 'contrast' or 'reference' (got null)",
        ),
        (
            {"multiplier": "x" * 500},
            "relevance.multiplier: Input should be a valid number, unable to parse string as a "
            "number (got a text of 500 characters)",
        ),
        ({"foo": 1}, "relevance.foo: Extra inputs are not permitted"),
    ],
)
def test_pydantics_refusals_name_the_value(
    api: TestClient,  # noqa: F811
    relevance: dict,
    expected: str,
) -> None:
    """Each 422 names the value it refuses: pydantic's own messages did not ("Input should
    be greater than or equal to 0"), and 1e300 for an integer was "Unable to parse input
    string as an integer, exceeded maximum size", of a number that was no string."""
    assert _message(api.post("/run_task", json={**SENTIMENT, "relevance": relevance})) == expected


@pytest.mark.parametrize(
    ("inputs", "expected"),
    [
        (
            {"token_ids": [2, 5, 3]},
            "inputs.token_ids: has no [MASK] (id 4): mlm is a masked LM and explains the token "
            "it fills in; put id 4 where the word to predict goes",
        ),
        ({"token_ids": [[2, 4, 3], [2, 5, 3]]}, "inputs.token_ids.1: has no [MASK] (id 4)"),
        ({"text": "the cat"}, "inputs.text: has no [MASK]: mlm is a masked LM"),
        ({"token_ids": [2, 4, 3]}, ""),
    ],
)
def test_a_masked_lms_input_holds_its_mask(tmp_path: Path, inputs: dict, expected: str) -> None:
    """Ids without the mask token's id are refused in words ("has no the id of [MASK] (4)"
    read before), with the id to put."""
    from service.api import door
    from service.api.metadata import ModelMetadata
    from service.registry import Registry
    from service.schemas import RunTaskRequest

    spec = _masked_lm(tmp_path / "mlm", vocab_size=12)
    meta = ModelMetadata(Registry([spec], tmp_path), str(tmp_path)).get(spec)
    req = RunTaskRequest.model_validate({"model": spec.id, "inputs": inputs})
    message = _refused(lambda: door.check(spec, spec.task, req, meta))
    assert message.startswith(expected) if expected else message == "", message


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [
        ("data:image/png;base64,", ""),
        ("DATA:image/png;base64,", ""),
        ("data:image/gif;base64,", ""),  # the data says what it is: Pillow reads a PNG
        (
            "image/png;base64,",
            'inputs.image: "image/png;base64," before the base64 is not a data URL: send the '
            "base64 alone, or as data:image/png;base64,... (base64 has no commas)",
        ),
        ("garbage,", 'inputs.image: "garbage," before the base64 is not a data URL'),
    ],
)
def test_an_image_is_base64_or_a_data_url(
    api: TestClient,  # noqa: F811
    prefix: str,
    expected: str,
) -> None:
    """Anything before a comma was dropped, whatever it was: a data URL's header, or a
    client's mistake."""
    body = _digit(_encoded("L", "PNG"))
    body["inputs"]["image"] = prefix + body["inputs"]["image"]
    resp = api.post("/run_task", json=body)
    if not expected:
        assert resp.status_code == 202, resp.text
        return
    assert _message(resp).startswith(expected)


def test_unknown_layer_names_are_listed_briefly() -> None:
    """A refusal lists the first five unknown names, each cut to 60 characters, and how many
    more: a request of 20000 names of 300 characters was answered with all of them (a 12 MB
    422 for a 6 MB body), and a name of a million characters in full."""
    from service import layer_names

    names = [f"nope{i}" + "x" * 300 for i in range(20000)]
    with pytest.raises(layer_names.UnknownNodes) as caught:
        layer_names.check("m", ["tanh", *names], {"tanh", "linear"})
    first = repr(names[0][:60])
    assert caught.value.msg.startswith(f"{first}... (305 characters), ")
    assert " and 19995 more are not nodes of m's graph (2 nodes" in caught.value.msg
    assert len(caught.value.msg) < 1000
    with pytest.raises(layer_names.UnknownNodes) as caught:
        layer_names.check("m", ["lineer"], {"tanh", "linear"})
    assert caught.value.msg.startswith("'lineer' is not a node of m's graph (2 nodes; closest")
