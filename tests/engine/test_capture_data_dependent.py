"""Models whose eager forward branches or loops on values computed from the inputs (a
data-dependent count or condition), which torch.export cannot trace as written: each is
captured by a general mechanism, its recorded forward equals eager, and relevance is
conserved."""

from __future__ import annotations

import pytest
import torch

from engine import DLBacktrace
from tests.helpers.tiny import tiny_model

MULTIPLIER = 100.0


def _ids(batch: int = 2, tokens: int = 9, vocab: int = 96) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, vocab, (batch, tokens), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _conserved(conservation: dict) -> None:
    seed, inputs, sinks = (torch.as_tensor(conservation[k]).double() for k in
                           ("seed", "inputs", "sinks"))  # fmt: skip
    assert (seed.abs().amax() > 0) and (inputs.abs() > 0).any()
    torch.testing.assert_close(inputs + sinks, seed, rtol=0, atol=1e-4 * MULTIPLIER)


_MOE = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    num_local_experts=4,
    num_experts_per_tok=2,
    pad_token_id=0,
)


def test_eager_experts_are_captured_grouped_and_restored():
    """OpenAI's privacy filter runs its experts eager by default, a Python loop over the
    experts some token picked (``nonzero``): captured with the grouped implementation, for any
    routing, and left eager for the user afterwards."""
    model = tiny_model(
        "OpenAIPrivacyFilterConfig", "OpenAIPrivacyFilterForTokenClassification", _MOE
    )
    assert model.config._experts_implementation == "eager"
    inputs = _ids()
    dlb = DLBacktrace(model, inputs)
    assert model.config._experts_implementation == "eager"
    result = dlb.run_task(task="token-classification", inputs=inputs, multiplier=MULTIPLIER,
                          relevance_nodes="inputs")  # fmt: skip
    with torch.no_grad():
        eager = model(**inputs).logits
    torch.testing.assert_close(torch.as_tensor(result["predictions"]), eager, rtol=1e-4, atol=1e-4)
    _conserved(result["conservation"])


def _explained(dlb: DLBacktrace, inputs: dict, **kwargs) -> dict:
    return dlb.run_task(task="text-classification", inputs=inputs, multiplier=MULTIPLIER,
                        relevance_nodes="inputs", **kwargs)  # fmt: skip


def _agrees_with_eager(model: torch.nn.Module, inputs: dict, result: dict) -> None:
    with torch.no_grad():
        eager = model(**inputs).logits
    if eager.dim() == 3:  # a causal LM's logits: the last token's are explained
        eager = eager[:, -1]
    got = torch.as_tensor(result["predictions"])
    torch.testing.assert_close(got.reshape(eager.shape), eager, rtol=1e-4, atol=1e-4)


def _dbrx() -> torch.nn.Module:
    return tiny_model(
        "DbrxConfig",
        "DbrxForCausalLM",
        dict(
            vocab_size=96,
            d_model=32,
            n_heads=4,
            n_layers=2,
            max_seq_len=64,
            attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
            ffn_config={"ffn_hidden_size": 48, "moe_num_experts": 4, "moe_top_k": 2},
        ),
    )


def test_an_expert_loop_over_nonzero_is_captured_for_each_input():
    """DBRX loops in Python over the experts its tokens picked (``nonzero``), a loop as long
    as a count of the data: captured specialised to the example's values, and captured again
    for another input (whose routing differs), each equal to eager and conserved; the reference
    forward is routed as the input (its counts are the input's). One specialised graph is kept
    besides the first, not one per input."""
    model = _dbrx()
    first = _ids()
    dlb = DLBacktrace(model, first)
    for seed in (1, 2):
        inputs = _ids() if seed == 1 else _ids(tokens=7)
        inputs["input_ids"] = (inputs["input_ids"] * (seed + 1)) % 93 + 3
        for mode in ("default", "reference"):
            result = _explained(dlb, inputs, mode=mode)
            _conserved(result["conservation"])
        _agrees_with_eager(model, inputs, result)
    assert len(dlb._graphs) == 2
    _agrees_with_eager(model, first, _explained(dlb, first))


def _longformer() -> torch.nn.Module:
    return tiny_model(
        "LongformerConfig",
        "LongformerForSequenceClassification",
        dict(
            vocab_size=96,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=48,
            attention_window=4,
            max_position_embeddings=64,
            num_labels=3,
        ),
    )


def test_global_attention_gathered_by_nonzero_is_captured():
    """Longformer gathers its global tokens with ``nonzero`` and branches on whether there are
    any: captured specialised to the example, equal to eager and conserved, also for a padded
    input (another count of real tokens)."""
    model = _longformer()
    inputs = _ids()
    dlb = DLBacktrace(model, inputs)
    _agrees_with_eager(model, inputs, _explained(dlb, inputs))
    padded = _ids()
    padded["attention_mask"][1, 6:] = 0
    result = _explained(dlb, padded)
    _agrees_with_eager(model, padded, result)
    _conserved(result["conservation"])


def test_blt_generates_and_explains_without_a_cache():
    """BLT (bytes pooled into patches by their entropy): captured for the example's values,
    and decoded without a cache because its forward with one raises (its cache is built from a
    configuration without a layer count): the tokens of ``generate``, each step conserved."""
    from bench.coverage.architectures import build, list_architectures

    model, inputs = build(next(a for a in list_architectures("causal-lm") if a.name == "blt"))
    dlb = DLBacktrace(model, inputs)
    result = dlb.run_task(task="generation", inputs=inputs, max_new_tokens=2,
                          return_relevance=True, multiplier=MULTIPLIER)  # fmt: skip
    with torch.no_grad():
        want = model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert torch.equal(torch.as_tensor(result["generated_ids"]), want)
    for conservation in result["conservation_trace"]:
        _conserved(conservation)


def test_several_rows_of_ids_per_sample_are_refused_clearly():
    """MusicGen decodes [B * codebooks, T] ids with a [B, T] mask, one token per codebook per
    step: not one row per sequence, which generation explains; said so, instead of a reshape
    error."""
    from bench.coverage.architectures import build, list_architectures

    arch = next(a for a in list_architectures("causal-lm") if a.name == "musicgen")
    model, inputs = build(arch)
    dlb = DLBacktrace(model, inputs)
    with pytest.raises(ValueError, match="one row of ids per sequence"):
        dlb.run_task(task="generation", inputs=inputs, max_new_tokens=2)


_BART = dict(
    vocab_size=96, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
    decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
    max_position_embeddings=32, num_labels=3, bos_token_id=2, eos_token_id=1, pad_token_id=0,
)  # fmt: skip


def test_a_batch_of_one_through_a_graph_that_asserts_a_batch_of_two():
    """BART's classifier gathers each sample's EOS rows (``hidden[eos_mask].view(B, -1, H)``):
    exported with a batch of two, the graph asserts at least two such rows ('u1 >= 2'), and
    one sample failed inside the forward with torch's 'Runtime assertion failed'. It is
    captured again for the batch as given, and explained as it is within the batch."""
    model = tiny_model("BartConfig", "BartForSequenceClassification", _BART)
    inputs = _ids(tokens=7)
    inputs["input_ids"][:, -1] = 1  # one EOS per sample, last
    dlb = DLBacktrace(model, inputs)
    batch = dlb.run_task(inputs=inputs, relevance_nodes="inputs")
    for i in range(2):
        one = {k: v[i : i + 1] for k, v in inputs.items()}
        single = dlb.run_task(inputs=one, relevance_nodes="inputs")
        with torch.no_grad():
            eager = model(**one).logits
        torch.testing.assert_close(torch.as_tensor(single["predictions"]), eager)
        torch.testing.assert_close(
            single["relevance"]["input_ids"][0], batch["relevance"]["input_ids"][i],
            rtol=1e-4, atol=1e-5,
        )  # fmt: skip
        _conserved(single["conservation"])
    assert len(dlb._graphs) == 2  # the first graph and one for a batch of one
    assert dlb.debug_execution_differences(**one)["match"]
