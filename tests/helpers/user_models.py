"""Models as platform engineers register their own: small random-weight transformers
checkpoints written with ``save_pretrained`` (DistilBERT classifiers of one label of three,
of several labels and of a value, a bare DistilBERT encoder, a DistilBERT masked LM
registered for fill-mask (``head: masked-lm``), a RoBERTa sequence classifier,
with fewer positions than the registry's default ``max_tokens``, a ViT with its image
processor, a one-channel ViT, a Llama whose tokenizer has no pad token (also registered as a
text classifier of the token it reads next, ``head: causal-lm``), one whose tokenizer pads on
the left (a text classifier so), a T5), each with its tokenizer built offline.
``python -m tests.helpers.user_models DIR`` writes them, so that test processes need not
import torch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.helpers.stack import ROOT

CORPUS = ["the cat sat on the mat", "a dog ran in the park", "who lives in paris"] * 20
WORDS = sorted(set(" ".join(CORPUS).split()))
POSITIONS = 32  # tokens each text model takes (RoBERTa's table has 2 more rows)
VIT_SIZE = 32


def _bpe(specials: list[str]) -> Any:
    """A byte-level BPE trained on ``CORPUS`` (offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=alphabet
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def _distilbert(
    out: Path, names: tuple[str, ...], cls: str = "DistilBertForSequenceClassification", **cfg: Any
) -> None:
    """A DistilBERT classifier with a class (or output) per name, saved as transformers class
    ``cls`` (the bare encoder: a checkpoint without the classifier); ``cfg``: more of its
    configuration (``problem_type``)."""
    import transformers as tf

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    tok = tf.DistilBertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})
    labels = dict(enumerate(names))
    cfg = tf.DistilBertConfig(
        vocab_size=len(vocab), dim=32, n_layers=1, n_heads=2, hidden_dim=64,
        max_position_embeddings=POSITIONS, id2label=labels,
        label2id={v: k for k, v in labels.items()}, **cfg,
    )  # fmt: skip
    getattr(tf, cls)(cfg).eval().save_pretrained(out)
    tok.save_pretrained(out)


def _roberta(out: Path) -> None:
    import transformers as tf
    from tokenizers import processors

    bpe = _bpe(["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    ids = {t: bpe.token_to_id(t) for t in ("<s>", "</s>")}
    bpe.post_processor = processors.RobertaProcessing(("</s>", ids["</s>"]), ("<s>", ids["<s>"]))
    tok = tf.RobertaTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", sep_token="</s>",
        cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
    )  # fmt: skip
    cfg = tf.RobertaConfig(
        vocab_size=bpe.get_vocab_size(), hidden_size=32, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=64, max_position_embeddings=POSITIONS + 2,
        pad_token_id=1, num_labels=2,
    )  # fmt: skip
    tf.RobertaForSequenceClassification(cfg).eval().save_pretrained(out)
    tok.save_pretrained(out)


def _vit(out: Path, channels: int, size: int) -> None:
    import transformers as tf

    cfg = tf.ViTConfig(
        image_size=size, patch_size=8, num_channels=channels, hidden_size=32,
        num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, num_labels=4,
    )  # fmt: skip
    tf.ViTForImageClassification(cfg).eval().save_pretrained(out)
    proc = tf.ViTImageProcessor(
        size={"height": size, "width": size}, image_mean=[0.5] * channels,
        image_std=[0.25] * channels,
    )  # fmt: skip
    proc.save_pretrained(out)


def _templated(specials: list[str], single: str, special: str, **tokens: str) -> tuple[Any, Any]:
    """(``_bpe(specials)``, a fast tokenizer over it) whose post-processor adds ``special``
    where the template ``single`` places it; ``tokens``: the tokenizer's named special tokens
    (``bos_token``, ...)."""
    import transformers as tf
    from tokenizers import processors

    bpe = _bpe(specials)
    bpe.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[(special, bpe.token_to_id(special))]
    )
    return bpe, tf.PreTrainedTokenizerFast(tokenizer_object=bpe, **tokens)


def _llama(out: Path, padding_side: str = "right") -> None:
    import transformers as tf

    bpe, tok = _templated(["<unk>", "<s>", "</s>"], "<s> $A", "<s>", padding_side=padding_side,
                          bos_token="<s>", eos_token="</s>", unk_token="<unk>")  # fmt: skip
    bos = bpe.token_to_id("<s>")
    assert tok.pad_token is None  # what this model is here for
    cfg = tf.LlamaConfig(
        vocab_size=bpe.get_vocab_size(), hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, bos_token_id=bos, eos_token_id=bpe.token_to_id("</s>"),
    )  # fmt: skip
    tf.LlamaForCausalLM(cfg).eval().save_pretrained(out)
    tok.save_pretrained(out)


def _t5(out: Path) -> None:
    """An encoder-decoder LM: its decoder starts from the pad token and ends at ``</s>``."""
    import transformers as tf

    bpe, tok = _templated(["<pad>", "</s>", "<unk>"], "$A </s>", "</s>",
                          pad_token="<pad>", eos_token="</s>", unk_token="<unk>")  # fmt: skip
    eos = bpe.token_to_id("</s>")
    cfg = tf.T5Config(
        vocab_size=bpe.get_vocab_size(), d_model=32, d_kv=8, d_ff=64, num_layers=2,
        num_heads=4, pad_token_id=bpe.token_to_id("<pad>"), eos_token_id=eos,
        decoder_start_token_id=bpe.token_to_id("<pad>"),
    )  # fmt: skip
    tf.T5ForConditionalGeneration(cfg).eval().save_pretrained(out)
    tok.save_pretrained(out)


def write(out: Path) -> None:
    """Every model under ``out``, seeded."""
    import torch

    torch.manual_seed(0)
    _distilbert(out / "distilbert", ("neg", "neu", "pos"))
    multi = {"problem_type": "multi_label_classification"}
    _distilbert(out / "distilbert-multilabel", ("toxic", "insult", "threat"), **multi)
    _distilbert(out / "distilbert-regression", ("stars",), problem_type="regression")
    _distilbert(out / "distilbert-base", ("neg", "pos"), "DistilBertModel")
    _distilbert(out / "distilbert-mlm", ("neg", "pos"), "DistilBertForMaskedLM")
    _roberta(out / "roberta")
    _vit(out / "vit", 3, VIT_SIZE)
    _vit(out / "vit-gray", 1, 16)
    _llama(out / "llama")
    _llama(out / "llama-left", padding_side="left")
    _t5(out / "t5")


def build(out: Path) -> Path:
    """``write`` in a subprocess; returns ``out``."""
    cmd = [sys.executable, "-m", "tests.helpers.user_models", str(out)]
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return out


def entries(folder: Path) -> list[dict[str, Any]]:
    """Registry entries as an operator writes them: id, task, path; no limits, no image."""
    tasks = {
        "distilbert": "text-classification",
        "distilbert-multilabel": "text-classification",
        "distilbert-regression": "text-classification",
        "distilbert-base": "text-classification",
        "distilbert-mlm": "text-classification",
        "roberta": "text-classification",
        "vit": "image-classification",
        "vit-gray": "image-classification",
        "llama": "generation",
        "llama-next-token": "text-classification",
        "llama-left": "text-classification",
        "t5": "generation",
    }
    # the others: the head their task implies
    heads = {
        "distilbert-mlm": "masked-lm",
        "llama-next-token": "causal-lm",
        "llama-left": "causal-lm",
    }
    folders = {"llama-next-token": "llama"}  # the others: the folder of their name
    return [
        {
            "id": f"user-{name}",
            "task": task,
            "source": {"kind": "transformers", "path": str(folder / folders.get(name, name))}
            | ({"head": heads[name]} if name in heads else {}),
        }
        for name, task in tasks.items()
    ]


if __name__ == "__main__":
    write(Path(sys.argv[1]))
