"""The attribution methods compared, each behind one signature.

A method is a factory ``build(task) -> explain``; ``build`` does the one-time, untimed work
(capturing the graph, registering hooks) and ``explain(inputs, target)`` returns relevance for
a batch: pixel-shaped [n, 1, H, W] for images, one score per token [n, T] for text. Gradient
methods on text work on the token embeddings and sum over the hidden size, as their authors'
tutorials do. Integrated Gradients integrates from the task's removal baseline (the mean-pixel
image, the [MASK] or <unk> embeddings), so it answers the question the perturbation asks.

In a contrast row ``target`` is [n, 2], the class and its alternative (the runner-up), and
every method explains the logit difference: the engine in mode "contrast" (from the removal
baseline, as IG), Captum on a forward that returns the logits minus the alternative's,
Zennit and LXT from the output gradient one-hot(target) - one-hot(alternative).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .tasks import Inputs, Task

Explain = Callable[[Inputs, Tensor], Tensor]

# The engine's seed size; relevance is rank-compared, so any positive value would do.
SEED = 100.0
IG_STEPS = 50


def _pair(target: Tensor) -> tuple[Tensor, Tensor | None]:
    """The explained class and, in a contrast row, its alternative."""
    return (target[:, 0], target[:, 1]) if target.dim() == 2 else (target, None)


def _difference(forward: Callable) -> Callable:
    """``forward`` with the alternative's logit subtracted (the last extra argument)."""

    def contrast_forward(*args: Tensor) -> Tensor:
        *rest, alternative = args
        out = forward(*rest)
        return out - out.gather(1, alternative[:, None])

    return contrast_forward


@dataclass(frozen=True)
class Method:
    name: str
    kinds: tuple[str, ...]  # task kinds it applies to
    build: Callable[[Task], Explain]
    package: str  # where it comes from, for the report


# ---------------------------------------------------------------- this engine


def _engine(mode: str, named: bool = False) -> Callable[[Task], Explain]:
    """This engine in ``mode``. Modes "reference" and "contrast" start from the removal
    baseline, as Integrated Gradients does; ``named``: from the engine's named reference that
    a caller would pick for the task (``task.extra["reference"]``), which need not be that
    baseline."""

    def build(task: Task) -> Explain:
        from engine import DLBacktrace
        from engine.sweep import Seed

        dlb = DLBacktrace(task.model, task.subset(slice(0, 2)))

        def reference(inputs: Inputs) -> dict:
            if mode == "default":
                return {}
            if named:
                tokenizer = task.extra.get("tokenizer")
                return {"reference": task.extra["reference"], "tokenizer": tokenizer}
            return {"reference": _removed(task, inputs)}

        if task.kind != "lm":
            key = "input" if task.kind == "image" else "input_ids"

            def classify(inputs: Inputs, target: Tensor) -> Tensor:
                res = dlb.run_task(
                    **reference(inputs),
                    inputs=inputs,
                    task="image-classification" if task.kind == "image" else "text-classification",
                    mode=mode,
                    multiplier=SEED,
                    target=_pair(target)[0],  # contrast: the runner-up is the alternative
                    relevance_nodes="inputs",
                )
                return res["relevance"][key]

            return classify

        def next_token(inputs: Inputs, target: Tensor) -> Tensor:
            n, length = inputs["input_ids"].shape
            rows = torch.arange(n)
            token = _pair(target)[0]
            index = torch.stack([rows, torch.full_like(rows, length - 1), token], -1)
            seed = Seed(index[None], torch.full((1, n), SEED))
            exp = dlb.explain(
                inputs, seed, mode=mode, relevance_nodes="inputs", **reference(inputs)
            )
            return exp.relevance["input_ids"][0]

        return next_token

    return build


# ---------------------------------------------------------------- Captum


def _differentiable(task: Task) -> tuple[Callable, Callable[[Inputs], tuple], Callable]:
    """(forward over a float input, inputs -> (float input, extra args), per-feature reduce)."""
    if task.kind == "image":

        def image_forward(x: Tensor) -> Tensor:
            return task.model(x)

        return image_forward, lambda inputs: (inputs["input"], ()), lambda a: a

    embed = task.model.get_input_embeddings()

    def text_forward(emb: Tensor, mask: Tensor) -> Tensor:
        out = task.model(inputs_embeds=emb, attention_mask=mask).logits
        return out[:, -1] if task.kind == "lm" else out

    def split(inputs: Inputs) -> tuple[Tensor, tuple]:
        return embed(inputs["input_ids"]).detach(), (inputs["attention_mask"],)

    return text_forward, split, lambda a: a.sum(-1)


def _removed(task: Task, inputs: Inputs) -> Inputs:
    """The inputs with every feature removed (the perturbation's end point); special tokens
    and padding stay."""
    n = next(iter(inputs.values())).shape[0]
    gone = task.remove(inputs, torch.ones(n, task.features.shape[1], dtype=torch.bool))
    if task.kind == "image":
        return gone
    keep = inputs["attention_mask"].bool() & ~torch.isin(
        inputs["input_ids"], torch.tensor(task.extra["tokenizer"].all_special_ids)
    )
    return {**gone, "input_ids": torch.where(keep, gone["input_ids"], inputs["input_ids"])}


def _baseline(task: Task, inputs: Inputs) -> Tensor:
    """The float input with every feature removed: the removed image, or its embeddings."""
    gone = _removed(task, inputs)
    if task.kind == "image":
        return gone["input"]
    return task.model.get_input_embeddings()(gone["input_ids"]).detach()


def _captum(name: str) -> Callable[[Task], Explain]:
    def build(task: Task) -> Explain:
        import captum.attr

        forward, split, reduce = _differentiable(task)
        contrast = task.target.dim() == 2
        algo = getattr(captum.attr, name)(_difference(forward) if contrast else forward)

        def explain(inputs: Inputs, target: Tensor) -> Tensor:
            x, extra = split(inputs)
            target, alternative = _pair(target)
            extra = (*extra, alternative) if contrast else extra
            kwargs = {"target": target, "additional_forward_args": extra or None}
            if name == "IntegratedGradients":
                kwargs.update(baselines=_baseline(task, inputs), n_steps=IG_STEPS)
                kwargs["internal_batch_size"] = 16 * IG_STEPS
            return reduce(algo.attribute(x, **kwargs)).detach()

        return explain

    return build


# ---------------------------------------------------------------- Zennit and LXT


def _zennit_epsilon_plus(task: Task) -> Explain:
    from zennit.attribution import Gradient
    from zennit.composites import EpsilonPlus

    composite = EpsilonPlus()

    def explain(inputs: Inputs, target: Tensor) -> Tensor:
        x = inputs["input"]
        with Gradient(model=task.model, composite=composite) as attributor:
            logits = task.model(x)
            _, relevance = attributor(x, _output_gradient(target, logits))
        return relevance.detach()

    return explain


def _output_gradient(target: Tensor, logits: Tensor) -> Tensor:
    """one-hot(target), minus one-hot(alternative) in a contrast row."""
    target, alternative = _pair(target)
    grad = torch.nn.functional.one_hot(target, logits.shape[-1]).to(logits.dtype)
    if alternative is not None:
        grad = grad - torch.nn.functional.one_hot(alternative, logits.shape[-1]).to(grad)
    return grad


def _lxt(variant: str) -> Callable[[Task], Explain]:
    def build(task: Task) -> Explain:
        from .lxt_adapter import patched

        forward, split, reduce = _differentiable(task)
        with patched(task.model, variant):  # fail at build time if LXT cannot patch
            pass

        def explain(inputs: Inputs, target: Tensor) -> Tensor:
            x, extra = split(inputs)
            x = x.requires_grad_()
            with patched(task.model, variant), torch.enable_grad():
                out = forward(x, *extra)
                (out * _output_gradient(target, out)).sum().backward()
            return reduce(x * x.grad).detach()

        return explain

    return build


def _random(task: Task) -> Explain:
    g = torch.Generator().manual_seed(0)

    def explain(inputs: Inputs, target: Tensor) -> Tensor:
        first = next(iter(inputs.values()))
        shape = first.shape if task.kind == "image" else inputs["input_ids"].shape
        return torch.rand(shape, generator=g)

    return explain


ALL = ("image", "text", "lm")
TEXT = ("text", "lm")
METHODS = [
    Method("random", ALL, _random, "-"),
    Method("engine-default", ALL, _engine("default"), "engine"),
    Method("engine-contrast", ALL, _engine("contrast"), "engine"),
    Method("engine-reference", ALL, _engine("reference"), "engine"),
    Method("engine-reference-named", ALL, _engine("reference", named=True), "engine"),
    Method("captum-ig", ALL, _captum("IntegratedGradients"), "captum"),
    Method("captum-ixg", ALL, _captum("InputXGradient"), "captum"),
    Method("captum-saliency", ALL, _captum("Saliency"), "captum"),
    Method("zennit-epsilonplus", ("image",), _zennit_epsilon_plus, "zennit"),
    Method("lxt-attnlrp", TEXT, _lxt("attnlrp"), "lxt"),
    Method("lxt-cplrp", TEXT, _lxt("cplrp"), "lxt"),
]
