"""``bench.coverage`` on a representative handful of tiny architectures (text classifier,
decoders generating, a CNN, a vision transformer): each must be ok, through the same
per-architecture check the CLI runs; and the report groups failures by cause."""

from __future__ import annotations

import json

import pytest
import torch

from bench.coverage.architectures import Arch, list_architectures
from bench.coverage.check import STATUSES, as_close_as_eager, check_architecture, missing_ops
from bench.coverage.report import failures, low_shares, markdown, summary

SUBSET = [
    ("sequence-classification", "bert"),
    ("causal-lm", "gpt2"),
    ("causal-lm", "llama"),
    ("torchvision", "resnet18"),
    ("image-classification", "vit"),
]


@pytest.mark.parametrize("mapping, name", SUBSET)
def test_representative_architectures_are_ok(mapping, name):
    arch = next(a for a in list_architectures(mapping) if a.name == name)
    outcome = check_architecture(arch)
    assert (outcome.status, outcome.detail) == ("ok", "")
    assert outcome.seconds > 0
    assert isinstance(outcome.input_share, float)


def test_a_model_class_that_does_not_exist_is_not_built():
    outcome = check_architecture(Arch("causal-lm", "llama", "NoSuchModelForCausalLM"))
    assert outcome.status == "not-built"
    assert "NoSuchModelForCausalLM" in outcome.detail


def test_missing_ops_are_named_once_each():
    message = (
        "no relevance rule for: aten.type_as.default at node 'type_as', "
        "aten.pad.default at node 'pad', aten.type_as.default at node 'type_as_1'"
    )
    assert missing_ops(message) == ["aten.pad.default", "aten.type_as.default"]


def test_report_counts_built_ok_and_groups_failures_by_op():
    rows = {
        "causal-lm/a": {"mapping": "causal-lm", "status": "ok"},
        "causal-lm/b": {"mapping": "causal-lm", "status": "not-built", "detail": "x"},
        "causal-lm/c": {"mapping": "causal-lm", "status": "unsupported-op", "detail": "p, q"},
        "causal-lm/d": {"mapping": "causal-lm", "status": "unsupported-op", "detail": "p"},
        "causal-lm/e": {"mapping": "causal-lm", "status": "timeout", "detail": "over 60 s"},
    }
    summ = summary(rows, {"causal-lm": 9})
    assert summ == {
        "causal-lm": {"architectures": 9, "run": 5, "built": 4, "ok": 1, "percent": 25.0}
    }
    fails = failures(rows)
    assert [(f["cause"], f["count"]) for f in fails] == [
        ("no rule for p", 2),
        ("no rule for q", 1),
        ("timeout", 1),
    ]
    table = markdown(summ, fails)
    assert "| causal-lm | 9 | 5 | 4 | 1 | 25.0 % |" in table
    assert "| no rule for p | 2 | c, d |" in table
    assert set(r["status"] for r in rows.values()) <= set(STATUSES)


def test_report_lists_ok_rows_whose_relevance_mostly_ends_in_sinks():
    rows = {
        "causal-lm/a": {"mapping": "causal-lm", "status": "ok", "input_share": 0.9},
        "causal-lm/b": {"mapping": "causal-lm", "status": "ok", "input_share": 0.2},
        "causal-lm/c": {"mapping": "causal-lm", "status": "ok", "input_share": 0.05},
        "causal-lm/d": {"mapping": "causal-lm", "status": "ok"},  # recorded before shares
        "causal-lm/e": {"mapping": "causal-lm", "status": "timeout", "input_share": None},
    }
    low = low_shares(rows)
    assert low == {"causal-lm/c": 0.05, "causal-lm/b": 0.2}
    table = markdown(summary(rows, {}), failures(rows), low)
    assert "| causal-lm/c | 0.050 |" in table


def test_results_merge_into_the_file_as_it_is_then(tmp_path):
    """Two runs writing one results file (another helper's reruns) keep each other's rows:
    each row is merged into what the file holds when it is written."""
    from bench.coverage.__main__ import _merge

    path = tmp_path / "coverage.json"
    mine = _merge(path, {"causal-lm/a": {"status": "ok"}})
    _merge(path, {"causal-lm/b": {"status": "timeout"}})  # the other run
    merged = _merge(path, {"causal-lm/a": {"status": "run-error"}})
    assert mine == {"causal-lm/a": {"status": "ok"}}
    assert merged == {"causal-lm/a": {"status": "run-error"}, "causal-lm/b": {"status": "timeout"}}
    assert json.loads(path.read_text()) == merged


def test_generation_is_compared_with_whole_forwards_where_generate_is_not_the_forward():
    """RWKV's cached step broadcasts its [B, H] state against the [B, 1, H] token: for a batch
    of two, generate's logits are not the model's, so the reference is the greedy decode by
    whole forwards (and says so); llama's generate is the forward, and the reference."""
    from bench.coverage.check import _reference
    from tests.engine.lm_models import prompts, tiny_lm
    from tests.engine.test_generation_uncached import UNCACHED
    from tests.helpers.tiny import tiny_model

    batch = prompts(2, 6, seed=1, pads=(0, 2))
    rwkv = tiny_model(*UNCACHED["rwkv"])
    tokens, note = _reference(rwkv, batch)
    assert note.startswith("greedy whole forwards")
    ids = batch["input_ids"]
    with torch.no_grad():
        for _ in range(tokens.shape[1] - ids.shape[1]):
            ids = torch.cat([ids, rwkv(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(tokens, ids)
    llama = tiny_lm("llama")
    tokens, note = _reference(llama, batch)
    assert note == ""
    assert torch.equal(tokens, llama.generate(**batch, max_new_tokens=3, do_sample=False))


@pytest.mark.parametrize(
    "name",
    [
        "ernie4_5_moe",
        "glm4_moe_lite",
        "bailing_hybrid",
        "inkling2_text",
        "kimi_linear",
        "deepseek_v2",
    ],
)
def test_configurations_with_more_size_names_build_small(name):
    """The shrink knows the top-k and group names of these configurations (``moe_k``,
    ``num_experts_per_token``, ``num_expert_group``) and gives multi-head latent attention one
    key-value head per head; otherwise the build fell back to the default widths (3.3 billion
    parameters for bailing_hybrid) and the run past the memory limit. ``unpadded_vocab_size``
    is the LM head's width (inkling2: 200058 outputs over 128 embeddings, so decoding fed
    the embedding ids it does not have). Linear attention's heads (``linear_num_heads``,
    ``linear_head_dim``) are heads too (kimi_linear: 3.3 million, past the memory limit).
    A routing left unset by the defaults (deepseek_v2's top-k) is set where there are experts."""
    from bench.coverage.architectures import build

    arch = next(a for a in list_architectures("causal-lm") if a.name == name)
    model, _ = build(arch)
    assert sum(p.numel() for p in model.parameters()) < 3 * 10**6  # defaults: 8M to 3.3G


def test_a_causal_lm_of_a_multimodal_type_builds_from_its_text_configuration():
    """Qwen3_5ForCausalLM takes Qwen3_5TextConfig (its ``config_class``, the ``text_config`` of
    the type's Qwen3_5Config): built from the type's configuration it had no vocab_size."""
    from bench.coverage.architectures import build

    arch = next(a for a in list_architectures("causal-lm") if a.name == "qwen3_5")
    model, _ = build(arch)
    assert type(model.config).__name__ == "Qwen3_5TextConfig"


@pytest.mark.parametrize(
    "mapping, name",
    [
        ("causal-lm", "gpt_neo"),
        ("sequence-classification", "t5"),
        ("sequence-classification", "esm"),
        ("sequence-classification", "mistral4"),
        ("causal-lm", "zamba"),
        ("causal-lm", "zamba2"),
        ("causal-lm", "gemma3n_text"),
        ("causal-lm", "jamba"),
        ("causal-lm", "mamba2"),
        ("causal-lm", "dots1"),
        ("image-classification", "levit"),
        ("image-classification", "hgnet_v2"),
        ("image-classification", "mobilevitv2"),
    ],
)
def test_configurations_the_generic_shrink_breaks_build_consistent(mapping, name):
    """Per-layer settings follow the shrunk depth (GPT-Neo's run-length ``attention_types``,
    Zamba 2's ``layers_block_type``, Jamba's attention period), state-space heads fill the
    expanded width (Mamba 2), unset sizes, vocabularies and decoder starts are set (Dots1's
    experts, ESM, T5), what
    a configuration derives is left to it (Mistral 4's ``head_dim``), and vision models keep
    their patch size and stage widths (LeViT, HGNet-V2, MobileViT-v2): none of these built
    before, or (Mamba 2) only at the default widths."""
    from bench.coverage.architectures import build

    arch = next(a for a in list_architectures(mapping) if a.name == name)
    model, _ = build(arch)
    assert sum(p.numel() for p in model.parameters()) < 15 * 10**6


def test_per_layer_settings_are_cut_to_the_layers_kept():
    """The first two layers, the first and last of every kind, the first of every index
    list are kept; lists one per layer, layer indices and dicts keyed by them follow,
    renumbered, and counts of layers in proportion."""
    from bench.coverage.architectures import _per_layer

    have = {
        "layer_types": ["a", "a", "a", "b", "a", "a", "a", "b"],
        "widths": [1, 2, 3, 4, 5, 6, 7, 8],
        "moe_layers": [5, 7],
        "per_layer_config": {3: "x", 7: "y"},
        "attn_layer_period": 4,
        "attn_layer_offset": 3,
        "num_kv_shared_layers": 4,
    }
    kept, out = _per_layer(have, 8)
    assert kept == [0, 1, 3, 5, 6, 7]
    assert out == {
        "layer_types": ["a", "a", "b", "a", "a", "b"],
        "widths": [1, 2, 4, 6, 7, 8],
        "moe_layers": [3, 5],
        "per_layer_config": {2: "x", 5: "y"},
        "attn_layer_period": 2,
        "attn_layer_offset": 1,
        "num_kv_shared_layers": 3,
    }
    assert _per_layer({"attention_types": [[["global", "local"], 12]]}, 24) == (
        [0, 1],
        {"attention_types": [[["global", "local"], 1]]},
    )


@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet"])
def test_batch_norms_of_a_random_model_normalise(name):
    """A random MobileNet's batch norms (unit statistics after 0.02-deviation convolutions,
    EfficientNet's scales of 0.02 too) let its outputs vanish (max 6e-23); their statistics
    are set from a batch of images and their scale to one, as training leaves them."""
    from bench.coverage.architectures import build

    arch = next(a for a in list_architectures("image-classification") if a.name == name)
    model, inputs = build(arch)
    with torch.no_grad():
        assert float(model(**inputs).logits.abs().max()) > 1e-3


def test_a_mixture_of_experts_lm_whose_length_is_static_generates_explained():
    """Jamba's state-space scan makes export fix the sequence length, so each explained
    prefix runs on a graph of its own; the per-expert totals read that graph's ``offs``,
    not the first graph's (KeyError: cumsum before)."""
    arch = next(a for a in list_architectures("causal-lm") if a.name == "jamba")
    outcome = check_architecture(arch)
    assert outcome.status == "ok", outcome.detail


@pytest.mark.parametrize(
    "mapping, name",
    [
        ("causal-lm", "bamba"),  # no attention layer by default: given one
        ("causal-lm", "granitemoehybrid"),
        ("causal-lm", "lfm2_moe"),  # layer types unset by default
        ("causal-lm", "qwen4_exp_text"),  # indexer unset by default
        ("causal-lm", "dbrx"),  # rope_theta and clip_qkv only in checkpoints
        ("causal-lm", "cohere_compass_text"),  # RoPE per layer type left empty
        ("causal-lm", "dory"),  # input, recurrent and output layers add up to the depth
        ("causal-lm", "gemma4"),  # per_layer_config of the nested text configuration
        ("causal-lm", "reformer"),
        ("causal-lm", "blt"),
        ("causal-lm", "musicgen"),  # one row of ids per codebook
        ("image-classification", "imagegpt"),  # an image as colour-cluster ids
        ("image-classification", "siglip2"),  # flattened patches, their mask and grid
        ("image-classification", "shieldgemma2"),  # an image inside a prompt
        ("token-classification", "bros"),  # boxes
        ("question-answering", "lxmert"),  # region features and boxes
        ("question-answering", "longformer"),  # global attention given
    ],
)
def test_configurations_whose_defaults_fail_build_small(mapping, name):
    """These did not build at all: defaults transformers' own code fails on (settings only
    checkpoints have), nested per-layer settings and layer counts that did not follow the
    depth, and inputs the forward cannot run without. Each builds small and runs eager."""
    from bench.coverage.architectures import build

    arch = next(a for a in list_architectures(mapping) if a.name == name)
    model, inputs = build(arch)
    assert sum(p.numel() for p in model.parameters()) < 3 * 10**6
    with torch.no_grad():
        model(**inputs)


def test_per_layer_settings_serialised_with_text_keys_and_parts_of_the_depth_are_cut():
    """Gemma 4's ``per_layer_config`` comes back from a nested configuration keyed "05";
    Dory's input, recurrent and output layers (8 + 20 + 8 of 36) are shared out over the
    layers kept, at least one each, still adding up."""
    from bench.coverage.architectures import _per_layer

    types = ["s", "s", "s", "f"] * 9
    have = {
        "layer_types": types,
        "per_layer_config": {f"{i:02d}": {"head_dim": 512} for i in range(3, 36, 4)},
        "n_input_layers": 8,
        "n_recurrent_layers": 20,
        "n_output_layers": 8,
    }
    kept, out = _per_layer(have, 36)
    assert kept == [0, 1, 3, 34, 35]
    assert out["layer_types"] == ["s", "s", "f", "s", "f"]
    assert out["per_layer_config"] == {2: {"head_dim": 512}, 4: {"head_dim": 512}}
    assert (out["n_input_layers"], out["n_recurrent_layers"], out["n_output_layers"]) == (1, 3, 1)


def test_float32_rounding_of_the_eager_model_is_not_a_forward_difference():
    """hgnet_v2's eager float32 logits are 1.5e-4 from its float64 ones and the engine's
    7e-5: ok. An engine as far again from float64 as eager is, past the tolerance, is not."""
    arch = next(a for a in list_architectures("image-classification") if a.name == "hgnet_v2")
    assert check_architecture(arch).status == "ok"
    exact = torch.zeros(1, 3, dtype=torch.float64)
    eager = torch.full((1, 3), 1.5e-4)
    assert as_close_as_eager(eager, torch.full((1, 3), 7e-5), [exact], 0)
    assert not as_close_as_eager(eager, torch.full((1, 3), 5e-4), [exact], 0)
    assert not as_close_as_eager(eager, torch.full((1, 3), 7e-5), [], 0)  # no float64 run
