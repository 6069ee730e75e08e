"""What a sweep starts from and what it gives: ``Seed`` (K seeds on the explained output)
and ``Explanation`` (the relevance of one sweep, with the record it ran on). Both are
re-exported by ``engine.sweep``, which runs the sweeps."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, fx

from .capture import Captured
from .recording import NodeIO


@dataclass
class Seed:
    """K seeds on the explained output: seed k puts ``value[k, e]`` at ``output[index[k, e]]``
    (in mode "contrast", ``value[k, e]`` times the output there: ``engine.contrast``).

    Entries are sparse so that a seed on a [B, T, V] language-model output never becomes a
    dense tensor of that size.
    """

    index: Tensor  # [K, E, output.ndim], long
    value: Tensor  # [K, E]

    @property
    def K(self) -> int:
        return self.index.shape[0]

    def gather(self, output: Tensor) -> Tensor:
        """The output's values at the seed's entries [K, E]."""
        return output[tuple(self.index.to(output.device).unbind(-1))]

    def dense(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> Tensor:
        R = torch.zeros(self.K, *shape, dtype=dtype, device=device)
        k = torch.arange(self.K, device=device)[:, None].expand_as(self.value)
        R.index_put_(
            (k, *self.index.to(device).unbind(-1)), self.value.to(device, dtype), accumulate=True
        )
        return R


@dataclass
class Explanation:
    """Relevance of one sweep. Tensors have a leading seed axis K."""

    relevance: dict[str, Tensor]
    seed: Tensor  # [K, B] seed value per sample
    inputs: Tensor  # [K, B] relevance that reached the inputs
    sinks: Tensor  # [K, B] relevance left in biases, constants and cancelled shares
    outputs: tuple
    env: dict[fx.Node, Any] = field(repr=False, default_factory=dict)
    fused: dict[fx.Node, dict[str, Any]] = field(repr=False, default_factory=dict)
    captured: Captured | None = field(repr=False, default=None)  # the graph that ran
    lean: bool = False  # the forward kept only what the rules read, freed during the sweep

    def node_io(self) -> NodeIO:
        """The public ``node_io`` form: recorded inputs and output of every op. Not for a
        lean explanation (``DLBacktrace.explain(..., retain=...)``): most op values were
        never kept or were freed by the sweep, and a partial ``node_io`` would pass for a
        whole one."""
        if self.lean:
            raise RuntimeError(
                "node_io is not kept by a lean explanation (explain(..., retain=...)): "
                "explain without retain to read every op's values"
            )
        return NodeIO(self.captured, self.env, self.fused)
