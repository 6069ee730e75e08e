"""Capture a model once with ``torch.export`` and keep what the sweep needs.

The graph is exported non-strict with dynamic batch and sequence dimensions where the model allows
it, then functionalised (``run_decompositions({})``): in-place ops such as ``relu_`` or ``add_``
would otherwise overwrite recorded activations, while high-level ops (linear, conv2d, layer_norm,
scaled_dot_product_attention, embedding, pooling) stay graph leaves, which is what rules are
written for.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import fx
from torch.export import Dim, ExportedProgram

Inputs = torch.Tensor | tuple | list | Mapping[str, torch.Tensor]


class CaptureError(RuntimeError):
    """The model could not be exported; the message says why and what was tried."""


def bind_inputs(model: torch.nn.Module, inputs: Inputs) -> dict[str, torch.Tensor]:
    """Name every input after the forward argument it feeds.

    Capturing with keyword arguments makes the graph's placeholders carry those names
    (``x``, ``input_ids``), so ``relevance["input_ids"]`` needs no lookup table, and a tuple at
    capture time and a dict at run time (as in the reference examples) mean the same thing.
    """
    if isinstance(inputs, Mapping):
        return dict(inputs)
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    params = [
        p
        for p in inspect.signature(model.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if len(inputs) > len(params):
        raise TypeError(
            f"{type(model).__name__}.forward takes {len(params)} positional inputs, "
            f"got {len(inputs)}"
        )
    return {p.name: t for p, t in zip(params, inputs, strict=False)}


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


def _dynamic_spec(example: dict[str, torch.Tensor]) -> dict[str, dict[int, object]]:
    """Batch is dynamic for every input; the second dimension of token-like (integer, 2-D)
    inputs is dynamic too. ``Dim.AUTO`` lets export keep a dimension static when the model
    needs it instead of failing."""
    spec: dict[str, dict[int, object]] = {}
    for name, t in example.items():
        dims: dict[int, object] = {0: Dim.AUTO} if t.dim() > 0 else {}
        if t.dim() == 2 and not t.is_floating_point():
            dims[1] = Dim.AUTO
        spec[name] = dims
    return spec


def _widen_batch(example: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Export specialises a dimension of size 1; capture with a batch of two so that one graph
    serves every batch size."""
    return {
        k: (v.repeat(2, *([1] * (v.dim() - 1))) if v.dim() > 0 and v.shape[0] == 1 else v)
        for k, v in example.items()
    }


@dataclass
class Captured:
    """An exported graph plus the facts about it the forward pass and the sweep need."""

    program: ExportedProgram
    nodes: list[fx.Node]
    input_names: list[str]
    constants: dict[str, torch.Tensor]
    output: fx.Node
    batch_axis: dict[fx.Node, int | None] = field(default_factory=dict)

    @property
    def graph(self) -> fx.Graph:
        return self.program.graph

    def accepts(self, inputs: Mapping[str, torch.Tensor]) -> bool:
        """Whether run-time inputs fit the captured shapes (static dims equal, dynamic dims
        within the exported upper bound)."""
        if set(inputs) != set(self.input_names):
            return False
        placeholders = {n.name: n for n in self.nodes if n.op == "placeholder"}
        for name, value in inputs.items():
            meta = placeholders[name].meta["val"]
            if meta.dim() != value.dim() or meta.dtype != value.dtype:
                return False
            for size, actual in zip(meta.shape, value.shape, strict=True):
                if isinstance(size, int):
                    if size != actual:
                        return False
                    continue
                bound = self.program.range_constraints.get(size.node.expr)
                if bound is not None and bound.upper.is_Integer and actual > int(bound.upper):
                    return False
        return True


def capture(
    model: torch.nn.Module, example: dict[str, torch.Tensor], verbose: bool = False
) -> Captured:
    """Export ``model(**example)``: first with dynamic dims, then, if that fails, static."""
    attempts = [
        ("dynamic", _widen_batch(example), _dynamic_spec(example)),
        ("static", example, None),
    ]
    errors = []
    for label, args, spec in attempts:
        try:
            with _without_kv_cache(model), torch.no_grad():
                program = torch.export.export(model, (), args, dynamic_shapes=spec, strict=False)
            program = program.run_decompositions({})
        except Exception as exc:  # noqa: BLE001 - every failure is reported below
            errors.append(f"{label}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
            if verbose:
                print(f"[capture] {label} export failed: {errors[-1]}")
            continue
        if verbose:
            print(f"[capture] {label} export of {type(model).__name__} succeeded")
        return _wrap(program)
    raise CaptureError(
        f"torch.export could not capture {type(model).__name__}: " + " | ".join(errors)
    )


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


def _batch_axes(captured: Captured) -> dict[fx.Node, int | None]:
    """Which axis of each node's value is the batch, read from the symbolic shapes.

    The conservation report is per sample, so every sink must be summed per sample; the symbol
    export gave the inputs' first dimension identifies that axis exactly, even after reshapes
    that fold batch and sequence into one dimension (the axis whose size mentions the symbol).
    """
    symbols = set()
    for node in captured.nodes:
        if node.op == "placeholder" and node.name in captured.input_names:
            val = node.meta.get("val")
            if (
                isinstance(val, torch.Tensor)
                and val.dim() > 0
                and isinstance(val.shape[0], torch.SymInt)
            ):
                symbols |= val.shape[0].node.expr.free_symbols
    axes: dict[fx.Node, int | None] = {}
    for node in captured.nodes:
        val = node.meta.get("val")
        axes[node] = None
        if not isinstance(val, torch.Tensor):
            continue
        for axis, size in enumerate(val.shape):
            if isinstance(size, torch.SymInt) and size.node.expr.free_symbols & symbols:
                axes[node] = axis
                break
    return axes
