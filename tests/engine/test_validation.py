"""Inputs checked before any work: each bad input gets an error naming the argument, what the
captured graph expects and what it received; numpy arrays, lists and text are accepted; constant
ids the graph does not take are dropped; an export failure falls through to the next attempt,
while the caller's own exceptions (a job timeout) propagate."""

from __future__ import annotations

import math
import signal
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from engine import DLBacktrace
from engine.capture import CaptureError, capture

from .zoo import ZOO, minilm_tokenizer


@pytest.fixture(scope="module")
def tabular():
    model, inputs = ZOO["tabular"]()
    return inputs["input"], DLBacktrace(model, inputs)


@pytest.fixture(scope="module")
def bert():
    model, inputs = ZOO["bert"]()
    return inputs, DLBacktrace(model, (inputs["input_ids"], inputs["attention_mask"]))


def _run(dlb, inputs, **kw):
    return dlb.run_task(inputs=inputs, relevance_nodes="inputs", **kw)


def test_input_for_graph_none_is_named():
    with pytest.raises(TypeError, match="input_for_graph"):
        DLBacktrace(nn.Linear(3, 2), None)


def test_a_model_that_is_no_module_is_named():
    """A plain function (or a model's output, passed by mistake) raised AttributeError
    'function' object has no attribute 'eval'."""
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got function"):
        DLBacktrace(lambda x: x, torch.ones(1, 3))


@pytest.mark.parametrize(
    "value,error", [("100", TypeError), (math.nan, ValueError), (math.inf, ValueError)]
)
def test_multiplier_must_be_a_finite_number(tabular, value, error):
    x, dlb = tabular
    with pytest.raises(error, match="multiplier"):
        _run(dlb, x, multiplier=value)


def test_shape_and_dtype_errors_name_the_input_without_a_second_capture(tabular):
    x, dlb = tabular
    with pytest.raises(
        ValueError, match=r"input: expected 2 dimensions \[B, 6\], got shape \(6,\)"
    ):
        _run(dlb, x[0])
    with pytest.raises(ValueError, match=r"input: expected shape \[B, 6\].*got \(4, 5\)"):
        _run(dlb, x[:, :5])
    with pytest.raises(TypeError, match=r"input: the model takes torch.float32, got torch.float64"):
        _run(dlb, x.double())
    with pytest.raises(TypeError, match="input: expected floating-point values"):
        _run(dlb, x.long())
    with pytest.raises(ValueError, match=r"input is empty \(shape \(0, 6\)\)"):
        _run(dlb, x[:0])
    assert len(dlb._graphs) == 1


def test_nan_and_inf_are_counted_and_located(tabular):
    x, dlb = tabular
    bad = x.clone()
    bad[1, 3], bad[2, 0] = math.nan, math.inf
    with pytest.raises(ValueError, match=r"input holds 2 NaN or inf .* first at position \(1, 3\)"):
        _run(dlb, bad)


def test_numpy_arrays_and_lists_are_accepted(tabular):
    x, dlb = tabular
    expected = _run(dlb, x)["relevance"]["input"]
    for given in (x.numpy(), x.tolist(), {"input": x.numpy()}, (x.numpy(),)):
        torch.testing.assert_close(_run(dlb, given)["relevance"]["input"], expected)


def test_token_id_errors(bert):
    inputs, dlb = bert
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with pytest.raises(TypeError, match="input_ids: expected integer ids"):
        _run(dlb, {"input_ids": ids.float(), "attention_mask": mask})
    too_big = ids.clone()
    too_big[1, 2] = 120
    with pytest.raises(ValueError, match=r"input_ids: ids must lie in \[0, 120\).*\(1, 2\)"):
        _run(dlb, {"input_ids": too_big, "attention_mask": mask})
    with pytest.raises(ValueError, match=r"\[0, 120\)"):
        _run(dlb, {"input_ids": -ids, "attention_mask": mask})
    long_ids = torch.randint(5, 120, (1, 513))
    with pytest.raises(ValueError, match="513 positions, the model's position table has 512"):
        _run(dlb, {"input_ids": long_ids, "attention_mask": torch.ones_like(long_ids)})
    assert len(dlb._graphs) == 1
    as_int32 = _run(dlb, {"input_ids": ids.int(), "attention_mask": mask.bool()})
    torch.testing.assert_close(
        as_int32["relevance"]["input_ids"], _run(dlb, inputs)["relevance"]["input_ids"]
    )


def test_uint8_image_is_not_text():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)
    ).eval()
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    dlb = DLBacktrace(model, images.float() / 255)
    with pytest.raises(TypeError, match="uint8 image.*float"):
        dlb.run_task(inputs=images)
    with pytest.raises(TypeError, match="uint8"):
        dlb.detect_task(images)


@pytest.fixture(scope="module")
def minilm():
    model, inputs = ZOO["minilm"]()
    return inputs, DLBacktrace(model, (inputs["input_ids"], inputs["attention_mask"]))


def test_text_with_a_tokenizer(minilm):
    _, dlb = minilm
    tok = minilm_tokenizer()
    texts = ["a wonderful, moving film", "dull"]
    res = dlb.run_task(task="text-classification", inputs=texts, tokenizer=tok)
    enc = tok(texts, padding=True, return_tensors="pt")
    assert res["relevance"]["input_ids"].shape == enc["input_ids"].shape
    with pytest.raises(TypeError, match="tokenizer"):
        dlb.run_task(task="text-classification", inputs=texts)
    assert len(dlb._graphs) == 1


def test_token_type_ids_are_constants_not_inputs(minilm):
    """A BatchEncoding with token_type_ids on a graph captured from (input_ids,
    attention_mask): the same graph, the same relevance, none for token_type_ids."""
    inputs, dlb = minilm
    enc = {**inputs, "token_type_ids": torch.zeros_like(inputs["input_ids"])}
    with_types = _run(dlb, enc)
    assert len(dlb._graphs) == 1 and "token_type_ids" not in with_types["relevance"]
    torch.testing.assert_close(
        with_types["relevance"]["input_ids"], _run(dlb, inputs)["relevance"]["input_ids"]
    )


def test_evaluation_types(bert):
    inputs, dlb = bert
    summary = dlb.evaluation(_run(dlb, inputs), top_k=3)
    index = summary["top_features"]["input_ids"]["index"]
    assert isinstance(index, np.ndarray) and index.dtype == np.int64


class _JobTimeout(Exception):
    """Stands for RQ's JobTimeoutException: raised by the caller's signal handler."""


def test_caller_exception_during_export_propagates():
    """A timeout raised by the caller's signal handler while export runs leaves ``capture``
    as itself. The handler raises on every tick of a 10 ms timer while the capture runs:
    a single tick (the test's first form) sometimes landed in torch code that swallows
    exceptions, and the capture finished (1 run in 4 of the whole suite)."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    capturing = [False]

    def raise_timeout(signum, frame):
        if capturing[0]:
            raise _JobTimeout("job exceeded its timeout")

    def run() -> None:
        capturing[0] = True
        try:
            capture(model, {"input": torch.randn(2, 4)})
        finally:
            capturing[0] = False

    previous = signal.signal(signal.SIGALRM, raise_timeout)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.01, 0.01)
        with pytest.raises(_JobTimeout):
            run()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_export_failures_fall_through_and_are_reported(monkeypatch):
    model = nn.Sequential(nn.Linear(4, 2)).eval()
    calls = []

    def fail(*args, **kwargs):
        calls.append(kwargs.get("dynamic_shapes"))
        raise RuntimeError("cannot trace this")

    monkeypatch.setattr(torch.export, "export", fail)
    with pytest.raises(CaptureError, match="dynamic: RuntimeError.*static: RuntimeError"):
        capture(model, {"input": torch.randn(2, 4)})
    assert len(calls) == 2

    def interrupt(*args, **kwargs):
        raise _JobTimeout("from the caller")

    monkeypatch.setattr(torch.export, "export", interrupt)
    with pytest.raises(_JobTimeout):
        capture(model, {"input": torch.randn(2, 4)})


def test_only_token_ids_and_float_inputs_are_data():
    """A graph captured with token_type_ids names only input_ids as data: the sweep's
    provenance should take ``captured.data_inputs`` (token type ids select constants)."""
    model, inputs = ZOO["bert"]()
    example = {**inputs, "token_type_ids": torch.zeros_like(inputs["input_ids"])}
    captured = capture(model, example)
    assert set(captured.input_names) == {"input_ids", "attention_mask", "token_type_ids"}
    assert captured.data_inputs == ["input_ids"]


def test_tokenizer_outputs_the_model_does_not_take_are_left_out(bert):
    """A tokenizer's whole output (here with ``special_tokens_mask`` and ``length``, as
    ``return_special_tokens_mask`` / ``return_length`` add them) explains as the model's own
    inputs do; those extras went into the forward's ``**kwargs`` and the capture, and the
    sweep failed with a KeyError naming a graph node."""
    inputs, dlb = bert
    extra = {
        **inputs,
        "special_tokens_mask": torch.zeros_like(inputs["input_ids"]),
        "length": torch.full((inputs["input_ids"].shape[0],), inputs["input_ids"].shape[1]),
    }
    with pytest.warns(UserWarning, match=r"\['special_tokens_mask', 'length'\] are not arguments"):
        got = _run(dlb, extra)
    torch.testing.assert_close(
        got["relevance"]["input_ids"], _run(dlb, inputs)["relevance"]["input_ids"]
    )
    assert len(dlb._graphs) == 1  # no second capture for them


def test_a_model_that_does_not_run_on_the_example_blames_the_inputs():
    """Every export fails where the model itself fails: the inputs are wrong, and export's
    own words ("a and b must have same reduction dim") would blame the capture."""
    model = nn.Sequential(nn.Linear(4, 2)).eval()
    with pytest.raises(ValueError, match=r"does not run on inputs of shapes input \(2, 5\): "):
        capture(model, {"input": torch.randn(2, 5)})


def test_a_model_whose_relevance_reaches_no_input_is_warned_of():
    """Ids cast to float carry no relevance (only an embedding lookup of them does): every
    input's relevance is 0, which must not read as "nothing mattered" unannounced."""
    from engine import DLBacktrace

    class Counts(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, counts: torch.Tensor) -> torch.Tensor:
            return self.fc(counts.float())

    with pytest.warns(UserWarning, match=r"reaches none of the inputs \(counts\)"):
        DLBacktrace(Counts().eval(), {"counts": torch.tensor([[1, 0, 2]])})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DLBacktrace(nn.Sequential(nn.Linear(3, 2)).eval(), torch.randn(1, 3))
