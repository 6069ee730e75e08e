"""Named references for mode "reference": what "the input with its features removed" means,
so that callers need not build the reference tensors themselves.

Mode "reference" explains the change of the output from a reference input to the actual one,
and is only as good as that reference: in ``bench.faithfulness`` it beats every peer when the
reference is the removal baseline, and falls below mode "default" on two of four models with
zeros. The names below are the usual removal baselines:

- ``"zeros"``: zero floating-point inputs, zero embedding vectors for token ids (the default);
- ``"mean"``: each image replaced by its own mean colour (per channel);
- ``"blur"``: each image blurred (Gaussian, sigma a quarter of its larger side), which
  removes detail without painting a colour that the image does not have;
- ``"mask"``: every token except the tokenizer's special ones replaced by its mask token (its
  unknown token when it has none).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .tasks import REFERENCE_NAMES


def named_reference(
    name: str, inputs: dict[str, Tensor], tokenizer: Any = None
) -> dict[str, Tensor] | None:
    """The reference inputs that ``name`` stands for (None: the sweep's zero default). Only
    the named kind of feature is removed: every other input stays as given."""
    if name == "zeros":
        return None
    if name in ("mean", "blur"):
        images = {k: v for k, v in inputs.items() if v.is_floating_point() and v.dim() == 4}
        if not images:
            raise ValueError(f'reference "{name}" is for image inputs [B, C, H, W]')
        fill = channel_mean if name == "mean" else blurred
        return {**inputs, **{k: fill(v) for k, v in images.items()}}
    if name == "mask":
        return {**inputs, "input_ids": masked_ids(inputs, tokenizer)}
    raise ValueError(f"reference must be inputs or one of {REFERENCE_NAMES}, got {name!r}")


def channel_mean(images: Tensor) -> Tensor:
    """Each image's mean over its pixels, per channel, at every pixel."""
    return images.mean(dim=(-2, -1), keepdim=True).expand_as(images).clone()


def blurred(images: Tensor, sigma: float | None = None) -> Tensor:
    """Separable Gaussian blur of the last two dimensions, with reflected borders, kernel
    radius 3 sigma (at most the image's side less one); sigma defaults to a quarter of the
    larger side."""
    height, width = images.shape[-2:]
    sigma = sigma if sigma is not None else max(height, width) / 4
    radius = min(int(3 * sigma), min(height, width) - 1)
    t = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    flat = images.reshape(-1, 1, height, width)
    padded = F.pad(flat, (radius,) * 4, mode="reflect")
    rows = F.conv2d(padded, k.view(1, 1, 1, -1))
    return F.conv2d(rows, k.view(1, 1, -1, 1)).reshape(images.shape)


def masked_ids(inputs: dict[str, Tensor], tokenizer: Any) -> Tensor:
    """``input_ids`` with every token but the special ones ([CLS], [SEP], padding...)
    replaced by the mask token, or by the unknown token where there is no mask token."""
    ids = inputs.get("input_ids")
    if ids is None:
        raise ValueError('reference "mask" is for token inputs (input_ids)')
    if tokenizer is None:
        raise ValueError('reference "mask" needs the tokenizer (run_task(tokenizer=...))')
    fill = tokenizer.mask_token_id
    fill = tokenizer.unk_token_id if fill is None else fill
    if fill is None:
        raise ValueError('reference "mask": the tokenizer has neither a mask nor an unknown token')
    special = torch.isin(ids, torch.tensor(tokenizer.all_special_ids, device=ids.device))
    return torch.where(special, ids, torch.full_like(ids, fill))
