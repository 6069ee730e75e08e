"""One architecture through the engine, classified: build, capture, run, then forward equality
and conservation, as a new user would try it (public API only).

Statuses, in the order a run can fail: ``not-built`` (the configuration or model cannot be
made here: not the engine's failure), ``capture`` (``DLBacktrace(model, inputs)`` raised),
``unsupported-op`` (an op without a rule; the detail names the ops), ``run-error``
(``run_task`` raised), ``forward-differs`` (the engine's logits or tokens are not the eager
model's), ``conservation`` (inputs + sinks != seed per sample, or nothing reaches the inputs),
``ok``; the CLI adds ``timeout`` and ``memory`` for runs it had to stop. A conserved row also
records ``input_share``: the least share of the seed that reaches the inputs (over samples, and
over steps for generation); the rest ends in sinks, which a user's explanation does not show.
"""

from __future__ import annotations

import inspect
import re
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .architectures import TORCHVISION, Arch, NotBuilt, build, first_line

OK = "ok"
STATUSES = (
    OK,
    "not-built",
    "capture",
    "unsupported-op",
    "run-error",
    "forward-differs",
    "conservation",
    "timeout",
    "memory",
)
MULTIPLIER = 100.0
CONSERVATION_RTOL = 1e-4
FORWARD_RTOL, FORWARD_ATOL = 1e-4, 1e-4
NEW_TOKENS = 3
_MEMORY = re.compile(r"MemoryError|bad_alloc|can't allocate memory|out of memory")
# the mapping's task when the engine has it; the issue adds token classification and QA
_TASKS = {
    "sequence-classification": "text-classification",
    "token-classification": "token-classification",
    "question-answering": "question-answering",
    "image-classification": "image-classification",
    "causal-lm": "generation",
    "seq2seq-lm": "generation",
    TORCHVISION: "image-classification",
}


@dataclass
class Outcome:
    """What one architecture did: a status of ``STATUSES``, a one-line detail, the time."""

    mapping: str
    name: str
    status: str
    detail: str = ""
    seconds: float = 0.0
    input_share: float | None = None  # min inputs / seed, for rows that reach conservation

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Failed(Exception):
    """A classified failure: its status and detail."""

    def __init__(self, status: str, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


def stage(name: str) -> None:
    """Say which stage runs now (stderr), so a run stopped at its time limit says where."""
    print(f"@stage {name}", file=sys.stderr, flush=True)


def check_architecture(arch: Arch) -> Outcome:
    """Build, capture and run ``arch``; the first failure decides the status."""
    started = time.perf_counter()
    share = None
    try:
        status, (detail, share) = OK, _check(arch)
    except _Failed as f:
        status, detail = f.status, f.detail
    if status != OK and _MEMORY.search(detail):
        status = "memory"
    seconds = time.perf_counter() - started
    return Outcome(arch.mapping, arch.name, status, detail, seconds, share)


def _check(arch: Arch) -> tuple[str, float | None]:
    """Raises ``_Failed``; returns a note for an ok row (empty when there is none) and its
    input share."""
    from engine import DLBacktrace

    stage("build")
    try:
        model, inputs = build(arch)
    except NotBuilt as e:
        raise _Failed("not-built", str(e)) from None
    stage("capture")
    try:
        dlb = DLBacktrace(model, inputs)
    except Exception as e:  # noqa: BLE001 - every capture failure is a result
        raise _Failed("capture", _describe(e)) from None
    stage("run")
    task = engine_task(arch.mapping)
    if task == "generation":
        return _check_generation(dlb, model, inputs)
    return "", _check_classification(dlb, model, inputs, task)


def engine_task(mapping: str) -> str:
    """The task the mapping runs as: its own where the engine knows it, else
    text-classification (what a user would try before the engine had the task)."""
    from engine.tasks import TASK_NAMES

    task = _TASKS[mapping]
    return task if task in TASK_NAMES else "text-classification"


def _run(dlb: Any, **kwargs: Any) -> tuple[dict[str, Any], list[str]]:
    """``run_task``, its failures classified, and the warnings it gave."""
    from engine import UnsupportedOpError

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = dlb.run_task(multiplier=MULTIPLIER, relevance_nodes="inputs", **kwargs)
        except UnsupportedOpError as e:
            raise _Failed("unsupported-op", ", ".join(missing_ops(str(e)))) from None
        except Exception as e:  # noqa: BLE001 - every run failure is a result
            raise _Failed("run-error", _describe(e)) from None
    return result, [str(w.message) for w in caught]


def missing_ops(message: str) -> list[str]:
    """The op names of an ``UnsupportedOpError`` message, once each, sorted."""
    ops = re.findall(r"([\w.]+) at node", message)
    return sorted(set(ops)) or [first_line(RuntimeError(message))]


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {first_line(e)}"


# ------------------------------------------------------------------ classification


def _check_classification(dlb: Any, model: nn.Module, inputs: dict, task: str) -> float | None:
    result, _ = _run(dlb, task=task, inputs=inputs)
    with torch.no_grad():
        eager = _logits(model(**inputs))
    got = [torch.as_tensor(np.asarray(p)).float() for p in _leaves(result["predictions"])]
    if len(eager) == 2 and len(got) == 1 and got[0].shape == (*eager[0].shape, 2):
        eager = [torch.stack(eager, -1)]  # question answering: start and end as [B, T, 2]
    exact: list[torch.Tensor] | None = None
    for i, (want, have) in enumerate(zip(eager, got, strict=False)):
        if want.shape == have.shape and torch.allclose(
            have, want.float(), rtol=FORWARD_RTOL, atol=FORWARD_ATOL
        ):
            continue
        exact = exact if exact is not None else _float64_logits(model, inputs)
        if want.shape != have.shape or not as_close_as_eager(want, have, exact, i):
            raise _Failed("forward-differs", _difference(want, have))
    return _check_conservation([result["conservation"]])


def _float64_logits(model: nn.Module, inputs: dict) -> list[torch.Tensor]:
    """The eager logits of a float64 copy of the model (empty where it cannot run so)."""
    import copy

    cast = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    try:
        with torch.no_grad():
            return _logits(copy.deepcopy(model).double()(**cast))
    except Exception:  # noqa: BLE001 - no float64 reference: the float32 check stands
        return []


def as_close_as_eager(
    want: torch.Tensor, have: torch.Tensor, exact: list[torch.Tensor], i: int
) -> bool:
    """Whether the engine's logits are no farther from the float64 model's than eager
    float32's own (plus the tolerance): float32's rounding over a deep model (hgnet_v2:
    1.5e-4 from float64, where the engine's were 7e-5) is not the engine's error."""
    if i >= len(exact) or exact[i].shape != want.shape:
        return False
    ref = exact[i]
    own = float((want.double() - ref).abs().max())
    return float((have.double() - ref).abs().max()) <= own + FORWARD_ATOL


def _logits(out: Any) -> list[torch.Tensor]:
    """The output tensors a head explains: logits, or start and end logits."""
    if isinstance(out, torch.Tensor):
        return [out]
    fields = [getattr(out, k, None) for k in ("logits", "start_logits", "end_logits")]
    found = [t for t in fields if isinstance(t, torch.Tensor)]
    return found or [t for t in torch.utils._pytree.tree_leaves(out) if torch.is_tensor(t)][:1]


def _leaves(predictions: Any) -> list[Any]:
    if isinstance(predictions, dict):
        return list(predictions.values())
    if isinstance(predictions, list | tuple):
        return list(predictions)
    return [predictions]


def _difference(want: torch.Tensor, have: torch.Tensor) -> str:
    if want.shape != have.shape:
        return f"logits shape {tuple(have.shape)}, eager {tuple(want.shape)}"
    return f"max |diff| {float((have - want.float()).abs().max()):.3g}"


def _check_conservation(reports: list[dict[str, Any]]) -> float | None:
    """inputs + sinks == seed per sample (1e-4 of the multiplier), and not all in sinks;
    returns the least share of a seed that reaches the inputs (None: every seed is 0)."""
    shares = []
    for c in reports:
        seed, at_inputs, sinks = (np.asarray(_numpy(c[k]), np.float64) for k in
                                  ("seed", "inputs", "sinks"))  # fmt: skip
        if not np.all(np.isfinite(at_inputs + sinks)):
            raise _Failed("conservation", "non-finite relevance")
        error = float(np.abs(at_inputs + sinks - seed).max())
        if error > CONSERVATION_RTOL * MULTIPLIER:
            raise _Failed(
                "conservation",
                f"seed {seed.tolist()}, inputs + sinks {(at_inputs + sinks).round(4).tolist()}",
            )
        if np.any(seed != 0) and not np.any(at_inputs[seed != 0]):
            raise _Failed("conservation", "nothing reaches the inputs (all in sinks)")
        shares += (at_inputs[seed != 0] / seed[seed != 0]).ravel().tolist()
    return round(min(shares), 4) if shares else None


def _numpy(x: Any) -> Any:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x


# ------------------------------------------------------------------ generation


def _check_generation(dlb: Any, model: nn.Module, inputs: dict) -> tuple[str, float | None]:
    """The engine's tokens against the reference (``_reference``), each step's graph logits
    against the decode's (no 'logits differ' warning), and conservation."""
    result, said = _run(
        dlb,
        task="generation",
        inputs=inputs,
        max_new_tokens=NEW_TOKENS,
        return_relevance=True,
    )
    differs = [w for w in said if "logits differ" in w]
    if differs:
        raise _Failed("forward-differs", differs[0])
    if getattr(model.config, "is_encoder_decoder", False):  # the decoder's sequences
        want, note = _seq2seq_reference(model, inputs), ""
    else:
        want, note = _reference(model, inputs)
    have = torch.as_tensor(result["generated_ids"]).cpu()
    n = min(want.shape[1], have.shape[1])
    if not torch.equal(want[:, :n], have[:, :n]):
        source = note or "transformers' generate"
        raise _Failed(
            "forward-differs", f"tokens {have[:, -NEW_TOKENS:].tolist()}, "
            f"{source} {want[:, -NEW_TOKENS:].tolist()}"
        )  # fmt: skip
    share = _check_conservation([c for c in result["conservation_trace"] if c is not None])
    return note, share


@torch.no_grad()
def _seq2seq_reference(model: nn.Module, inputs: dict) -> torch.Tensor:
    """An encoder-decoder's greedy tokens as ``generate`` gives them (one beam, as the
    engine's default: some generation configs ask for five)."""
    source = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
    out = model.generate(**source, max_new_tokens=NEW_TOKENS, do_sample=False, num_beams=1)
    return out.cpu()


@torch.no_grad()
def _reference(model: nn.Module, inputs: dict) -> tuple[torch.Tensor, str]:
    """The greedy tokens to compare with, and a note when they are not generate's.

    transformers' ``generate`` is the reference where it computes the model's own logits: at
    each step, those of a forward over the whole prefix (mask, positions ``cumsum - 1`` where
    the forward takes them). Where its cache or state path gives others (RWKV's cached step
    broadcasts its [B, H] state against the [B, 1, H] token into [B, B, H]: wrong for any batch
    over 1), its tokens are not the model's, and the reference is the greedy decode by whole
    forwards, which the engine explains."""
    out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
                         output_logits=True, return_dict_in_generate=True)  # fmt: skip
    sequences, prompt = out.sequences.cpu(), inputs["input_ids"].shape[1]
    mask = inputs["attention_mask"]
    off = max(
        float((_whole(model, sequences[:, : prompt + s], mask) - logits.float().cpu()).abs().max())
        for s, logits in enumerate(out.logits)
    )
    if off <= 1e-3 * max(1.0, float(out.logits[0].abs().max())):
        return sequences, ""
    ids = inputs["input_ids"]
    for _ in range(NEW_TOKENS):
        ids = torch.cat([ids, _whole(model, ids, mask).argmax(-1, keepdim=True)], dim=1)
    return ids, f"greedy whole forwards (generate's logits are not the forward's: off by {off:.3g})"


def _whole(model: nn.Module, ids: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
    """Last-position logits of one forward over ``ids`` (the left-padded prompt, then new
    tokens), masked and numbered as ``generate`` does."""
    new = ids.shape[1] - prompt_mask.shape[1]
    mask = torch.cat([prompt_mask, prompt_mask.new_ones(ids.shape[0], new)], dim=1)
    kwargs = {"attention_mask": mask}
    if "position_ids" in inspect.signature(model.forward).parameters:
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=ids, **kwargs).logits[:, -1].float()
