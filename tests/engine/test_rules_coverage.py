"""The ops architectures met without a rule (issue 16): each in a tiny module captured with
DLBacktrace, conserved in every mode, and the closed form where there is one."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine import DLBacktrace
from engine.rules import TINY, rule_for
from engine.rules.dense import Bilinear, Linear
from engine.rules.pooling import Interpolation, PositiveMap, Prod, Share
from engine.rules.recurrent import LSTM, forward
from engine.rules.shape import MaskedScatter, Pad, Scatter, Stack, TopK

from .test_rules import conserved, ctx_of, rand

aten = torch.ops.aten
B, D = 2, 8


class Head(nn.Module):
    """``body`` (the op under test, [B, 8] -> any shape) then a linear head to 3 logits."""

    def __init__(self, body: Callable[[torch.Tensor], torch.Tensor], width: int):
        super().__init__()
        self.body = body
        torch.manual_seed(0)
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        return self.head(self.body(x).reshape(x.shape[0], -1))


def _scatter(x):
    y = x.new_empty(x.shape)
    y[:, :4] = 2 * x[:, :4]
    y[:, 4:] = torch.relu(x[:, 4:])
    return y


def _index_put(x):
    y = torch.zeros_like(x)
    y[:, torch.tensor([0, 2])] = x[:, :2]
    return y + x


def _select_scatter(x):
    y = x.clone()
    y[:, 2] = torch.relu(x[:, 3]) * 2
    return y


_GROUP_W, _GROUP_B = (torch.randn(*s, generator=torch.Generator().manual_seed(2))
                      for s in ((2, 4, 4), (2, 1, 4)))  # fmt: skip


def _groups(x):
    y = torch.baddbmm(_GROUP_B, x.reshape(-1, 2, 4).transpose(0, 1), _GROUP_W, alpha=0.5)
    return y.transpose(0, 1)


def _grid(x):
    return x.reshape(x.shape[0], 1, 2, 4)


class GridConv(nn.Module):
    """A convolution with its padding given by name (aten.conv2d.padding), on the 2 x 4 grid."""

    def __init__(self, padding: str, kernel: tuple[int, int]):
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(1, 2, kernel, padding=padding)

    def forward(self, x):
        return self.conv(_grid(x))


def _one_kv_head(x):
    """Multi-query attention as falcon writes it: one K / V head broadcast to 2 query heads."""
    q = x.reshape(x.shape[0], 1, 2, 4).expand(-1, 2, -1, -1)
    kv = x.reshape(x.shape[0], 1, 2, 4)
    return F.scaled_dot_product_attention(q * 2, kv, kv)


class Recurrent(nn.Module):
    """An LSTM over the 8 features read as 4 steps of 2: its output sequence, and with
    ``states`` its final h and c too (time-major, projected, one direction)."""

    def __init__(self, states: bool = False):
        super().__init__()
        torch.manual_seed(1)
        self.states = states
        if states:
            self.lstm = nn.LSTM(2, 3, proj_size=2)
        else:
            self.lstm = nn.LSTM(2, 3, num_layers=2, bidirectional=True, batch_first=True)

    def forward(self, x):
        steps = x.reshape(x.shape[0], 4, 2)
        if not self.states:
            return self.lstm(steps)[0]
        out, (h, c) = self.lstm(steps.transpose(0, 1))
        return torch.cat([out.transpose(0, 1).flatten(1), h[0], c[0]], 1)


def _aliases(x):
    """ATen's other names: torch.multiply is aten.multiply, torch.clip aten.clip, ..."""
    h = torch.multiply(x, torch.sigmoid(x))
    h = torch.true_divide(torch.subtract(h, torch.divide(h.mean(-1, keepdim=True), 2.0)), 1.5)
    return torch.concat([torch.clip(h, -3, 3), torch.negative(torch.absolute(h))], -1)


def _canonical(x):
    """``_aliases`` with the canonical names."""
    h = torch.mul(x, torch.sigmoid(x))
    h = torch.div(torch.sub(h, torch.div(h.mean(-1, keepdim=True), 2.0)), 1.5)
    return torch.cat([torch.clamp(h, -3, 3), torch.neg(torch.abs(h))], -1)


class Composite(nn.Module):
    """A torch module without a rule of its own, decomposed at capture into ops with rules
    (``capture.with_rules``): ``build`` made under a fixed seed, applied to ``shape(x)``,
    its first output taken."""

    def __init__(self, build: Callable[[], nn.Module], shape: Callable = _grid):
        super().__init__()
        torch.manual_seed(1)
        self.module, self.shape = build(), shape

    def forward(self, x):
        out = self.module(self.shape(x))
        return out[0] if isinstance(out, tuple) else out


def _steps(x):
    """[B, 8] as 4 steps of 2 features."""
    return x.reshape(x.shape[0], 4, 2)


def _volume(x):
    return x.reshape(x.shape[0], 1, 2, 2, 2)


# Modules that had no rule (UnsupportedOpError naming aten.gru.input, aten.pixel_shuffle,
# aten.instance_norm, aten.conv3d, aten.conv_transpose2d, ...): each is decomposed by torch's
# own decompositions until its parts have rules (instance norm: into a variance, an rsqrt and
# products, the rsqrt a constant there; conv3d and the transposed convolutions: into the
# general convolution, which has a rule, ``Convolution``).
COMPOSITES = {
    "gru": (Composite(lambda: nn.GRU(2, 3, batch_first=True), _steps), 4 * 3),
    "rnn_tanh": (Composite(lambda: nn.RNN(2, 3, batch_first=True), _steps), 4 * 3),
    "pixel_shuffle": (Composite(lambda: nn.PixelShuffle(2), lambda x: x.reshape(-1, 4, 1, 2)), 8),
    "pixel_unshuffle": (Composite(lambda: nn.PixelUnshuffle(2)), 8),
    "instance_norm": (Composite(lambda: nn.InstanceNorm2d(1, affine=True)), D),
    "cosine_similarity": (lambda x: F.cosine_similarity(x[:, :4], x[:, 4:])[:, None] * 5, 1),
    "max_avg_pool1d": (lambda x: F.avg_pool1d(F.max_pool1d(x[:, None], 2), 2), 2),
    "adaptive_max_pool2d": (Composite(lambda: nn.AdaptiveMaxPool2d((1, 2))), 2),
    "conv3d": (Composite(lambda: nn.Conv3d(1, 2, 2, padding=1), _volume), 2 * 27),
    "conv_transpose1d": (Composite(lambda: nn.ConvTranspose1d(4, 2, 3, stride=2), _steps), 2 * 5),
    "conv_transpose2d": (
        Composite(lambda: nn.ConvTranspose2d(1, 2, 2, stride=2, groups=1, dilation=1)),
        2 * 4 * 8,
    ),
}


class TwoHalves(nn.Module):
    """``nn.Bilinear`` of the two halves of the 8 features, built under a fixed seed."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.bilinear = nn.Bilinear(4, 4, 3)

    def forward(self, x):
        return self.bilinear(x[:, :4], x[:, 4:])


_MIX, _SQUARE = (torch.randn(*s, generator=torch.Generator().manual_seed(3))
                 for s in ((8, 8), (4, 4)))  # fmt: skip


def _halves(x):
    return x.reshape(-1, 2, 4), x.reshape(-1, 2, 4).flip(-1)


# Einsums of three or more operands (einsum's rule took two), each beside the same pairwise
# products written out, left to right as torch contracts them.
EINSUMS = {
    "einsum_three": (
        lambda x: torch.einsum("bi,ij,bj->bj", x, _MIX, x),
        lambda x: torch.einsum("bj,bj->bj", torch.einsum("bi,ij->bj", x, _MIX), x),
        D,
    ),
    "einsum_four": (
        lambda x: torch.einsum("bi,bj,ij,bk->bk", x[:, :4], x[:, 4:], _SQUARE, x[:, :2]),
        lambda x: torch.einsum(
            "b,bk->bk",
            torch.einsum("bij,ij->b", torch.einsum("bi,bj->bij", x[:, :4], x[:, 4:]), _SQUARE),
            x[:, :2],
        ),
        2,
    ),
    "einsum_ellipsis": (
        lambda x: torch.einsum("...i,ij,...j->...", _halves(x)[0], _SQUARE, _halves(x)[1]),
        lambda x: torch.einsum(
            "...j,...j->...", torch.einsum("...i,ij->...j", _halves(x)[0], _SQUARE), _halves(x)[1]
        ),
        2,
    ),
    "einsum_implicit_output": (
        lambda x: torch.einsum("bi,ij,jk", x[:, :4], _SQUARE, _SQUARE.T),
        lambda x: torch.einsum(
            "bj,jk->bk", torch.einsum("bi,ij->bj", x[:, :4], _SQUARE), _SQUARE.T
        ),
        4,
    ),
}


def _scores_into_a_buffer(x: torch.Tensor) -> torch.Tensor:
    """Two rows' products by baddbmm with beta 0 into a buffer of NaN, which it never reads."""
    t = x.reshape(-1, 2, 4)
    buffer = torch.full((x.shape[0], 2, 2), float("nan"))
    return torch.baddbmm(buffer, t, t.mT, beta=0).reshape(x.shape[0], 4)


def _write_tail(x: torch.Tensor) -> torch.Tensor:
    y = x * 2
    y[:, -3:] = x[:, :3] * 3
    return y


def _masked_twice(x: torch.Tensor) -> torch.Tensor:
    """Attention over 2 tokens of width 4 whose second key is masked out for the first query
    twice over (-inf + -inf in an add)."""
    t = x.reshape(-1, 2, 4)
    mask = torch.tensor([[0.0, float("-inf")], [0.0, 0.0]])
    scores = t @ t.transpose(-1, -2) + mask
    return (torch.softmax(scores + mask, -1) @ t).reshape(-1, D)


BODIES: dict[str, tuple[Callable, int]] = {
    **COMPOSITES,
    **{name: (einsum, width) for name, (einsum, _, width) in EINSUMS.items()},
    "aliases": (_aliases, 2 * D),
    "glu": (nn.GLU(), D // 2),
    "hardshrink": (nn.Hardshrink(0.3), D),
    "softshrink": (nn.Softshrink(0.3), D),
    "type_as": (lambda x: torch.tanh(x).type_as(x), D),
    "stack": (lambda x: torch.stack([x, x * 3, torch.relu(x)], 1), 3 * D),
    "slice_scatter_copy_new_empty": (_scatter, D),
    "pad_constant": (lambda x: F.pad(_grid(x), (1, 2, 1, 0)), 3 * 7),
    "pad_reflect": (lambda x: F.pad(_grid(x), (1, 1, 1, 1), mode="reflect"), 4 * 6),
    "pad_replicate": (lambda x: F.pad(_grid(x), (2, 1, 1, 1), mode="replicate"), 4 * 7),
    "square": (lambda x: torch.square(x), D),
    "clamp": (lambda x: x.clamp(-0.5, 0.5), D),
    "softplus": (lambda x: F.softplus(x), D),
    "expm1": (lambda x: torch.expm1(x), D),
    "min_other": (lambda x: torch.min(x, x.flip(-1) * 2), D),
    "addcmul": (lambda x: torch.addcmul(x, x, torch.tanh(x), value=0.5), D),
    "cumsum": (lambda x: x.cumsum(-1), D),
    "repeat_interleave": (lambda x: x.repeat_interleave(2, dim=-1), 2 * D),
    "zeros_like": (lambda x: x + torch.zeros_like(x), D),
    "upsample_nearest": (lambda x: F.interpolate(_grid(x), scale_factor=2), 4 * D),
    "upsample_bilinear": (
        lambda x: F.interpolate(_grid(x), scale_factor=2, mode="bilinear"),
        4 * D,
    ),
    "upsample_bicubic": (
        lambda x: F.interpolate(_grid(x), scale_factor=2, mode="bicubic"),
        4 * D,
    ),
    "upsample_bicubic_antialias": (
        lambda x: F.interpolate(_grid(x), size=(1, 3), mode="bicubic", antialias=True),
        3,
    ),
    "lstm_two_layers_bidirectional": (Recurrent(), 4 * 6),
    "lstm_projected_with_states": (Recurrent(states=True), 4 * 2 + 2 + 3),
    "select_scatter": (_select_scatter, D),
    "as_strided_overlapping": (
        lambda x: x.contiguous().as_strided((x.shape[0], 3, 4), (8, 2, 1)),
        12,
    ),
    "vector_norm": (lambda x: torch.linalg.vector_norm(x.reshape(-1, 2, 4), dim=-1), 2),
    "index_add": (lambda x: x.index_add(1, torch.tensor([0, 0, 3]), x[:, :3]), D),
    "index_put": (_index_put, D),
    "im2col": (lambda x: F.unfold(_grid(x), (2, 2)), 4 * 3),
    # MobileViT-v2 folds its patches back into an image (nn.Fold); overlapping ones add up
    "col2im": (lambda x: F.fold(x.reshape(-1, 4, 2), (2, 3), (2, 2)), 6),
    "logsumexp": (lambda x: x.reshape(-1, 2, 4).logsumexp(-1), 2),
    "topk": (lambda x: x.topk(3, dim=-1).values, 3),
    "amax": (lambda x: x.reshape(-1, 2, 4).amax(-1), 2),
    # Hiera's pooling over mask units, and its kin
    "max_dim": (lambda x: x.reshape(-1, 2, 4).max(-1).values, 2),
    "min_dim_keepdim": (lambda x: x.reshape(-1, 2, 4).min(1, keepdim=True).values, 4),
    # SigLIP's patch embedding (padding="valid"); "same" with an odd kernel
    "conv_padding_valid": (GridConv("valid", (2, 2)), 2 * 3),
    "conv_padding_same": (GridConv("same", (1, 3)), 2 * D),
    "attention_one_kv_head": (_one_kv_head, 2 * D),
    "tril_triu": (lambda x: _grid(x).tril() - 2 * _grid(x).triu(1), D),
    # RecurrentGemma's gates: block-diagonal linear layers with a bias
    "baddbmm": (_groups, D),
    # beta 0: self is not read (GPT-2's upcast attention passes an uninitialised buffer)
    "baddbmm_beta_zero": (_scores_into_a_buffer, 4),
    # xLSTM's stabiliser and its concatenate (cat's alias); llama4's router scatters scores
    "abs_concatenate": (lambda x: torch.concatenate([x.abs(), x * 2], dim=1), 2 * D),
    "log": (lambda x: torch.log(torch.sigmoid(x) + 1.0), D),  # Kimi Linear's gates
    # YOSO's collision probability, 1 - acos(cosine) / pi, and the other inverse functions
    "acos_asin_atan": (
        lambda x: torch.acos(torch.tanh(x)) + torch.asin(torch.tanh(x)) * torch.atan(x),
        D,
    ),
    "scatter_src": (
        lambda x: torch.zeros_like(x).scatter(1, torch.tensor([[1, 4], [0, 7]]), x[:, :2] * 3),
        D,
    ),
    # products of many data factors
    "prod": (lambda x: x.reshape(-1, 2, 4).prod(-1), 2),
    "cumprod": (lambda x: x.cumprod(-1), D),
    # selections: sorted values, medians, the k-th value
    "sort_descending_stable": (
        lambda x: torch.sort(x, dim=-1, descending=True, stable=True).values,
        D,
    ),
    "msort": (lambda x: torch.msort(x.reshape(-1, 2, 4).transpose(0, 2)).transpose(0, 2), D),
    "median_dim": (lambda x: x.reshape(-1, 2, 4).median(-1).values, 2),
    "nanmedian_keepdim": (lambda x: x.reshape(-1, 2, 4).nanmedian(1, keepdim=True).values, 4),
    "kthvalue": (lambda x: x.kthvalue(3, -1).values[:, None], 1),
    "median_of_all": (lambda x: torch.stack([row.median() for row in x])[:, None], 1),
    "bilinear": (TwoHalves(), 3),
    # Longformer: a write at a negative start, x[:, -3:] = ..., and scores masked twice
    # with -inf (the add of two infinite operands), on the relevance path since written-out
    # attention passes relevance to its scores
    "slice_scatter_negative_start": (_write_tail, D),
    "masked_twice": (_masked_twice, D),
    # vision-language models put image features at the image tokens' embeddings
    "masked_scatter": (
        lambda x: (x * 2).masked_scatter(torch.arange(D) % 3 == 0, x[:, 5:].tanh()),
        D,
    ),
    # elementwise functions no family lists: activations, by torch's pointwise tag
    "unary_pointwise": (
        lambda x: (
            torch.log1p(x.sigmoid()) * torch.tan(x.tanh())
            + torch.erfc(x)
            - x.sinc()
            + torch.special.i0(x.tanh()) * torch.logit(x.sigmoid(), eps=1e-6).nan_to_num()
        ),
        D,
    ),
    # of a 4-D input: a sum of squares over neighbouring channels by avg_pool3d
    "local_response_norm": (
        Composite(lambda: nn.LocalResponseNorm(2), lambda x: x.reshape(-1, 2, 2, 2)),
        D,
    ),
}

_cache: dict[str, DLBacktrace] = {}


def captured(name: str) -> DLBacktrace:
    if name not in _cache:
        body, width = BODIES[name]
        _cache[name] = DLBacktrace(Head(body, width).eval(), {"x": rand(B, D)})
    return _cache[name]


@pytest.mark.parametrize("mode", ["default", "contrast", "reference"])
@pytest.mark.parametrize("name", list(BODIES))
def test_conserved(name, mode):
    result = captured(name).run_task(inputs={"x": rand(B, D, seed=1)}, mode=mode)
    c = result["conservation"]
    # 1e-5 of the seed, or of the parts where they are larger: mode "contrast" can explain a
    # small logit difference by large opposite shares (float32 sums them to ~1e-7 of each)
    scale = max(100.0, float(abs(c["inputs"]).max() + abs(c["sinks"]).max()))
    assert abs(c["inputs"] + c["sinks"] - c["seed"]).max() <= 1e-5 * scale, c
    if mode == "default":
        assert (abs(c["inputs"]) > 1e-3).all(), c


def test_stack_gives_each_piece_its_slice():
    R = rand(2, 3, 4, 5)
    (grads, sink) = Stack().default(ctx_of(aten.stack.default, {"tensors": [], "dim": 1}, R))
    assert sink is None
    for i, piece in enumerate(grads["tensors"]):
        assert torch.equal(piece, R[:, :, i])


def test_constant_pad_border_is_a_sink_and_crop_drops():
    x, R = rand(1, 3, 4), rand(2, 1, 4, 5)
    args = {"self": x, "pad": [2, -1, 1, 0], "mode": "constant", "value": 0.0}
    grads, sink = Pad().default(ctx_of(aten.pad.default, args, R))
    assert torch.equal(grads["self"][..., :3], R[..., 1:, 2:])
    assert torch.equal(grads["self"][..., 3:], torch.zeros(2, 1, 3, 1))  # cropped
    assert sink[..., 1:, 2:].abs().sum() == 0 and torch.equal(sink[..., 0, :], R[..., 0, :])
    assert torch.equal(sink[..., :2], R[..., :2])


def test_reflect_pad_gives_the_border_to_the_element_it_copied():
    x, R = rand(1, 1, 3), torch.ones(1, 1, 1, 5)
    args = {"self": x, "pad": [1, 1], "mode": "reflect", "value": None}
    grads, sink = Pad().default(ctx_of(aten.pad.default, args, R))
    assert sink is None and grads["self"].tolist() == [[[[1.0, 3.0, 1.0]]]]


def test_cumsum_shares_by_magnitude():
    x, R = rand(1, 4), rand(3, 1, 4)
    grads, sink = rule_for(aten.cumsum.default, "default")(
        ctx_of(aten.cumsum.default, {"self": x, "dim": -1}, R)
    )
    expected = x.abs() * (R / x.abs().cumsum(-1)).flip(-1).cumsum(-1).flip(-1)
    torch.testing.assert_close(grads["self"], expected)
    conserved(R, grads, sink)


def test_reductions_share_by_their_weights():
    x, R = rand(2, 5), rand(3, 2)
    deviations = (x - x.mean(-1, keepdim=True)) ** 2
    for op, extra, weights in (
        (aten.var.correction, {}, deviations / deviations.sum(-1, keepdim=True)),
        (aten.std.dim, {}, deviations / deviations.sum(-1, keepdim=True)),
        (aten.logsumexp.default, {}, torch.softmax(x, -1)),
        (aten.amax.default, {}, F.one_hot(x.argmax(-1), 5).to(x.dtype)),
        (aten.linalg_vector_norm.default, {"ord": 2}, x**2 / (x**2).sum(-1, keepdim=True)),
    ):
        args = {"self": x, **extra, "dim": [-1], "keepdim": False}
        grads, sink = Share().default(ctx_of(op, args, R))
        torch.testing.assert_close(grads["self"], R[..., None] * weights)
        conserved(R, grads, sink)


def test_slice_scatter_moves_relevance_with_the_elements():
    x, src, R = rand(2, 6), rand(2, 2, seed=1), rand(3, 2, 6, seed=2)
    args = {"self": x, "src": src, "dim": 1, "start": 1, "end": 5, "step": 2}
    grads, sink = Scatter().default(ctx_of(aten.slice_scatter.default, args, R))
    assert torch.equal(grads["src"], R[..., 1:5:2])
    assert torch.equal(grads["self"][..., 1:5:2], torch.zeros(3, 2, 2))
    conserved(R, grads, sink)


def test_only_functions_of_their_first_tensor_are_taken_for_activations():
    """The pointwise fallback hands R to the first argument: ``2 ** x`` (pow.Scalar, its tensor
    second), polygamma(n, x), in-place overloads and two-tensor clamps are no activations."""
    from engine.rules import family_of

    for op in (
        aten.pow.Scalar,
        aten.polygamma.default,
        aten.log1p_.default,
        aten.xlogy.Scalar_Self,
    ):
        assert family_of(op) is None, op
    for op in (aten.log1p.default, aten.erfinv.default, aten.special_i0e.default):
        assert family_of(op) is not None, op


def test_masked_scatter_moves_relevance_with_the_elements():
    """Two rows of 4, elements 1 and 3 of each replaced by source's first 4 (of 5)."""
    x, src, R = rand(2, 4), rand(5, seed=1), rand(3, 2, 4, seed=2)
    mask = torch.tensor([False, True, False, True])
    args = {"self": x, "mask": mask, "source": src}
    out = x.masked_scatter(mask, src)
    grads, sink = MaskedScatter().default(ctx_of(aten.masked_scatter.default, args, R, out=out))
    assert torch.equal(grads["source"][:, :4], R[:, :, 1::2].reshape(3, 4))
    assert torch.equal(grads["source"][:, 4], torch.zeros(3))  # not written
    assert torch.equal(grads["self"][..., 1::2], torch.zeros(3, 2, 2))
    conserved(R, grads, sink)


def test_index_add_shares_by_magnitude():
    x, src, R = rand(4), rand(2, seed=1), rand(3, 4, seed=2)
    index = torch.tensor([1, 1])
    args = {"self": x, "dim": 0, "index": index, "source": src, "alpha": 1}
    grads, sink = Scatter().default(ctx_of(aten.index_add.default, args, R))
    denominator = x.abs().index_add(0, index, src.abs())
    torch.testing.assert_close(grads["source"], src.abs() * (R / denominator)[:, index])
    conserved(R, grads, sink)


def test_topk_returns_relevance_to_the_taken_elements():
    x, R = rand(2, 5), rand(3, 2, 2)
    out = x.topk(2)
    grads, _ = TopK().default(
        ctx_of(aten.topk.default, {"self": x, "k": 2, "dim": -1}, {0: R}, out=out)
    )
    assert torch.equal(grads["self"].gather(2, out.indices.expand(3, -1, -1)), R)
    assert torch.allclose(grads["self"].sum(-1), R.sum(-1))


class HashedIds(nn.Module):
    """CANINE's input: each id hashed into buckets by integer arithmetic, ((id + 1) * prime)
    % buckets, before each lookup; and, like CANINE, no single token table to give
    (``get_input_embeddings`` raises) beside a learned position table."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.config = SimpleNamespace(max_position_embeddings=8)
        self.tables = nn.ModuleList(nn.Embedding(32, 4) for _ in range(2))
        self.positions, self.head = nn.Embedding(8, 4), nn.Linear(4, 3)

    def get_input_embeddings(self):
        raise NotImplementedError("no single token table")

    def forward(self, input_ids):
        hashed = [t(((input_ids + 1) * p) % 32) for t, p in zip(self.tables, (31, 43), strict=True)]
        h = sum(hashed) + self.positions(torch.arange(input_ids.shape[1]))
        return self.head(h.mean(1))


class MaskedIds(nn.Module):
    """gemma3's image-token masking: some ids replaced by a placeholder id (index_put) before
    the embedding lookup; relevance must still reach the ids."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.head = nn.Embedding(16, 4), nn.Linear(4, 3)

    def forward(self, input_ids):
        ids = input_ids.clone()
        ids[ids > 12] = 0
        return self.head(self.embed(ids).mean(1))


class PlaceholderIds(MaskedIds):
    """Gemma 4's: torch.where(mask, placeholder id, ids) before the lookup."""

    def forward(self, input_ids):
        ids = torch.where(input_ids > 12, 0, input_ids.clone())
        return self.head(self.embed(ids).mean(1))


class PromptedIds(nn.Module):
    """CPM-Ant's input: the ids cast to int32 and placed after constant prompt ids (cat)
    before the lookup; the prompt's share is a sink, the text's must reach the ids."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.head = nn.Embedding(24, 4), nn.Linear(4, 3)

    def forward(self, input_ids):
        prompt = torch.arange(16, 19, dtype=torch.int32).repeat(input_ids.shape[0], 1)
        ids = torch.cat([prompt, input_ids.to(torch.int32)], dim=1)
        return self.head(self.embed(ids).mean(1))


@pytest.mark.parametrize("mode", ["default", "contrast", "reference"])
@pytest.mark.parametrize("model", [HashedIds, MaskedIds, PlaceholderIds, PromptedIds])
def test_ids_reach_the_input(model, mode):
    """Ids hashed by integer arithmetic (CANINE), masked by index_put (gemma3) or where
    (gemma4) or cast and put after constant ids (CPM-Ant) stay on the id path: the
    relevance of the embeddings reaches the ids, conserved."""
    ids = torch.tensor([[1, 14, 3, 5], [15, 2, 7, 9]])
    result = DLBacktrace(model().eval(), {"input_ids": ids}).run_task(
        inputs={"input_ids": ids}, mode=mode
    )
    c = result["conservation"]
    assert abs(c["inputs"] + c["sinks"] - c["seed"]).max() <= 1e-5 * 100.0, c
    assert (abs(c["inputs"]) > 1.0).all(), c


def _cubic(s: torch.Tensor, a: float = -0.75) -> torch.Tensor:
    """The cubic convolution kernel torch's bicubic interpolation uses."""
    s = s.abs()
    near = ((a + 2) * s - (a + 3)) * s * s + 1
    far = ((a * s - 5 * a) * s + 8 * a) * s - 4 * a
    return torch.where(s <= 1, near, torch.where(s < 2, far, 0.0))


def test_bicubic_shares_by_the_magnitude_of_its_signed_weights():
    """One row of 4 upsampled to 8: A built from the kernel (taps clamped at the border);
    R_in = |x| * |A|^T (R / (|A| |x|)), conserved although some weights are negative."""
    x, R = rand(1, 1, 1, 4), rand(3, 1, 1, 1, 8, seed=1)
    src = (torch.arange(8) + 0.5) * 4 / 8 - 0.5
    A = torch.zeros(8, 4)
    for j, s in enumerate(src.tolist()):
        base = int(torch.floor(torch.tensor(s)))
        for tap in range(-1, 3):
            A[j, min(max(base + tap, 0), 3)] += _cubic(torch.tensor(s - base - tap))
    assert (A < 0).any()
    args = {"input": x, "output_size": [1, 8], "align_corners": False, "scale_factors": None}
    torch.testing.assert_close(aten.upsample_bicubic2d.vec(**args)[0, 0, 0], A @ x[0, 0, 0])
    grads, sink = Interpolation().default(ctx_of(aten.upsample_bicubic2d.vec, args, R))
    ratio = R[:, 0, 0, 0] / (A.abs() @ x[0, 0, 0].abs() + TINY)
    torch.testing.assert_close(grads["input"][:, 0, 0, 0], x[0, 0, 0].abs() * (ratio @ A.abs()))
    conserved(R, grads, sink)


def _lstm_args(lstm: nn.LSTM, x: torch.Tensor) -> dict:
    layers = lstm.num_layers * (2 if lstm.bidirectional else 1)
    h0 = torch.zeros(layers, x.shape[0], lstm.proj_size or lstm.hidden_size)
    return {
        "input": x,
        "hx": [h0, torch.zeros(layers, x.shape[0], lstm.hidden_size)],
        "params": list(lstm._flat_weights),
        "has_biases": lstm.bias,
        "num_layers": lstm.num_layers,
        "dropout": 0.0,
        "train": False,
        "bidirectional": lstm.bidirectional,
        "batch_first": lstm.batch_first,
    }


def test_lstm_rule_runs_the_cells_as_torch_does():
    lstm = Recurrent().lstm
    x = rand(2, 5, 2)
    layers = forward(x, *_lstm_args(lstm, x)["hx"], _lstm_args(lstm, x))
    top = torch.cat([torch.stack([c.outputs[t] for t in range(5)], 1) for c in layers[-1][1]], -1)
    torch.testing.assert_close(top, lstm(x)[0])


def test_lstm_one_step_gives_the_cell_input_share_to_x():
    """One step from zero states: h = o tanh(i g), so R goes whole to g, whose pre-activation
    W_g x + b shares it by the |z| rule; the gates take none."""
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 4, batch_first=True)
    x, R = rand(2, 1, 3), rand(5, 2, 1, 4, seed=1)
    args = _lstm_args(lstm, x)
    grads, sink = LSTM().default(ctx_of(aten.lstm.input, args, {0: R}))
    w = lstm.weight_ih_l0[8:12].detach()
    b = (lstm.bias_ih_l0 + lstm.bias_hh_l0)[8:12].detach()
    contributions = x[:, 0, None, :].abs() * w.abs()  # [B, unit, feature]
    shares = contributions / (contributions.sum(-1, keepdim=True) + b.abs()[:, None] + TINY)
    expected = torch.einsum("kbj,bjf->kbf", R[:, :, 0], shares)
    torch.testing.assert_close(grads["input"][:, :, 0], expected)
    assert grads["hx"][0].abs().max() == 0 and grads["hx"][1].abs().max() == 0
    total = grads["input"].flatten(1).sum(1) + sink.flatten(1).sum(1)
    torch.testing.assert_close(total, R.flatten(1).sum(1))


class Branch(nn.Module):
    """Longformer's "any global attention?": a Python branch on a value of the input, which
    export cannot trace symbolically (a data-dependent guard)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(D, 3)

    def forward(self, x, flags):
        h = torch.tanh(x)
        if flags.any():
            h = h * 2
        return self.head(h)


def test_a_data_dependent_branch_is_captured_by_draft_export_and_again_for_the_other_way():
    """Draft export captures the branch the example took and asserts it; an input that goes
    the other way fails that assertion, and is captured again for itself (it raised torch's
    'Runtime assertion failed' before ``DLBacktrace._with_graph``): each run equals eager,
    the doubled branch included, and conserves. Inputs that alternate reuse both graphs."""
    model = Branch().eval()
    x, flags = rand(B, D), torch.zeros(B, D, dtype=torch.long)
    with pytest.warns(UserWarning, match="draft export"):
        dlb = DLBacktrace(model, {"x": x, "flags": flags})
    other = {"x": x, "flags": torch.ones_like(flags)}
    for inputs in ({"x": rand(B, D, seed=1), "flags": flags}, other, {"x": x, "flags": flags},
                   other):  # fmt: skip
        result = dlb.run_task(inputs=inputs)
        c = result["conservation"]
        assert abs(c["inputs"] + c["sinks"] - c["seed"]).max() <= 1e-5 * 100.0, c
        assert (abs(c["inputs"]) > 1.0).all(), c
        with torch.no_grad():
            eager = model(**inputs)
        torch.testing.assert_close(torch.as_tensor(result["predictions"]), eager)
    assert len(dlb._graphs) == 2  # not one more per alternation


@pytest.mark.parametrize("mode", ["default", "contrast", "reference"])
def test_aliases_explain_as_their_canonical_ops(mode):
    """torch.multiply, subtract, divide, true_divide, clip, negative, absolute and concat
    had no rule (their aten ops are aliases); captured as the canonical ops, they give the
    relevance of the same model written with mul, sub, div, clamp, neg, abs and cat."""
    inputs = {"x": rand(B, D, seed=1)}
    alias = captured("aliases")
    names = {str(n.target) for n in alias.graph.nodes if n.op == "call_function"}
    assert not any(a in name for a in ("multiply", "subtract", "divide", "clip") for name in names)
    canonical = DLBacktrace(Head(_canonical, 2 * D).eval(), inputs)
    torch.testing.assert_close(
        alias.run_task(inputs=inputs, mode=mode)["relevance"]["x"],
        canonical.run_task(inputs=inputs, mode=mode)["relevance"]["x"],
    )


@pytest.mark.parametrize("mode", ["default", "contrast", "reference"])
@pytest.mark.parametrize("name", list(EINSUMS))
def test_einsum_gives_what_its_pairwise_products_give(name, mode):
    """An einsum of three or four operands (an ellipsis, an implicit output) explains as the
    same products written two at a time: the two-operand rule on each step."""
    _, pairwise, width = EINSUMS[name]
    inputs = {"x": rand(B, D, seed=1)}
    written = DLBacktrace(Head(pairwise, width).eval(), {"x": rand(B, D)})
    torch.testing.assert_close(
        captured(name).run_task(inputs=inputs, mode=mode)["relevance"]["x"],
        written.run_task(inputs=inputs, mode=mode)["relevance"]["x"],
    )


def test_sort_and_median_give_relevance_to_the_element_taken():
    """Sorted values hand their relevance back to the elements they came from; a median
    (kthvalue) along a dimension to its element, whose index the op returns; the median of
    all elements to the element equal to it."""
    x, R = rand(2, 5), rand(3, 2, 5, seed=1)
    out = x.sort(-1, descending=True)
    args = {"self": x, "dim": -1, "descending": True}
    grads, sink = TopK().default(ctx_of(aten.sort.default, args, {0: R}, out=out))
    assert sink is None and torch.equal(grads["self"].gather(2, out.indices.expand(3, -1, -1)), R)
    out = x.median(-1)
    args = {"self": x, "dim": -1, "keepdim": False}
    grads, _ = TopK().default(ctx_of(aten.median.dim, args, {0: R[..., 0]}, out=out))
    expected = F.one_hot(out.indices, 5).to(x.dtype) * R[..., :1]
    torch.testing.assert_close(grads["self"], expected)
    grads, _ = Share().default(ctx_of(aten.median.default, {"self": x}, R[:, 0, 0]))
    expected = (x == x.median()).to(x.dtype) * R[:, 0, 0, None, None]
    torch.testing.assert_close(grads["self"], expected)


def test_prod_gives_each_factor_an_equal_share():
    """Mode "default": the n factors of an output element share its relevance equally, as the
    two factors of a gate do: 1 / 4 each for a product of 4, 1 / (t + 1) for cumprod's t-th."""
    x, R = rand(2, 4), rand(3, 2, 4, seed=1)
    args = {"self": x, "dim": -1, "keepdim": False, "dtype": None}
    grads, sink = Prod().default(ctx_of(aten.prod.dim_int, args, R[..., 0]))
    torch.testing.assert_close(grads["self"], R[..., :1].expand(-1, -1, 4) / 4)
    args = {"self": x, "dim": -1, "dtype": None}
    grads, sink = Prod().default(ctx_of(aten.cumprod.default, args, R))
    shares = R / torch.arange(1, 5)
    torch.testing.assert_close(grads["self"], shares.flip(-1).cumsum(-1).flip(-1))
    conserved(R, grads, sink)


def test_prod_reference_splits_the_change_exactly():
    """Mode "reference": three factors' change, y - y' = sum_i dx_i * integral_0^1 of the
    other two along the line from x' to x; for x_1 that is
    dx_1 (x'_2 x'_3 + (x'_2 dx_3 + dx_2 x'_3) / 2 + dx_2 dx_3 / 3)."""
    x, xr, R = rand(2, 3), rand(2, 3, seed=1), rand(4, 2, seed=2)
    args = {"self": x, "dim": -1, "keepdim": False, "dtype": None}
    out, ref_out = x.prod(-1), xr.prod(-1)
    ctx = ctx_of(aten.prod.dim_int, args, R, ref={**args, "self": xr}, out=out, ref_out=ref_out)
    grads, sink = Prod().reference(ctx)
    (_, b, c), (da, db, dc) = xr.unbind(-1), (x - xr).unbind(-1)
    line = b * c + (b * dc + db * c) / 2 + db * dc / 3
    torch.testing.assert_close(grads["self"][..., 0], R / (out - ref_out) * da * line)
    torch.testing.assert_close(grads["self"].sum(-1), R, atol=1e-5, rtol=1e-5)
    conserved(R, grads, sink)


def test_bilinear_with_a_constant_operand_is_the_linear_rule():
    """x1^T W x2 + b with x2 a constant is a linear layer of x1 with weights W x2: its
    relevance is the linear rule's; with both data, each takes half of R."""
    torch.manual_seed(0)
    layer = nn.Bilinear(4, 3, 2)
    w, b = layer.weight.detach(), layer.bias.detach()
    x1, x2, R = rand(1, 4), rand(1, 3, seed=1), rand(5, 1, 2, seed=2)
    args = {"input1": x1, "input2": x2, "weight": w, "bias": b}
    grads, sink = Bilinear().default(ctx_of(aten.bilinear.default, args, R, data={"input1"}))
    linear = {"input": x1, "weight": torch.einsum("oij,j->oi", w, x2[0]), "bias": b}
    expected, expected_sink = Linear().default(ctx_of(aten.linear.default, linear, R))
    torch.testing.assert_close(grads["input1"], expected["input"])
    torch.testing.assert_close(sink, expected_sink)
    grads, sink = Bilinear().default(ctx_of(aten.bilinear.default, args, R))
    torch.testing.assert_close(grads["input1"], expected["input"] / 2)
    conserved(R, grads, sink)


def test_avg_pool3d_shares_by_magnitude():
    """nn.LocalResponseNorm's avg_pool3d: one window of 8 shares its relevance in proportion
    to |x|, as avg_pool2d does."""
    x, R = rand(1, 1, 2, 2, 2), rand(3, 1, 1, 1, 1, 1, seed=1)
    args = {"self": x, "kernel_size": [2, 2, 2], "stride": [2, 2, 2], "padding": [0, 0, 0]}
    args |= {"ceil_mode": False, "count_include_pad": True, "divisor_override": None}
    grads, sink = PositiveMap().default(ctx_of(aten.avg_pool3d.default, args, R))
    torch.testing.assert_close(grads["self"], R * x.abs() / x.abs().sum())
    conserved(R, grads, sink)
