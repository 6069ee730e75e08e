"""Causal LMs for generation demos: ``tiny-lookup-lm`` and ``gpt2-small-config``.

``tiny-lookup-lm`` is a 1-layer, width-64 GPT-2 trained on a key-value lookup: the prompt
``a3 c1 f9 h0 ? c`` asks for the value stored under key ``c``, and the answer is ``1`` then
``<eos>``. Each key-value pair is one token, so a single attention hop solves the task and the
model learns it in a few hundred steps on a CPU; the answer's relevance should peak at the
pair token that holds it (planted evidence for faithfulness checks). One layer, because with
two the trained model depends on the machine's float rounding: on one CPU it read the pair
token at the answer, on another (same seed, same versions) it first copied the value into the
query's position and the relevance peaked there; with one layer the only route from the pair
to the answer is the one attention hop (trained to 100 % in 500 steps on both).

``gpt2-small-config`` is the GPT-2 architecture with 6 layers of width 256 and seeded random
weights, over a character tokenizer we ship (the byte-level BPE would need a download)."""

from __future__ import annotations

import json
import random
import string
import time
from pathlib import Path

from engine.tasks import TaskName

from ..models import LoadedModel

KEYS = "abcdefgh"
VALUES = "0123456789"
PAIRS = 4
SPECIALS = ["<pad>", "<eos>", "<unk>"]


def _tokenizer(vocab: list[str], split: str):
    """A transformers fast tokenizer over a fixed vocabulary, built without any download.
    ``split='words'`` splits on spaces; ``split='chars'`` makes every character a token."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    if split == "words":
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    else:
        tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
        tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        bos_token="<eos>",
        padding_side="left",
    )


def lookup_vocab() -> list[str]:
    return SPECIALS + ["?"] + list(KEYS) + list(VALUES) + [k + v for k in KEYS for v in VALUES]


def lookup_example(rng: random.Random) -> tuple[str, str, int]:
    """(prompt, answer, index of the pair token that holds the answer)."""
    keys = rng.sample(KEYS, PAIRS)
    vals = [rng.choice(VALUES) for _ in keys]
    q = rng.randrange(PAIRS)
    prompt = " ".join(k + v for k, v in zip(keys, vals, strict=True)) + f" ? {keys[q]}"
    return prompt, vals[q], q


def _gpt2(vocab_size: int, layers: int, width: int, heads: int, positions: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=vocab_size,
        n_positions=positions,
        n_embd=width,
        n_layer=layers,
        n_head=heads,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(cfg)


def build_lookup(out: Path, seed: int = 0) -> dict:
    """Train the lookup LM into ``out``. ``seed`` seeds its initialisation and its training
    prompts (the demo's is 0; the held-out prompts stay the same): other seeds give the other
    builds a faithfulness comparison may want to average over, each reproducible."""
    import torch

    t0 = time.perf_counter()
    # One thread, whatever the calling process set: a float sum splits differently across
    # threads, and 700 training steps turn that into another model (two threads stopped at
    # step 600 with other weights), so the build would depend on who triggered it.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        tok = _tokenizer(lookup_vocab(), "words")
        model = _gpt2(len(lookup_vocab()), layers=1, width=64, heads=4, positions=32)

        def batch(rng: random.Random, n: int):
            rows = []
            for _ in range(n):
                prompt, answer, _ = lookup_example(rng)
                rows.append(tok(prompt)["input_ids"] + tok(answer)["input_ids"] + [1])
            x = torch.tensor(rows)
            labels = torch.full_like(x, -100)
            labels[:, -2:] = x[:, -2:]
            return x, labels

        rng, held = random.Random(seed), random.Random(12345)
        tx, _ = batch(held, 500)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        acc, step = 0.0, 0
        for step in range(1, 2001):
            x, labels = batch(rng, 64)
            loss = model(input_ids=x, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % 100 == 0:
                with torch.no_grad():
                    pred = model(input_ids=tx[:, :-2]).logits[:, -1].argmax(-1)
                acc = float((pred == tx[:, -2]).float().mean())
                if acc >= 0.99:
                    break
    finally:
        torch.set_num_threads(threads)
    model.eval().save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return {
        "task": TaskName.GENERATION,
        "seed": seed,
        "heldout_accuracy": acc,
        "steps": step,
        "example": lookup_example(random.Random(7))[:2],
        "build_seconds": round(time.perf_counter() - t0, 2),
    }


def build_gpt2_small(out: Path) -> dict:
    import torch

    torch.manual_seed(0)
    vocab = SPECIALS + list(string.printable[:95])  # digits, letters, punctuation, space
    tok = _tokenizer(vocab, "chars")
    model = _gpt2(len(vocab), layers=6, width=256, heads=8, positions=256)
    model.eval().save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return {"task": TaskName.GENERATION, "weights": "random (seed 0)", "vocab": "characters"}


def load_lm(path: Path) -> LoadedModel:
    from transformers import AutoTokenizer, GPT2LMHeadModel

    info = json.loads((path / "build.json").read_text())
    model = GPT2LMHeadModel.from_pretrained(path, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return LoadedModel(info["model_id"], TaskName.GENERATION, model, tok, None, info=info)
