"""The checks of a request that depend on the model it names: the registry entry's task, the
input kinds and references of that task (``engine.tasks``), and the entry's limits. Pydantic
has checked everything else (``schemas.RunTaskRequest``); each failure here is a 422 that
names its field, as pydantic's are."""

from __future__ import annotations

import base64
import binascii
import io
import struct
import zlib
from typing import Any

from fastapi import HTTPException

from engine.tasks import TASKS, TaskName

from ..registry import Limits, ModelSpec, Registry
from ..schemas import GenerationParams, RunTaskRequest, pair_refusal, shown
from ..vocabulary import IMAGE_FORMATS
from .errors import invalid


def resolve(registry: Registry, req: RunTaskRequest) -> tuple[ModelSpec, TaskName]:
    """The registry entry and the task it runs (404 for a model not in the registry; 422
    for a task the model does not do)."""
    spec = registry.get(req.model)
    if spec is None:
        raise HTTPException(404, f"model {req.model!r} is not in the registry (GET /models)")
    task = TaskName(spec.task if req.task == TaskName.AUTO else req.task)
    if task != spec.task:
        raise invalid(["task"], f"model {spec.id} does {spec.task}, not {task}")
    return spec, task


def check_inputs(spec: ModelSpec, req: RunTaskRequest) -> None:
    """Bounds that depend on the model: input kind, batch, sizes, reference, generation
    limits. Fills in the model's default ``generation.max_new_tokens``."""
    task = TASKS[TaskName(spec.task)]
    kind = req.inputs.kind()
    if kind not in task.inputs:
        raise invalid(["inputs", kind], f"{spec.task} takes {' or '.join(task.inputs)}")
    _check_sizes(kind, getattr(req.inputs, kind), spec.limits)
    if req.inputs.text_pair is not None:
        _check_pairs(spec, task.pairs, req)
    reference = req.relevance.reference
    if reference not in (None, *task.references):
        choices = ", ".join(task.references)
        raise invalid(
            ["relevance", "reference"], f"{spec.task} takes reference {choices}, not {reference}"
        )
    if task.name == TaskName.GENERATION:
        _check_generation(req.generation, spec)
    _check_seed(req)


# The cheap bound on a text's characters before any tokenizer counts it: the worker (and the
# door, where it knows the tokenizer) count the real tokens.
CHARS_PER_TOKEN = 32


def _check_sizes(kind: str, value: Any, lim: Limits) -> None:
    """Rows against ``max_batch``, and each row's length or the image's size."""
    rows = value if isinstance(value, list) and value and isinstance(value[0], list) else None
    if kind == "text" and isinstance(value, list):
        rows = value
    if rows is not None and len(rows) > lim.max_batch:
        raise invalid(["inputs", kind], f"{len(rows)} rows, more than max_batch={lim.max_batch}")
    if kind == "token_ids":
        longest = max(len(x) for x in rows) if rows else len(value)
        if longest > lim.max_tokens:
            raise invalid(
                ["inputs", "token_ids"], f"{longest} tokens, more than max_tokens={lim.max_tokens}"
            )
    if kind == "text":
        longest = max(len(t) for t in (rows or [value]))
        if longest > lim.max_tokens * CHARS_PER_TOKEN:
            raise invalid(["inputs", "text"], f"text too long for max_tokens={lim.max_tokens}")
    if kind == "features":
        _check_features(rows or [value], lim)
    if kind == "image":
        check_image(value, lim.max_image_size)


# The largest float32: the worker casts features to float32, which reads anything larger as
# infinity (the job failed: "input holds 1 NaN or inf value(s)").
FLOAT32_MAX = 3.4028234663852886e38


def _check_features(rows: list[list[float]], lim: Limits) -> None:
    """Rows of at most ``max_features`` numbers, all as wide (ragged rows failed in the
    worker with numpy's "setting an array element with a sequence"), each a float32."""
    loc = ["inputs", "features"]
    widths = [len(row) for row in rows]
    if max(widths) > lim.max_features:
        raise invalid(loc, f"{max(widths)} features, more than max_features={lim.max_features}")
    if len(set(widths)) > 1:
        i = next(i for i, w in enumerate(widths) if w != widths[0])
        raise invalid(
            loc, f"row {i} has {widths[i]} features, row 0 {widths[0]}: give every row as many"
        )
    for i, row in enumerate(rows):
        if max(map(abs, row)) > FLOAT32_MAX:
            j, x = next((j, x) for j, x in enumerate(row) if abs(x) > FLOAT32_MAX)
            raise invalid(
                loc,
                f"{x} (row {i}, feature {j}) is past float32's range (at most "
                f"{FLOAT32_MAX:.7g} either way), which the model reads as infinity",
            )


# The largest number of each output dtype (``output.encoding`` json writes float32), and
# float32's smallest normal one: the engine computes in float32.
_LARGEST = {"float16": 65504.0, "float32": FLOAT32_MAX}
FLOAT32_TINY = 1.1754943508222875e-38


def _check_seed(req: RunTaskRequest) -> None:
    """The seed (``multiplier`` times ``scaler``: the relevance adds up to it) within the
    numbers the relevance is computed and sent in: above float16's 65504, the default
    base64 float16 relevance came back infinite, every value of it; below float32's
    smallest normal number, all of it came back 0."""
    rel, out = req.relevance, req.output
    seed = rel.multiplier * rel.scaler
    dtype = "float32" if out.encoding == "json" else out.dtype
    # named by the one the request sets (the scaler, where it sets that alone)
    name, other = "multiplier", "scaler"
    if "multiplier" not in rel.model_fields_set:
        name, other = other, name
    given = f"{getattr(rel, name):g} (times {other} {getattr(rel, other):g}: {seed:g})"
    if seed > _LARGEST[dtype]:
        top = f"{_LARGEST[dtype]:g}"
        raise invalid(
            ["relevance", name],
            f"{given}: the relevance adds up to that, past the largest {dtype} ({top}) of "
            f"output.dtype, so it would come back infinite; send output.dtype float32, or a "
            f"multiplier times scaler of at most {top}",
        )
    if seed < FLOAT32_TINY:
        raise invalid(
            ["relevance", name],
            f"{given}: the relevance adds up to that, below float32's smallest normal number "
            f"({FLOAT32_TINY:g}), so it would come back 0; send a larger {name}",
        )


def _check_pairs(spec: ModelSpec, pairs: bool, req: RunTaskRequest) -> None:
    """A pair of texts for a task that takes pairs, within the cheap bound on characters
    (the door counts a pair's tokens where it knows the tokenizer, ``door``)."""
    loc = ["inputs", "text_pair"]
    if not pairs:
        raise invalid(loc, pair_refusal(spec.task))
    longest = max(len(text) + len(pair or "") for text, pair in req.inputs.pairs())
    if longest > spec.limits.max_tokens * CHARS_PER_TOKEN:
        raise invalid(loc, f"text and text_pair too long for max_tokens={spec.limits.max_tokens}")


def _check_generation(g: GenerationParams, spec: ModelSpec) -> None:
    lim = spec.limits
    if g.max_new_tokens is None:
        g.max_new_tokens = min(16, lim.max_new_tokens)
        # the model's default, not the client's: the door lowers it to the positions the
        # prompt leaves (door._check_positions), where a number sent is refused
        g.model_fields_set.discard("max_new_tokens")
    if g.max_new_tokens > lim.max_new_tokens:
        raise invalid(
            ["generation", "max_new_tokens"],
            f"{g.max_new_tokens} is more than {lim.max_new_tokens} for {spec.id}",
        )
    if g.num_beams > lim.max_beams:
        raise invalid(
            ["generation", "num_beams"],
            f"{g.num_beams} is more than {lim.max_beams} for {spec.id}",
        )


# PNG's (bit depth, colour type) pairs (PNG specification, IHDR).
_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(raw: bytes) -> tuple[int, int] | None:
    """Width and height from a PNG whose header Pillow would read without a question: the
    signature, an IHDR chunk with a valid CRC, sizes above 0, a known depth/colour pair and
    filter method 0, then at once the first IDAT chunk (Pillow's ``open`` reads the chunks
    up to there; the pixels are not read here nor there). None for anything else. Why:
    ``Image.open`` costs the API about 0.2 ms of CPU a request for the same two numbers;
    whatever this does not vouch for goes to Pillow, so every refusal keeps Pillow's
    verdict and message."""
    if len(raw) < 41 or not raw.startswith(_PNG_SIGNATURE) or raw[8:16] != b"\0\0\0\rIHDR":
        return None
    if raw[37:41] != b"IDAT":
        return None
    w, h, depth, colour, _, filt = struct.unpack(">IIBBBB", raw[16:28])
    crc_ok = zlib.crc32(raw[12:29]) == struct.unpack(">I", raw[29:33])[0]
    if not crc_ok or w == 0 or h == 0 or filt or depth not in _PNG_DEPTHS.get(colour, ()):
        return None
    return w, h


# Formats Pillow names apart that are one of IMAGE_FORMATS: a multi-picture JPEG (MPO, as
# phone cameras write a photo with a depth map or a second view) is a JPEG whose first
# picture the worker reads (Pillow's JPEG opener makes it one); it was refused as not JPEG.
_AS_FORMAT = {"MPO": "JPEG"}
# ASCII whitespace, dropped from base64 as the worker's decoder drops it.
_WHITESPACE = str.maketrans("", "", " \t\r\n")


def check_image(b64: str, max_side: int) -> None:
    """Decode the header only (no full decode in the API) and bound the size. Pillow refuses
    to open an image of more than twice its pixel limit (a decompression bomb): that is
    too large as well, also when the PNG header is read here (``png_size``)."""
    from PIL import Image, UnidentifiedImageError

    loc = ["inputs", "image"]
    prefix, comma, payload = b64.partition(",") if "," in b64 else ("", "", b64)
    if comma and not prefix.lstrip().lower().startswith("data:"):
        raise invalid(
            loc,
            f"{shown(prefix + comma, 40)} before the base64 is not a data URL: send the base64 "
            "alone, or as data:image/png;base64,... (base64 has no commas)",
        )
    try:  # without line breaks and spaces, which MIME base64 (the base64 tool's) wraps in
        payload = payload.translate(_WHITESPACE)
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise invalid(loc, "not a base64 PNG or JPEG image (not valid base64)") from exc
    too_many = f"too many pixels; at most {max_side} pixels a side"
    size = png_size(raw)
    if size is not None:
        fmt, (w, h) = "PNG", size
        if Image.MAX_IMAGE_PIXELS and w * h > 2 * Image.MAX_IMAGE_PIXELS:
            raise invalid(loc, too_many)
    else:
        try:
            with Image.open(io.BytesIO(raw)) as img:
                fmt, (w, h) = _AS_FORMAT.get(img.format, img.format), img.size
        except Image.DecompressionBombError as exc:
            raise invalid(loc, too_many) from exc
        except (UnidentifiedImageError, ValueError, OSError) as exc:
            raise invalid(loc, "not a base64 PNG or JPEG image (unreadable image data)") from exc
    if fmt not in IMAGE_FORMATS:
        raise invalid(loc, f"format {fmt} is not PNG or JPEG")
    if max(w, h) > max_side:
        raise invalid(loc, f"{w}x{h} is larger than {max_side} pixels a side")
    if (cut := truncated(raw, fmt)) is not None:
        raise invalid(loc, cut)


# A PNG's last chunk: IEND, of length 0 (its CRC left out: Pillow reads none of it).
_PNG_END = b"\0\0\0\0IEND"
_JPEG_EOI = b"\xff\xd9"
# JPEG markers without a length: TEM and the restart markers.
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})


def truncated(raw: bytes, fmt: str) -> str | None:
    """Why the file is cut short, or None: a PNG without its IEND chunk, a JPEG without an
    end-of-image marker after its image data. Headers alone pass the door's other checks,
    and such a file failed in the worker ("image file is truncated"), after the queue. No
    decode: a search from the end, which finds the end marker at once in a whole file."""
    if fmt == "PNG" and raw.rfind(_PNG_END, 33) == -1:
        return "truncated PNG (it ends before its IEND chunk)"
    if fmt == "JPEG":
        scan = _jpeg_scan(raw)
        if scan is None or raw.rfind(_JPEG_EOI, scan) == -1:
            return "truncated JPEG (it ends before its end-of-image marker, FFD9)"
    return None


def _jpeg_scan(raw: bytes) -> int | None:
    """Where the main image's data starts (after its first SOS segment's header), walking
    the segments from SOI by their lengths, so that markers inside a segment (an EXIF
    thumbnail's in APP1) are skipped; None where the file ends first. Bytes between
    segments are skipped as Pillow skips them (fill bytes, junk)."""
    pos, end = 2, len(raw)
    while pos + 4 <= end:
        marker = raw[pos + 1]
        if raw[pos] != 0xFF or marker in (0x00, 0xFF):
            pos += 1
        elif marker in _JPEG_STANDALONE:
            pos += 2
        else:
            length = (raw[pos + 2] << 8) | raw[pos + 3]
            pos += 2 + length
            if marker == 0xDA:
                return pos if pos <= end else None
    return None
