"""Parameters as objects: what a ``run_task`` call asks for, validated once, where it is built.

``DLBacktrace.run_task`` keeps the keyword API of the dl-backtrace package and turns its
keywords into these objects; ``_classify`` and ``run_generation`` take the objects.

- ``RelevanceParams``: how relevance is computed and reported (both tasks);
- ``DecodingParams``: what the caller asked of the decode, resolved against the model into an
  ``engine.decoding.DecodingConfig`` (greedy or sampling, EOS and padding ids);
- ``StepPlan``: which generation steps are explained, and along which path;
- ``OutputParams``: which traces the result carries, and debug logging.

No torch here: a service can build and validate these without loading the engine.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .tasks import MODES, PROBLEM_TYPES, REFERENCE_NAMES

if TYPE_CHECKING:
    from .decoding import DecodingConfig

# Sampling settings left unset take these values when the decode samples (the reference's).
SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 0.9}
PATHS = ("batched", "stepwise")


@dataclass(frozen=True)
class RelevanceParams:
    """How relevance is computed and reported (see ``DLBacktrace.run_task``).

    ``relevance_nodes``: "all", "inputs", or node names (kept as a tuple); ``target``: the
    classes to explain instead of the predicted ones; ``reference``: inputs or a name of
    ``engine.references``, for modes "reference" and "contrast"; ``contrast_with``: the
    alternative the target is explained against in mode "contrast" (``engine.contrast``):
    "runner-up", "rest" (the softmax-weighted other classes), a class index or a label.
    ``problem_type``: what a classifier's logits are (``engine.tasks.PROBLEM_TYPES``); None
    for a single-label classifier, or a single logit decided by ``thresholding``.
    """

    mode: str = "default"
    multiplier: float = 100.0
    scaler: float = 1.0
    thresholding: float = 0.5
    temperature: float = 1.0
    relevance_nodes: str | tuple[str, ...] = "all"
    target: Any = None
    reference: Any = None
    contrast_with: int | str = "runner-up"
    problem_type: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        for name in ("multiplier", "scaler", "thresholding", "temperature"):
            _finite(name, getattr(self, name))
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        nodes = self.relevance_nodes
        if isinstance(nodes, str) and nodes not in ("all", "inputs"):
            raise ValueError(
                f"relevance_nodes must be 'all', 'inputs' or a list of node names, got {nodes!r}"
            )
        if not isinstance(nodes, str):
            object.__setattr__(self, "relevance_nodes", tuple(nodes))
        if self.reference is not None:
            if self.mode == "default":
                raise ValueError('reference= is for modes "reference" and "contrast"')
            if isinstance(self.reference, str) and self.reference not in REFERENCE_NAMES:
                raise ValueError(
                    f"reference must be inputs or one of {REFERENCE_NAMES}, got {self.reference!r}"
                )
        self._check_contrast_with()
        self._check_problem_type()

    def _check_problem_type(self) -> None:
        """A known problem type, and a mode that has a meaning for it: a regression's
        value has no alternative to be explained against; each label of a multi-label
        classifier is decided on its own, so its logit is its own contrast (present
        against absent) and there is no other class to name."""
        kind = self.problem_type
        if kind is not None and kind not in PROBLEM_TYPES:
            raise ValueError(f"problem_type must be one of {PROBLEM_TYPES}, got {kind!r}")
        if kind == "regression" and self.mode == "contrast":
            raise ValueError(
                'mode "contrast" is not defined for regression (a value has no alternative '
                'class); use "default" or "reference"'
            )
        if kind == "multi_label_classification" and self.contrast_with != "runner-up":
            raise ValueError(
                "contrast_with: each label of a multi-label classifier is decided on its own, "
                'so mode "contrast" explains a label against its absence; leave '
                "contrast_with out"
            )

    def _check_contrast_with(self) -> None:
        """An index >= 0 or a non-empty label, and anything but the default only in mode
        "contrast" (a label is looked up in the model when the run starts)."""
        alt = self.contrast_with
        if isinstance(alt, bool) or not isinstance(alt, numbers.Integral | str):
            raise TypeError(f"contrast_with must be a class index or a label, got {alt!r}")
        if isinstance(alt, numbers.Integral):
            if alt < 0:
                raise ValueError(f"contrast_with must be a class index >= 0, got {alt}")
            object.__setattr__(self, "contrast_with", int(alt))
        elif not alt:
            raise ValueError("contrast_with must not be empty")
        if alt != "runner-up" and self.mode != "contrast":
            raise ValueError('contrast_with= is for mode "contrast"')

    @property
    def keep(self) -> str | set[str]:
        """What the sweep keeps besides the inputs: "all", or a set of node names."""
        nodes = self.relevance_nodes
        if isinstance(nodes, str):
            return "all" if nodes == "all" else set()
        return set(nodes)


def _finite(name: str, value: Any) -> None:
    """A real, finite number: ``"100"`` is a ``TypeError``, NaN or inf a ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")


@dataclass(frozen=True)
class DecodingParams:
    """What the caller asked of the decode, with the meaning transformers gives it.
    ``None`` leaves a setting to ``resolve``. ``top_k=0`` and ``top_p=1.0`` switch those
    warpers off and ``temperature=1.0`` changes nothing, as in ``generate``; ``do_sample=None``
    samples only when a setting that changes the distribution was asked for (temperature
    other than 1, top_k > 0, top_p < 1), so ``temperature=1.0, top_k=0, top_p=1.0`` decodes
    greedily, like plain calls. Temperature 0 means greedy, even with ``do_sample=True``
    (``generate`` raises there; the limit of sampling as temperature goes to 0 is the argmax).
    ``num_beams > 1`` is beam search."""

    max_new_tokens: int = 50
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    do_sample: bool | None = None
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature is not None:
            _finite("temperature", self.temperature)
            if self.temperature < 0:
                raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        top_k = self.top_k
        if top_k is not None and (
            isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 0
        ):
            raise ValueError(f"top_k must be an integer >= 0 (0: off), got {self.top_k!r}")
        if self.top_p is not None:
            _finite("top_p", self.top_p)
            if not 0 < self.top_p <= 1:
                raise ValueError(f"top_p must lie in (0, 1] (1: off), got {self.top_p}")
        if isinstance(self.max_new_tokens, bool) or not isinstance(
            self.max_new_tokens, numbers.Integral
        ):
            raise TypeError(f"max_new_tokens must be an integer, got {self.max_new_tokens!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        self._check_search()

    def _check_search(self) -> None:
        """Beam search and sampling switches as ``generate`` takes them. Each is read by a
        test that would otherwise take a wrong value silently or fail deep in the decode:
        ``num_beams=2.5`` in ``torch.full``; a NaN ``length_penalty`` scored every finished
        beam NaN and returned a shorter sequence; the decode stops early only on
        ``early_stopping is True`` and plans for the longest on ``"never"``, so ``1`` or
        ``"yes"`` were the heuristic without a word; ``do_sample="no"`` sampled."""
        if isinstance(self.num_beams, bool) or not isinstance(self.num_beams, numbers.Integral):
            raise TypeError(f"num_beams must be an integer, got {self.num_beams!r}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        _finite("length_penalty", self.length_penalty)
        if self.early_stopping not in (True, False, "never") or not isinstance(
            self.early_stopping, bool | str
        ):
            raise ValueError(
                f'early_stopping must be True, False or "never", got {self.early_stopping!r}'
            )
        if self.do_sample is not None and not isinstance(self.do_sample, bool):
            raise TypeError(f"do_sample must be True, False or None, got {self.do_sample!r}")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral)
        ):
            raise TypeError(f"seed must be an integer, got {self.seed!r}")

    def resolve(self, lm: Any, tokenizer: Any = None) -> DecodingConfig:
        """The decode to run: greedy or sampling decided, unset sampling settings at
        ``SAMPLING_DEFAULTS``, EOS and padding ids from the model's generation config, its
        config, or the tokenizer."""
        from .decoding import DecodingConfig

        do_sample = self.do_sample
        if do_sample is None:
            do_sample = (
                self.temperature not in (None, 0.0, 1.0)
                or self.top_k not in (None, 0)
                or self.top_p not in (None, 1.0)
            )
        if self.temperature == 0.0:
            do_sample = False
        eos_ids, pad = special_ids(lm, tokenizer)

        def pick(name: str) -> Any:
            value = getattr(self, name)
            return SAMPLING_DEFAULTS[name] if value is None else value

        return DecodingConfig(
            max_new_tokens=self.max_new_tokens,
            do_sample=do_sample,
            temperature=pick("temperature") if do_sample else 1.0,
            top_k=pick("top_k") if do_sample else None,
            top_p=pick("top_p") if do_sample else None,
            num_beams=self.num_beams,
            length_penalty=self.length_penalty,
            early_stopping=self.early_stopping,
            eos_token_ids=eos_ids,
            pad_token_id=pad,
            seed=self.seed,
        )


def special_ids(lm: Any, tokenizer: Any) -> tuple[tuple[int, ...], int]:
    """EOS ids and the padding id: the generation config first, then the model's config (EOS)
    or the tokenizer; padding falls back to the first EOS id, then 0."""
    gen = getattr(lm, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    if eos is None:
        eos = getattr(lm.config, "eos_token_id", None)
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    eos_ids = tuple(eos) if isinstance(eos, list | tuple) else (() if eos is None else (eos,))
    pad = getattr(gen, "pad_token_id", None)
    if pad is None and tokenizer is not None:
        pad = tokenizer.pad_token_id
    if pad is None:
        pad = eos_ids[0] if eos_ids else 0
    return eos_ids, pad


@dataclass(frozen=True)
class StepPlan:
    """Which generation steps to explain (``engine.steps.select_steps``: "all", "none", the
    first N, or a list) and how: "batched" (after decoding, one forward and one sweep per
    ``max_seeds_per_sweep`` steps) or "stepwise" (each step as soon as it is emitted).

    ``memory_budget`` bounds a sweep's working memory: None (unbounded: ``max_seeds_per_sweep``
    seeds), bytes as an int or a string ("512MB", "2GB", "1.5GiB"), or "auto" (half the free
    memory of the device, ``engine.memory``). With a budget the seeds per sweep are as many as
    the graph's estimate fits, at most ``max_seeds_per_sweep``, and a request that cannot fit
    one seed is refused before decoding.

    ``max_seeds_per_sweep`` is 12 from measurement (``bench.generation --scale``, a 55 M
    Llama-style model at 512 + 64 on 2 CPU cores, bench/README.md): the peak extra memory
    (RSS) was 0.66-0.82 GB with 12 seeds per sweep, 0.82-0.96 GB with 16, 0.91-1.12 GB with 24,
    1.48 GB with 64; the time was 20-26 s from 8 to 24 seeds in most runs and 43-54 s with 64
    (a sweep's temporaries grow with its seeds, and large ones cost page faults), though one
    forward more per sweep."""

    steps: str | int | Sequence[int] | None = "all"
    path: str = "batched"
    max_seeds_per_sweep: int = 12
    memory_budget: int | str | None = None

    def __post_init__(self) -> None:
        if self.path not in PATHS:
            raise ValueError(f"path must be 'batched' or 'stepwise', got {self.path!r}")
        seeds = self.max_seeds_per_sweep
        if isinstance(seeds, bool) or not isinstance(seeds, numbers.Integral) or seeds < 1:
            raise ValueError(f"max_seeds_per_sweep must be an integer >= 1, got {seeds!r}")
        if self.memory_budget is not None and self.memory_budget != "auto":
            object.__setattr__(self, "memory_budget", parse_bytes(self.memory_budget))


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip


def parse_bytes(value: Any) -> int:
    """A positive number of bytes from an int or a string with a unit ("2GB", "1.5 GiB")."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        number, unit = float(value), ""
    elif isinstance(value, str):
        text = value.strip().lower()
        split = len(text.rstrip("kmgtib"))
        number_text, unit = text[:split].strip(), text[split:]
        try:
            number = float(number_text)
        except ValueError:
            number = math.nan
    else:
        raise TypeError(f'memory_budget must be bytes (int or "2GB") or "auto", got {value!r}')
    if unit not in _UNITS or not math.isfinite(number) or number * _UNITS[unit] < 1:
        raise ValueError(f'memory_budget must be positive bytes ("512MB", "2GB", "1.5GiB"),'
                         f" an int, or \"auto\"; got {value!r}")  # fmt: skip
    return int(number * _UNITS[unit])


@dataclass(frozen=True)
class OutputParams:
    """Which per-step traces the result carries, and whether each run is logged."""

    return_scores: bool = False
    return_relevance: bool = False
    return_layerwise_output: bool = False
    debug: bool = False


def with_keywords(keywords: Mapping[str, Any], *params: Any, task: str = "generation") -> tuple:
    """``params`` with the fields named in ``keywords`` replaced; each keyword goes to the first
    object that has a field of its name. A keyword no object has is a ``TypeError``."""
    fields = [{f.name for f in dataclasses.fields(p)} for p in params]
    unknown = sorted(k for k in keywords if not any(k in names for names in fields))
    if unknown:
        raise TypeError(f"unexpected arguments for {task}: {unknown}")
    out, taken = [], set()
    for p, names in zip(params, fields, strict=True):
        mine = {k: v for k, v in keywords.items() if k in names and k not in taken}
        taken |= mine.keys()
        out.append(dataclasses.replace(p, **mine) if mine else p)
    return tuple(out)
