"""Capture a model once with ``torch.export`` and keep what the sweep needs.

The graph is exported non-strict with dynamic batch and sequence dimensions where the model
allows it (static if it must; by draft export past a data-dependent guard), then
functionalised (``run_decompositions({})``): in-place ops such as ``relu_`` or ``add_`` would
otherwise overwrite recorded activations, while high-level ops (linear, conv2d, layer_norm,
scaled_dot_product_attention, embedding, pooling) stay graph leaves, which is what rules are
written for.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import operator
import warnings
from collections.abc import Hashable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
from torch import SymInt, fx
from torch._decomp import decomposition_table
from torch.export import Dim, ExportedProgram
from torch.export.graph_signature import OutputKind
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from . import specialise
from .provenance import Provenance
from .rules import family_of

Inputs = torch.Tensor | tuple | list | Mapping[str, torch.Tensor]


class CaptureError(RuntimeError):
    """The model could not be exported; the message says why and what was tried."""


def placed(
    model: torch.nn.Module, device: str | torch.device | None
) -> tuple[torch.nn.Module, torch.device]:
    """The model to capture (``unwrapped``, in eval mode) on ``device``, and that device. By
    default (None) where its weights are (its first parameter's or buffer's device; the CPU
    for a model without either): a model on a GPU is explained there, not moved to the CPU."""
    model = unwrapped(model)
    if device is None:
        tensors = itertools.chain(model.parameters(), model.buffers())
        device = next((t.device for t in tensors if t.device.type != "meta"), "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was asked for but torch sees no CUDA device")
    return model.eval().to(device), device


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The module a wrapper runs unchanged: ``DataParallel``'s and DDP's ``module`` (they
    split the batch over devices and run it), ``torch.compile``'s original (compiled, the same
    function). Their own ``forward(*inputs)`` names no input, and export cannot trace the
    compiled one."""
    compiled = getattr(getattr(torch, "_dynamo", None), "eval_frame", None)
    compiled = getattr(compiled, "OptimizedModule", ())
    parallel = (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)
    while True:
        if isinstance(model, parallel):
            model = model.module
        elif compiled and isinstance(model, compiled):
            model = model._orig_mod
        else:
            return model


def bind_inputs(model: torch.nn.Module, inputs: Inputs) -> dict[str, torch.Tensor]:
    """Name every input after the forward argument it feeds.

    Capturing with keyword arguments makes the graph's placeholders carry those names
    (``x``, ``input_ids``), so ``relevance["input_ids"]`` needs no lookup table, and a tuple at
    capture time and a dict at run time (as in the reference examples) mean the same thing.
    """
    if isinstance(inputs, Mapping):
        return _model_inputs(model, dict(inputs))
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    params = [
        p.name
        for p in inspect.signature(model.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    main = getattr(model, "main_input_name", None)
    if main in params:
        # transformers models: a tuple means (input_ids, attention_mask, token_type_ids), as
        # in the reference examples, whatever the forward's order (GPT-2 puts the cache second)
        params = [n for n in (main, *_HF_ORDER) if n in params]
    if not params and _takes_var_positional(model):
        raise TypeError(
            f"{type(model).__name__}.forward(*args) names none of its inputs, and the engine "
            "names each input after its argument: wrap the model in a module whose forward "
            "names them (def forward(self, x): return model(x))"
        )
    if len(inputs) > len(params):
        raise TypeError(
            f"{type(model).__name__}.forward takes {len(params)} tensor inputs "
            f"({', '.join(params)}), got {len(inputs)}"
        )
    return dict(zip(params, inputs, strict=False))


def _takes_var_positional(model: torch.nn.Module) -> bool:
    parameters = inspect.signature(model.forward).parameters.values()
    return any(p.kind is p.VAR_POSITIONAL for p in parameters)


_HF_ORDER = ("attention_mask", "token_type_ids", "position_ids")


def _model_inputs(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> dict:
    """A transformers model's named inputs without those its forward has no argument for.

    A tokenizer's output carries more than the model takes (``special_tokens_mask``,
    ``offset_mapping``, ``length`` when asked for), and the whole output is what people pass.
    The model's ``**kwargs`` would swallow them in eager mode, but an exported graph takes
    them as inputs of its own and explains something else. They are left out, with a
    warning naming them. Other models keep every input: a ``forward(**batch)`` wrapper's
    inputs are all in its kwargs."""
    if getattr(model, "main_input_name", None) is None:
        return inputs
    params = inspect.signature(model.forward).parameters.values()
    named = [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if not named or not any(p.kind is p.VAR_KEYWORD for p in params):
        # no **kwargs: an unknown name fails in the forward, with Python's own message;
        # no named argument (a wrapper's ``*args, **kwargs``): nothing to tell them apart by
        return inputs
    extra = [k for k in inputs if k not in named]
    if extra:
        warnings.warn(
            f"inputs {extra} are not arguments of {type(model).__name__}.forward "
            f"(it takes {', '.join(named)}): left out",
            stacklevel=4,
        )
    return {k: v for k, v in inputs.items() if k in named}


@contextlib.contextmanager
def _without_kv_cache(model: torch.nn.Module) -> Iterator[None]:
    """Export transformers models with ``use_cache=False``: a cache object is not an output
    relevance can start from, and generation keeps its own KV-cached eager decode."""
    configs = [m.config for m in model.modules() if getattr(m, "config", None) is not None]
    saved = [getattr(c, "use_cache", None) for c in configs]
    for c in configs:
        if hasattr(c, "use_cache"):
            c.use_cache = False
    try:
        yield
    finally:
        for c, value in zip(configs, saved, strict=True):
            if value is not None:
                c.use_cache = value


@contextlib.contextmanager
def _grouped_experts(model: torch.nn.Module) -> Iterator[None]:
    """Export a transformers mixture of experts whose experts run ``eager`` with
    ``experts_implementation="grouped_mm"``, where the model can switch (its experts use
    transformers' experts interface). The eager path loops in Python over the experts that
    some token picked (``nonzero``): a loop as long as a data-dependent count, which export
    cannot trace and draft export would fix to the example's routing. The grouped path
    computes the same sums in one graph for any routing (OpenAI's privacy filter defaults to
    eager for its accumulation order; a user may load any MoE so)."""
    switch = getattr(model, "set_experts_implementation", None)
    saved = model.get_experts_implementation() if switch is not None else {}
    eager = {key: "grouped_mm" for key, impl in saved.items() if impl == "eager"}
    if not eager or not model._can_set_experts_implementation():
        yield
        return
    switch({**saved, **eager})
    try:
        yield
    finally:
        switch(saved)


def _dynamic_spec(example: dict[str, torch.Tensor]) -> dict[str, dict[int, object]]:
    """Batch is dynamic for every input; the second dimension of token-like (integer, 2-D)
    inputs is dynamic too. ``Dim.AUTO`` lets export keep a dimension static when the model
    needs it instead of failing. A batch of one (exported as given) stays static: export
    would specialise it anyway, with a warning."""
    spec: dict[str, dict[int, object]] = {}
    for name, t in example.items():
        dims: dict[int, object] = {0: Dim.AUTO} if t.dim() > 0 and t.shape[0] > 1 else {}
        if t.dim() == 2 and not t.is_floating_point():
            dims[1] = Dim.AUTO
        spec[name] = dims
    return spec


# How torch.export's run-time assertions (``aten._assert_scalar`` in the graph) fail.
FAILED_ASSERTION = "Runtime assertion failed for expression"


def _widen_batch(example: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Export specialises a dimension of size 1; capture with a batch of two so that one graph
    serves every batch size."""
    return {
        k: (v.repeat(2, *([1] * (v.dim() - 1))) if v.dim() > 0 and v.shape[0] == 1 else v)
        for k, v in example.items()
    }


# The inputs that hold the tokens a model reads, by the names transformers gives them: an
# encoder-decoder reads its source and its decoder's own tokens.
TOKEN_INPUTS = ("input_ids", "decoder_input_ids")


@dataclass
class Captured:
    """An exported graph plus the facts about it the forward pass and the sweep need."""

    program: ExportedProgram
    nodes: list[fx.Node]
    input_names: list[str]
    constants: dict[str, torch.Tensor]
    output: fx.Node
    batch_axis: dict[fx.Node, BatchAxis | None] = field(default_factory=dict)
    # the inputs a graph specialised to their values was captured for (``engine.specialise``)
    example: dict[str, torch.Tensor] | None = None

    @property
    def graph(self) -> fx.Graph:
        return self.program.graph

    @property
    def data_inputs(self) -> list[str]:
        """The inputs relevance is explained onto: floating-point inputs and the token ids
        (``input_ids`` and an encoder-decoder's ``decoder_input_ids``, else the first integer
        input). Other integer inputs (token type ids, position ids, masks) select or shape
        constants: their share is a sink, whatever the graph takes."""
        values = {n.name: n.meta["val"] for n in self.nodes if n.op == "placeholder"}
        ints = [n for n in self.input_names if not values[n].is_floating_point()]
        ids = [n for n in ints if n in TOKEN_INPUTS] or ints[:1]
        return [n for n in self.input_names if n in ids or values[n].is_floating_point()]

    def user_outputs(self) -> list[Any]:
        """What the model returns, in order, without the new values of the buffers and
        parameters its forward writes in place (export returns those first: an
        ``nn.Embedding(max_norm=...)`` renormalises its weight at each lookup, and that weight
        was taken for the logits)."""
        outputs = self.output.args[0]
        outputs = outputs if isinstance(outputs, list | tuple) else (outputs,)
        kinds = [spec.kind for spec in self.program.graph_signature.output_specs]
        return [o for o, kind in zip(outputs, kinds, strict=True) if kind == OutputKind.USER_OUTPUT]

    def float_outputs(self) -> list[fx.Node]:
        """The floating-point tensors the model returns, in order."""
        return [
            node
            for node in self.user_outputs()
            if isinstance(node, fx.Node)
            and isinstance(node.meta.get("val"), torch.Tensor)
            and node.meta["val"].is_floating_point()
        ]

    def explained_output(self) -> fx.Node:
        """The logits: the output under the key ``logits`` where the model returns a dict or
        a ``ModelOutput`` (a user's dict may put it after others), else the first
        floating-point tensor the model returns."""
        outputs = self.float_outputs()
        if not outputs:
            raise ValueError("the model returns no floating-point tensor to explain")
        named = self.output_named("logits")
        return named if named in outputs else outputs[0]

    def output_named(self, key: str) -> fx.Node | None:
        """The output returned under ``key`` at the top of a dict-like output (one tensor)."""
        spec = self.program.call_spec.out_spec
        keys = getattr(spec, "context", None)
        if spec is None or not isinstance(keys, list) or key not in keys:
            return None
        children = spec.children() if hasattr(spec, "children") else spec.children_specs
        at = keys.index(key)
        if children[at].num_leaves != 1:
            return None
        leaves = self.user_outputs()
        start = sum(child.num_leaves for child in children[:at])
        return leaves[start] if start < len(leaves) else None

    def sizes(self, inputs: Mapping[str, torch.Tensor]) -> dict[sympy.Symbol, int]:
        """Values of the shape symbols for these run-time inputs."""
        values = {}
        for node in self.nodes:
            if node.op == "placeholder" and node.name in inputs:
                for size, actual in zip(
                    node.meta["val"].shape, inputs[node.name].shape, strict=True
                ):
                    if isinstance(size, SymInt) and isinstance(size.node.expr, sympy.Symbol):
                        values[size.node.expr] = actual
        return values

    def accepts(self, inputs: Mapping[str, torch.Tensor]) -> bool:
        """Whether run-time inputs fit the captured shapes (static dims equal, dynamic dims
        within the exported upper bound). A dim asked dynamic that export specialised (the
        model loops over the sequence, say) is a SymInt of constant value: static too, so that
        another length is captured again instead of run through a graph of the example's."""
        if set(inputs) != set(self.input_names):
            return False
        if self.example is not None:
            return all(_equal(inputs[k], v) for k, v in self.example.items())
        placeholders = {n.name: n for n in self.nodes if n.op == "placeholder"}
        for name, value in inputs.items():
            meta = placeholders[name].meta["val"]
            if meta.dim() != value.dim() or meta.dtype != value.dtype:
                return False
            for size, actual in zip(meta.shape, value.shape, strict=True):
                expr = size_expr(size)
                if expr.is_number:  # static, or a dynamic dim export specialised (a SymInt
                    if int(expr) != actual:  # of constant value: RWKV's, Mamba's length)
                        return False
                    continue
                bound = self.program.range_constraints.get(expr)
                if bound is not None and bound.upper.is_Integer and actual > int(bound.upper):
                    return False
        return True


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b.to(a.device))


def capture(
    model: torch.nn.Module,
    example: dict[str, torch.Tensor],
    verbose: bool = False,
    specialised: bool = False,
    widen: bool = True,
) -> Captured:
    """Export ``model(**example)``: first with dynamic dims, then, if that fails, static;
    then, if they stopped at a data-dependent guard, by draft export, then specialised to
    the example's values (``_export``). ``specialised``: only the last (the model needed it
    for another input already: the others would fail again, at seconds each). ``widen``: a
    batch of one is exported as two (``_widen_batch``); False exports it as given (a graph
    of batch two failed one of its run-time assertions on it)."""
    first = _widen_batch(example) if widen else _fresh(example)
    attempts = [
        ("dynamic", first, _dynamic_spec(first)),
        # fresh tensors: a failed attempt may have marked the example's dims dynamic
        ("static", _fresh(example), None),
        ("draft", _fresh(example), None),
        ("specialised", _fresh(example), None),
    ]
    errors, data_dependent = [], specialised
    for label, args, spec in attempts[-1:] if specialised else attempts:
        if label in ("draft", "specialised") and not data_dependent:
            break
        try:
            with _without_kv_cache(model), _grouped_experts(model), torch.no_grad():
                with warnings.catch_warnings():
                    # nn.LSTM and nn.GRU reassign their _flat_weights in forward, which
                    # export reports as attributes that should be buffers: nothing a user
                    # of the engine can act on, and the graph is right
                    warnings.filterwarnings("ignore", message=r"The tensor attributes .*_flat_w")
                    program = _export(label, model, args, spec)
            program = program.run_decompositions(DECOMPOSITIONS)
            captured = with_rules(_wrap(program))
            if label == "specialised":
                captured.example = _fresh(args)
        except Exception as exc:  # noqa: BLE001 - export failures are reported below
            if not _export_failure(exc, model):
                raise
            data_dependent |= "data-dependent" in str(exc)
            errors.append(f"{label}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
            if verbose:
                print(f"[capture] {label} export failed: {errors[-1]}")
            continue
        if verbose:
            print(f"[capture] {label} export of {type(model).__name__} succeeded")
        return captured
    why = _uncapturable(model, example)
    advice = "".join(f"it {a}. " for a in sorted(why)) + ("torch.export said: " if why else "")
    raise CaptureError(
        f"torch.export could not capture {type(model).__name__}: {advice}" + " | ".join(errors)
    )


# What a model may do that torch.export cannot capture, with what to do instead: found in
# the eager run after every export failed, since export's own words name neither (a packed
# LSTM fails with "zeros(): argument 'size' ... got FakeTensor"). By ATen op, or by the
# torch function called and its arguments where the op decomposes before ATen sees it.
_PACKED = (
    "packs its sequences (torch.nn.utils.rnn.pack_padded_sequence, or pack_sequence, into an "
    "RNN, LSTM or GRU): a packed batch's shape depends on the values of the lengths, which "
    "torch.export cannot capture. Pass the padded batch [B, T, ...] to the recurrent layer "
    "instead and mask what lies past each sequence's length (the outputs times a mask made "
    "from the lengths; the final state gathered from the outputs at position length - 1)"
)
_ONE_HOT = (
    "one-hot encodes ids without num_classes (F.one_hot(ids)): the codes' width is the "
    "largest id plus one, a value torch.export cannot capture. Give the number of classes "
    "(F.one_hot(ids, num_classes))"
)
UNCAPTURABLE = {torch.ops.aten._pack_padded_sequence.default: _PACKED}


def _classes_inferred(args: tuple, kwargs: dict) -> bool:
    return (args[1] if len(args) > 1 else kwargs.get("num_classes", -1)) < 0


UNCAPTURABLE_CALLS = {torch.nn.functional.one_hot: (_classes_inferred, _ONE_HOT)}


class _OpsRun(TorchDispatchMode):
    """Records what an eager forward runs that ``UNCAPTURABLE`` lists."""

    def __init__(self) -> None:
        super().__init__()
        self.why: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if func in UNCAPTURABLE:
            self.why.add(UNCAPTURABLE[func])
        return func(*args, **(kwargs or {}))


class _CallsRun(TorchFunctionMode):
    """Records the calls of an eager forward that ``UNCAPTURABLE_CALLS`` lists."""

    def __init__(self) -> None:
        super().__init__()
        self.why: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        check = UNCAPTURABLE_CALLS.get(func) if isinstance(func, Hashable) else None
        if check is not None and check[0](args, kwargs):
            self.why.add(check[1])
        return func(*args, **kwargs)


def _uncapturable(model: torch.nn.Module, example: dict[str, torch.Tensor]) -> set[str]:
    """After every export failed: what the model's forward on the example does that export
    cannot capture, and whether it runs at all. If it does not, the inputs are what is wrong
    (a row of 5 features for a model of 4), and export's own words (``a and b must have same
    reduction dim``) would blame the capture."""
    positional, named = _by_position(model, _fresh(example))
    ops, calls = _OpsRun(), _CallsRun()
    try:
        with _without_kv_cache(model), torch.no_grad():
            try:
                with calls, ops:
                    model(*positional, **named)
            except Exception:  # noqa: BLE001 - the same forward unrecorded decides
                ops.why.clear()
                calls.why.clear()
                model(*positional, **named)
    except Exception as exc:  # noqa: BLE001 - any failure of the model's own forward
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in example.items())
        raise ValueError(
            f"the model does not run on inputs of shapes {shapes}: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:300]}"
        ) from exc
    return ops.why | calls.why


# ATen's other names for ops the rules know (torch.multiply is aten.multiply, not aten.mul):
# each is rewritten as its canonical op while the program is functionalised, so that one rule,
# and every check of an op by identity, covers both spellings. Overloads with the same name
# take the same arguments.
_ALIASES = {
    "multiply": "mul",
    "subtract": "sub",
    "divide": "div",
    "true_divide": "div",
    "clip": "clamp",
    "absolute": "abs",
    "negative": "neg",
    "arccos": "acos",
    "arcsin": "asin",
    "arctan": "atan",
    "arctan2": "atan2",
    "fix": "trunc",
    "concat": "cat",
}


def _alias_decompositions() -> dict:
    aten = torch.ops.aten
    table = {}
    for alias, canonical in _ALIASES.items():
        packet, target = getattr(aten, alias), getattr(aten, canonical)
        for overload in packet.overloads():
            if overload in target.overloads() and not overload.endswith("out"):
                table[getattr(packet, overload)] = getattr(target, overload)
    return table


DECOMPOSITIONS = _alias_decompositions()


def _cdist(x1: torch.Tensor, x2: torch.Tensor, p: float = 2.0, *_: object) -> torch.Tensor:
    """torch.cdist written as the norm of the differences (torch writes it as one kernel, or
    as matrix products of |x|^2 terms whose shares mean nothing): each pair's distance
    explained by its coordinates' differences, as a hand-written distance is (prototype
    and RBF classifiers, -cdist(features, prototypes))."""
    return torch.linalg.vector_norm(x1.unsqueeze(-2) - x2.unsqueeze(-3), ord=p, dim=-1)


# The engine's own decompositions, for ops torch's leave whole or in parts without rules.
OWN_DECOMPOSITIONS = {
    torch.ops.aten.cdist.default: _cdist,
    torch.ops.aten._cdist_forward.default: _cdist,
}


# Rounds of ``with_rules``: a composite's parts may be composites themselves (instance norm
# is a batch norm in training mode, which is a variance, an rsqrt and products).
_DECOMPOSE_ROUNDS = 4


def with_rules(captured: Captured) -> Captured:
    """``captured`` with each op on the relevance path that has no rule of its own decomposed
    by torch's decompositions (GLU, the shrinkages, GRU and RNN cells, pixel shuffle, instance
    norm, cosine similarity, conv3d and transposed convolutions, ...), round by round, until
    every such op has a rule or none is left that decomposes: the parts of a composite op
    usually have rules. Ops with a rule stay graph leaves. Where an op is left without a rule
    that the model did not call itself (a part of a composite: prims.prod from prod), the
    capture is left as it was, so that the refusal names the model's own ops."""
    original, export_table = captured, torch.export.default_decompositions()
    unruled = _unruled(captured)
    for _ in range(_DECOMPOSE_ROUNDS):
        table = {}
        for op in unruled:
            if op in OWN_DECOMPOSITIONS:  # where torch's leave an op without parts
                table[op] = OWN_DECOMPOSITIONS[op]
            elif op in export_table:  # core ATen's and the composites' own
                table[op] = export_table[op]
            elif op in decomposition_table:  # the others torch has
                table[op] = decomposition_table[op]
        if not table:
            break
        captured = _wrap(captured.program.run_decompositions(table))
        unruled = _unruled(captured)
    called = {n.target for n in original.nodes}
    return captured if unruled <= called else original


def _unruled(captured: Captured) -> set:
    """The ops without a rule on the relevance path of any floating-point output."""
    found = set()
    for output in captured.float_outputs():
        provenance = Provenance(captured.nodes, captured.data_inputs, output)
        found |= {
            n.target
            for n in provenance.visited
            if n.op == "call_function"
            and isinstance(n.target, torch._ops.OpOverload)
            and family_of(n.target) is None
        }
    return found


def _fresh(example: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in example.items()}


def _export(label: str, model: torch.nn.Module, args: dict, spec: dict | None) -> ExportedProgram:
    """One export attempt. ``draft``: a branch on a value computed from the inputs (a
    data-dependent guard: Longformer's "any global attention?") cannot be traced
    symbolically; draft export runs real tensors alongside, takes the example's branch and
    records the condition as a runtime assertion in the graph, so an input that would take
    the other branch raises ("Runtime assertion failed") instead of running the wrong one,
    and is captured for itself (``DLBacktrace._with_graph``).
    ``specialised``: where draft export fails too (a loop over ``nonzero``'s rows), the graph
    of the example's own values (``engine.specialise``)."""
    positional, named = _by_position(model, args)
    if label in ("dynamic", "static"):
        return torch.export.export(model, positional, named, dynamic_shapes=spec, strict=False)
    if label == "specialised":
        return _specialised(model, positional, named)
    program = torch.export.draft_export(model, positional, named)
    warnings.warn(
        f"{type(model).__name__}: captured by draft export, with its data-dependent branches "
        "fixed to the example's; inputs that take another branch are captured again",
        stacklevel=4,
    )
    return program


def _specialised(model: torch.nn.Module, positional: tuple, named: dict) -> ExportedProgram:
    answers, eager = specialise.record(model, positional, named)
    with specialise.replaying(answers):
        program = torch.export.export(model, positional, named, strict=False)
    if not specialise.same_outputs(eager, program, positional, named):
        raise CaptureError("the graph specialised to the example's values is not its forward")
    warnings.warn(
        f"{type(model).__name__}: captured for the example's values (its forward counts or "
        "branches on them); other inputs are captured again",
        stacklevel=5,
    )
    return program


def _by_position(model: torch.nn.Module, args: dict) -> tuple[tuple, dict]:
    """The inputs as the model's callers pass them. By keyword, as a tokenizer's dict is
    passed; but a model with forward pre-hooks gets its leading inputs by position, as
    ``model(x)`` passes them: a pre-hook sees only positional arguments, and one that reads
    or rewrites ``inputs[0]`` fails on (or is skipped by) a call by keyword."""
    if not model._forward_pre_hooks:
        return (), args
    lead = []
    for p in inspect.signature(model.forward).parameters.values():
        if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) or p.name not in args:
            break
        lead.append(p.name)
    return tuple(args[n] for n in lead), {k: v for k, v in args.items() if k not in lead}


# Where the exceptions of a failed export come from: torch's tracer and the libraries it
# calls, and Python itself (the model's code raising TypeError, IndexError, ...).
_EXPORT_PACKAGES = {"builtins", "torch", "transformers", "sympy", "functorch"}


def _export_failure(exc: Exception, model: torch.nn.Module) -> bool:
    """Whether ``exc`` says the export failed (so the next attempt may succeed) rather than
    something of the caller's environment: a job timeout raised from a signal handler, an
    interrupt, memory. Decided by the package of the exception's class: torch and the
    libraries it calls, Python's built-in exceptions (except timeouts and memory), or a package
    the model's own modules come from."""
    if isinstance(exc, TimeoutError | MemoryError):
        return False
    if isinstance(exc, CaptureError):  # an attempt's own check
        return True
    packages = _EXPORT_PACKAGES | {type(m).__module__.split(".")[0] for m in model.modules()}
    return type(exc).__module__.split(".")[0] in packages


def _wrap(program: ExportedProgram) -> Captured:
    sig = program.graph_signature
    state = {**program.state_dict, **program.constants}
    lifted = {
        **sig.inputs_to_parameters,
        **sig.inputs_to_buffers,
        **sig.inputs_to_lifted_tensor_constants,
    }
    constants = {placeholder: state[target] for placeholder, target in lifted.items()}
    nodes = list(program.graph.nodes)
    output = nodes[-1]
    captured = Captured(
        program=program,
        nodes=nodes,
        input_names=list(sig.user_inputs),
        constants=constants,
        output=output,
    )
    captured.batch_axis = _batch_axes(captured)
    return captured


def _batch_axes(captured: Captured) -> dict[fx.Node, BatchAxis | None]:
    """Where the batch lives in each node's value, read from the symbolic shapes.

    The conservation report is per sample, so every sink must be summed per sample. The
    symbol export gave the inputs' first dimension marks the batch axis exactly. Reshapes may
    fold batch and other dimensions into one axis, with the batch outside ([B*T, E] from
    [B, T, E]) or inside ([T*B, E] from [T, B, E]): along such an axis the sample of index i
    is (i // inner) % B, with ``inner`` derived from the reshape's input shape.
    """
    symbols = set()
    for node in captured.nodes:
        if node.op == "placeholder" and node.name in captured.input_names:
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor) and val.dim() and isinstance(val.shape[0], SymInt):
                symbols |= val.shape[0].node.expr.free_symbols
    axes: dict[fx.Node, BatchAxis | None] = {}
    for node in captured.nodes:
        val = node.meta.get("val")
        if isinstance(val, list | tuple) and val and isinstance(val[0], torch.Tensor):
            val = val[0]
        axes[node] = None
        if not isinstance(val, torch.Tensor):
            continue
        for axis, size in enumerate(val.shape):
            if isinstance(size, SymInt) and size.node.expr.free_symbols & symbols:
                axes[node] = BatchAxis(axis, _inner(node, axis, axes))
                break
    return axes


@dataclass(frozen=True)
class BatchAxis:
    axis: int
    inner: sympy.Expr | int = 1


def size_expr(size: int | SymInt) -> sympy.Expr:
    """A tensor dimension as a sympy expression: its symbol's, or the integer."""
    return size.node.expr if isinstance(size, SymInt) else sympy.Integer(size)


def _inner(node: fx.Node, axis: int, axes: dict) -> sympy.Expr | int:
    """``inner`` of a folded batch axis, following the reshape that folded it."""
    val = node.meta["val"]
    out = val[0] if isinstance(val, list | tuple) else val
    out_shape = out.shape
    size = size_expr(out_shape[axis])
    if not isinstance(size, sympy.Mul):
        return 1
    for arg in node.all_input_nodes:
        known = axes.get(arg)
        val = arg.meta.get("val")
        if isinstance(val, list | tuple) and val:  # a multi-output op (topk): the output taken
            val = val[node.args[1] if node.target is operator.getitem else 0]
        if known is None or not isinstance(val, torch.Tensor):
            continue
        if val.dim() > known.axis and size_expr(val.shape[known.axis]) == size:
            return known.inner  # same folded axis passed through (linear, elementwise)
        if val.numel() == out.numel():  # a reshape: count strides
            after_in = sympy.Mul(*[size_expr(s) for s in val.shape[known.axis + 1 :]])
            after_out = sympy.Mul(*[size_expr(s) for s in out_shape[axis + 1 :]])
            return sympy.simplify(after_in * known.inner / after_out)
    return 1
