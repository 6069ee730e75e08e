"""A request's inputs as the model's tensors: token ids and attention mask from texts or raw
ids, an image resized and normalised as the registry entry says, rows of features; and the
inputs of a batch's jobs merged into one batch, with each job's rows in it."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from engine.tasks import PAIR_TASKS, TaskName

from ..models import CachedModel
from ..registry import ImageSpec, ModelSpec
from ..schemas import Inputs, no_separator, pair_refusal
from ..vocabulary import IMAGE_FORMATS

Batch = dict[str, torch.Tensor]
# An image model's input when the registry entry gives no ``image``.
DEFAULT_IMAGE = ImageSpec()
# A picture whose pixels spread less than this (standard deviation, intensities in [0, 1])
# holds nothing a classifier could read: its prediction says nothing, however confident.
UNIFORM_STD = 0.02
NEARLY_UNIFORM = "the image is nearly uniform: nothing to read (the prediction means nothing)"


@dataclass
class Tensors:
    """One request's input tensors, the resized picture of an image (drawn under its
    heatmap) and what the result should warn about the input."""

    batch: Batch
    png: bytes | None = None
    warnings: list[str] = field(default_factory=list)


def for_task(entry: CachedModel, spec: ModelSpec, task: TaskName, inputs: Inputs) -> Tensors:
    """The model's input tensors for one request."""
    if task == TaskName.IMAGE_CLASSIFICATION:
        return image(entry, inputs)
    if task == TaskName.TABULAR_CLASSIFICATION:
        rows = np.asarray(inputs.features, dtype=np.float32)
        x = torch.from_numpy(rows[None] if rows.ndim == 1 else rows)
        return Tensors({entry.input_name: x})
    return Tensors(tokens(entry, spec, inputs))


def _padding(entry: CachedModel) -> tuple[int, bool]:
    """The tokenizer's pad id (0 without one) and whether to pad on the left: as the
    tokenizer does, but always for a causal LM's generation, which decodes after each
    prompt's last token (the engine refuses right padding; a causal LM may ship a
    right-padding tokenizer). An encoder-decoder's source is padded as its tokenizer pads
    (left padding would move BART's absolute positions)."""
    tok = entry.loaded.tokenizer
    pad = tok.pad_token_id if tok is not None and tok.pad_token_id is not None else 0
    config = getattr(entry.loaded.model, "config", None)
    left = entry.loaded.task == TaskName.GENERATION
    left = left and not getattr(config, "is_encoder_decoder", False)
    return pad, left or (tok is not None and tok.padding_side == "left")


def _padded(parts: list[torch.Tensor], value: int, left: bool) -> torch.Tensor:
    """Rows of unequal length ([n, L] each) padded to the longest and stacked."""
    width = max(t.shape[1] for t in parts)
    return torch.cat(
        [
            torch.nn.functional.pad(
                t, (width - t.shape[1], 0) if left else (0, width - t.shape[1]), value=value
            )
            for t in parts
        ]
    )


def tokens(entry: CachedModel, spec: ModelSpec, inputs: Inputs) -> Batch:
    """input_ids and attention_mask from texts (and their pairs) or raw ids, checked against
    max_tokens; and token_type_ids where the model takes them (``CachedModel.segments``):
    the tokenizer's for texts, zeros (one segment) for raw ids, so that every batch of the
    model has the same inputs and runs through one captured graph."""
    pad, left = _padding(entry)
    if inputs.token_ids is not None:
        enc = _raw_ids(entry, inputs.token_ids, pad, left)
    else:
        enc = _encoded(entry, spec, inputs, pad, left)
    length = enc["input_ids"].shape[1]
    if length > spec.limits.max_tokens:
        raise ValueError(
            f"inputs: {length} tokens, more than max_tokens={spec.limits.max_tokens} "
            f"for model {spec.id}"
        )
    return enc


def _raw_ids(entry: CachedModel, ids: list, pad: int, left: bool) -> Batch:
    """Rows of token ids padded to one batch, each checked against the vocabulary."""
    tok = entry.loaded.tokenizer
    rows = [ids] if ids and isinstance(ids[0], int) else ids
    parts = [torch.tensor(r, dtype=torch.long)[None] for r in rows]
    ids_t = _padded(parts, pad, left)
    mask = _padded([torch.ones_like(p) for p in parts], 0, left)
    if tok is not None and ids_t.max() >= len(tok):
        raise ValueError(f"inputs.token_ids: id {int(ids_t.max())} is not in the vocabulary")
    enc = {"input_ids": ids_t, "attention_mask": mask}
    if entry.segments:
        enc["token_type_ids"] = torch.zeros_like(ids_t)
    return enc


def _encoded(entry: CachedModel, spec: ModelSpec, inputs: Inputs, pad: int, left: bool) -> Batch:
    """The tokenizer's encoding of the texts, as ``tokenizer(text, text_pair)`` where the
    request pairs them, padded here as raw ids are (``_padding``): a tokenizer saved
    without a pad token (a Llama's, most causal LMs') refuses ``padding=True`` even for
    one text, and every job on such a model failed with transformers' advice to set one."""
    tok = entry.loaded.tokenizer
    texts, seconds = zip(*inputs.pairs(), strict=True)
    pairs = list(seconds) if inputs.text_pair is not None else None
    if pairs is not None:
        check_pairs(entry, spec)
    enc = tok(list(texts), pairs)
    names = ("input_ids", "attention_mask", *(("token_type_ids",) if entry.segments else ()))
    return {
        k: _padded(
            [torch.tensor(row, dtype=torch.long)[None] for row in enc[k]],
            pad if k == "input_ids" else 0,
            left,
        )
        for k in names
    }


def check_pairs(entry: CachedModel, spec: ModelSpec) -> None:
    """A pair of texts is one input only for a task that takes pairs and a tokenizer that
    marks where the second text starts (more special tokens for a pair than for one text:
    BERT's second [SEP], RoBERTa's </s></s>); the door says the same where it knows the
    tokenizer."""
    if spec.task not in PAIR_TASKS:
        raise ValueError(f"inputs.text_pair: {pair_refusal(spec.task)}")
    tok = entry.loaded.tokenizer
    if tok.num_special_tokens_to_add(pair=True) <= tok.num_special_tokens_to_add(pair=False):
        raise ValueError(f"inputs.text_pair: {no_separator(spec.id)}")


def image(entry: CachedModel, inputs: Inputs) -> Tensors:
    """The model's input tensor [1, C, S, S] as the image spec says (``ImageSpec``), the
    resized picture (PNG; one already at the model's size and mode is kept as sent), and a
    warning when the picture is nearly uniform (a blank page)."""
    from PIL import Image

    spec = entry.loaded.image or DEFAULT_IMAGE
    raw = base64.b64decode((inputs.image or "").split(",", 1)[-1])
    img = _picture(raw)
    size = spec.size
    if img.format == "PNG" and img.mode == spec.mode and img.size == (size, size):
        png = raw
    else:
        img = img.convert(spec.mode).resize((size, size), Image.Resampling.BILINEAR)
        out = io.BytesIO()
        img.save(out, format="PNG")
        png = out.getvalue()
    arr = np.asarray(img, dtype=np.float32) / 255.0
    std, mean = _moments(arr)
    warnings = [NEARLY_UNIFORM] if std < UNIFORM_STD else []
    if spec.invert == "always" or (spec.invert == "auto" and mean > 0.5):
        arr = 1.0 - arr  # ink on paper, for a model trained on light ink on dark
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    mean = np.asarray(spec.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(spec.std, dtype=np.float32)[:, None, None]
    x = torch.from_numpy((arr - mean) / std)[None]
    return Tensors({entry.input_name: x}, png, warnings)


def _moments(arr: np.ndarray) -> tuple[float, float]:
    """The standard deviation and mean of ``arr``'s values, from two sums in float64:
    numpy's ``std`` and ``mean`` took four times as long (several passes and temporaries),
    a tenth of a small image's preparation."""
    x = arr.reshape(-1)
    mean = float(x.sum(dtype=np.float64)) / x.size
    square = float(np.dot(x.astype(np.float64), x)) / x.size
    return max(0.0, square - mean * mean) ** 0.5, mean


def _picture(raw: bytes) -> Any:
    """The decoded picture, upright, with 16-bit grey (PNG's ``I;16``, ``I``) brought to 8
    bits: Pillow's ``convert`` to ``L`` or ``RGB`` clips those values at 255, which makes
    nearly any such picture a white page. Upright: a phone's photo is stored sideways with an
    EXIF orientation that viewers apply (as transformers' ``load_image`` does), so the model
    sees what its sender saw; a picture without one is left as it came (``exif_transpose``
    copies even those, and the copy lost the format that ``image`` keeps a PNG as sent by).
    Data the door's header check let through but that does not decode (a truncated file) is
    a ValueError naming the input."""
    from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

    try:
        # Only the formats the door lets through: without ``formats`` Pillow first asks
        # every registered plugin whether it knows the data (half of a small PNG's decode).
        img = Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS)
        img.load()
    except UnidentifiedImageError:  # its message names a BytesIO object, not the data
        raise ValueError("inputs.image: not a PNG or JPEG image") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ValueError(f"inputs.image: not a readable PNG or JPEG image ({exc})") from None
    if img.getexif().get(ExifTags.Base.Orientation, 1) != 1:
        img = ImageOps.exif_transpose(img)  # a copy, with no ``format``: not kept as sent
    if img.mode.startswith("I"):
        deep = np.asarray(img, dtype=np.float32) / 65535.0
        img = Image.fromarray(np.clip(deep * 255.0 + 0.5, 0, 255).astype(np.uint8))
    return _on_white(img)


def _on_white(img: Any) -> Any:
    """A picture with transparency (RGBA, LA, a palette with a transparent colour) laid on
    white, as a page shows it: Pillow's ``convert`` drops the alpha and keeps the colour
    stored under it, most often black, so a drawing on a transparent canvas became ink on
    black (a blank page to a model that reads dark ink on light)."""
    from PIL import Image

    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode not in ("RGBA", "LA", "PA"):
        return img
    base = "L" if img.mode == "LA" else "RGB"
    flat = Image.new(base, img.size, "white")
    flat.paste(img.convert(base), mask=img.getchannel("A"))
    return flat


def blank(entry: CachedModel, spec: ModelSpec) -> Batch | None:
    """A sample input to warm a model up with; None for tabular models (the row width is
    not known before a request)."""
    if spec.task == TaskName.TABULAR_CLASSIFICATION:
        return None
    if spec.task == TaskName.IMAGE_CLASSIFICATION:
        img = entry.loaded.image or DEFAULT_IMAGE
        return {entry.input_name: torch.zeros(1, img.channels, img.size, img.size)}
    return tokens(entry, spec, Inputs(text="warm up"))


def merge(entry: CachedModel, batches: list[Batch]) -> tuple[Batch, list[slice]]:
    """One batch from the jobs' batches, and each job's rows in it. Token inputs of unequal
    length are padded (the attention mask hides the padding, as for the rows of one
    request); other inputs must agree in shape, or a ValueError says why not."""
    sizes = [next(iter(b.values())).shape[0] for b in batches]
    starts = np.cumsum([0, *sizes])
    rows = [slice(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:], strict=True)]
    if len(batches) == 1:
        return batches[0], rows
    if "input_ids" in batches[0]:
        pad, left = _padding(entry)
        return {
            name: _padded([b[name] for b in batches], pad if name == "input_ids" else 0, left)
            for name in batches[0]
        }, rows
    merged = {}
    for name in batches[0]:
        shapes = {tuple(b[name].shape[1:]) for b in batches}
        if len(shapes) != 1:
            raise ValueError(f"inputs {name!r} differ in shape: {sorted(shapes)}")
        merged[name] = torch.cat([b[name] for b in batches])
    return merged, rows


def on_device(entry: CachedModel, batch: Batch) -> Batch:
    """The batch as the model takes it (``taken``) on its device, floats in its dtype."""
    first = next(entry.loaded.model.parameters(), None)
    dtype = first.dtype if first is not None else torch.float32
    return {
        k: v.to(entry.device, dtype=dtype if v.is_floating_point() else v.dtype)
        for k, v in taken(entry, batch).items()
    }


def taken(entry: CachedModel, batch: Batch) -> Batch:
    """The batch without the inputs the model's forward has no argument for: an operator's
    own model that reads only ``input_ids`` got the attention mask too, and every job on it
    failed with "forward() got an unexpected keyword argument 'attention_mask'". The
    batch itself keeps them (the documents read the mask)."""
    names = entry.arguments
    return batch if names is None else {k: v for k, v in batch.items() if k in names}
