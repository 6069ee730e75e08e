"""Recurrent layers captured as one op (``aten.lstm``): the LSTM rule of Arras et al. (2017,
"Explaining recurrent neural network predictions in sentiment analysis").

Per step, c_t = f * c_{t-1} + i * g and h_t = o * tanh(c_t) (with a projection,
h_t = W_hr (o * tanh(c_t)), shared by the |z| rule). The gates i, f, o are multiplicative
sinks of no relevance: they only scale the signal. So h_t's relevance goes to c_t whole;
c_t's is shared between c_{t-1} and the cell input g by |f c_{t-1}| and |i g|; g's
pre-activation W_ig x_t + W_hg h_{t-1} + b shares it between x_t, h_{t-1} and the bias (the
sink) by the |z| rule; h_{t-1}'s relevance then joins c_{t-1}'s, one step back. Each share
adds up to what it splits, so R is conserved. Modes "reference" and "contrast" use the
same shares, at the input (a difference rule would need both passes'
gates at every step and would still split their products approximately).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .base import TINY, Ctx, Family, Propagation

aten = torch.ops.aten


@dataclass
class Cell:
    """One layer and direction: its weights and, per time step t (in time order, whichever
    way the direction runs), what the rule reads of the forward pass."""

    w_ih: Tensor
    w_hh: Tensor
    bias: Tensor | None  # b_ih + b_hh
    w_hr: Tensor | None
    reverse: bool
    h_prev: dict[int, Tensor] = field(default_factory=dict)  # state entering step t
    c_prev: dict[int, Tensor] = field(default_factory=dict)
    gates: dict[int, tuple[Tensor, Tensor, Tensor]] = field(default_factory=dict)  # i, f, g
    memory: dict[int, Tensor] = field(default_factory=dict)  # o * tanh(c_t)
    outputs: dict[int, Tensor] = field(default_factory=dict)  # h_t

    def steps(self, T: int) -> range:
        """Time steps in the order the cell ran them."""
        return range(T - 1, -1, -1) if self.reverse else range(T)


class LSTM(Family):
    ops = (aten.lstm.input,)
    maps = True

    def default(self, ctx: Ctx) -> Propagation:
        return _lstm(ctx)


def _lstm(ctx: Ctx) -> Propagation:
    """The layers from the top down; each direction's relevance at the layer's input adds
    up, and becomes the relevance of the layer below's output."""
    a, K = ctx.args, next(iter(ctx.R.values())).shape[0]  # R: {output index: relevance}
    x, h0, c0 = _batch_major(a["input"], a), *_states(a["hx"], a)  # [B, T, F], [L*D, B, H]
    layers = forward(x, h0, c0, a)
    dirs, width = len(layers[0][1]), h0.shape[-1]
    r_out = _batch_major(ctx.R[0], a, seeds=True) if 0 in ctx.R else None
    r_last = [None if i not in ctx.R else _states([ctx.R[i]], a)[0] for i in (1, 2)]
    r_h0, r_c0 = (torch.zeros(K, *s.shape, dtype=x.dtype, device=x.device) for s in (h0, c0))
    sink = torch.zeros(K, *x.shape[:2], dtype=x.dtype, device=x.device)
    for layer in range(len(layers) - 1, -1, -1):
        inputs, cells = layers[layer]
        r_in = torch.zeros(K, *inputs.shape, dtype=x.dtype, device=x.device)
        for d, cell in enumerate(cells):
            n = layer * dirs + d
            r_h = None if r_out is None else r_out[..., d * width : (d + 1) * width]
            ends = [None if r is None else r[:, n] for r in r_last]
            r_h0[:, n], r_c0[:, n] = _backward(ctx, cell, inputs, r_h, ends, r_in, sink)
        r_out = r_in
    return {"input": _time_major(r_out, a), "hx": _states_back([r_h0, r_c0], a)}, (
        _time_major(sink, a)
    )


def forward(x: Tensor, h0: Tensor, c0: Tensor, a: dict[str, Any]) -> list[tuple[Tensor, list]]:
    """Each layer's input [B, T, F] and its cells (one per direction), run as torch runs them."""
    params, dirs = a["params"], 2 if a["bidirectional"] else 1
    per = len(params) // (a["num_layers"] * dirs)
    layers = []
    for layer in range(a["num_layers"]):
        cells = []
        for d in range(dirs):
            n = layer * dirs + d
            weights = params[n * per : (n + 1) * per]
            cells.append(_run(x, h0[n], c0[n], weights, a["has_biases"], d == 1))
        layers.append((x, cells))
        x = torch.cat(
            [torch.stack([c.outputs[t] for t in sorted(c.outputs)], 1) for c in cells], -1
        )
    return layers


def _run(x: Tensor, h: Tensor, c: Tensor, weights: list[Tensor], has_biases: bool, reverse: bool):
    """One cell over the sequence; torch's gate order (i, f, g, o)."""
    w_ih, w_hh = weights[0], weights[1]
    bias = weights[2] + weights[3] if has_biases else None
    cell = Cell(w_ih, w_hh, bias, weights[-1] if len(weights) in (3, 5) else None, reverse)
    for t in cell.steps(x.shape[1]):
        z = x[:, t] @ w_ih.T + h @ w_hh.T + (0 if bias is None else bias)
        i, f, g, o = z.chunk(4, -1)
        i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
        cell.h_prev[t], cell.c_prev[t], cell.gates[t] = h, c, (i, f, g)
        c = f * c + i * g
        cell.memory[t] = o * c.tanh()
        h = cell.memory[t] if cell.w_hr is None else cell.memory[t] @ cell.w_hr.T
        cell.outputs[t] = h
    return cell


def _backward(ctx, cell, inputs, r_h, ends, r_in, sink) -> tuple[Tensor, Tensor]:
    """One cell's steps in reverse: writes x_t's relevance into ``r_in``, the bias shares into
    ``sink`` ([K, B, T]); returns the relevance of the initial h and c."""
    T, H = inputs.shape[1], cell.c_prev[0].shape[-1]
    aw_ih, aw_hh = ctx.abs_of(cell.w_ih)[2 * H : 3 * H], ctx.abs_of(cell.w_hh)[2 * H : 3 * H]
    bias = TINY if cell.bias is None else cell.bias[2 * H : 3 * H].abs() + TINY
    zeros = torch.zeros(r_in.shape[0], inputs.shape[0], H, dtype=inputs.dtype, device=inputs.device)
    r_h_next = zeros[..., : cell.h_prev[0].shape[-1]] if ends[0] is None else ends[0]
    r_c_next = zeros if ends[1] is None else ends[1]
    for t in reversed(cell.steps(T)):
        r = r_h_next if r_h is None else r_h[:, :, t] + r_h_next
        if cell.w_hr is not None:  # h_t = W_hr m_t: the |z| rule, no bias
            (r,), s = _z_rule(r, [(cell.memory[t], ctx.abs_of(cell.w_hr))], TINY)
            sink[:, :, t] += s
        i, f, g = cell.gates[t]
        keep, new = (f * cell.c_prev[t]).abs(), (i * g).abs()
        ratio = (r + r_c_next) / (keep + new + TINY)
        r_c_next, r_g = ratio * keep, ratio * new
        sink[:, :, t] += (ratio * TINY).sum(-1)
        parts = [(inputs[:, t], aw_ih), (cell.h_prev[t], aw_hh)]
        (r_x, r_h_next), s = _z_rule(r_g, parts, bias)
        r_in[:, :, t] += r_x
        sink[:, :, t] += s
    return r_h_next, r_c_next


def _z_rule(r: Tensor, parts: list[tuple[Tensor, Tensor]], bias: Tensor | float):
    """The |z| rule of z = sum_k x_k W_k^T + b: each x_k's share of ``r``, and the bias share
    (``bias`` = |b| + TINY) summed over the units, [K, B]."""
    ratio = r / (sum(x.abs() @ aw.T for x, aw in parts) + bias)
    return [x.abs() * (ratio @ aw) for x, aw in parts], (ratio * bias).sum(-1)


def _batch_major(t: Tensor, a: dict[str, Any], seeds: bool = False) -> Tensor:
    """The input (or, with ``seeds``, its relevance [K, ...]) as [(K,) B, T, F]."""
    s = int(seeds)
    t = t.unsqueeze(s) if t.dim() == 2 + s else (t if a["batch_first"] else t.transpose(s, s + 1))
    return t


def _time_major(t: Tensor, a: dict[str, Any]) -> Tensor:
    """Back from [K, B, T, ...] to the input's layout."""
    if a["input"].dim() == 2:
        return t[:, 0]
    return t if a["batch_first"] else t.transpose(1, 2)


def _states(hx: list[Tensor], a: dict[str, Any]) -> list[Tensor]:
    """h0, c0 as [(K,) L*D, B, H] (an unbatched input's states have no B)."""
    unbatched = a["input"].dim() == 2
    return [t.unsqueeze(-2) if unbatched else t for t in hx]


def _states_back(r: list[Tensor], a: dict[str, Any]) -> list[Tensor]:
    return [t.squeeze(-2) for t in r] if a["input"].dim() == 2 else r
