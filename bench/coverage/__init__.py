"""Architecture coverage of the engine: tiny random instances of every transformers auto-mapping
architecture and every torchvision classifier, captured, run, and checked for forward equality
and conservation (``python -m bench.coverage``)."""
