"""Inputs checked before any work, against the captured graph's input signature.

A wrong input otherwise surfaces as a raw torch error deep in a forward or an export (``a and b
must have same reduction dim``, ``index out of range in self``), or worse as NaN relevance.
Here every check names the argument, what the graph expects and what it received.

Also here: the forms accepted where tensors are (numpy arrays, nested lists, text with a
tokenizer), converted once, and the inputs a graph does not take dropped when they only select
constant embeddings (``token_type_ids`` left at the model's default, zeros).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import SymInt, Tensor, fx

from .capture import size_expr
from .provenance import ID_PATH_OPS, LOOKUPS, bind
from .rules.shape import EmbeddingBag

aten = torch.ops.aten

# Inputs that only select constant embeddings: their zeros are the model's own default.
CONSTANT_ID_INPUTS = ("token_type_ids",)


def as_tensors(inputs: Any, tokenizer: Any = None, name: str = "inputs") -> Any:
    """``inputs`` with numpy arrays and (nested) lists of numbers as tensors, and text (a string
    or a list of strings) tokenized with padding; tensors, tuples and mappings keep their form.
    ``None`` is a ``TypeError`` naming ``name``."""
    if inputs is None:
        raise TypeError(f"{name} is None: pass a tensor, a tuple of tensors or a dict of tensors")
    if _is_text(inputs):
        if tokenizer is None:
            raise TypeError(f"{name} is text: pass tokenizer= to turn it into token ids")
        return dict(tokenizer(inputs, return_tensors="pt", padding=True))
    if isinstance(inputs, Mapping):
        return {k: _tensor(v, f"{name}[{k!r}]") for k, v in inputs.items()}
    if isinstance(inputs, tuple):
        return tuple(_tensor(v, f"{name}[{i}]") for i, v in enumerate(inputs))
    return _tensor(inputs, name)


def _is_text(inputs: Any) -> bool:
    return isinstance(inputs, str) or (
        isinstance(inputs, list) and bool(inputs) and all(isinstance(s, str) for s in inputs)
    )


def _tensor(value: Any, name: str) -> Any:
    if value is None or isinstance(value, Tensor):
        return value
    if isinstance(value, np.ndarray | list | int | float | np.generic):
        try:  # an array keeps its dtype; Python numbers take torch's defaults (float32, int64)
            return torch.as_tensor(value) if isinstance(value, np.ndarray) else torch.tensor(value)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{name}: cannot make a tensor of it ({exc})") from exc
    raise TypeError(f"{name}: expected a tensor, numpy array or list, got {type(value).__name__}")


def check_values(inputs: Mapping[str, Tensor]) -> None:
    """No empty input, and no NaN or inf in a floating-point one (count and first position)."""
    for name, value in inputs.items():
        if value.numel() == 0:
            raise ValueError(f"{name} is empty (shape {tuple(value.shape)})")
        if value.is_floating_point():
            bad = ~torch.isfinite(value)
            count = int(bad.sum())
            if count:
                first = tuple(int(i) for i in bad.nonzero()[0])
                raise ValueError(
                    f"{name} holds {count} NaN or inf value(s), the first at position {first}"
                )


def drop_constant_ids(inputs: dict[str, Tensor], taken: list[str]) -> dict[str, Tensor]:
    """Without the constant-id inputs the graph does not take and that hold the model's
    default (zeros): a tokenizer's ``token_type_ids`` then needs no second graph."""
    return {
        k: v
        for k, v in inputs.items()
        if k in taken or k not in CONSTANT_ID_INPUTS or bool(v.any())
    }


def check_signature(inputs: dict[str, Tensor], nodes: list[fx.Node], names: list[str]) -> dict:
    """Each input against the graph's placeholder of its name: rank and dtype, and the static
    dimensions no other graph could change (channels, features). Integer inputs of another
    integer dtype are cast to the graph's. Returns the inputs, cast."""
    placeholders = {
        n.name: n.meta["val"] for n in nodes if n.op == "placeholder" and n.name in names
    }
    out = {}
    for name, value in inputs.items():
        meta = placeholders.get(name)
        if meta is None:
            out[name] = value
            continue
        want = _shape(meta)
        if meta.dim() != value.dim():
            raise ValueError(
                f"{name}: expected {meta.dim()} dimensions {want}, got shape {tuple(value.shape)}"
            )
        out[name] = _dtype(name, value, meta.dtype)
        fixed = _fixed_axis(meta)
        if fixed is not None and meta.shape[fixed] != value.shape[fixed]:
            raise ValueError(
                f"{name}: expected shape {want} (dimension {fixed} is {meta.shape[fixed]}), "
                f"got {tuple(value.shape)}"
            )
    return out


def _shape(meta: Tensor) -> str:
    dims = ["B" if i == 0 else str(s) for i, s in enumerate(meta.shape)]
    dims = [d if not d.startswith("s") else "*" for d in dims]  # dynamic: any size
    return "[" + ", ".join(dims) + "]"


def _fixed_axis(meta: Tensor) -> int | None:
    """The axis that says what a floating-point input is (image channels, feature width):
    static in the graph, and a model takes no other size there."""
    if not meta.is_floating_point() or meta.dim() < 2:
        return None
    axis = 1 if meta.dim() >= 4 else meta.dim() - 1
    return axis if not isinstance(meta.shape[axis], SymInt) else None


def _dtype(name: str, value: Tensor, want: torch.dtype) -> Tensor:
    if value.dtype == want:
        return value
    if not want.is_floating_point and not value.is_floating_point():
        return value.to(want)  # int32 ids or a bool mask: the same values
    if not want.is_floating_point and bool(((value == 0) | (value == 1)).all()):
        return value.to(want)  # a float mask of 0. and 1. (numpy's default): the same values
    if want.is_floating_point and value.dtype == torch.uint8 and value.dim() >= 3:
        raise TypeError(
            f"{name}: got a uint8 image, the model takes {want}: convert it to float "
            "(e.g. x.float() / 255, then the model's normalisation)"
        )
    if want.is_floating_point and value.is_floating_point():
        raise TypeError(
            f"{name}: the model takes {want}, got {value.dtype}: convert it (x.to({want}))"
        )
    kind = "integer ids" if not want.is_floating_point else "floating-point values"
    raise TypeError(f"{name}: expected {kind} ({want}), got {value.dtype}")


def check_shared_sizes(
    inputs: Mapping[str, Tensor], nodes: list[fx.Node], names: list[str]
) -> None:
    """Inputs agree where the graph has one size for them: each dimension the graph names by
    a shared symbol (the batch, the sequence of ids and their mask). A mask one token short,
    or of another batch, otherwise fails deep in an attention op, or broadcasts into a wrong
    answer. Export may give each input's batch a symbol of its own, so dimension 0 is the
    batch, unless its symbol is another input's later dimension (positions [T] beside x
    [B, T, F]: the sequence)."""
    placeholders = {n.name: n.meta["val"] for n in nodes if n.op == "placeholder"}
    later = {
        _symbol(size) for meta in placeholders.values() if isinstance(meta, Tensor)
        for size in meta.shape[1:]
    }  # fmt: skip
    seen: dict[Any, tuple[str, int, int]] = {}
    for name, value in inputs.items():
        meta = placeholders.get(name) if name in names else None
        if meta is None or meta.dim() != value.dim():
            continue
        for axis, size in enumerate(meta.shape):
            symbol = _symbol(size)
            if symbol is None:
                continue
            batch = axis == 0 and symbol not in later
            key = "batch" if batch else symbol
            other = seen.setdefault(key, (name, axis, value.shape[axis]))
            if other[2] != value.shape[axis]:
                what = "batch size" if batch else "size"
                raise ValueError(
                    f"{name}: shape {tuple(value.shape)} does not match {other[0]}: the graph "
                    f"takes one {what} for {other[0]} (dimension {other[1]}: {other[2]}) and "
                    f"{name} (dimension {axis}: {value.shape[axis]})"
                )


def _symbol(size: Any) -> Any:
    """A dimension's symbol, None for a fixed size (export writes some as a SymInt of a
    number: positions [T] beside x [B, T, F] with T fixed)."""
    if not isinstance(size, SymInt) or size.node.expr.is_number:
        return None
    return size.node.expr


def check_input_dtypes(captured: Any, name: str = "input_for_graph") -> None:
    """Each floating-point input has the dtype of the parameters it first meets. Export does
    not check dtypes (a float64 example into a float32 model captures), and every later run
    would fail with torch's ``mat1 and mat2 must have the same dtype``; numpy arrays are
    float64, so this is the usual way to get there."""
    for node in captured.nodes:
        if node.op != "placeholder" or node.name not in captured.input_names:
            continue
        val = node.meta.get("val")
        if not isinstance(val, Tensor) or not val.is_floating_point():
            continue
        want = _parameter_dtype(node, captured.constants)
        if want is not None and want != val.dtype:
            raise TypeError(
                f"{name}: {node.name} is {val.dtype}, the model's parameters are {want}: "
                f"convert it (x.to({want})) or the model (model.to({val.dtype}))"
            )


def _parameter_dtype(start: fx.Node, constants: Mapping[str, Tensor]) -> torch.dtype | None:
    """The dtype of the floating-point parameter of the first op that takes ``start``'s value
    together with one, followed through the ops that keep its dtype (a cast is the model's
    own choice: not followed)."""
    frontier, seen = [start], {start}
    dtype = start.meta["val"].dtype
    while frontier:
        for user in frontier.pop(0).users:
            if user in seen:
                continue
            seen.add(user)
            found = _parameters_of(user, constants)
            if found is not None:
                return found
            val = user.meta.get("val")
            if isinstance(val, Tensor) and val.dtype == dtype:
                frontier.append(user)
    return None


def _parameters_of(node: fx.Node, constants: Mapping[str, Tensor]) -> torch.dtype | None:
    """The dtype of a floating-point parameter among ``node``'s arguments."""
    for arg in node.all_input_nodes:
        value = constants.get(arg.name)
        if isinstance(value, Tensor) and value.is_floating_point() and value.dim() > 0:
            return value.dtype
    return None


def check_ids(inputs: Mapping[str, Tensor], nodes: list[fx.Node], constants: dict) -> None:
    """Ids that index an embedding table lie in [0, rows of the table)."""
    for name, rows in _table_rows(nodes, constants).items():
        ids = inputs.get(name)
        if ids is None:
            continue
        bad = (ids < 0) | (ids >= rows)
        count = int(bad.sum())
        if count:
            first = tuple(int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"{name}: ids must lie in [0, {rows}) (the rows of the table they index); {count} "
                f"do not, the first {int(ids[first])} at position {first}"
            )


def _table_rows(nodes: list[fx.Node], constants: dict) -> dict[str, int]:
    """For each integer input that an embedding (an embedding bag, a one-hot code) looks up:
    the smallest table's rows."""
    rows: dict[str, int] = {}
    for node in nodes:
        val = node.meta.get("val")
        if node.op != "placeholder" or not isinstance(val, Tensor) or val.is_floating_point():
            continue
        for lookup in _lookups_by(node):
            count = _rows_looked_up(lookup, constants)
            if count is not None:
                rows[node.name] = min(rows.get(node.name, count), count)
    return rows


def _lookups_by(ids: fx.Node) -> Iterator[fx.Node]:
    """The lookups that index a table with ``ids``, or with ids computed from them
    (``provenance.ID_PATH_OPS``)."""
    frontier, seen = [ids], set()
    while frontier:
        current = frontier.pop()
        for user in current.users:
            if user in seen:
                continue
            seen.add(user)
            if user.target in LOOKUPS and bind(user)[LOOKUPS[user.target]] is current:
                yield user
            elif user.target in ID_PATH_OPS:
                frontier.append(user)


def _rows_looked_up(node: fx.Node, constants: dict) -> int | None:
    """The rows of the table that the lookup ``node`` indexes (a one-hot's: its classes),
    None where that table is not known."""
    bound = bind(node)
    if node.target is aten.one_hot.default:
        classes = bound["num_classes"]
        return classes if isinstance(classes, int) and classes > 0 else None
    table = constants.get(bound["weight"].name)
    return None if table is None else table.shape[0]


def check_bag_ids(captured: Any) -> None:
    """Ids that an embedding bag takes flat, one dimension of N ids cut into B bags by
    offsets (the form nn.EmbeddingBag's documentation leads with), are refused saying how to
    pass them: the engine explains each sample on inputs whose first dimension is the batch,
    and flat ids have none (each input was taken for a batch: 'the graph takes one batch
    size for text (dimension 0: 7) and offsets (dimension 0: 2)'). Ids [B] looked up one
    per bag are each a sample's, and pass."""
    for node in captured.nodes:
        val = node.meta.get("val")
        if node.op != "placeholder" or node.name not in captured.input_names:
            continue
        if not isinstance(val, Tensor) or val.dim() != 1 or val.is_floating_point():
            continue
        for lookup in _lookups_by(node):
            bags = lookup.meta["val"][0] if lookup.target in EmbeddingBag.ops else None
            if bags is not None and size_expr(bags.shape[0]) != size_expr(val.shape[0]):
                raise ValueError(
                    f"{node.name}: nn.EmbeddingBag takes these ids flat (one dimension, cut "
                    "into bags by offsets), and the engine explains each sample on inputs "
                    "whose first dimension is the batch: pass the ids as [B, L], one row per "
                    "bag (shorter bags padded with the bag's padding_idx, which it leaves out "
                    "of its sum, mean or max), and no offsets"
                )


def signature(nodes: list[fx.Node], names: list[str], constants: dict, output: fx.Node) -> dict:
    """What a captured graph takes and gives, in plain values (JSON), for a caller that checks
    inputs before they reach the engine (the service's API, which has no torch): for each
    input in ``names``, its dtype, its shape (None where any size goes), the axis that says
    what it is (``_fixed_axis``: channels, features; None if none) and, for ids, the rows of
    the table they index (None if none); and the shape of the explained ``output``."""
    rows = _table_rows(nodes, constants)
    inputs = {}
    for node in nodes:
        val = node.meta.get("val")
        if node.op == "placeholder" and node.name in names and isinstance(val, Tensor):
            inputs[node.name] = {
                "dtype": str(val.dtype).removeprefix("torch."),
                "shape": _static_sizes(val),
                "fixed_axis": _fixed_axis(val),
                "ids_below": rows.get(node.name),
            }
    out = output.meta.get("val")
    return {"inputs": inputs, "output": _static_sizes(out) if isinstance(out, Tensor) else None}


def _static_sizes(meta: Tensor) -> list[int | None]:
    """Each dimension's size where the graph fixes it, None where it takes any."""
    return [None if _symbol(s) is not None else int(s) for s in meta.shape]


def position_limit(model: torch.nn.Module) -> int | None:
    """Rows of the model's learned position table (config ``max_position_embeddings`` or
    ``n_positions`` where an embedding of that size exists): positions past it do not exist.
    Rotary models have no table and take longer sequences."""
    config = next((m.config for m in model.modules() if hasattr(m, "config")), None)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if not isinstance(limit, int):
        return None
    tokens = _token_table(model)  # a vocabulary of the same size is not a position table
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding) and module is not tokens:
            if module.num_embeddings == limit:
                return limit
    return None


def _token_table(model: torch.nn.Module) -> torch.nn.Module | None:
    """The model's token embedding, None where it has none to give: transformers raises
    NotImplementedError for models that hash characters into several tables (CANINE)."""
    get_tokens = getattr(model, "get_input_embeddings", None)
    try:
        return get_tokens() if callable(get_tokens) else None
    except NotImplementedError:
        return None


def check_length(model: torch.nn.Module, length: int, what: str) -> None:
    """``length`` positions fit the model's position table."""
    limit = position_limit(model)
    if limit is not None and length > limit:
        raise ValueError(f"{what} is {length} positions, the model's position table has {limit}")
