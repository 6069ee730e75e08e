"""Perturbation curves and their areas.

For one sample with n features and a relevance score per feature, MoRF removes the most relevant
features first and LeRF the least relevant first. Point s of a curve (s = 0 .. S) is the target's
logit after removing the first round(s / S * n) features of that order, so curves of samples with
different feature counts share one axis: the fraction removed. Ties (many methods give exactly 0
to a background pixel) are broken by one seeded random order shared by all methods, so no method
gains from the input's layout.

AOPC(MoRF) = mean_s (f_0 - f_MoRF(s)), the average drop of the logit (Samek et al., 2017), and
ABPC = mean_s (f_LeRF(s) - f_MoRF(s)): the area between the curves, higher is better. Both are
computed per sample; the report gives their mean and standard error over samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .tasks import Task


@dataclass
class Curves:
    """Per-sample curves [N, S + 1] of one method on one task."""

    morf: Tensor
    lerf: Tensor

    @property
    def abpc(self) -> Tensor:
        """ABPC per sample [N]."""
        return (self.lerf - self.morf).mean(1)

    def summary(self) -> dict[str, float | list[float]]:
        aopc = (self.morf[:, :1] - self.morf).mean(1)
        return {
            "aopc_morf": _mean(aopc),
            "aopc_morf_se": _se(aopc),
            "abpc": _mean(self.abpc),
            "abpc_se": _se(self.abpc),
            "morf_curve": [round(v, 5) for v in self.morf.mean(0).tolist()],
            "lerf_curve": [round(v, 5) for v in self.lerf.mean(0).tolist()],
        }


def paired(a: Tensor, b: Tensor) -> dict[str, float]:
    """Mean and standard error of the per-sample difference a - b (same samples, same
    tie-breaks): far tighter than comparing two means, whose spread is mostly the samples'."""
    return {"diff": _mean(a - b), "diff_se": _se(a - b)}


def _mean(t: Tensor) -> float:
    return float(t.double().mean())


def _se(t: Tensor) -> float:
    return float(t.double().std() / math.sqrt(t.numel()))


def ranks(relevance: Tensor, features: Tensor, tiebreak: Tensor) -> Tensor:
    """Rank of each feature, 0 = most relevant [N, F]; absent features rank last.

    ``tiebreak`` is a random permutation of the F slots per sample: sorting it first and then
    stable-sorting by relevance orders tied features randomly, the same way for every method."""
    rel = relevance.float().masked_fill(~features, float("-inf"))
    shuffled = rel.gather(1, tiebreak)
    order = tiebreak.gather(1, shuffled.argsort(dim=1, descending=True, stable=True))
    return order.argsort(dim=1)


def curves(task: Task, relevance: Tensor, tiebreak: Tensor, batch: int = 512) -> Curves:
    """MoRF and LeRF curves of per-feature ``relevance`` [N, F] on ``task``."""
    counts = task.features.sum(1)
    rank = ranks(relevance, task.features, tiebreak)
    # LeRF order: the same ranking reversed among the sample's own features
    rank_lerf = torch.where(task.features, counts[:, None] - 1 - rank, rank)
    return Curves(_curve(task, rank, counts, batch), _curve(task, rank_lerf, counts, batch))


def _curve(task: Task, rank: Tensor, counts: Tensor, batch: int) -> Tensor:
    points = []
    for s in range(task.steps + 1):
        removed = torch.round(counts.double() * s / task.steps).long()
        drop = (rank < removed[:, None]) & task.features
        points.append(_scores(task, drop, batch))
    return torch.stack(points, 1)


def _scores(task: Task, drop: Tensor, batch: int) -> Tensor:
    out = []
    for i in range(0, task.n, batch):
        part = slice(i, i + batch)
        inputs = task.remove(task.subset(part), drop[part])
        out.append(task.score(inputs, task.target[part]))
    return torch.cat(out)
