"""The three benchmark tasks: a model, its held-out samples, what counts as one feature, how a
feature is removed, and which output is explained.

Every task reduces to the same interface, so the metric code never looks at pixels or tokens:
``features`` marks which of a sample's F feature slots exist, ``pool`` turns input-shaped
relevance into one score per feature, ``remove`` replaces the chosen features by the task's
documented baseline, and ``score`` reads the explained output (the target's logit). The
contrast rows (``<model>-contrast``) explain and perturb the logit difference target minus
runner-up instead: their ``target`` is [N, 2], the class and its alternative.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.references import blurred

Inputs = dict[str, Tensor]

# Features of the image task: non-overlapping PATCH x PATCH pixel blocks.
PATCH = 2


@dataclass
class Task:
    """One model and its held-out samples, seen as N samples of at most F features each."""

    name: str
    kind: str  # "image", "text" or "lm"
    model: nn.Module
    inputs: Inputs  # N samples, batched (and padded where lengths differ)
    target: Tensor  # [N] class or token explained: the prediction ([N, 2]: and runner-up)
    features: Tensor  # [N, F] bool: which feature slots a sample has
    steps: int  # points of a perturbation curve after the unperturbed one
    baseline: str  # what a removed feature becomes, in words (for the JSON and README)
    extra: dict[str, Any] = field(default_factory=dict)
    # the demo's build report (training steps, accuracy): a demo model is trained on first use,
    # and the lookup LM's training rounds differently on another CPU, so runs on two machines
    # may score two different models (see ``weights_fingerprint``)
    build: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return self.features.shape[0]

    def subset(self, idx: Tensor | slice) -> Inputs:
        return {k: v[idx] for k, v in self.inputs.items()}

    def logits(self, inputs: Inputs) -> Tensor:
        """The explained output's logits [n, C]: the classifier's, or the LM's next token's."""
        with torch.no_grad():
            out = self.model(**inputs)
        out = out if isinstance(out, Tensor) else out.logits
        return out[:, -1] if self.kind == "lm" else out

    def score(self, inputs: Inputs, target: Tensor) -> Tensor:
        """The target's logit, or with an alternative ([n, 2]) the logit difference."""
        if target.dim() == 2:
            both = self.logits(inputs).gather(1, target)
            return both[:, 0] - both[:, 1]
        return self.logits(inputs).gather(1, target[:, None])[:, 0]

    def pool(self, relevance: Tensor) -> Tensor:
        """Input-shaped relevance [n, ...] -> per-feature relevance [n, F]."""
        if self.kind == "image":
            return F.avg_pool2d(relevance.sum(1, keepdim=True), PATCH).flatten(1) * PATCH**2
        return relevance

    def remove(self, inputs: Inputs, drop: Tensor) -> Inputs:
        """Replace the features where ``drop`` [n, F] is true by the baseline."""
        if self.kind == "image":
            side = inputs["input"].shape[-1] // PATCH
            pixels = drop.view(-1, 1, side, side).repeat_interleave(PATCH, 2)
            pixels = pixels.repeat_interleave(PATCH, 3)
            x = inputs["input"]
            return {"input": torch.where(pixels, self.extra["fill"](x), x)}
        ids = torch.where(drop, self.extra["fill"], inputs["input_ids"])
        return {**inputs, "input_ids": ids}


def _predicted(task: Task, batch: int = 128) -> Tensor:
    rows = [
        task.logits(task.subset(slice(i, i + batch))).argmax(-1) for i in range(0, task.n, batch)
    ]
    return torch.cat(rows)


def digits_task(data_dir: str | None, n: int, fill: str = "mean") -> Task:
    """The digits CNN on its held-out images (the first ``n`` of the 300 the build held out).

    Baseline ``fill="mean"``: the mean pixel of the training images, one grey level for every
    removed pixel. ``fill="blur"``: the pixel of the image blurred (Gaussian, sigma 2 pixels),
    which erases a stroke's detail without painting grey into the dark background.
    """
    from service.demo import build_demo_model
    from service.demo.digits import dataset

    demo = build_demo_model("digits-cnn", data_dir)
    x, _ = dataset()
    # The split of service/demo/digits.build: a seeded permutation, the first 300 held out.
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    held, train = perm[:300], perm[300:]
    if held[:20].tolist() != demo.info["heldout_indices"]:
        raise RuntimeError("digits split differs from the one the model was built with")
    images = x[held[:n]]
    side = images.shape[-1] // PATCH
    mean = x[train].mean()
    fills = {"mean": lambda img: mean, "blur": lambda img: blurred(img, sigma=2.0)}
    words = {"mean": "the training images' mean pixel", "blur": "the image blurred (sigma 2)"}
    task = Task(
        name="digits-cnn" if fill == "mean" else f"digits-cnn-{fill}",
        kind="image",
        model=demo.model,
        inputs={"input": images},
        target=torch.empty(0, dtype=torch.long),
        features=torch.ones(len(images), side * side, dtype=torch.bool),
        steps=16,
        baseline=f"{PATCH}x{PATCH} pixel patches set to {words[fill]}",
        extra={"fill": fills[fill], "reference": fill},
        build=demo.info,
    )
    task.target = _predicted(task)
    return task


def sentiment_task(data_dir: str | None, n: int) -> Task:
    """MiniLM sentiment on ``n`` held-out sentences (phrases never seen in training).

    Features are the word-piece tokens between [CLS] and [SEP]; a removed token becomes [MASK],
    the token MiniLM's masked-language-model pretraining taught it to read as "unknown here".
    """
    from service.demo import build_demo_model
    from service.demo.sentiment import corpus

    demo = build_demo_model("minilm-sentiment", data_dir)
    tok = demo.tokenizer
    rows = corpus(held_out=True)
    random.Random(0).shuffle(rows)
    enc = tok([text for text, _ in rows[:n]], padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    special = torch.isin(ids, torch.tensor(tok.all_special_ids))
    task = Task(
        name="minilm-sentiment",
        kind="text",
        model=demo.model,
        inputs={"input_ids": ids, "attention_mask": mask},
        target=torch.empty(0, dtype=torch.long),
        features=(mask == 1) & ~special,
        steps=10,
        baseline="token replaced by [MASK] ([CLS], [SEP] and padding are never removed)",
        extra={"fill": tok.mask_token_id, "tokenizer": tok, "reference": "mask"},
        build=demo.info,
    )
    task.target = _predicted(task)
    return task


def lookup_task(data_dir: str | None, n: int) -> Task:
    """The lookup LM on ``n`` fresh prompts (``a3 c1 f9 h0 ? c``), target: the next token.

    A removed token becomes <unk>: it never occurs in training, so its embedding is still the
    small random one of initialisation and carries next to nothing but its position.
    """
    from service.demo import build_demo_model
    from service.demo.lookup import lookup_example

    demo = build_demo_model("tiny-lookup-lm", data_dir)
    tok = demo.tokenizer
    rng = random.Random(2024)  # the build trains on seed 0 and measures on seed 12345
    prompts = [lookup_example(rng)[0] for _ in range(n)]
    ids = torch.tensor([tok(p)["input_ids"] for p in prompts])
    task = Task(
        name="tiny-lookup-lm",
        kind="lm",
        model=demo.model,
        inputs={"input_ids": ids, "attention_mask": torch.ones_like(ids)},
        target=torch.empty(0, dtype=torch.long),
        features=torch.ones_like(ids, dtype=torch.bool),
        steps=ids.shape[1],
        baseline="token replaced by <unk> (never trained: its embedding is the initial one)",
        extra={"fill": tok.unk_token_id, "tokenizer": tok, "reference": "mask"},
        build=demo.info,
    )
    task.target = _predicted(task)
    return task


def contrasted(build):
    """The contrast row of a task: the prediction against the runner-up, whose logit
    difference is what the perturbation curves read and every method explains."""

    def build_contrast(data_dir: str | None, n: int) -> Task:
        task = build(data_dir, n)
        runner_up = torch.cat(
            [
                task.logits(task.subset(slice(i, i + 128))).topk(2, -1).indices[:, 1]
                for i in range(0, task.n, 128)
            ]
        )
        task.name = f"{task.name}-contrast"
        task.target = torch.stack([task.target, runner_up], -1)
        return task

    return build_contrast


USUAL = {
    "digits-cnn": digits_task,
    "digits-cnn-blur": lambda data_dir, n: digits_task(data_dir, n, fill="blur"),
    "minilm-sentiment": sentiment_task,
    "tiny-lookup-lm": lookup_task,
}
TASKS = {**USUAL, **{f"{name}-contrast": contrasted(build) for name, build in USUAL.items()}}
