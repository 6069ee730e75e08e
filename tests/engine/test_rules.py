"""Each rule family in each mode against a closed form on small tensors, the way Zennit tests
its rules against a matrix reference: the method is called directly with a hand-built Ctx."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.rules import (
    COMPOSITES,
    FAMILIES,
    MODES,
    TINY,
    Canonical,
    Composite,
    Ctx,
    LinearRows,
    attention_weights,
    family_of,
    grouped_mm_ops,
    rule_for,
    stable,
)
from engine.rules.attention import Attention
from engine.rules.dense import AddMM, Conv, Linear, Product
from engine.rules.elementwise import Add, Identity, MaskedFill, Mul, Where
from engine.rules.normalisation import BatchNorm, LayerNorm, RMSNorm
from engine.rules.pooling import MaxPool, PositiveMap
from engine.rules.shape import Cat, Pad, Permute, Reshape, Split, Transpose

aten = torch.ops.aten


@pytest.fixture(autouse=True)
def float64():
    """Closed forms compared in double precision; the default is restored for other tests."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


class Node:
    """The part of an fx.Node a rule reads: its op, and identity for ``Canonical`` lookups."""

    def __init__(self, target, name: str = "node"):
        self.target, self.name = target, name


def ctx_of(target, args, R, data=None, ref=None, out=None, ref_out=None, facts=None) -> Ctx:
    """A Ctx for op ``target``: ``data`` names the arguments that carry relevance (default:
    every tensor argument), ``ref``/``out``/``ref_out`` feed mode "reference"."""
    if data is None:
        data = {n for n, v in args.items() if isinstance(v, torch.Tensor)}

    def bias_term(b, n, like):
        return (b.abs() if b is not None else torch.zeros(n, dtype=like.dtype)) + TINY

    return Ctx(
        node=Node(target),
        args=args,
        out=out,
        R=R,
        is_data=lambda name, index=None: name in data if index is None else (name, index) in data,
        abs_of=torch.abs,
        bias_term=bias_term,
        ref=ref,
        ref_out=ref_out,
        facts=facts or Canonical(),
    )


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def conserved(R, grads, sink) -> None:
    """inputs + sink = R, per seed."""
    parts = [g for v in grads.values() for g in (v if isinstance(v, list) else [v])]
    parts += [] if sink is None else [sink]
    torch.testing.assert_close(sum(g.flatten(1).sum(1) for g in parts), R.flatten(1).sum(1))


# ---------------------------------------------------------------- dense


def linear_case():
    x, w, b = rand(3, 5, seed=1), rand(4, 5, seed=2), rand(4, seed=3)
    R = rand(2, 3, 4, seed=4).abs()
    return x, w, b, R


def linear_reference_ctx(x, w, b, R, xr) -> Ctx:
    """The Ctx of ``aten.linear`` in mode "reference": input ``x`` against ``xr`` (weight and
    bias the same), both outputs computed."""
    args = {"input": x, "weight": w, "bias": b}
    return ctx_of(aten.linear.default, args, R, ref={**args, "input": xr},
                  out=F.linear(x, w, b), ref_out=F.linear(xr, w, b))  # fmt: skip


def linear_reference_case():
    """``linear_case`` against the reference input ``xr`` (seed 5): x, xr, w, b, R and
    their ``linear_reference_ctx``."""
    x, w, b, R = linear_case()
    xr = rand(3, 5, seed=5)
    return x, xr, w, b, R, linear_reference_ctx(x, w, b, R, xr)


def test_linear_default_is_the_z_rule():
    """R_in = |x||w| R / (|x||W|^T + |b|), the bias share the sink."""
    x, w, b, R = linear_case()
    grads, sink = Linear().default(
        ctx_of(aten.linear.default, {"input": x, "weight": w, "bias": b}, R)
    )
    c = x.abs()[:, None, :] * w.abs()[None]  # [B, out, in]
    D = c.sum(-1) + b.abs()
    expected = torch.einsum("boi,kbo->kbi", c, R / D)
    torch.testing.assert_close(grads["input"], expected)
    torch.testing.assert_close(sink, (R * b.abs() / D).sum(-1))
    conserved(R, grads, sink)


def test_linear_contrast_is_the_reference_rule():
    """Mode "contrast" below the seed head: the difference rule of mode "reference"."""
    x, xr, w, b, R, ctx = linear_reference_case()
    grads, sink = Linear().contrast(ctx)
    expected, expected_sink = Linear().reference(ctx)
    torch.testing.assert_close(grads["input"], expected["input"])
    torch.testing.assert_close(sink, expected_sink)


def test_linear_reference_is_the_difference_rule():
    """R_in = dx w R / dy: the bias cancels, so the inputs take all of R (up to EPS)."""
    x, xr, w, b, R, ctx = linear_reference_case()
    grads, sink = Linear().reference(ctx)
    dy = ctx.out - ctx.ref_out  # stabilised by +-EPS: where dy vanishes, its relevance is a sink
    expected = torch.einsum("bi,oi,kbo->kbi", x - xr, w, R / stable(dy))
    torch.testing.assert_close(grads["input"], expected)
    torch.testing.assert_close(sink, R * (1 - dy / stable(dy)))
    conserved(R, grads, sink)


def test_linear_reference_reveal_cancel_conserves():
    """With a relu after the layer (a canonize fact), RevealCancel: inputs + sink = R."""
    x, xr, w, b, R, ctx = linear_reference_case()
    plain, _ = Linear().reference(ctx)
    ctx.facts = Canonical(relu_after=frozenset({ctx.node}))
    grads, sink = Linear().reference(ctx)
    conserved(R, grads, sink)
    assert not torch.allclose(grads["input"], plain["input"])


@pytest.mark.parametrize("mode", ["default", "reference"])
def test_seed_rows_are_the_linear_rule(mode):
    """The seed head (``LinearRows``) on sparse entries equals the linear rule on the rows."""
    x, w, b, _ = linear_case()
    xr = rand(3, 5, seed=5)
    unit = torch.tensor([[1, 3, 0]])  # one seed, one entry per sample
    value = torch.tensor([[1.0, 2.0, -0.5]])
    rows = {"input": x[None], "weight": w[unit], "bias": b[unit]}
    ref = {"input": xr[None]}
    got, sink = getattr(LinearRows(), mode)(ctx_of(aten.linear.default, rows, value, ref=ref))
    R = torch.zeros(1, 3, 4)
    R[0, torch.arange(3), unit[0]] = value[0]
    dense = linear_reference_ctx(x, w, b, R, xr)
    expected, _ = getattr(Linear(), mode)(dense)
    torch.testing.assert_close(got["input"], expected["input"], rtol=1e-4, atol=1e-8)
    conserved(value, got, sink)


def test_seed_rows_contrast_split_the_difference_exactly():
    """Mode "contrast": entries carry relevance per unit of their logit (+u on the target,
    -u on the alternative), so one sample's entries explain u (z_t - z_a): contributions
    u (x - x') (w_t - w_a) of the change from the reference, and the reference's own
    difference u (x' (w_t - w_a) + b_t - b_a) the sink."""
    x, w, b, _ = linear_case()
    xr = rand(3, 5, seed=5)
    unit = torch.tensor([[1, 3]])  # sample 0: class 1 against class 3
    value = torch.tensor([[2.0, -2.0]])
    rows = {"input": x[[0, 0]][None], "weight": w[unit], "bias": b[unit]}
    ref = {"input": xr[[0, 0]][None]}
    got, sink = LinearRows().contrast(ctx_of(aten.linear.default, rows, value, ref=ref))
    dw = w[1] - w[3]
    torch.testing.assert_close(got["input"].sum(1)[0], 2.0 * (x[0] - xr[0]) * dw)
    torch.testing.assert_close(sink.sum(), 2.0 * (xr[0] @ dw + b[1] - b[3]))
    z = F.linear(x[0], w, b)
    torch.testing.assert_close(got["input"].sum() + sink.sum(), 2.0 * (z[1] - z[3]))


def test_addmm_is_a_linear_layer():
    x, w, b, R = linear_case()
    got, sink = AddMM().default(ctx_of(aten.addmm.default, {"self": b, "mat1": x, "mat2": w.T}, R))
    expected, _ = Linear().default(
        ctx_of(aten.linear.default, {"input": x, "weight": w, "bias": b}, R)
    )
    torch.testing.assert_close(got["mat1"], expected["input"])
    conserved(R, got, sink)


@pytest.mark.parametrize("stride", [1, 2])
def test_conv_default_is_the_z_rule_over_patches(stride):
    """A convolution is a linear map of its patches: the |z| rule over F.unfold's columns,
    folded back (overlapping patches add up), is the matrix reference."""
    x, w, b = rand(2, 3, 6, 6, seed=1), rand(4, 3, 3, 3, seed=2), rand(4, seed=3)
    y = F.conv2d(x, w, b, stride, 1)
    R = rand(1, *y.shape, seed=4).abs()
    args = {"input": x, "weight": w, "bias": b, "stride": [stride], "padding": [1],
            "dilation": [1], "groups": 1}  # fmt: skip
    grads, sink = Conv().default(ctx_of(aten.conv2d.default, args, R))
    cols = F.unfold(x, 3, padding=1, stride=stride)  # [B, C*9, L]
    c = cols.abs()[:, None] * w.abs().flatten(1)[None, :, :, None]  # [B, O, C*9, L]
    D = c.sum(2) + b.abs()[None, :, None]
    share = (c * (R[0].flatten(2) / D)[:, :, None]).sum(1)
    expected = F.fold(share, (6, 6), 3, padding=1, stride=stride)
    torch.testing.assert_close(grads["input"][0], expected)
    conserved(R, grads, sink)


@pytest.mark.parametrize("mode", MODES)
def test_conv_conserves_in_every_mode(mode):
    x, w, b = rand(2, 3, 5, 5, seed=1), rand(4, 3, 3, 3, seed=2), rand(4, seed=3)
    xr = rand(2, 3, 5, 5, seed=6)
    y, yr = F.conv2d(x, w, b, 1, 1), F.conv2d(xr, w, b, 1, 1)
    R = rand(1, *y.shape, seed=4)
    args = {"input": x, "weight": w, "bias": b, "stride": [1], "padding": [1], "dilation": [1],
            "groups": 1}  # fmt: skip
    ctx = ctx_of(aten.conv2d.default, args, R, ref={**args, "input": xr}, out=y, ref_out=yr)
    conserved(R, *getattr(Conv(), mode)(ctx))


def test_product_one_data_operand_is_the_linear_rule():
    x, w, _, R = linear_case()
    got, sink = Product().default(
        ctx_of(aten.mm.default, {"self": x, "mat2": w.T}, R, data={"self"})
    )
    expected, _ = Linear().default(
        ctx_of(aten.linear.default, {"input": x, "weight": w, "bias": None}, R)
    )
    torch.testing.assert_close(got["self"], expected["input"])
    assert "mat2" not in got
    conserved(R, got, sink)


@pytest.mark.parametrize("mode", MODES)
def test_product_two_data_operands(mode):
    """Half of R to each operand (default); the exact split of ab - a'b' (reference, contrast)."""
    a, b = rand(3, 4, seed=1), rand(4, 2, seed=2)
    ar, br = rand(3, 4, seed=3), rand(4, 2, seed=4)
    R = rand(1, 3, 2, seed=5).abs()
    ctx = ctx_of(aten.mm.default, {"self": a, "mat2": b}, R, ref={"self": ar, "mat2": br},
                 out=a @ b, ref_out=ar @ br)  # fmt: skip
    grads, sink = getattr(Product(), mode)(ctx)
    conserved(R, grads, sink)
    if mode == "default":
        for g in grads.values():
            torch.testing.assert_close(g.sum(), R.sum() / 2)
    if mode != "default":
        torch.testing.assert_close(sink, R * (1 - (a @ b - ar @ br) / stable(a @ b - ar @ br)))


# ---------------------------------------------------------------- elementwise


def test_add_default_splits_by_magnitude():
    a, b = rand(2, 3, seed=1), rand(2, 3, seed=2)
    R = rand(1, 2, 3, seed=3)
    grads, sink = Add().default(ctx_of(aten.add.Tensor, {"self": a, "other": b, "alpha": 1}, R))
    torch.testing.assert_close(grads["self"], R * a.abs() / (a.abs() + b.abs()))
    conserved(R, grads, sink)


def test_add_constant_share_is_a_sink():
    a, b = rand(2, 3, seed=1), rand(3, seed=2)
    R = rand(1, 2, 3, seed=3)
    grads, sink = Add().default(ctx_of(aten.add.Tensor, {"self": a, "other": b, "alpha": 1}, R,
                                       data={"self"}))  # fmt: skip
    torch.testing.assert_close(sink, R * b.abs() / (a.abs() + b.abs()))
    conserved(R, grads, sink)


@pytest.mark.parametrize("op", [aten.add.Tensor, aten.sub.Tensor, aten.rsub.Tensor])
def test_add_reference_shares_the_changes(op):
    a, b, ar, br = (rand(2, 3, seed=s) for s in range(4))
    y, yr = op(a, b), op(ar, br)
    R = rand(1, 2, 3, seed=5)
    args = {"self": a, "other": b, "alpha": 1}
    ctx = ctx_of(op, args, R, ref={"self": ar, "other": br, "alpha": 1}, out=y, ref_out=yr)
    grads, sink = Add().reference(ctx)
    sign = -1 if op is aten.rsub.Tensor else 1
    torch.testing.assert_close(grads["self"], sign * R * (a - ar) / stable(y - yr))
    conserved(R, grads, sink)


def test_mul_default_halves_and_constant_factor_passes_all():
    a, b = rand(2, 3, seed=1), rand(2, 3, seed=2)
    R = rand(1, 2, 3, seed=3)
    grads, sink = Mul().default(ctx_of(aten.mul.Tensor, {"self": a, "other": b}, R))
    torch.testing.assert_close(grads["self"], R / 2)
    grads, sink = Mul().default(ctx_of(aten.mul.Tensor, {"self": a, "other": b}, R, data={"other"}))
    torch.testing.assert_close(grads["other"], R)
    assert sink is None
    grads, _ = Mul().default(ctx_of(aten.div.Tensor, {"self": a, "other": b}, R))
    assert set(grads) == {"self"}  # a division: the numerator takes all


def test_mul_reference_splits_the_product_exactly():
    a, b, ar, br = (rand(2, 3, seed=s) for s in range(4))
    R = rand(1, 2, 3, seed=5)
    ctx = ctx_of(aten.mul.Tensor, {"self": a, "other": b}, R, ref={"self": ar, "other": br},
                 out=a * b, ref_out=ar * br)  # fmt: skip
    grads, sink = Mul().reference(ctx)
    ratio = R / stable(a * b - ar * br)
    torch.testing.assert_close(grads["self"], ratio * (a - ar) * (b + br) / 2)
    conserved(R, grads, sink)


def test_mul_reference_hand_written_rms_norm_is_the_norm_rule():
    """x * rsqrt(mean(x^2) + eps), flagged by canonize, gets aten.rms_norm's difference rule."""
    x, xr = rand(2, 6, seed=1), rand(2, 6, seed=2)
    eps = 1e-6
    factor, factor_r = (torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps) for t in (x, xr))
    R = rand(1, 2, 6, seed=3)
    y, yr = x * factor, xr * factor_r
    ctx = ctx_of(aten.mul.Tensor, {"self": x, "other": factor}, R, data={"self"},
                 ref={"self": xr, "other": factor_r}, out=y, ref_out=yr)  # fmt: skip
    ctx.facts = Canonical(rms_eps={ctx.node: eps})
    got, sink = Mul().reference(ctx)
    norm = ctx_of(
        aten.rms_norm.default,
        {"input": x, "normalized_shape": [6], "weight": None, "eps": eps},
        R,
        ref={"input": xr},
        out=y,
        ref_out=yr,
    )
    expected, _ = RMSNorm().reference(norm)
    torch.testing.assert_close(got["self"], expected["input"])
    conserved(R, got, sink)


def test_where_and_masked_fill_place_relevance():
    cond = rand(2, 3, seed=1) > 0
    a, b = rand(2, 3, seed=2), rand(2, 3, seed=3)
    R = rand(1, 2, 3, seed=4)
    args = {"condition": cond, "self": a, "other": b}
    grads, sink = Where().default(ctx_of(aten.where.self, args, R, data={"self"}))
    torch.testing.assert_close(grads["self"], torch.where(cond, R, 0))
    torch.testing.assert_close(sink, torch.where(cond, 0, R))
    grads, sink = MaskedFill().default(
        ctx_of(aten.masked_fill.Scalar, {"self": a, "mask": cond, "value": 0.0}, R)
    )
    torch.testing.assert_close(grads["self"] + sink, R)
    torch.testing.assert_close(sink, torch.where(cond, R, 0))


@pytest.mark.parametrize("mode", MODES)
def test_identity_passes_through(mode):
    x, R = rand(2, 3, seed=1), rand(1, 2, 3, seed=2)
    rule = rule_for(aten.relu.default, mode)
    assert rule.passes_through
    grads, sink = rule(ctx_of(aten.relu.default, {"self": x}, R))
    assert grads["self"] is R and sink is None
    assert isinstance(family_of(aten.relu.default), Identity)


# ---------------------------------------------------------------- normalisation


def test_batch_norm_default():
    """y = x s + t per channel: R_in = R |x s| / (|x s| + |t|)."""
    x = rand(2, 3, 4, seed=1)
    stats = {"weight": rand(3, seed=2), "bias": rand(3, seed=3), "running_mean": rand(3, seed=4),
             "running_var": rand(3, seed=5).abs() + 0.5, "momentum": 0.1, "eps": 1e-5}  # fmt: skip
    s = stats["weight"] / torch.sqrt(stats["running_var"] + 1e-5)
    t = stats["bias"] - stats["running_mean"] * s
    R = rand(1, 2, 3, 4, seed=6)
    c, shift = x * s[:, None], t.abs()[:, None]
    ctx = ctx_of(aten._native_batch_norm_legit_no_training.default, {"input": x, **stats}, (R,))
    grads, sink = BatchNorm().default(ctx)
    torch.testing.assert_close(grads["input"], R * c.abs() / (c.abs() + shift))
    torch.testing.assert_close(grads["input"] + sink, R)


def test_layer_norm_reference_conserves_and_default_passes_through():
    x, xr = rand(2, 5, seed=1), rand(2, 5, seed=2)
    g, b = rand(5, seed=3), rand(5, seed=4)
    y, yr = (F.layer_norm(t, [5], g, b) for t in (x, xr))
    R = rand(1, 2, 5, seed=5)
    args = {"input": x, "normalized_shape": [5], "weight": g, "bias": b, "eps": 1e-5}
    ctx = ctx_of(aten.layer_norm.default, args, R, ref={**args, "input": xr}, out=y, ref_out=yr)
    grads, sink = LayerNorm().reference(ctx)
    dy = y - yr  # the difference rule is exact: only the stabiliser's share sinks
    torch.testing.assert_close(sink, R * (1 - dy / stable(dy)))
    assert LayerNorm().default(ctx)[0]["input"] is R


# ---------------------------------------------------------------- attention


def test_attention_default_is_two_product_rules():
    """R_V[k, d] = 1/2 sum_q |A_qk V_kd| R_qd / sum_k' |A_qk' V_k'd|, and R_A (the other
    half) split between Q and K by the |z| rule of Q K^T."""
    q, k, v = rand(1, 2, 3, 4, seed=1), rand(1, 2, 3, 4, seed=2), rand(1, 2, 3, 4, seed=3)
    R = rand(1, 1, 2, 3, 4, seed=4).abs()
    args = {"query": q, "key": k, "value": v, "attn_mask": None, "dropout_p": 0.0,
            "is_causal": True, "scale": None, "enable_gqa": False}  # fmt: skip
    grads, sink = Attention().default(ctx_of(aten.scaled_dot_product_attention.default, args, R,
                                             data={"query", "key", "value"}))  # fmt: skip
    A = attention_weights(q, k, None, True, None)
    c = A[..., :, :, None] * v.abs()[..., None, :, :]  # [.., q, k, d]
    expected = 0.5 * (c * (R[0] / c.sum(-2))[..., :, None, :]).sum(-3)
    torch.testing.assert_close(grads["value"][0], expected)
    torch.testing.assert_close(grads["value"].sum() * 2, R.sum())
    conserved(R, grads, sink)


@pytest.mark.parametrize("mode", ["contrast", "reference"])
def test_attention_conserves(mode):
    q, k, v = (rand(1, 2, 3, 4, seed=s) for s in (1, 2, 3))
    qr, kr, vr = (rand(1, 2, 3, 4, seed=s) for s in (4, 5, 6))
    args = {"query": q, "key": k, "value": v, "attn_mask": None, "dropout_p": 0.0,
            "is_causal": False, "scale": None, "enable_gqa": False}  # fmt: skip
    ref = {**args, "query": qr, "key": kr, "value": vr}
    y, yr = F.scaled_dot_product_attention(q, k, v), F.scaled_dot_product_attention(qr, kr, vr)
    R = rand(1, 1, 2, 3, 4, seed=7)
    ctx = ctx_of(aten.scaled_dot_product_attention.default, args, R, ref=ref, out=y, ref_out=yr)
    grads, sink = getattr(Attention(), mode)(ctx)
    conserved(R, grads, sink)


# ---------------------------------------------------------------- pooling


def test_max_pool_winner_takes_all_and_reference_conserves():
    x, xr = rand(1, 2, 4, 4, seed=1), rand(1, 2, 4, 4, seed=2)
    args = {"self": x, "kernel_size": [2, 2], "stride": [2, 2], "padding": [0, 0],
            "dilation": [1, 1], "ceil_mode": False}  # fmt: skip
    y, yr = F.max_pool2d(x, 2), F.max_pool2d(xr, 2)
    R = rand(1, *y.shape, seed=3)
    grads, _ = MaxPool().default(ctx_of(aten.max_pool2d.default, args, R))
    xg = x.clone().requires_grad_()
    (F.max_pool2d(xg, 2) * R[0]).sum().backward()  # the gradient routes to the winners
    torch.testing.assert_close(grads["self"][0], xg.grad)
    ctx = ctx_of(aten.max_pool2d.default, args, R, ref={**args, "self": xr}, out=y, ref_out=yr)
    conserved(R, *MaxPool().reference(ctx))


@pytest.mark.parametrize("mode", MODES)
def test_mean_is_a_positive_map(mode):
    """mean over the last axis: R_in = R |x_i| / sum |x| (x - x' in modes reference and
    contrast)."""
    x, xr = rand(2, 5, seed=1), rand(2, 5, seed=2)
    y, yr = x.mean(-1), xr.mean(-1)
    R = rand(1, 2, seed=3)
    args = {"self": x, "dim": [-1], "keepdim": False, "dtype": None}
    ctx = ctx_of(aten.mean.dim, args, R, ref={**args, "self": xr}, out=y, ref_out=yr)
    grads, sink = getattr(PositiveMap(), mode)(ctx)
    source = x.abs() if mode == "default" else x - xr
    D = x.abs().sum(-1) if mode == "default" else (x - xr).sum(-1)
    torch.testing.assert_close(
        grads["self"], R[..., None] * source / D[:, None], rtol=1e-4, atol=1e-6
    )
    conserved(R, grads, sink)


# ---------------------------------------------------------------- shape


def test_shape_rules_move_relevance_with_the_elements():
    x = rand(2, 3, 4, seed=1)
    R = rand(1, 4, 3, 2, seed=2)
    got = Permute().default(ctx_of(aten.permute.default, {"self": x, "dims": [2, 1, 0]}, R))[0]
    torch.testing.assert_close(got["self"], R.permute(0, 3, 2, 1))
    R2 = rand(1, 2, 4, 3, seed=3)
    got = Transpose().default(ctx_of(aten.transpose.int, {"self": x, "dim0": 1, "dim1": 2}, R2))[0]
    torch.testing.assert_close(got["self"], R2.transpose(2, 3))
    R3 = rand(1, 2, 12, seed=4)
    got = Reshape().default(ctx_of(aten.view.default, {"self": x, "size": [2, 12]}, R3))[0]
    torch.testing.assert_close(got["self"], R3.view(1, 2, 3, 4))
    a, b = rand(2, 1, seed=5), rand(2, 3, seed=6)
    Rc = rand(1, 2, 4, seed=7)
    got = Cat().default(ctx_of(aten.cat.default, {"tensors": [a, b], "dim": 1}, Rc))[0]
    torch.testing.assert_close(torch.cat(got["tensors"], -1), Rc)
    parts = list(x.split(2, dim=2))
    Rs = {1: rand(1, 2, 3, 2, seed=8)}
    ctx = ctx_of(aten.split.Tensor, {"self": x, "split_size": 2, "dim": 2}, Rs, out=parts)
    got = Split().default(ctx)[0]["self"]
    torch.testing.assert_close(got[..., 2:], Rs[1])
    assert not got[..., :2].any()


def test_pad_border_is_a_sink():
    x = rand(2, 3, seed=1)
    R = rand(1, 2, 5, seed=2)
    grads, sink = Pad().default(
        ctx_of(aten.constant_pad_nd.default, {"self": x, "pad": [1, 1], "value": 0.0}, R)
    )
    torch.testing.assert_close(grads["self"], R[..., 1:4])
    conserved(R, grads, sink)


# ---------------------------------------------------------------- modes as tables


def test_each_mode_picks_its_method_and_overrides_pick_another():
    linear = family_of(aten.linear.default)
    for mode in MODES:
        assert rule_for(aten.linear.default, mode) == getattr(linear, mode)
        assert COMPOSITES[mode].method == mode
    alternative = Composite("default", {aten.linear.default: "contrast"})
    assert alternative.rule(linear, aten.linear.default) == linear.contrast
    assert alternative.rule(linear, aten.conv2d.default) == linear.default
    assert rule_for(aten.nonzero.default, "default") is None


def test_registry_covers_each_op_once_and_grouped_mm_by_name():
    ops = [op for family in FAMILIES for op in family.ops]
    assert len(ops) == len(set(ops))
    for op in grouped_mm_ops():  # present only once torch or transformers registered them
        assert all(rule_for(op, mode) is not None for mode in MODES)


@pytest.mark.parametrize("transposed", [False, True])
def test_general_convolution_is_the_z_rule_of_its_map(transposed):
    """aten.convolution (conv3d and the transposed convolutions decompose to it): the |z| rule
    of the linear map it is, written as a matrix M (y = M x + b)."""
    from engine.rules.dense import Convolution

    x, R = rand(2, 2, 3, 3, seed=1), rand(2, 2, 3, 5, 5, seed=2).abs()
    w, b = rand(2, 3, 3, 3, seed=3), rand(3, seed=4)
    geometry = {"stride": [1, 1], "padding": [0, 0], "dilation": [1, 1],
                "transposed": transposed, "output_padding": [0, 0], "groups": 1}  # fmt: skip
    if not transposed:  # 2 -> 3 channels, 3x3 -> 5x5 by padding 2
        w, geometry["padding"] = w.transpose(0, 1).contiguous(), [2, 2]
    args = {"input": x, "weight": w, "bias": b, **geometry}
    grads, sink = Convolution().default(ctx_of(aten.convolution.default, args, R))

    def conv(u):
        return torch.convolution(u, w, None, *(geometry[k] for k in geometry))

    M = torch.autograd.functional.jacobian(conv, x[:1]).reshape(75, 18)
    c = x.reshape(2, 1, 18).abs() * M.abs()  # [B, out, in]
    D = c.sum(-1) + b.abs().repeat_interleave(25)
    expected = torch.einsum("boi,kbo->kbi", c, R.reshape(2, 2, 75) / D)
    torch.testing.assert_close(grads["input"], expected.reshape(2, *x.shape))
    conserved(R, grads, sink)
