"""Relevance rules, as op families with one method per mode.

Each module holds one family of ops (``dense``: linear, addmm, convolutions, grouped expert
matmuls, matmul and einsum products; ``elementwise``; ``normalisation``; ``attention``;
``pooling``, with interpolation and reductions; ``shape``; ``recurrent``: the LSTM).
A family is a small class (``base.Family``) listing its ops, with one
method per mode: ``default``, ``contrast``, ``reference``. All of them are built from one
mechanism in ``base``: the |z| proportional propagation (``proportional``; in ``dense``, the
same written over a weighted map's forward and adjoint) and the difference rule, with ``Ctx``
holding what a rule sees of a node.

Mode ``"default"`` is the |z| rule of Backtrace: contributions ``|x_k w_jk|`` share ``R_j`` in
proportion, ``|b_j|`` takes the rest. Mode ``"contrast"`` explains a logit difference
(``engine.contrast``): its seed is signed, the seed head (``LinearRows.contrast``) splits
the difference exactly, and below it the families run their ``reference`` rules, from the
same reference input (``Family.contrast``). Mode ``"reference"`` explains the
change from a reference input (``ctx.ref``), as DeepLIFT's rescale rule does: a map linear in
``x`` shares ``R_j`` by the contributions of the difference over their sum ``y_j - y'_j``
(the bias cancels); a product of two data operands splits exactly; activations pass relevance
on. Relevance is signed; what a stabilised denominator withholds is the sink.

A mode is a table (``registry.Composite``) that picks each family's method, as Zennit's
composites pick rules: a new mode is one method per family that needs one plus one entry in
``COMPOSITES``; an alternative rule for one op is one method on its family plus one
``overrides`` entry. The registry (op -> family) is built once at import and never changes;
graph facts the rules need (folded batch norms, a relu after a linear map, hand-written RMS
norms, routing, ids replaced where a condition on them holds) come from ``engine.canonize``
through ``Ctx.facts``.
"""

from ..tasks import MODES
from .attention import attention_scores, attention_weights
from .base import EPS, TINY, Canonical, Ctx, Family, Propagation, Rule, passes_through, stable
from .dense import LinearRows
from .normalisation import batch_norm_affine
from .registry import (
    COMPOSITES,
    FAMILIES,
    GROUPED_MM,
    Composite,
    family_of,
    grouped_mm_ops,
    rule_for,
)
from .shape import Reshape

# Ops that only rearrange elements (``provenance`` follows ids through them).
RESHAPE_OPS = Reshape.ops

__all__ = [
    "COMPOSITES",
    "EPS",
    "FAMILIES",
    "GROUPED_MM",
    "MODES",
    "RESHAPE_OPS",
    "TINY",
    "Canonical",
    "Composite",
    "Ctx",
    "Family",
    "LinearRows",
    "Propagation",
    "Rule",
    "attention_scores",
    "attention_weights",
    "batch_norm_affine",
    "family_of",
    "grouped_mm_ops",
    "passes_through",
    "rule_for",
    "stable",
]
