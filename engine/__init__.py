"""Layer-wise relevance for PyTorch models: the DLBacktrace API, computed by one vectorised
rule sweep over a ``torch.export`` graph. Usable without the service.

The torch-backed names are imported on first use (PEP 562), so that ``engine.tasks`` (the
task table, which the torch-free API process reads) can be imported without torch."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .allocator import tune_allocator
    from .backtrace import DLBacktrace
    from .capture import CaptureError
    from .provenance import UnsupportedOpError
    from .sweep import Explanation, Seed

__version__ = "0.1.0"
_LAZY = {
    "DLBacktrace": ".backtrace",
    "CaptureError": ".capture",
    "Explanation": ".sweep",
    "Seed": ".sweep",
    "UnsupportedOpError": ".provenance",
    "tune_allocator": ".allocator",
}
__all__ = [
    "CaptureError",
    "DLBacktrace",
    "Explanation",
    "Seed",
    "UnsupportedOpError",
    "tune_allocator",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value
