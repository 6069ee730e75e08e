"""Which family covers an op (the registry, built once at import) and which of its methods a
mode runs (the composites, one table per mode)."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..tasks import MODES
from .attention import Attention, Softmax
from .base import Family, Rule
from .dense import (
    AddMM,
    BAddBMM,
    Bilinear,
    Conv,
    Convolution,
    Einsum,
    GroupedMM,
    Linear,
    Product,
)
from .elementwise import (
    Add,
    AddCMul,
    Copy,
    Extremum,
    IdArithmetic,
    Identity,
    MaskedFill,
    Mul,
    Where,
)
from .normalisation import BatchNorm, GroupNorm, LayerNorm, RMSNorm
from .pooling import Fold, Interpolation, MaxPool, PositiveMap, Prod, ScatterReduce, Share
from .recurrent import LSTM
from .shape import (
    Adjoint,
    Cat,
    Embedding,
    EmbeddingBag,
    MaskedScatter,
    OneHot,
    Pad,
    Permute,
    Reshape,
    Scatter,
    Split,
    Stack,
    TopK,
    Transpose,
)

FAMILIES: tuple[Family, ...] = (
    Linear(),
    AddMM(),
    BAddBMM(),
    Conv(),
    Convolution(),
    Product(),
    Einsum(),
    Bilinear(),
    Add(),
    Mul(),
    Where(),
    MaskedFill(),
    Identity(),
    IdArithmetic(),
    Copy(),
    Extremum(),
    AddCMul(),
    BatchNorm(),
    LayerNorm(),
    RMSNorm(),
    GroupNorm(),
    Attention(),
    Softmax(),
    MaxPool(),
    PositiveMap(),
    Interpolation(),
    Fold(),
    Share(),
    Prod(),
    ScatterReduce(),
    Reshape(),
    Permute(),
    Transpose(),
    Adjoint(),
    Cat(),
    Stack(),
    Scatter(),
    MaskedScatter(),
    TopK(),
    Split(),
    Pad(),
    Embedding(),
    EmbeddingBag(),
    OneHot(),
    LSTM(),
)

# op overload -> the family that covers it
REGISTRY: Mapping[Any, Family] = {op: family for family in FAMILIES for op in family.ops}

# Ops that exist only once torch or transformers registered them, by qualified name: the
# grouped matmuls mixture-of-experts layers run their experts with.
GROUPED_MM = GroupedMM()
_BY_NAME: Mapping[str, Family] = {
    "aten::_grouped_mm": GROUPED_MM,
    "transformers::grouped_mm_fallback": GROUPED_MM,
}


def family_of(target: Any) -> Family | None:
    """The family of rules for the op ``target``, None when no rule covers it."""
    family = REGISTRY.get(target)
    if family is None and isinstance(target, torch._ops.OpOverload):
        family = _BY_NAME.get(target.name())
        if family is None and _unary_pointwise(target):
            family = ACTIVATIONS
    return family


# Elementwise functions of one tensor not listed by a family (log1p, tan, erfc, lgamma,
# logit, sinc, nan_to_num, the special functions): activations, as relevance-engine.md has
# every elementwise activation (the nonlinearity is not evidence), found by torch's own
# ``pointwise`` tag rather than listed one by one. Rounding, signs and comparisons never
# reach a rule: their outputs are constants (``provenance.CONSTANT_OPS``) or not floating.
ACTIVATIONS = REGISTRY[torch.ops.aten.relu.default]


def _tensor_type(t: Any) -> bool:
    """A Tensor or a Tensor? argument (clamp's bounds may be tensors too)."""
    if isinstance(t, torch.OptionalType):
        t = t.getElementType()
    return isinstance(t, torch.TensorType)


@functools.cache
def _unary_pointwise(op: torch._ops.OpOverload) -> bool:
    """Whether ``op`` is an elementwise function of exactly one tensor, its first argument
    (an activation hands R to the first: ``2 ** x``'s tensor is its second), with one output
    and no argument it writes to."""
    schema, args = op._schema, op._schema.arguments
    tensors = [a for a in args if _tensor_type(a.type)]
    first = bool(args) and isinstance(args[0].type, torch.TensorType)
    one = len(tensors) == 1 and len(schema.returns) == 1 and not schema.is_mutable
    return torch.Tag.pointwise in op.tags and first and one


def grouped_mm_ops() -> tuple[Any, ...]:
    """The grouped matmul overloads present (transformers registers its fallback on import):
    rows sorted by expert, ``offs`` = cumulative rows per expert."""
    try:
        import transformers.integrations.moe  # noqa: F401 - registers the custom op
    except ImportError:
        return ()
    ops = [getattr(torch.ops.aten, "_grouped_mm", None)]
    ops.append(getattr(getattr(torch.ops, "transformers", None), "grouped_mm_fallback", None))
    return tuple(op.default for op in ops if op is not None and hasattr(op, "default"))


@dataclass(frozen=True)
class Composite:
    """A mode, as a table: the family method that runs each op (``method``, unless
    ``overrides`` names another method of the op's family for that op)."""

    method: str
    overrides: Mapping[Any, str] = field(default_factory=dict)

    def rule(self, family: Family, target: Any) -> Rule:
        return getattr(family, self.overrides.get(target, self.method))


COMPOSITES: Mapping[str, Composite] = {mode: Composite(mode) for mode in MODES}


def rule_for(target: Any, mode: str) -> Rule | None:
    """The rule that runs the op ``target`` in ``mode``; None when no family covers it."""
    family = family_of(target)
    return None if family is None else COMPOSITES[mode].rule(family, target)
