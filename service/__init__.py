"""The backtrace service: a FastAPI front end, RQ workers running ``engine``, traces in Redis.

Nothing imported by the API process (``service.api`` and what it imports) may import torch;
the worker side (``service.jobs``, ``service.models``, ``service.demo``) does.
"""

__version__ = "0.1.0"
