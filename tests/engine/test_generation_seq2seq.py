"""Explained generation with encoder-decoder LMs (``engine.seq2seq``): T5, BART and mBART
(random weights, small configs) generate the tokens transformers' ``generate`` does, and each step's
relevance is conserved, lies on the source and on the decoder's tokens before the emitted one
(nothing on the source's padding), and is what explaining that step's logit alone gives."""

from __future__ import annotations

import pytest
import torch
from transformers import BartConfig, BartForConditionalGeneration

from engine import DLBacktrace
from engine.memory import MemoryBudgetError, estimate
from engine.tasks import TaskName
from tests.helpers.tiny import tiny_model

BART_SIZES = {
    "vocab_size": 100, "d_model": 32, "encoder_layers": 2, "decoder_layers": 2,
    "encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_ffn_dim": 48,
    "decoder_ffn_dim": 48, "max_position_embeddings": 64, "forced_eos_token_id": None,
    "eos_token_id": 99,  # never the argmax of these weights: every step is generated
}  # fmt: skip
MODELS = {  # (config class, model class, configuration), for tiny_model
    "t5": (
        "T5Config",
        "T5ForConditionalGeneration",
        dict(
            vocab_size=100,
            d_model=32,
            d_kv=8,
            d_ff=48,
            num_layers=2,
            num_heads=4,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        ),
    ),
    "bart": ("BartConfig", "BartForConditionalGeneration", BART_SIZES),
    # no decoder start token in its configs: generate starts from BOS, and so does the graph
    "mbart": ("MBartConfig", "MBartForConditionalGeneration", BART_SIZES),
}
STEPS = 4


def source() -> dict[str, torch.Tensor]:
    ids = torch.randint(5, 90, (2, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # the second source is two tokens shorter, padded on the right
    return {"input_ids": ids, "attention_mask": mask}


def model(name: str) -> torch.nn.Module:
    return tiny_model(*MODELS[name])


@pytest.mark.parametrize("mode", ["default", "reference"])
@pytest.mark.parametrize("name", MODELS)
def test_generates_as_generate_and_each_step_is_conserved(name: str, mode: str) -> None:
    lm, inputs = model(name), source()
    dlb = DLBacktrace(lm, inputs)  # the graph gets the decoder's tokens as an input
    assert "decoder_input_ids" in dlb.captured.input_names
    result = dlb.run_task(
        task="auto", inputs=inputs, max_new_tokens=STEPS, mode=mode, return_relevance=True
    )
    want = lm.generate(**inputs, max_new_tokens=STEPS, do_sample=False)
    assert result["task"] == "generation" and torch.equal(result["generated_ids"], want)
    assert result["explained_steps"] == list(range(STEPS))
    for step, (trace, c) in enumerate(
        zip(result["relevance_trace"], result["conservation_trace"], strict=True)
    ):
        assert trace["input_ids"].shape == (2, 7)
        assert trace["decoder_input_ids"].shape == (2, 1 + step)
        assert torch.all(trace["input_ids"][1, 5:] == 0)  # the source's padding
        total = trace["input_ids"].sum(1) + trace["decoder_input_ids"].sum(1)
        torch.testing.assert_close(total, c["inputs"], rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(c["inputs"] + c["sinks"], c["seed"], rtol=1e-4, atol=1e-3)
        assert float(trace["input_ids"].abs().sum()) > 0.1  # the source explains something


@pytest.mark.parametrize("name", MODELS)
def test_each_step_is_its_logit_explained_alone(name: str) -> None:
    """The batched sweep (every step's seed in one sweep over the final sequence) gives each
    step the relevance of a classification-style explanation of that step's logit alone:
    the decoder's prefix up to the step, the emitted token's logit at its last position."""
    lm, inputs = model(name), source()
    dlb = DLBacktrace(lm, inputs)
    result = dlb.run_task(
        task="generation", inputs=inputs, max_new_tokens=STEPS, return_relevance=True
    )
    sequences = result["generated_ids"]
    for step in (0, STEPS - 1):
        prefix = {**inputs, "decoder_input_ids": sequences[:, : step + 1]}
        tokens = sequences[:, step + 1].tolist()
        alone = dlb.run_task(
            task="text-classification", inputs=prefix, position=step, target=tokens
        )["relevance"]
        trace = result["relevance_trace"][step]
        for name_ in ("input_ids", "decoder_input_ids"):
            torch.testing.assert_close(trace[name_], alone[name_], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["t5", "bart"])
def test_layer_outputs_are_what_each_step_saw(name: str) -> None:
    """``return_layerwise_output``: each explained step's op outputs are those of a forward
    over the decoder's prefix up to that step (the encoder's the same for every step). It
    was ignored for encoder-decoders: the result had no ``layerwise_output_trace``."""
    lm, inputs = model(name), source()
    dlb = DLBacktrace(lm, inputs)
    result = dlb.run_task(
        task="generation", inputs=inputs, max_new_tokens=STEPS, return_layerwise_output=True
    )
    trace, sequences = result["layerwise_output_trace"], result["generated_ids"]
    assert len(trace) == STEPS
    for step in (0, STEPS - 1):
        prefix = {**inputs, "decoder_input_ids": sequences[:, : step + 1]}
        io, _ = dlb.record(prefix)
        tensors = {n for n in io if isinstance(io[n]["output_values"], torch.Tensor)}
        assert set(trace[step]) == tensors
        for node, value in trace[step].items():
            want = io[node]["output_values"]
            assert value.shape == want.shape, (step, node)
            torch.testing.assert_close(value, want, rtol=1e-4, atol=1e-5)


def test_an_encoder_decoder_lm_is_detected_as_generation() -> None:
    lm, inputs = model("t5"), source()
    assert DLBacktrace(lm, inputs).detect_task(inputs) == TaskName.GENERATION


def test_beam_search_explains_the_returned_sequences() -> None:
    """Beam search's per-step scores are beams'; the trace explains the sequences it returns
    (each step conserved), with their own log-probabilities as the step's scores."""
    lm, inputs = model("t5"), source()
    dlb = DLBacktrace(lm, inputs)
    result = dlb.run_task(
        task="generation", inputs=inputs, max_new_tokens=STEPS, num_beams=3,
        return_relevance=True, return_scores=True,
    )  # fmt: skip
    want = lm.generate(**inputs, max_new_tokens=STEPS, num_beams=3, do_sample=False)
    assert torch.equal(result["generated_ids"], want)
    sequences = result["generated_ids"]
    for step, c in enumerate(result["conservation_trace"]):
        torch.testing.assert_close(c["inputs"] + c["sinks"], c["seed"], rtol=1e-4, atol=1e-3)
        logp = result["scores_trace"][step]
        assert torch.allclose(logp.exp().sum(-1), torch.ones(2), atol=1e-4)
        chosen = logp.gather(1, sequences[:, step + 1, None])
        assert bool((chosen > -30).all())  # the returned token is a likely one of its step


@pytest.mark.parametrize("name", MODELS)
def test_sampling_draws_generates_tokens(name: str) -> None:
    """With a seed, sampling draws the tokens ``torch.manual_seed(seed)`` then ``generate``
    draws (same processors and warpers, same draws)."""
    lm, inputs = model(name), source()
    settings = {"do_sample": True, "temperature": 0.8, "top_k": 30, "top_p": 0.95}
    result = DLBacktrace(lm, inputs).run_task(
        task="generation", inputs=inputs, max_new_tokens=STEPS, seed=7, **settings
    )
    torch.manual_seed(7)
    want = lm.generate(**inputs, max_new_tokens=STEPS, **settings)
    assert torch.equal(result["generated_ids"], want)


def test_each_token_is_streamed_before_any_relevance() -> None:
    """``on_step`` hears each token as it is chosen (relevance None), then each step's
    relevance once the sweep has run: every token before any relevance."""
    lm, inputs = model("t5"), source()
    heard: list[tuple[int, bool]] = []

    def on_step(step: int, tokens, scores, relevance) -> None:
        assert tokens.shape == (2,) and scores.shape == (2, 100)
        heard.append((step, relevance is not None))

    DLBacktrace(lm, inputs).run_task(
        task="generation", inputs=inputs, max_new_tokens=STEPS, on_step=on_step
    )
    steps = list(range(STEPS))
    assert heard == [(s, False) for s in steps] + [(s, True) for s in steps]


def test_planted_evidence_the_copied_source_token_explains_the_answer() -> None:
    """A tiny BART trained (seconds) to answer with its source's token at position 2: each
    row's first generated token is that token, and its relevance over the source is largest
    at position 2, with most of the source's share there."""
    torch.manual_seed(0)
    config = BartConfig(
        vocab_size=16, d_model=32, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
        decoder_ffn_dim=64, max_position_embeddings=16, pad_token_id=1, bos_token_id=0,
        eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None, dropout=0.0,
        attention_dropout=0.0, activation_dropout=0.0, scale_embedding=True,
    )  # fmt: skip
    lm = BartForConditionalGeneration(config)
    optimiser = torch.optim.Adam(lm.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(3000):
        src = torch.randint(4, 16, (64, 6), generator=g)
        labels = torch.stack([src[:, 2], torch.full((64,), 2)], 1)
        loss = lm(input_ids=src, labels=labels).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if loss.item() < 0.02:
            break
    lm.eval()
    src = torch.randint(4, 16, (16, 6), generator=g)
    result = DLBacktrace(lm, {"input_ids": src}).run_task(
        task="generation", inputs={"input_ids": src}, max_new_tokens=1, return_relevance=True
    )
    assert torch.equal(result["generated_ids"][:, 1], src[:, 2])
    relevance = result["relevance_trace"][0]["input_ids"]
    assert torch.equal(relevance.argmax(1), torch.full((16,), 2))
    assert float((relevance[:, 2] / relevance.abs().sum(1)).mean()) > 0.6


def test_a_memory_budget_bounds_the_sweeps() -> None:
    """A budget below one seed's sweep is refused before the model runs; one that holds two
    seeds (the estimate over the source and max_new_tokens decoder tokens) explains the steps
    two at a time, with the unbounded run's relevance."""
    lm, inputs = model("t5"), source()
    dlb = DLBacktrace(lm, inputs)
    kw = {"task": "generation", "inputs": inputs, "max_new_tokens": STEPS}
    unbounded = dlb.run_task(**kw, return_relevance=True)
    captured, sweeper = dlb._graphs[0]
    shapes = {"input_ids": (2, 7), "attention_mask": (2, 7), "decoder_input_ids": (2, STEPS)}
    sizes = captured.sizes({k: torch.empty(v, device="meta") for k, v in shapes.items()})
    memory = estimate(sweeper, sizes, "default", {"input_ids", "decoder_input_ids"})
    ran = []
    hook = lm.register_forward_pre_hook(lambda *_: ran.append(1))
    with pytest.raises(MemoryBudgetError, match="cannot hold one sweep"):
        dlb.run_task(**kw, memory_budget=memory.needed(1) - 1)
    hook.remove()
    assert ran == []
    sweeps = []
    explain = dlb.explain
    dlb.explain = lambda *a, **k: sweeps.append(explain(*a, **k)) or sweeps[-1]
    bounded = dlb.run_task(**kw, memory_budget=memory.needed(2), return_relevance=True)
    assert len(sweeps) == STEPS // 2
    for a, b in zip(bounded["relevance_trace"], unbounded["relevance_trace"], strict=True):
        for name in ("input_ids", "decoder_input_ids"):
            torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)
