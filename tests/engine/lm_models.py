"""Tiny causal LMs for the generation tests: small random configurations of transformers
families, and a lookup model trained in a fraction of a second whose answer copies a prompt token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import transformers
from torch import Tensor, nn

from tests.helpers.tiny import tiny_model

VOCAB = 96
EOS, PAD = 1, 0

# the vocabulary and special token ids of every tiny LM here and in the generation tests
SPECIAL = dict(vocab_size=VOCAB, bos_token_id=2, eos_token_id=EOS, pad_token_id=PAD)
_DECODER = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    **SPECIAL,
)
_MOE = dict(_DECODER, num_experts_per_tok=2)

CONFIGS: dict[str, tuple[str, str, dict]] = {
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        dict(n_layer=2, n_embd=64, n_head=4, n_positions=128, **SPECIAL),
    ),
    "llama": ("LlamaConfig", "LlamaForCausalLM", _DECODER),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _DECODER),
    "mistral": ("MistralConfig", "MistralForCausalLM", _DECODER),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(_MOE, num_local_experts=4)),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(_MOE, num_experts=4, moe_intermediate_size=48, shared_expert_intermediate_size=48),
    ),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(_MOE, num_experts=4)),
    # experts as a loop over index-gathered rows (no grouped matmul), routed by topk
    "jetmoe": (
        "JetMoeConfig",
        "JetMoeForCausalLM",
        dict(_MOE, num_local_experts=4, kv_channels=16, num_key_value_heads=2),
    ),
}


class WrappedLM(nn.Module):
    """A causal LM whose forward a test replaces; everything else (its generation config,
    transformers' processor builders) is the wrapped LM's."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["lm"], name)


def tiny_lm(family: str, seed: int = 0, sharpen: float = 1.0) -> nn.Module:
    """A random-weight causal LM of ``family``. ``sharpen`` scales the LM head so that logits
    are peaked (random models otherwise emit near-uniform logits and never stop at EOS)."""
    model = tiny_model(*CONFIGS[family], seed=seed)
    if sharpen != 1.0:
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(sharpen)
    return model


def prompts(batch: int, length: int, seed: int = 0, pads: tuple[int, ...] = ()) -> dict:
    """Random token prompts; row i gets ``pads[i]`` left-padding tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for row, n in enumerate(pads):
        ids[row, :n], mask[row, :n] = PAD, 0
    return {"input_ids": ids, "attention_mask": mask}


@dataclass(frozen=True)
class LookupTask:
    """Class lookup: the prompt holds one token of each of ``classes`` classes in random order,
    then a separator and a query naming a class; the answer is the prompt token of that class.

    So the answer copies a known prompt token (the *source*), found by matching the query against
    every token's class: planted evidence whose location the relevance must find.
    """

    classes: int = 6
    per_class: int = 8
    sep: int = 1

    @property
    def first_query(self) -> int:
        return 2

    @property
    def first_content(self) -> int:
        return 2 + self.classes

    @property
    def vocab(self) -> int:
        return self.first_content + self.classes * self.per_class

    def sample(self, n: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
        """(prompts [n, classes + 2], answers [n], source positions [n])."""
        g = torch.Generator().manual_seed(seed)
        order = torch.rand(n, self.classes, generator=g).argsort(1)
        member = torch.randint(0, self.per_class, (n, self.classes), generator=g)
        content = self.first_content + order * self.per_class + member
        query = torch.randint(0, self.classes, (n,), generator=g)
        source = (order == query[:, None]).long().argmax(1)
        ids = torch.cat(
            [content, torch.full((n, 1), self.sep), (self.first_query + query)[:, None]], 1
        )
        return ids, content.gather(1, source[:, None]).squeeze(1), source


def train_lookup_lm(task: LookupTask = LookupTask(), seed: int = 0) -> nn.Module:
    """A one-layer Llama trained on ``task`` to a loss under 0.01 (a few dozen steps).

    One layer suffices (the query attends to the token of its class and copies it) and keeps
    the planted evidence sharp: the copied token carries the answer."""
    transformers.logging.set_verbosity_error()
    config = transformers.LlamaConfig(
        vocab_size=task.vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=32,
        bos_token_id=PAD,
        eos_token_id=task.sep,
        pad_token_id=PAD,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for step in range(400):
        ids, answer, _ = task.sample(128, seed=1000 + step)
        loss = nn.functional.cross_entropy(model(input_ids=ids).logits[:, -1], answer)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 1e-2:
            break
    return model.eval()


def word_tokenizer():
    """A word-level fast tokenizer over ``VOCAB`` ids ("w3" ... ), built in memory."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {"<pad>": PAD, "<eos>": EOS, "<bos>": 2} | {f"w{i}": i for i in range(3, VOCAB)}
    core = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>"
    )


def conserved_and_paths_agree(
    dlb, batch, tolerance: float, mode: str = "default", steps: int = 4
) -> list:
    """Run the batched and the stepwise path; assert that they agree to ``tolerance`` (relative)
    and that relevance is conserved at every step. Returns the batched conservation trace."""
    from engine.generation import run_generation

    kw = {"max_new_tokens": steps, "return_relevance": True, "mode": mode}
    batched = run_generation(dlb, batch, **kw)
    stepwise = run_generation(dlb, batch, path="stepwise", **kw)
    for i in range(steps):
        a = batched["relevance_trace"][i]["input_ids"]
        b = stepwise["relevance_trace"][i]["input_ids"]
        assert float((a - b).abs().max()) <= tolerance * float(a.abs().max())
        c = batched["conservation_trace"][i]
        torch.testing.assert_close(a.sum(-1) + c["sinks"], c["seed"], rtol=1e-4, atol=1e-4)
    return batched["conservation_trace"]
