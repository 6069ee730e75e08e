"""Capture specialised to the example's values, for models whose forward counts or branches
on values computed from the inputs where draft export fails as well.

A mixture of experts that loops in Python over the experts some token picked
(``for e in mask.nonzero()``: DBRX, LongCat-Flash), or an attention that gathers its global
tokens with ``nonzero`` and branches on ``any()`` (Longformer), needs a count or a truth value
of the data before it can go on: torch.export gives it an unbacked symbol and stops at the
first guard on it. Here the model first runs eagerly on the example while each such call
records what it gave, keyed by the model's line that made it (and its rank among that line's
calls); then export runs with those calls answering from the record: ``nonzero`` and
one-argument ``where`` as ``nonzero_static`` of the recorded count (the indices stay computed
in the graph, only their number is fixed), ``item``, ``bool``, ``int``, ``float`` and
``tolist`` as the recorded Python values (the branch the example took). A call the eager run
did not make (export's own ``item`` of an index tensor) runs as it is.

The graph is right for the example's values only: ``Captured.example`` holds them, and other
inputs are captured again (``Captured.accepts``). The capture is checked against the eager
output before it is used.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections import Counter, defaultdict
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_TORCH = os.path.dirname(torch.__file__)
_VALUES = frozenset(
    (
        torch.Tensor.item,
        torch.Tensor.__bool__,
        torch.Tensor.__int__,
        torch.Tensor.__float__,
        torch.Tensor.tolist,
    )
)
_NONZERO = frozenset((torch.nonzero, torch.Tensor.nonzero, torch.argwhere, torch.Tensor.argwhere))

Site = tuple[str, str, int]


class _Record(TorchFunctionMode):
    """Record (``replay=False``) or answer (``replay=True``) the data-dependent calls."""

    def __init__(self, answers: dict[Site, list] | None = None):
        super().__init__()
        self.replay = answers is not None
        self.answers: dict[Site, list] = defaultdict(list, answers or {})
        self.seen: Counter = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = _kind(func, args, kwargs)
        if kind is None:
            return func(*args, **kwargs)
        site = (kind, *_caller())
        if not self.replay:
            out = func(*args, **kwargs)
            self.answers[site].append(_count(args, kwargs) if kind != "value" else out)
            return out
        rank, known = self.seen[site], self.answers.get(site, [])
        self.seen[site] += 1
        if rank >= len(known):  # a call of export's own: as it is
            return func(*args, **kwargs)
        if kind == "value":
            return known[rank]
        return _static_nonzero(args, kwargs, known[rank], as_tuple=kind == "tuple")


def _kind(func: Any, args: tuple, kwargs: dict) -> str | None:
    """ "value" (a Python value of a tensor), "index" or "tuple" (``nonzero``'s two layouts),
    or None (any other call)."""
    if func in _VALUES:
        return "value"
    if func is torch.where and len(args) + len(kwargs) == 1:
        return "tuple"
    if func in _NONZERO:
        return "tuple" if kwargs.get("as_tuple") else "index"
    return None


def _count(args: tuple, kwargs: dict) -> int:
    tensor = args[0] if args else next(iter(kwargs.values()))
    return int(torch.count_nonzero(tensor))


def _static_nonzero(args: tuple, kwargs: dict, count: int, as_tuple: bool) -> Any:
    tensor = args[0] if args else next(iter(kwargs.values()))
    found = torch.nonzero_static(tensor, size=count)
    return tuple(found.unbind(1)) if as_tuple else found


def _caller() -> tuple[str, int]:
    """The innermost frame outside torch and this module: the model's line."""
    frame = sys._getframe(2)
    while frame is not None and (
        frame.f_code.co_filename.startswith(_TORCH) or frame.f_code.co_filename == __file__
    ):
        frame = frame.f_back
    return (frame.f_code.co_filename, frame.f_lineno) if frame is not None else ("", 0)


def record(model: torch.nn.Module, positional: tuple, named: dict) -> tuple[dict, Any]:
    """The data-dependent calls of ``model(*positional, **named)`` and its output."""
    with _Record() as recorder:
        out = model(*positional, **named)
    return dict(recorder.answers), out


@contextlib.contextmanager
def replaying(answers: dict) -> Iterator[None]:
    """Data-dependent calls answered from ``answers`` (``record``'s) while this is open."""
    with _Record(answers):
        yield


def same_outputs(eager: Any, program: torch.export.ExportedProgram, positional, named) -> bool:
    """Whether the captured program gives the eager outputs on the example (a recorded answer
    taken by the wrong call would show here)."""
    got = torch.utils._pytree.tree_leaves(program.module()(*positional, **named))
    want = torch.utils._pytree.tree_leaves(eager)
    got = [t for t in got if isinstance(t, torch.Tensor)]
    want = [t for t in want if isinstance(t, torch.Tensor)]
    return len(got) == len(want) and all(
        a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5, equal_nan=True)
        for a, b in zip(got, want, strict=True)
    )
