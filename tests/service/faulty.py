"""A registry model whose forward always raises: the service must end its jobs failed with
this message (loaded through the registry's ``python`` source kind, like operators' code)."""

from __future__ import annotations

import torch

from engine.tasks import TaskName
from service.models import LoadedModel

MESSAGE = "faulty-model: this model always raises"


class Faulty(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(MESSAGE)


def build() -> LoadedModel:
    return LoadedModel(
        "faulty", TaskName.TABULAR_CLASSIFICATION, Faulty().eval(), labels=["a", "b"]
    )
