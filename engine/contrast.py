"""Mode "contrast": why the target and not its alternative, as a seed.

The explained quantity is the logit difference d = z_t - z_a between the target t and its
alternative a: by default the runner-up (``contrast_with="runner-up"``), a named class (an
index, or a label the model's ``config.label2id`` knows), or ``"rest"``, the other classes'
logits averaged with their softmax weights (z_a = sum_c q_c z_c, q_c = p_c / (1 - p_t)), as
in contrastive LRP (Gu et al. 2018) and softmax-gradient LRP (Iwana et al. 2019).

``contrast_seed`` turns a seed (one entry per explained logit, value v = +-multiplier) into
entries on the target and on its alternatives whose values are relevance *per unit of their
logit* (in double precision): +v / |d| on the target, -v / |d| (times q_c for "rest") on
the alternatives. The sweep places value * logit on each entry, so an explained entry's seed
adds up to v * d / |d| = +-multiplier, as in the other modes (the seed is the logit
difference, scaled to the multiplier: relevance is a share of the difference, in the units
of the other modes): positive toward the target, negative toward the alternative, and
swapping the two flips every sign. A target below its alternative (d < 0, a ``target`` or
``contrast_with`` the caller named) has the seed -multiplier, as mode "reference" negates
a fall.

Relevance is taken against a reference input (``reference=``, as in mode "reference": zeros
by default, or a name of ``engine.references``), as DeepLIFT does: where the output is a
linear layer, the seed head splits d exactly (``rules.LinearRows.contrast``) into the
contributions of the change from the reference, (x_j - x'_j) (w_tj - w_aj), and the
reference's own difference d' (with the bias difference), a sink; on any other output, each
logit into its change and its reference value. Below the head the families run their
``reference`` rules (difference rules: linear in R, so signs and sums are kept, and nothing
cancels into sinks), as the difference of the target's and the alternative's explanations in
mode "reference". So the inputs explain d - d', the part of the preference the reference
input does not already have: all of d where the reference tells the classes apart no more
than a removed input does. Chosen by ``bench.faithfulness`` over the |z| rules below the
head (which scored 11.9 against Integrated Gradients' 23.9 on the digits' difference, and
0.33 against 0.67 on MiniLM's): from the removal baseline it is ahead of every peer on both
digits tasks and MiniLM, and within noise of Integrated Gradients on the lookup LM, whose
side depends on which training run of it is scored (+0.11 +- 0.06 paired over four builds;
bench/README.md). On the target's own logit it ranks below mode "default" on the lookup LM,
as Integrated Gradients of the same difference does: evidence that raises the target and its
alternative alike cancels here by definition. A single logit is already a difference (of the
positive and the negative class): it is its own contrast, as is each label's logit of a
multi-label classifier (present against absent; its labels are not alternatives), and so is
the one value per sample of a model that returns [B] (a regression, a squeezed logit).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .sweep import Seed

RUNNER_UP = "runner-up"
REST = "rest"


def contrast_seed(seed: Seed, logits: Tensor, contrast_with: Any, own: bool = False) -> Seed:
    """``seed`` (entries [K, E] on ``logits``' last axis) with each entry's alternatives
    appended and every value made relevance per unit of its logit (see the module). ``own``:
    each logit is its own contrast (the labels of a multi-label classifier)."""
    index, value = seed.index.to(logits.device), seed.value.to(logits.device)
    if index.shape[-1] == 1:  # logits [B], one value per sample (a squeezed logit): no classes
        return Seed(index, _per_unit(value, logits.detach()[index[..., 0]].double()))
    prefix, target = index[..., :-1], index[..., -1]
    rows = logits.detach()[tuple(prefix.unbind(-1))].double()  # [K, E, C]
    z_t = rows.gather(-1, target[..., None])[..., 0]
    classes = rows.shape[-1]
    if classes == 1 or own:
        return Seed(index, _per_unit(value, z_t))
    if contrast_with == REST:
        p = rows.softmax(-1).scatter(-1, target[..., None], 0.0)
        q = p / p.sum(-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)
        d = z_t - (q * rows).sum(-1)
        units = torch.arange(classes, device=index.device).expand(*target.shape, classes)
        alt_index = torch.cat([prefix[..., None, :].expand(*prefix.shape[:2], classes, -1),
                               units[..., None]], -1).flatten(1, 2)  # fmt: skip
        per_unit = _per_unit(value, d)
        alt_value = -(per_unit[..., None] * q).flatten(1)
    else:
        alt = _alternative(rows, target, contrast_with)
        d = z_t - rows.gather(-1, alt[..., None])[..., 0]
        per_unit = _per_unit(value, d)
        alt_index, alt_value = torch.cat([prefix, alt[..., None]], -1), -per_unit
    return Seed(torch.cat([index, alt_index], 1), torch.cat([per_unit, alt_value], 1))


def _alternative(rows: Tensor, target: Tensor, contrast_with: Any) -> Tensor:
    """The alternative class per entry: the runner-up, or the one class named."""
    if contrast_with == RUNNER_UP:
        return rows.scatter(-1, target[..., None], -torch.inf).argmax(-1)
    classes = rows.shape[-1]
    if not 0 <= contrast_with < classes:
        raise ValueError(f"contrast_with={contrast_with} is not a class index in [0, {classes})")
    if (target == contrast_with).any():
        raise ValueError(
            f"contrast_with={contrast_with} is the explained class itself (the target, or the "
            "prediction where no target is given): contrast it with another class, runner-up "
            "or rest"
        )
    return torch.full_like(target, contrast_with)


def _per_unit(value: Tensor, d: Tensor) -> Tensor:
    """value / |d| in double precision (the seed adds up to +-value even where the logits are
    far larger than their difference); 0 at an exact tie, where there is nothing to tell
    apart. No floor on |d|: a model's logits may all be 1e-9 (random weights), and the
    explanation does not depend on their scale."""
    d = d.double()
    return torch.where(d == 0, 0.0, value.double() / d.abs().clamp_min(torch.finfo(d.dtype).tiny))


def class_index(contrast_with: Any, model: Any) -> Any:
    """``contrast_with`` with a label replaced by its index (the model's ``config.label2id``)."""
    if not isinstance(contrast_with, str) or contrast_with in (RUNNER_UP, REST):
        return contrast_with
    label2id = getattr(getattr(model, "config", None), "label2id", None) or {}
    if not label2id:
        raise ValueError(
            f"contrast_with={contrast_with!r}: this model has no labels (no config.label2id); "
            "give a class index, 'runner-up' or 'rest'"
        )
    if contrast_with not in label2id:
        raise ValueError(
            f"contrast_with={contrast_with!r} is not a label of this model "
            f"(labels: {sorted(label2id)}); give a class index, 'runner-up' or 'rest'"
        )
    return int(label2id[contrast_with])
