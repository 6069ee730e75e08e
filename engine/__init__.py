"""Layer-wise relevance for PyTorch models: the DLBacktrace API, computed by one vectorised
rule sweep over a ``torch.export`` graph. Usable without the service."""

from .allocator import tune_allocator
from .backtrace import DLBacktrace
from .capture import CaptureError
from .provenance import UnsupportedOpError
from .sweep import Explanation, Seed

__version__ = "0.1.0"
__all__ = [
    "DLBacktrace",
    "CaptureError",
    "Explanation",
    "Seed",
    "UnsupportedOpError",
    "tune_allocator",
]
