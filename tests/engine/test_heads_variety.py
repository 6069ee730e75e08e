"""Heads people bring that the engine's own models do not cover: each runs through
``run_task``, its predictions equal the eager model's, and relevance is conserved (inputs +
sinks == seed, per seed and sample)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from engine import DLBacktrace
from tests.engine.test_heads import padded


def assert_conserved(result: dict) -> None:
    """inputs + sinks == seed to 1e-5 of the seed, plus float32's rounding of the parts where
    they are larger than the seed (mode "reference": a reference's own logits can be)."""
    c = result["conservation"]
    parts = np.abs(c["inputs"]) + np.abs(c["sinks"])
    error = np.abs(c["inputs"] + c["sinks"] - c["seed"])
    assert (error <= 1e-5 * (np.abs(c["seed"]) + parts)).all(), c


# ------------------------------------------------------------ question answering


class TwoHeadReader(nn.Module):
    """Start and end logits from two separate linear layers, not split from one [B, T, 2]
    tensor; returned as a tuple or as a dict."""

    def __init__(self, as_dict: bool = False):
        super().__init__()
        self.embed = nn.Embedding(40, 16)
        self.start = nn.Linear(16, 1)
        self.end = nn.Linear(16, 1)
        self.as_dict = as_dict

    def forward(self, input_ids):
        h = torch.tanh(self.embed(input_ids))
        start, end = self.start(h).squeeze(-1), self.end(h).squeeze(-1)
        return {"start_logits": start, "end_logits": end} if self.as_dict else (start, end)


def splinter() -> nn.Module:
    """A one-layer Splinter: its start and end logits are two products of a question token's
    projections with the sequence's (``SplinterForQuestionAnswering``)."""
    import transformers

    config = transformers.SplinterConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16, question_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.SplinterForQuestionAnswering(config).eval()


def qa_inputs() -> dict[str, torch.Tensor]:
    inputs = padded(2)
    inputs["input_ids"][:, 1] = 2  # Splinter reads its question token's position
    return inputs


def _spans(model: nn.Module, inputs: dict) -> torch.Tensor:
    """The eager model's start and end logits, [B, T, 2], and its answer over real tokens."""
    with torch.no_grad():
        out = model(**inputs)
    if isinstance(out, tuple):
        start, end = out[:2]
    else:
        start, end = out["start_logits"], out["end_logits"]
    return torch.stack([start, end], -1)


@pytest.mark.parametrize("build", ["splinter", "two heads", "two heads as a dict"])
def test_question_answering_of_start_and_end_computed_apart(build):
    """Seeding each of the two outputs (stacked into one node the sweep starts from) explains
    a start and an end that were never one tensor; before, such models were refused with
    'needs a model returning start and end logits split from one [B, T, 2] tensor'."""
    if build == "splinter":
        model, inputs = splinter(), qa_inputs()
    else:
        torch.manual_seed(0)
        model = TwoHeadReader(as_dict=build.endswith("dict")).eval()
        inputs = {"input_ids": qa_inputs()["input_ids"]}
    dlb = DLBacktrace(model, inputs)
    for mode in ("default", "reference"):
        res = dlb.run_task(task="question-answering", inputs=inputs, mode=mode)
        assert_conserved(res)
        assert res["relevance"]["input_ids"].shape == (2, 2, 6)  # [start / end, B, T]
    logits = _spans(model, inputs)
    torch.testing.assert_close(torch.as_tensor(res["predictions"]), logits)
    if "attention_mask" in inputs:
        logits = logits.masked_fill(inputs["attention_mask"][..., None] == 0, -torch.inf)
    assert res["answer_span"].tolist() == logits.argmax(1).tolist()
    assert len(dlb.captured.float_outputs()) == 2  # the graph's outputs are the model's


def test_question_answering_of_one_output_is_a_clear_error():
    ids = padded(2)["input_ids"]
    dlb = DLBacktrace(nn.Sequential(nn.Embedding(40, 8), nn.Linear(8, 1)), (ids,))
    with pytest.raises(ValueError, match=r"start and end logits \(\[B, T\] each"):
        dlb.run_task(task="question-answering", inputs=(ids,))


# ------------------------------------------------------------ tabular MLPs


def mlp(activation: nn.Module, norm: type[nn.Module] = nn.BatchNorm1d, out: int = 3) -> nn.Module:
    """Linear -> norm -> activation -> dropout -> linear -> activation -> linear, with batch
    norm statistics that are not the identity."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 16), norm(16), activation, nn.Dropout(0.2),
        nn.Linear(16, 8), activation, nn.Linear(8, out),
    )  # fmt: skip
    for module in model.modules():
        if isinstance(module, nn.BatchNorm1d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


ROWS = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("out", [1, 3])
@pytest.mark.parametrize("mode", ["default", "contrast", "reference"])
def test_linear_batch_norm_relu_conserves_in_every_mode(mode, out):
    """A relu behind a batch norm that is not folded into the linear layer before it: mode
    "reference"'s RevealCancel on the linear layer read the linear's output as the relu's
    input (the batch norm between them was taken for a folded one) and lost up to 1.28 of a
    seed of 100 (contrast: 0.17)."""
    model = mlp(nn.ReLU(), out=out)
    res = DLBacktrace(model, (ROWS,)).run_task(task="tabular-classification", inputs=(ROWS,),
                                               mode=mode)  # fmt: skip
    assert_conserved(res)
    with torch.no_grad():
        torch.testing.assert_close(torch.as_tensor(res["predictions"]), model(ROWS))


@pytest.mark.parametrize(
    "activation",
    [
        nn.GELU(),
        nn.SiLU(),
        nn.Tanh(),
        nn.Sigmoid(),
        nn.LeakyReLU(0.1),
        nn.ELU(),
        nn.Softplus(),
        nn.PReLU(),
        nn.RReLU(),
        nn.SELU(),
        nn.CELU(),
        nn.Threshold(0.1, 0.0),
    ],
    ids=lambda m: type(m).__name__,
)
@pytest.mark.parametrize("norm", [nn.BatchNorm1d, nn.LayerNorm], ids=["batch", "layer"])
def test_tabular_activations_and_norms(activation, norm):
    """PReLU, RReLU, SELU, CELU and Threshold had no rule (UnsupportedOpError naming
    aten.prelu.default, ...): activations hand relevance on unchanged, as every other does."""
    model = mlp(activation, norm)
    dlb = DLBacktrace(model, (ROWS,))
    for mode in ("default", "reference"):
        res = dlb.run_task(task="tabular-classification", inputs=(ROWS,), mode=mode)
        assert_conserved(res)
    with torch.no_grad():
        torch.testing.assert_close(torch.as_tensor(res["predictions"]), model(ROWS))


@pytest.mark.parametrize("mode", ["default", "contrast", "reference"])
def test_a_classifier_ending_in_log_softmax(mode):
    """A model returning log-probabilities (NLLLoss-trained): log_softmax had no rule. It is
    the logits less a per-row constant: relevance passes as through softmax, and contrast's
    difference of two log-probabilities is the difference of their logits."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3), nn.LogSoftmax(dim=1))
    res = DLBacktrace(model.eval(), (ROWS,)).run_task(inputs=(ROWS,), mode=mode)
    assert_conserved(res)
    assert res["task"] == "tabular-classification"
    with torch.no_grad():
        torch.testing.assert_close(torch.as_tensor(res["predictions"]), model(ROWS))


class Rounded(nn.Module):
    def forward(self, x):
        return torch.round(x)


@pytest.mark.parametrize("mode", ["default", "contrast", "reference"])
def test_a_linear_head_over_constants_sinks_its_seed(mode):
    """The rules hold rounded values constant (piecewise constant: no gradient), so a linear
    head reading them has no data input: its seed is a sink, reported as such. The seed was
    put on the head's input anyway, and the sweep failed with KeyError (then on a softmax,
    which the rules no longer hold constant where it flows on: ``test_normalisers``)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), Rounded(), nn.Linear(16, 3)).eval()
    res = DLBacktrace(model, (ROWS,)).run_task(inputs=(ROWS,), mode=mode)
    assert_conserved(res)
    assert (res["conservation"]["inputs"] == 0).all()


# ------------------------------------------------------------ clear refusals


@pytest.mark.parametrize(
    ("logits", "target", "message"),
    [(3, 7, r"\[0, 3\): 7"), (3, -1, r"\[0, 3\): -1"), (1, 2, r"\[0, 2\): 2"),
     (3, [0, 5, 1, 1], r"\[0, 3\): \[0, 5, 1, 1\]")],
)  # fmt: skip
def test_a_target_past_the_classes_is_a_clear_error(logits, target, message):
    """A target outside the classes failed with IndexError deep in the seed (7 of 3), and -1
    silently explained the last class; a single logit's target is its decision, 0 or 1."""
    torch.manual_seed(0)
    dlb = DLBacktrace(nn.Linear(6, logits), (ROWS,))
    with pytest.raises(ValueError, match=message):
        dlb.run_task(inputs=(ROWS,), target=target)


def test_a_token_target_past_the_labels_is_a_clear_error():
    dlb = DLBacktrace(
        nn.Sequential(nn.Embedding(40, 8), nn.Linear(8, 3)), (padded(2)["input_ids"],)
    )
    with pytest.raises(ValueError, match=r"target must be a class index in \[0, 3\): 5"):
        dlb.run_task(task="token-classification", inputs=(padded(2)["input_ids"],), target=5)


def test_a_map_per_class_is_refused_as_image_classification():
    """A segmentation-like [B, C, H, W] output: no token-classification hint (that is for
    [B, T, C]), but what an image classifier must return."""
    x = torch.randn(2, 3, 8, 8)
    dlb = DLBacktrace(nn.Conv2d(3, 4, 1), (x,))
    with pytest.raises(ValueError, match=r"returns \(2, 4, 8, 8\): use a model that pools"):
        dlb.run_task(task="image-classification", inputs=(x,))
