"""Normalisations: eval batch norm (when not folded into its convolution), layer, RMS and group
norm. The normalising factor is a constant in mode "default" (relevance passes unchanged; the
affine weight is not a target); modes "reference" and "contrast" split the change of a layer
or RMS norm exactly (``norm_difference``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import TINY, Ctx, Family, Propagation, stable

aten = torch.ops.aten


class BatchNorm(Family):
    """Eval batch norm is a per-channel affine map x * s + t: the |z| rule with one
    contribution per unit, the shift t is the sink."""

    ops = (aten._native_batch_norm_legit_no_training.default,)
    maps = True

    def _contributions(self, ctx: Ctx) -> tuple[Tensor, Tensor, Tensor]:
        """x * s per unit, the shift |t| + TINY, and R of output 0 (the statistics carry none)."""
        x = ctx.args["input"]
        shape = (-1,) + (1,) * (x.dim() - 2)
        scale, shift = batch_norm_affine(ctx.args)
        return x * scale.view(shape), shift.abs().view(shape) + TINY, ctx.R[0]

    def default(self, ctx: Ctx) -> Propagation:
        c, extra, R = self._contributions(ctx)
        ac = c.abs()
        r_in = R * (ac / (ac + extra))
        return {"input": r_in}, R - r_in

    def reference(self, ctx: Ctx) -> Propagation:
        """The shift cancels: each unit's change is all its own."""
        x = ctx.args["input"]
        scale, _ = batch_norm_affine(ctx.args)
        c = ctx.diff("input") * scale.view((-1,) + (1,) * (x.dim() - 2))
        R = ctx.R[0]
        r_in = R * (c / stable(c))
        return {"input": r_in}, R - r_in


def batch_norm_affine(a: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """Eval batch norm as y = x * scale + shift, per channel."""
    scale = torch.rsqrt(a["running_var"] + a["eps"])
    if a["weight"] is not None:
        scale = scale * a["weight"]
    shift = -a["running_mean"] * scale
    if a["bias"] is not None:
        shift = shift + a["bias"]
    return scale, shift


class LayerNorm(Family):
    """Layer norm y = g (x - mean x) s + b, s = 1 / sqrt(var x + eps). Mode "reference": the
    exact difference rule (``norm_difference``)."""

    ops = (aten.layer_norm.default,)
    maps = True
    center = True
    default = Family.identity

    def reference(self, ctx: Ctx) -> Propagation:
        a = ctx.args
        dims = len(a["normalized_shape"])
        g = a["weight"].flatten() if a["weight"] is not None else 1.0
        eps = a["eps"] if a["eps"] is not None else torch.finfo(a["input"].dtype).eps
        x, xr = a["input"], ctx.ref["input"]
        r_in, sink = norm_difference(ctx, x, xr, g, eps, dims, self.center)
        return {"input": r_in}, sink


class RMSNorm(LayerNorm):
    """RMS norm: the layer norm's rules with u = x, var = mean x^2."""

    ops = (aten.rms_norm.default,)
    center = False


class GroupNorm(Family):
    """Group norm: the normalising factor is a constant in every mode."""

    ops = (aten.group_norm.default,)
    maps = True
    default = contrast = reference = Family.identity


def norm_difference(
    ctx: Ctx, x: Tensor, xr: Tensor, g: Tensor | float, eps: float, dims: int, center: bool
) -> tuple[Tensor, Tensor]:
    """Mode "reference" for layer norm (``center``) and RMS norm over the last ``dims``
    dimensions of x, for the op ``ctx`` (its output's change: the normalised x's, times g).

    The change splits exactly into a linear map of the change of x: with u = x - mean x,
    y - y' = g (s (u - u') + u' (s - s')), and s - s' = m (var - var') with
    var - var' = 2 / n sum((u + u') / 2 (u - u')) and m the ratio of differences of
    1 / sqrt (its derivative where var = var'). R_x = dx * M^T (R / dy). The input's own
    factor s scales the first term: a reference with no spread (u' = 0, zero embeddings)
    has s' = 1 / sqrt(eps), and would otherwise blow the shares up."""
    shape = x.shape
    x, xr = x.flatten(-dims), xr.flatten(-dims)
    u, ur = (x - x.mean(-1, keepdim=True), xr - xr.mean(-1, keepdim=True)) if center else (x, xr)
    var, var_r = (t.pow(2).mean(-1, keepdim=True) for t in (u, ur))
    s, sr = (torch.rsqrt(t + eps) for t in (var, var_r))
    dvar, u_mid, du = var - var_r, (u + ur) / 2, u - ur
    slope = torch.where(
        dvar.abs() > 1e-12, (s - sr) / torch.where(dvar == 0, 1.0, dvar), -0.5 * s**3
    )
    coupling = ur * (2 * slope / x.shape[-1])  # u' ds/d(var) d(var)/du, per element
    z = g * (s * du + coupling * (u_mid * du).sum(-1, keepdim=True))
    R, ratio = ctx.R.flatten(-dims), ctx.per_change().flatten(-dims)
    r = g * ratio
    back = s * r + u_mid * (coupling * r).sum(-1, keepdim=True)
    if center:
        back = back - back.mean(-1, keepdim=True)
    r_in = (x - xr) * back
    return r_in.view(R.shape[0], *shape), R - ratio * z
