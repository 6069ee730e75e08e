"""Generation knobs with transformers' meaning (top_k=0 and top_p=1.0 off, temperature=1.0
unset, temperature 0 greedy), each case compared with ``generate`` on a tiny GPT-2; prompts
checked before decoding; relevance_nodes="all" and evaluation() after generation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine import DLBacktrace
from engine.params import DecodingParams
from tests.engine.lm_models import VOCAB, prompts, tiny_lm

NEW = 5


@pytest.fixture(scope="module")
def gpt2():
    model = tiny_lm("gpt2", sharpen=3.0)
    batch = prompts(2, 6, pads=(0, 2))
    return model, batch, DLBacktrace(model, (batch["input_ids"], batch["attention_mask"]))


def _generate(dlb, batch, **kw):
    kw = {"max_new_tokens": NEW, "steps": "none", **kw}
    return dlb.run_task(task="generation", inputs=batch, **kw)


def _expected(model, batch, seed=None, **kw):
    if seed is not None:
        torch.manual_seed(seed)
    return model.generate(**batch, max_new_tokens=NEW, **kw)


def test_neutral_settings_decode_greedily_like_generate(gpt2):
    model, batch, dlb = gpt2
    knobs = dict(temperature=1.0, top_k=0, top_p=1.0)
    res = _generate(dlb, batch, **knobs)
    assert not res["decoding"]["do_sample"]
    assert torch.equal(res["generated_ids"], _expected(model, batch, **knobs))


def test_temperature_zero_is_greedy(gpt2):
    model, batch, dlb = gpt2
    greedy = _expected(model, batch, do_sample=False)
    for kw in (dict(temperature=0.0), dict(temperature=0.0, do_sample=True, seed=1)):
        res = _generate(dlb, batch, **kw)
        assert not res["decoding"]["do_sample"]
        assert torch.equal(res["generated_ids"], greedy)


@pytest.mark.parametrize(
    "knobs",
    [
        dict(temperature=0.7, top_k=0, top_p=0.8),  # top_k=0: no top-k warper
        dict(do_sample=True, top_p=1.0),  # top_p=1.0: no top-p warper (top_k stays 50)
        dict(temperature=1.5, top_k=10, top_p=1.0),
    ],
)
def test_sampling_knobs_match_generate(gpt2, knobs):
    model, batch, dlb = gpt2
    res = _generate(dlb, batch, seed=7, **knobs)
    assert res["decoding"]["do_sample"]
    expected = _expected(model, batch, seed=7, **{"do_sample": True, **knobs})
    assert torch.equal(res["generated_ids"], expected)


@pytest.mark.parametrize(
    "knobs,match",
    [
        (dict(top_p=1.5), "top_p"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(temperature=-0.5), "temperature"),
        (dict(max_new_tokens=0), "max_new_tokens"),
    ],
)
def test_out_of_range_knobs_are_rejected(gpt2, knobs, match):
    _, batch, dlb = gpt2
    with pytest.raises(ValueError, match=match):
        _generate(dlb, batch, **knobs)
    with pytest.raises(ValueError, match=match):
        DecodingParams(**knobs)


@pytest.mark.parametrize(
    "knobs,error,match",
    [
        (dict(num_beams=2.5), TypeError, "num_beams must be an integer"),
        (dict(num_beams=2, length_penalty=float("nan")), ValueError, "length_penalty"),
        (dict(num_beams=2, early_stopping="yes"), ValueError, "early_stopping"),
        (dict(num_beams=2, early_stopping=1), ValueError, "early_stopping"),
        (dict(do_sample="no"), TypeError, "do_sample"),
        (dict(do_sample=True, seed="a"), TypeError, "seed must be an integer"),
        (dict(max_seeds_per_sweep=0), ValueError, "max_seeds_per_sweep"),
    ],
)
def test_malformed_search_settings_are_named(gpt2, knobs, error, match):
    """Before, each ran: a NaN length penalty returned a shorter sequence, early_stopping=1
    and do_sample="no" were taken as another setting, or torch failed deep in the decode
    (num_beams=2.5: 'full(): argument size', max_seeds_per_sweep=0: 'range() arg 3')."""
    _, batch, dlb = gpt2
    with pytest.raises(error, match=match):
        _generate(dlb, batch, steps="all", **knobs)


@pytest.mark.parametrize(
    "given,match",
    [
        (dict(target=3), "no target="),
        (dict(position=0), "no position="),
        (dict(target=0, position=[1, 2]), "no target= or position="),
    ],
)
def test_target_and_position_are_refused_not_ignored(gpt2, given, match):
    """Each step explains the token it emitted: a target or position was dropped without a
    word, and the generated token explained instead of the one asked for."""
    _, batch, dlb = gpt2
    with pytest.raises(ValueError, match=match):
        _generate(dlb, batch, **given)


def test_a_threshold_warns_that_generation_does_not_read_it(gpt2):
    _, batch, dlb = gpt2
    with pytest.warns(UserWarning, match="thresholding=0.2 has no effect on generation"):
        _generate(dlb, batch, thresholding=0.2)


def test_prompt_checked_before_decoding(gpt2):
    _, batch, dlb = gpt2
    with pytest.raises(ValueError, match=r"6 \+ 123|129 positions.*has 128"):
        _generate(dlb, batch, max_new_tokens=123)
    bad = {**batch, "input_ids": batch["input_ids"].clone()}
    bad["input_ids"][0, 3] = VOCAB
    with pytest.raises(ValueError, match=rf"input_ids: ids must lie in \[0, {VOCAB}\)"):
        _generate(dlb, bad)
    as_numpy = {k: v.numpy() for k, v in batch.items()}
    assert torch.equal(
        _generate(dlb, as_numpy)["generated_ids"], _generate(dlb, batch)["generated_ids"]
    )


def test_relevance_nodes_all_for_generation(gpt2):
    _, batch, dlb = gpt2
    default = _generate(dlb, batch, max_new_tokens=2, steps="all")
    assert set(default["relevance"]) == {"input_ids"}
    everything = _generate(dlb, batch, max_new_tokens=2, steps="all", relevance_nodes="all")
    assert len(everything["relevance"]) > 10
    torch.testing.assert_close(
        everything["relevance"]["input_ids"], default["relevance"]["input_ids"]
    )


def test_evaluation_after_generation_is_numpy(gpt2):
    _, batch, dlb = gpt2
    summary = dlb.evaluation(_generate(dlb, batch, max_new_tokens=2, steps="all"), top_k=3)
    assert isinstance(summary["conservation_error"], np.ndarray)
    assert isinstance(summary["input_share"], np.ndarray)
    index = summary["top_features"]["input_ids"]["index"]
    assert isinstance(index, np.ndarray) and index.dtype == np.int64
    assert (summary["conservation_error"] < 1e-3).all()


def test_evaluation_of_a_generation_that_explains_no_step_says_so(gpt2):
    """Its conservation is None: evaluation() failed on None.items()."""
    _, batch, dlb = gpt2
    with pytest.raises(ValueError, match="explains no step"):
        dlb.evaluation(_generate(dlb, batch, max_new_tokens=1, steps="none"))


def test_default_sweeps_carry_at_most_twelve_seeds(gpt2, monkeypatch):
    """Without a memory budget a sweep carries at most ``StepPlan.max_seeds_per_sweep`` = 12
    seeds (steps): measured on the CPU (``bench.generation --scale``, 512 + 64), 12 held the
    peak extra memory to 0.67-0.74 GB where 64 took 1.47 GB, in half the time."""
    _, batch, dlb = gpt2
    sweeps = []
    explain = dlb.explain
    monkeypatch.setattr(dlb, "explain", lambda *a, **k: sweeps.append(a[1].K) or explain(*a, **k))
    res = dlb.run_task(task="generation", inputs=batch, max_new_tokens=15, steps="all",
                       return_relevance=True)  # fmt: skip
    assert len(res["explained_steps"]) == 15
    assert sweeps == [12, 3]
