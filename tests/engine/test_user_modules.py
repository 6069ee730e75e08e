"""Modules users write themselves (the registry's "python" source returns any nn.Module):
recurrent nets, convolutions of every arity, norms, attention from torch.nn, gates, pooling by
selection, several inputs and outputs. Each tiny model, with random weights, explained on a
batch of two: the recorded forward equals eager, and inputs + sinks = seed in every mode."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from engine import DLBacktrace
from engine.capture import CaptureError

B = 2


def rand(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


class Recurrent(nn.Module):
    """[B, T, 4] through ``rnn`` (time-major where it is not batch-first), its outputs
    averaged over time, or its final hidden states of every layer and direction."""

    def __init__(self, rnn: nn.RNNBase, hidden_states: bool = False):
        super().__init__()
        self.rnn, self.hidden_states = rnn, hidden_states
        width = rnn.hidden_size * (1 + rnn.bidirectional)
        self.head = nn.Linear(width * (rnn.num_layers if hidden_states else 1), 3)

    def forward(self, x):
        out, h = self.rnn(x if self.rnn.batch_first else x.transpose(0, 1))
        if self.hidden_states:
            h = h[0] if isinstance(h, tuple) else h
            return self.head(torch.cat(list(h), -1))
        return self.head((out if self.rnn.batch_first else out.transpose(0, 1)).mean(1))


class Lengths(nn.Module):
    """[B, T, 4] of sequences of ``lengths`` through an LSTM or a GRU, packed
    (``pack_padded_sequence``, then ``pad_packed_sequence`` or the final hidden state) or, as
    the engine asks instead, padded: the outputs masked past each length, or taken at each
    sequence's last step."""

    def __init__(self, rnn: nn.RNNBase, packed: bool, last: bool):
        super().__init__()
        self.rnn, self.packed, self.last = rnn, packed, last
        self.head = nn.Linear(rnn.hidden_size * (1 + rnn.bidirectional), 3)

    def forward(self, x, lengths):
        if not self.packed:
            out, _ = self.rnn(x)
            if self.last:
                at = (lengths - 1)[:, None, None].expand(-1, 1, out.shape[-1])
                return self.head(out.gather(1, at)[:, 0])
            mask = torch.arange(x.shape[1], device=x.device)[None] < lengths[:, None]
            return self.head((out * mask[..., None]).sum(1))
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, h = self.rnn(packed)
        if self.last:
            h = h[0] if isinstance(h, tuple) else h
            return self.head(torch.cat(list(h), -1))
        return self.head(pad_packed_sequence(out, batch_first=True)[0].sum(1))


class CellLoop(nn.Module):
    """An LSTM cell stepped over time in Python, from a zero state."""

    def __init__(self):
        super().__init__()
        self.cell, self.head = nn.LSTMCell(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = c = x.new_zeros(x.shape[0], 6)
        for t in range(x.shape[1]):
            h, c = self.cell(x[:, t], (h, c))
        return self.head(h)


class Image(nn.Module):
    """[B, 4, 8, 8] through ``body``, flattened, to 3 logits."""

    def __init__(self, body: nn.Module, width: int):
        super().__init__()
        self.body, self.head = body, nn.Linear(width, 3)

    def forward(self, x):
        return self.head(self.body(x).flatten(1))


class SqueezeExcite(nn.Module):
    """x * sigmoid(fc(mean(x))) after a convolution."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.fc1, self.fc2, self.head = nn.Linear(8, 2), nn.Linear(2, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = F.relu(self.conv(x))
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(h.mean((2, 3))))))
        return self.head((h * s[:, :, None, None]).amax((2, 3)))


class Tabular(nn.Module):
    """[B, 8] through a linear layer, then ``fn``, then a head of ``width`` inputs."""

    def __init__(self, fn: Callable, width: int = 8):
        super().__init__()
        self.pre, self.fn, self.head = nn.Linear(8, 8), fn, nn.Linear(width, 3)

    def forward(self, x):
        return self.head(self.fn(self.pre(x)).reshape(x.shape[0], -1))


class SwiGLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1, self.w2, self.w3 = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(x + self.w3(F.silu(self.w1(x)) * self.w2(x)))


class InPlace(nn.Module):
    """``h += x``, ``ReLU(inplace=True)``, ``h *= 2``, ``clamp_``."""

    def __init__(self):
        super().__init__()
        self.l1, self.act, self.l2 = nn.Linear(8, 8), nn.ReLU(inplace=True), nn.Linear(8, 3)

    def forward(self, x):
        h = self.l1(x)
        h += x
        h = self.act(h)
        h *= 2
        h.clamp_(max=3)
        return self.l2(h)


class Masked(nn.Module):
    """masked_fill and where with masks computed from the data, a boolean-mask write."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = self.l1(x).masked_fill(x < -1, 0.0)
        h = torch.where(x > 0, h, -h).clone()
        h[h > 1] = 1.0
        return self.l2(h)


class Gathered(nn.Module):
    """The 4 features of largest magnitude by argsort and gather, 4 by index_select."""

    def __init__(self):
        super().__init__()
        self.l1, self.head = nn.Linear(8, 8), nn.Linear(8, 3)
        self.register_buffer("some", torch.tensor([0, 3, 5, 7]))

    def forward(self, x):
        h = self.l1(x)
        top = torch.gather(h, 1, h.abs().argsort(-1)[:, :4])
        return self.head(torch.cat([top, torch.index_select(h, 1, self.some)], 1))


class Pieces(nn.Module):
    """chunk, split, stack, unbind, flip, roll."""

    def __init__(self):
        super().__init__()
        self.l1, self.head = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        a, b = self.l1(x).chunk(2, -1)
        c, d = x.split([3, 5], -1)
        first, second = torch.stack([a, b], 1).unbind(1)
        return self.head(torch.cat([first * second, c, d.flip(-1).roll(1, -1)], -1)[:, :8])


class Statistics(nn.Module):
    """Pooling over time by mean, sum, var, std, logsumexp, topk and max of a Conv1d."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv1d(4, 8, 3), nn.Linear(8 * 7, 3)

    def forward(self, x):
        h = self.conv(x)
        pooled = [h.mean(-1), h.sum(-1), h.var(-1), h.std(-1), h.logsumexp(-1)]
        pooled += [h.topk(1, -1).values[..., 0], h.max(-1).values]
        return self.head(torch.cat(pooled, -1))


class Attention(nn.Module):
    """nn.MultiheadAttention over [B, T, 4] projected to 8, batch-first or not, with a key
    padding mask where one is given; the outputs averaged over time."""

    def __init__(self, batch_first: bool):
        super().__init__()
        self.batch_first = batch_first
        self.emb, self.head = nn.Linear(4, 8), nn.Linear(8, 3)
        self.att = nn.MultiheadAttention(8, 2, batch_first=batch_first)

    def forward(self, x, padding=None):
        h = self.emb(x) if self.batch_first else self.emb(x).transpose(0, 1)
        out = self.att(h, h, h, key_padding_mask=padding, need_weights=False)[0]
        return self.head((out if self.batch_first else out.transpose(0, 1)).mean(1))


class Encoder(nn.Module):
    """nn.TransformerEncoderLayer (in eval: its fast path), its first token classified."""

    def __init__(self, norm_first: bool):
        super().__init__()
        self.emb, self.head = nn.Linear(4, 8), nn.Linear(8, 3)
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True, norm_first=norm_first)

    def forward(self, x, padding=None):
        return self.head(self.enc(self.emb(x), src_key_padding_mask=padding)[:, 0])


class Causal(nn.Module):
    """scaled_dot_product_attention with is_causal, the last position classified."""

    def __init__(self):
        super().__init__()
        self.qkv, self.head = nn.Linear(4, 24), nn.Linear(8, 3)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, 2, 4).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.head(out.transpose(1, 2).reshape(b, t, 8)[:, -1])


class LogSoftmax(nn.Module):
    """A classifier whose last layer is log_softmax, as users train with NLLLoss."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(8, 16), nn.Linear(16, 3)

    def forward(self, x):
        return F.log_softmax(self.l2(F.relu(self.l1(x))), dim=1)


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(8, 6), nn.Linear(5, 6), nn.Linear(6, 3)

    def forward(self, a, b):
        return self.head(F.relu(self.a(a)) * torch.tanh(self.b(b)) + self.a(a))


class IdsAndNumbers(nn.Module):
    """Categorical ids embedded beside numeric features."""

    def __init__(self):
        super().__init__()
        self.emb, self.num, self.head = nn.Embedding(20, 4), nn.Linear(3, 4), nn.Linear(12, 3)

    def forward(self, ids, numbers):
        return self.head(torch.cat([self.emb(ids).flatten(1), self.num(numbers)], 1))


class Outputs(nn.Module):
    """Logits beside an auxiliary output, as a dict, a tuple or a list."""

    def __init__(self, kind: type):
        super().__init__()
        self.kind, self.logits, self.aux = kind, nn.Linear(8, 3), nn.Linear(8, 1)

    def forward(self, x):
        if self.kind is dict:
            return {"aux": self.aux(x), "logits": self.logits(x)}
        return self.kind([self.logits(x), self.aux(x)])


class Regression(nn.Module):
    """One value per sample, [B, 1] or squeezed to [B]."""

    def __init__(self, squeeze: bool):
        super().__init__()
        self.squeeze, self.l1, self.l2 = squeeze, nn.Linear(8, 8), nn.Linear(8, 1)

    def forward(self, x):
        y = self.l2(torch.relu(self.l1(x)))
        return y.squeeze(-1) if self.squeeze else y


class MaxNorm(nn.Module):
    """nn.Embedding(max_norm=...): it renormalises its weight in place at each lookup."""

    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(20, 8, max_norm=1.0), nn.Linear(8, 3)

    def forward(self, input_ids):
        return self.head(self.emb(input_ids).mean(1))


class Bag(nn.Module):
    """nn.EmbeddingBag over [B, L] ids (``mode``, id 0 its padding), or the same table as
    nn.Embedding reduced over the tokens (``written_out``): the sum, mean or max the bag
    computes, written by hand."""

    def __init__(self, mode: str, written_out: bool = False):
        super().__init__()
        self.mode, self.written_out = mode, written_out
        self.bag, self.head = nn.EmbeddingBag(20, 8, mode=mode, padding_idx=0), nn.Linear(8, 3)

    def forward(self, input_ids):
        if not self.written_out:
            return self.head(self.bag(input_ids))
        rows = F.embedding(input_ids, self.bag.weight)
        if self.mode == "max":
            return self.head(rows.amax(1))
        return self.head(rows.sum(1) if self.mode == "sum" else rows.mean(1))


class OneHotIds(nn.Module):
    """Ids embedded as one-hot codes: cast to floats and through a linear layer, or
    multiplied by a weight (``matmul``); their mean classified."""

    def __init__(self, matmul: bool = False):
        super().__init__()
        self.matmul, self.codes, self.head = matmul, nn.Linear(20, 8), nn.Linear(8, 3)

    def forward(self, input_ids):
        codes = F.one_hot(input_ids, 20).float()
        if self.matmul:
            return self.head((codes @ self.codes.weight.T + self.codes.bias).mean(1))
        return self.head(self.codes(codes).mean(1))


class EmbeddedIds(nn.Module):
    """OneHotIds's weights as an nn.Embedding (the codes' weight transposed) plus its bias."""

    def __init__(self, one_hot: OneHotIds):
        super().__init__()
        self.emb = nn.Embedding.from_pretrained(one_hot.codes.weight.detach().T.clone())
        self.bias, self.head = one_hot.codes.bias, one_hot.head

    def forward(self, input_ids):
        return self.head((self.emb(input_ids) + self.bias).mean(1))


class FlatBag(nn.Module):
    """nn.EmbeddingBag as its documentation leads with: flat ids [N] cut into bags by
    ``offsets``, or given [B, L] (no offsets); or ids [B], one per bag (``one_each``)."""

    def __init__(self, one_each: bool = False):
        super().__init__()
        self.one_each = one_each
        self.bag, self.head = nn.EmbeddingBag(20, 8, padding_idx=0), nn.Linear(8, 3)

    def forward(self, text, offsets=None):
        return self.head(self.bag(text[:, None] if self.one_each else text, offsets))


class Prototypes(nn.Module):
    """A prototype classifier: the negative distance of the features to 3 learned prototypes,
    by torch.cdist or written out."""

    def __init__(self, written_out: bool = False):
        super().__init__()
        self.written_out = written_out
        self.enc, self.prototypes = nn.Linear(8, 6), nn.Parameter(torch.randn(3, 6))

    def forward(self, x):
        h = self.enc(x)
        if self.written_out:
            return -((h[:, None] - self.prototypes[None]) ** 2).sum(-1).sqrt()
        return -torch.cdist(h, self.prototypes)


def _sequence():
    return rand(B, 6, 4)


def _lengths():
    return {"x": _sequence(), "lengths": torch.tensor([6, 4])}


def _padded_sequence():
    return {"x": _sequence(), "padding": torch.tensor([[False] * 6, [False] * 4 + [True] * 2])}


def _tabular():
    return rand(B, 8)


def _image():
    return rand(B, 4, 8, 8)


def _ids():
    return torch.tensor([[3, 5, 7, 1], [2, 9, 4, 4]])


# name -> (model, inputs)
MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[], object]]] = {
    "lstm_batch_first": (lambda: Recurrent(nn.LSTM(4, 6, batch_first=True)), _sequence),
    "lstm_bidirectional_time_major_hidden": (
        lambda: Recurrent(nn.LSTM(4, 5, bidirectional=True), hidden_states=True),
        _sequence,
    ),
    "gru_bidirectional": (
        lambda: Recurrent(nn.GRU(4, 5, batch_first=True, bidirectional=True)),
        _sequence,
    ),
    "gru_two_layers_hidden": (
        lambda: Recurrent(nn.GRU(4, 5, 2, batch_first=True), hidden_states=True),
        _sequence,
    ),
    "rnn_relu_time_major": (lambda: Recurrent(nn.RNN(4, 6, nonlinearity="relu")), _sequence),
    "lstm_cell_loop": (CellLoop, _sequence),
    "lstm_padded_masked_past_lengths": (
        lambda: Lengths(nn.LSTM(4, 6, batch_first=True), packed=False, last=False),
        _lengths,
    ),
    "gru_padded_last_step_of_lengths": (
        lambda: Lengths(nn.GRU(4, 6, batch_first=True), packed=False, last=True),
        _lengths,
    ),
    "conv1d_groups_dilation_adaptive_max": (
        lambda: nn.Sequential(
            nn.Conv1d(4, 8, 3, padding=2, dilation=2, groups=2),
            nn.GELU(),
            nn.Conv1d(8, 8, 3, groups=8),
            nn.AdaptiveMaxPool1d(1),
            nn.Flatten(),
            nn.Linear(8, 3),
        ),
        lambda: rand(B, 4, 8),
    ),
    "conv3d_groups_batch_norm": (
        lambda: nn.Sequential(
            nn.Conv3d(2, 4, 3, padding=1, groups=2),
            nn.BatchNorm3d(4),
            nn.ReLU(),
            nn.AdaptiveAvgPool3d(1),
            nn.Flatten(),
            nn.Linear(4, 3),
        ),
        lambda: rand(B, 2, 4, 4, 4),
    ),
    "conv_transpose2d_groups": (
        lambda: Image(
            nn.Sequential(
                nn.Conv2d(4, 8, 3, stride=2, padding=1),
                nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1, groups=2),
                nn.AdaptiveAvgPool2d(1),
            ),
            4,
        ),
        _image,
    ),
    "group_norm": (lambda: Image(nn.Sequential(nn.GroupNorm(2, 4), nn.AvgPool2d(4)), 16), _image),
    "instance_norm": (
        lambda: Image(nn.Sequential(nn.InstanceNorm2d(4, affine=True), nn.MaxPool2d(4)), 16),
        _image,
    ),
    "local_response_norm": (
        lambda: Image(nn.Sequential(nn.LocalResponseNorm(3), nn.AdaptiveMaxPool2d(2)), 16),
        _image,
    ),
    "interpolate_pixel_shuffle": (
        lambda: Image(
            nn.Sequential(
                nn.Upsample(scale_factor=2, mode="bilinear"),
                nn.PixelShuffle(2),
                nn.Upsample(scale_factor=0.5),
                nn.AdaptiveMaxPool2d(2),
            ),
            4,
        ),
        _image,
    ),
    "circular_padding_pools": (
        lambda: Image(
            nn.Sequential(
                nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular"),
                nn.MaxPool2d(3, 2, ceil_mode=True),
                nn.AvgPool2d(3, 1, padding=1, count_include_pad=False),
                nn.LPPool2d(2, 2),
            ),
            16,
        ),
        _image,
    ),
    "squeeze_excite": (SqueezeExcite, _image),
    "swiglu": (SwiGLU, _tabular),
    "activations": (
        lambda: Tabular(
            lambda h: (
                F.hardtanh(h)
                + F.hardswish(h)
                + F.mish(h)
                + F.elu(h)
                + F.selu(h)
                + F.softplus(h)
                + F.leaky_relu(h, 0.1)
                + F.relu6(h)
                + F.logsigmoid(h)
                + F.normalize(h, dim=-1)
                + F.glu(torch.cat([h, h], -1), -1)
            )
        ),  # fmt: skip
        _tabular,
    ),
    "prelu_dropout": (
        lambda: nn.Sequential(nn.Linear(8, 8), nn.PReLU(8), nn.Dropout(0.5), nn.Linear(8, 3)),
        _tabular,
    ),
    "cumsum": (lambda: Tabular(lambda h: h.cumsum(-1)), _tabular),
    "in_place": (InPlace, _tabular),
    "masks_from_data": (Masked, _tabular),
    "gather_index_select": (Gathered, _tabular),
    "chunk_split_stack_unbind_flip_roll": (Pieces, _tabular),
    "statistics_pooling": (Statistics, lambda: rand(B, 4, 8)),
    "multihead_attention_batch_first": (lambda: Attention(True), _sequence),
    "multihead_attention_time_major_padding": (lambda: Attention(False), _padded_sequence),
    "encoder_layer_post_norm_padding": (lambda: Encoder(False), _padded_sequence),
    "encoder_layer_pre_norm": (lambda: Encoder(True), _sequence),
    "sdpa_is_causal": (Causal, _sequence),
    "log_softmax_last": (LogSoftmax, _tabular),
    "two_inputs": (TwoInputs, lambda: {"a": rand(B, 8), "b": rand(B, 5, seed=3)}),
    "ids_and_numbers": (
        IdsAndNumbers,
        lambda: {"ids": _ids()[:, :2], "numbers": rand(B, 3)},
    ),
    "dict_output_logits_second": (lambda: Outputs(dict), _tabular),
    "tuple_output": (lambda: Outputs(tuple), _tabular),
    "list_output": (lambda: Outputs(list), _tabular),
    "regression_b1": (lambda: Regression(False), _tabular),
    "regression_b": (lambda: Regression(True), _tabular),
    "embedding_max_norm": (MaxNorm, _ids),
    "embedding_bag_mean_padding": (
        lambda: Bag("mean"),
        lambda: torch.tensor([[3, 5, 7, 0], [2, 9, 4, 4]]),
    ),
    "embedding_bag_max": (lambda: Bag("max"), _ids),
    "cdist_prototypes": (Prototypes, _tabular),
    "embedding_bag_padded_rows": (FlatBag, lambda: torch.tensor([[3, 5, 7, 1], [2, 9, 0, 0]])),
    "embedding_bag_one_id_each": (lambda: FlatBag(one_each=True), lambda: torch.tensor([3, 5])),
    "one_hot_linear": (OneHotIds, _ids),
    "one_hot_matmul": (lambda: OneHotIds(matmul=True), _ids),
}

_cache: dict[str, tuple] = {}


def built(name: str) -> tuple[nn.Module, object, DLBacktrace]:
    """Each model captured once (export is the slow part), its weights drawn under seed 0."""
    if name not in _cache:
        make, inputs = MODELS[name]
        torch.manual_seed(0)
        model = make().eval()
        example = inputs()
        _cache[name] = (model, example, DLBacktrace(model, example))
    return _cache[name]


def _eager(model: nn.Module, inputs: object) -> torch.Tensor:
    """The logits the model returns: under ``logits``, else its first output."""
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    if isinstance(out, dict):
        return out["logits"]
    return out[0] if isinstance(out, list | tuple) else out


@pytest.mark.parametrize("mode", ["default", "contrast", "reference"])
@pytest.mark.parametrize("name", list(MODELS))
def test_forward_equals_eager_and_relevance_is_conserved(name, mode):
    model, inputs, dlb = built(name)
    result = dlb.run_task(inputs=inputs, mode=mode)
    torch.testing.assert_close(
        torch.as_tensor(result["predictions"]), _eager(model, inputs), rtol=1e-4, atol=1e-5
    )
    c = result["conservation"]
    parts = abs(c["inputs"]) + abs(c["sinks"])
    assert (abs(c["inputs"] + c["sinks"] - c["seed"]) <= 1e-4 * 100.0 + 1e-5 * parts).all(), c
    if mode == "default":  # relevance reaches the inputs rather than vanishing into sinks
        assert (c["inputs"] > 1.0).all(), c


@pytest.mark.parametrize("name", ["lstm_batch_first", "gru_bidirectional"])
def test_recurrent_layers_are_captured_without_a_warning(name):
    """torch.export warned at every capture that nn.LSTM's and nn.GRU's ``_flat_weights``,
    reassigned in their forward, should be buffers: noise no user of the engine can act on."""
    make, inputs = MODELS[name]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        DLBacktrace(make().eval(), inputs())


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_embedding_bag_explains_as_its_lookups_reduced(mode):
    """An embedding bag gives its ids what its rows, looked up and summed (averaged, maxed)
    by hand, give them: each id its share of the bag's vector (it gave none: the bag was
    no lookup, and every input was a sink)."""
    ids = torch.tensor([[3, 5, 7, 1], [2, 9, 4, 4]])
    torch.manual_seed(0)
    bag = Bag(mode).eval()
    written = Bag(mode, written_out=True).eval()
    written.load_state_dict(bag.state_dict())
    got = DLBacktrace(bag, ids).run_task(inputs=ids)
    expected = DLBacktrace(written, ids).run_task(inputs=ids)
    torch.testing.assert_close(got["predictions"], expected["predictions"])
    torch.testing.assert_close(got["relevance"]["input_ids"], expected["relevance"]["input_ids"])
    assert (got["relevance"]["input_ids"].abs().sum(1) > 1.0).all()


def test_cdist_explains_as_the_distance_written_out():
    """torch.cdist (no rule: 'no relevance rule for aten.cdist') is decomposed at capture into
    the norm of the differences, and explains as that distance written by hand (in mode
    default: in mode reference the norm has a difference rule of its own)."""
    x = rand(B, 8)
    torch.manual_seed(0)
    model = Prototypes().eval()
    written = Prototypes(written_out=True).eval()
    written.load_state_dict(model.state_dict())
    got = DLBacktrace(model, x).run_task(inputs=x)
    expected = DLBacktrace(written, x).run_task(inputs=x)
    torch.testing.assert_close(got["relevance"]["x"], expected["relevance"]["x"])


@pytest.mark.parametrize("matmul", [False, True])
@pytest.mark.parametrize("mode", ["default", "contrast", "reference"])
def test_one_hot_ids_explain_as_an_embedding(mode, matmul):
    """Ids one-hot coded, cast to floats and multiplied by a weight get what the same
    weights as nn.Embedding give them (they got 0: a cast of integer codes carried no
    relevance, and the engine warned that none reached the inputs)."""
    ids = _ids()
    torch.manual_seed(0)
    one_hot = OneHotIds(matmul).eval()
    got = DLBacktrace(one_hot, ids).run_task(inputs=ids, mode=mode)
    expected = DLBacktrace(EmbeddedIds(one_hot).eval(), ids).run_task(inputs=ids, mode=mode)
    torch.testing.assert_close(got["predictions"], expected["predictions"])
    torch.testing.assert_close(
        got["relevance"]["input_ids"], expected["relevance"]["input_ids"], rtol=1e-4, atol=1e-3
    )
    assert (got["relevance"]["input_ids"].abs().sum(1) > 1.0).all()


def test_one_hot_ids_past_their_classes_are_refused_by_name():
    """A one-hot code's classes are the rows its ids index: an id past them is refused
    naming the input and the range, as for an embedding table, before torch's own
    'Class values must be smaller than num_classes'."""
    _, _, dlb = built("one_hot_linear")
    with pytest.raises(ValueError, match=r"input_ids: ids must lie in \[0, 20\)"):
        dlb.run_task(inputs=torch.tensor([[3, 25, 7, 1], [2, 9, 4, 4]]))


@pytest.mark.parametrize(
    "rnn, last",
    [
        (nn.LSTM(4, 6, batch_first=True), False),
        (nn.GRU(4, 5, batch_first=True, bidirectional=True), True),
    ],
    ids=["lstm_pad_packed", "gru_bidirectional_final_state"],
)
def test_packed_sequences_are_refused_saying_what_to_do(rnn, last):
    """pack_padded_sequence into a recurrent layer: torch.export cannot capture a packed
    batch (its shape is the lengths' values), and said only "zeros(): argument 'size' failed
    to unpack the object ... got FakeTensor". The refusal names it and the way round: the
    padded batch, masked (which the models "*_padded_*" above explain)."""
    model = Lengths(rnn, packed=True, last=last).eval()
    with pytest.raises(CaptureError, match=r"pack_padded_sequence.*Pass the padded batch"):
        DLBacktrace(model, _lengths())


def test_embedding_bag_of_flat_ids_and_offsets_says_to_pass_rows():
    """Flat ids [7] in bags at offsets [0, 4] were taken as a batch of 7 beside a batch of 2:
    'offsets: shape (2,) does not match text: the graph takes one batch size for text
    (dimension 0: 7) and offsets (dimension 0: 2)', which names no way out. The engine
    explains each sample on its own row of ids: [B, L] rows padded with the bag's
    padding_idx (explained above, "embedding_bag_padded_rows")."""
    inputs = {"text": torch.tensor([3, 5, 7, 1, 2, 9, 4]), "offsets": torch.tensor([0, 4])}
    with pytest.raises(ValueError, match=r"text: nn.EmbeddingBag takes these ids flat.*\[B, L\]"):
        DLBacktrace(FlatBag().eval(), inputs)


def test_one_hot_without_num_classes_is_refused_saying_to_give_it():
    """F.one_hot(ids) takes its width from the largest id, which export cannot capture: it
    said only 'Could not extract specialized integer from data-dependent expression u0'."""

    class Inferred(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(10, 3)

        def forward(self, input_ids):
            return self.head(F.one_hot(input_ids).float().sum(1))

    with pytest.raises(CaptureError, match=r"without num_classes.*F.one_hot\(ids, num_classes\)"):
        DLBacktrace(Inferred().eval(), _ids())
