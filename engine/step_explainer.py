"""Explains the tokens of one decode with the captured graph: where each emitted token's seed
sits, and how a sweep's relevance and layer outputs become a step's trace entry.

Where the LM takes positions and the graph does not (the graph the caller captured from ids and
mask), each row is shifted left for the explanation forward so that its first real token sits
at position 0 and its padding at the end (``Layout``): with causal attention, trailing padding
influences nothing before it, and a graph that builds positions with ``arange`` then sees the
positions the decode used. Relevance and layer outputs are shifted back (per node, along the
batch and sequence axes read from the exported symbolic shapes, ``Axes``), so
``relevance_trace[i]["input_ids"]`` lines up with ``generated_ids`` and padding positions hold
zeros. Elsewhere the rows stay as decoded: a graph that takes ``position_ids`` gets the
decode's (``engine.generation`` captures one where moving the padding does not replay the
decode), and an LM whose forward takes no positions numbered the padding in the decode too.
The mask moves with the ids: an all-ones mask over padding kept in place would let it into
the state of a recurrent model.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .lm_runner import position_ids_from_mask
from .params import RelevanceParams
from .sweep import Explanation, Seed


class Explained(NamedTuple):
    """One explained step: the sweep that explained it and the index of the step's seed."""

    exp: Explanation
    seed: int


@dataclass
class Layout:
    """Where each row's prompt starts: the explanation forward shifts rows left by ``shift``
    (zero where the padding stays in place); ``prompt_mask`` [B, P] is the decode's mask."""

    prompt_len: int
    shift: Tensor  # [B] left-padding length of each row
    prompt_mask: Tensor

    def compact(self, sequence: Tensor) -> tuple[Tensor, Tensor]:
        """Token ids and mask with each row shifted left by ``shift``: the decode's mask (the
        prompt's, then ones) moved with the ids, zeros where the shift empties positions. A
        row kept in place keeps its padding masked, as the decode ran it."""
        batch, length = sequence.shape
        j = torch.arange(length, device=sequence.device)[None] + self.shift[:, None]
        valid = j < length
        j = j.clamp(max=length - 1)
        ids = sequence.gather(1, j).masked_fill(~valid, 0)
        decoded = torch.nn.functional.pad(self.prompt_mask, (0, length - self.prompt_len), value=1)
        return ids, decoded.long().gather(1, j).masked_fill(~valid, 0)

    def position(self, step: int) -> Tensor:
        """[B] compact position whose logits chose the token of ``step``."""
        return self.prompt_len + step - 1 - self.shift


class StepExplainer:
    """Explains emitted tokens of one decode with ``captured``, a graph of ``dlb``.

    ``expert_ops``: the grouped matmul ops mixture-of-experts layers run their experts with;
    their nodes get per-expert relevance totals (``expert_relevance``)."""

    def __init__(
        self,
        dlb: Any,
        captured: Any,
        layout: Layout,
        relevance: RelevanceParams,
        expert_ops: Sequence[Any],
    ):
        self.dlb, self.captured, self.layout, self.relevance = dlb, captured, layout, relevance
        self.nodes = relevance.relevance_nodes
        names = captured.input_names
        self.token_input = "input_ids" if "input_ids" in names else names[0]
        unknown = set(names) - {self.token_input, "attention_mask", "position_ids"}
        if unknown:
            raise ValueError(
                f"the captured graph takes inputs {sorted(unknown)} that generation cannot fill;"
                " capture the model with input_ids (and attention_mask) only"
            )
        self.axes = node_axes(captured, self.token_input)
        self.expert_ops = tuple(expert_ops)
        self.expert_nodes = self._experts(captured)
        self.keep_values = False  # every sweep's recorded forward, for layer outputs

    def graph_inputs(self, sequence: Tensor) -> dict[str, Tensor]:
        ids, mask = self.layout.compact(sequence)
        given = {self.token_input: ids, "attention_mask": mask}
        given["position_ids"] = position_ids_from_mask(mask)
        return {k: v for k, v in given.items() if k in self.captured.input_names}

    def explain(
        self, sequence: Tensor, steps: list[int], tokens: Tensor, active: Tensor
    ) -> Explanation:
        """One forward over ``sequence`` (a prefix of the final one) and one sweep, seed k on the
        token emitted at ``steps[k]``. ``tokens`` / ``active`` are [B, N] over all steps."""
        batch = sequence.shape[0]
        rows = torch.arange(batch, device=sequence.device)
        index = torch.stack(
            [
                torch.stack([rows, self.layout.position(s), tokens[:, s]], -1)
                for s in steps  # K is small; each entry is a [B, 3] index
            ]
        )
        value = torch.stack([active[:, s].float() * self.relevance.multiplier for s in steps])
        inputs = self.graph_inputs(sequence)
        # the graph that runs this prefix: another than ``captured`` where the model made its
        # length static (a state-space layer's scan), so its own offsets are the ones kept
        graph = self.dlb.graph_for(inputs) if self.expert_nodes else None
        return self.dlb.explain(
            inputs, Seed(index, value), self.relevance.mode, self._kept(graph),
            contrast_with=self.relevance.contrast_with,
            retain=None if self.keep_values else self._offsets(graph),
        )  # fmt: skip

    def _kept(self, graph: Any) -> str | list[str]:
        """The sweep's ``relevance_nodes``: those asked for, or with "inputs" and experts the
        inputs of ``graph``'s own grouped matmuls (``_hidden``) as well."""
        hidden = self._hidden(graph)
        return sorted(hidden) if hidden else self.nodes

    def _hidden(self, graph: Any) -> set[str]:
        """Nodes kept only for per-expert totals, not for the trace: the inputs of ``graph``'s
        grouped matmuls where only the inputs were asked for (a graph captured again for a
        static length names its nodes anew, so they are found per graph)."""
        if graph is None or not self.expert_nodes or self.nodes != "inputs":
            return set()
        return {n.args[0].name for n in self._experts(graph)}

    def _experts(self, captured: Any) -> list:
        """The grouped matmuls of a graph of the model."""
        return [n for n in captured.nodes if n.target in self.expert_ops]

    def _offsets(self, captured: Any) -> set:
        """The values per-expert totals read after the sweep (grouped matmuls' ``offs``)."""
        if captured is None:
            return set()
        return {_offs(n) for n in self._experts(captured)}

    def release(self, exp: Explanation) -> None:
        """Drop a finished sweep's recorded forward and outputs (its logits already checked),
        keeping its relevance and the values per-expert totals read: a generation of many
        sweeps then holds one recorded forward at a time, as ``engine.memory`` assumes.
        Nothing is dropped when layer outputs are asked for (``keep_values``)."""
        if self.keep_values:
            return
        exp.env = {n: exp.env[n] for n in self._offsets(exp.captured) if n in exp.env}
        exp.outputs = ()

    def trace(self, e: Explained, step: int) -> dict[str, Tensor]:
        """Relevance of the step's seed as the trace entry of ``step``: over the prompt and the
        tokens before the emitted one ([B, prompt_len + step] for the token ids), and for other
        kept nodes cut to the same positions along their sequence axes."""
        length, scaler = self.layout.prompt_len + step, self.relevance.scaler
        hidden = self._hidden(e.exp.captured)
        return {
            name: _visible(rel[e.seed], self.axes.get(name), self.layout, length) * scaler
            for name, rel in e.exp.relevance.items()
            if name not in hidden
        }

    def conservation(self, e: Explained) -> dict[str, Tensor]:
        """The step's seed and where its relevance went: the inputs, and sinks (per row)."""
        exp, k, scaler = e.exp, e.seed, self.relevance.scaler
        return {
            "seed": exp.seed[k] * scaler,
            "inputs": exp.inputs[k] * scaler,
            "sinks": exp.sinks[k] * scaler,
        }

    def expert_relevance(self, e: Explained) -> dict[str, Tensor]:
        """Relevance that passed through each expert, per grouped matmul: {node: [experts]}.

        The rows entering a grouped matmul are (token, expert) pairs sorted by expert, and
        ``offs`` ends each expert's block, so the relevance of those rows summed per block is
        what each expert carried (summed over the batch and tokens)."""
        out = {}
        for node in self._experts(e.exp.captured):
            rel = e.exp.relevance.get(node.args[0].name)
            if rel is None:
                continue
            offs = e.exp.env[_offs(node)]
            rows = rel[e.seed].reshape(rel.shape[1], -1).sum(-1)
            expert = torch.searchsorted(offs, torch.arange(rows.shape[0], device=offs.device),
                                        right=True)  # fmt: skip
            totals = torch.zeros(offs.shape[0], dtype=rows.dtype, device=rows.device)
            out[node.name] = totals.index_add_(0, expert, rows) * self.relevance.scaler
        return out

    def layer_outputs(self, e: Explained, step: int) -> dict[str, Tensor]:
        """Every op's output as step ``step`` saw it (positions it could see, left padded)."""
        length = self.layout.prompt_len + step
        return {
            node.name: _visible(value, self.axes.get(node.name), self.layout, length)
            for node, value in e.exp.env.items()
            if node.op == "call_function" and isinstance(value, Tensor)
        }


@dataclass(frozen=True)
class Axes:
    """Where a node's value keeps the batch and the sequence positions (None / empty: not as
    a whole axis, e.g. folded into [B*T, H])."""

    batch: int | None
    seq: tuple[int, ...]


def node_axes(captured: Any, token_input: str) -> dict[str, Axes]:
    """Batch and sequence axes of every node, read from the exported symbolic shapes: an axis
    whose size is exactly the batch (or sequence) symbol of the token ids. Attention scores
    [B, H, T, T] get two sequence axes; a folded [B*T, H] axis gets none."""

    def expr(size):
        return size.node.expr if isinstance(size, torch.SymInt) else None

    inputs = [n for n in captured.nodes if n.op == "placeholder" and n.name in captured.input_names]
    t_sym = expr(next(n for n in inputs if n.name == token_input).meta["val"].shape[1])
    # Export may give each input its own batch symbol (they are never compared).
    b_syms = {expr(n.meta["val"].shape[0]) for n in inputs if n.meta["val"].dim() > 0} - {None}
    axes = {token_input: Axes(0, (1,))}
    if t_sym is None:
        return axes
    for node in captured.nodes:
        val = node.meta.get("val")
        if not isinstance(val, Tensor) or node.name in axes:
            continue
        exprs = [expr(s) for s in val.shape]
        seq = tuple(i for i, e in enumerate(exprs) if e == t_sym)
        if seq:
            batch = next((i for i, e in enumerate(exprs) if e in b_syms), None)
            axes[node.name] = Axes(batch, seq)
    return axes


def _visible(t: Tensor, axes: Axes | None, layout: Layout, length: int) -> Tensor:
    """A node value (or its relevance) as step ``length - prompt_len`` saw it: the first
    ``length`` positions, shifted back to the left-padded layout of ``generated_ids`` (zeros
    at padding). Without a sequence axis the value is returned as is."""
    if axes is None:
        return t
    for axis in axes.seq:
        t = t.narrow(axis, 0, min(length, t.shape[axis]))
    if axes.batch is None or not bool(layout.shift.any()):
        return t
    for axis in axes.seq:
        moved = t.movedim((axes.batch, axis), (0, -1))  # [B, ..., T]
        pos = torch.arange(moved.shape[-1], device=t.device)[None] - layout.shift[:, None]
        shape = (moved.shape[0],) + (1,) * (moved.dim() - 2) + (moved.shape[-1],)
        index = pos.clamp(min=0).reshape(shape).expand_as(moved)
        moved = moved.gather(-1, index).masked_fill((pos < 0).reshape(shape), 0)
        t = moved.movedim((0, -1), (axes.batch, axis))
    return t


def check_logits(
    exp: Explanation,
    layout: Layout,
    steps: list[int],
    tokens: Tensor,
    decoded_logits: Tensor,
    stacklevel: int = 4,
) -> None:
    """Warn when the graph's logits for emitted tokens differ from the decode's (a wrapper that
    changes the logits, or positions the graph builds differently): the trace would then
    explain numbers other than the ones that chose the tokens. ``stacklevel``: the warning's
    frame, the caller of run_generation."""
    logits = exp.outputs[0]
    batch = logits.shape[0]
    rows = torch.arange(batch, device=logits.device)
    for s in steps:
        got = logits[rows, layout.position(s), tokens[:, s]].float()
        want = decoded_logits[:, s].to(got.device)
        tol = 1e-3 * max(1.0, float(want.abs().max()))
        if float((got - want).abs().max()) > tol:
            warnings.warn(
                f"graph logits differ from the decode's at step {s} "
                f"(max diff {float((got - want).abs().max()):.3g}); relevance explains the graph",
                RuntimeWarning,
                stacklevel=stacklevel,
            )
            return


def _offs(node: Any) -> Any:
    """A grouped matmul's ``offs`` argument (where each expert's rows end)."""
    return node.args[2] if len(node.args) > 2 else node.kwargs["offs"]
