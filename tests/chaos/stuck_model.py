"""A registry model (``python`` source kind) for the stuck-worker tests: its forward returns
at once for a first feature up to 10, sleeps ``SLOW_S`` in Python for one up to 100, and for
a larger one never returns from native code that no signal reaches (RQ's job timeout is a
SIGALRM that Python handles between bytecodes), as a hung driver call or a deadlocked
extension would."""

from __future__ import annotations

import ctypes
import signal
import time

import torch

from engine.tasks import TaskName
from service.models import LoadedModel

SLOW_S = 3.0


class Stuck(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = float(x[0, 0])
        if first > 100:
            signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
            ctypes.CDLL(None).pause()  # no handler runs on this thread: never returns
        elif first > 10:
            time.sleep(SLOW_S)
        return self.linear(x)


def build() -> LoadedModel:
    return LoadedModel("stuck", TaskName.TABULAR_CLASSIFICATION, Stuck().eval(), labels=["a", "b"])
