"""Text generation with per-step relevance (``run_task(task="generation")``).

Tokens come from a KV-cached eager decode (``engine.decoding``); relevance comes from the
captured graph. Two ways to get the relevance of the tokens a decode emitted:

* **batched** (default): in a causal model the activations at positions <= p do not depend on
  later tokens, so one forward over the final sequence serves every step, and one sweep with one
  seed per step (seed i sits on the logit of token i at the position that predicted it) explains
  them all. This is exact, not an approximation.
* **stepwise**: explain each step as soon as its token exists (one forward over the prefix and
  one single-seed sweep per step), for consumers that want relevance while decoding continues.

Both give the same numbers (tested to 1e-5 relative).

Left padding is moved out of the way for the explanation forward: each row is shifted left so
that its first real token sits at position 0 and its padding at the end. With causal attention,
trailing padding influences nothing before it, and a graph that builds positions with ``arange``
(no ``position_ids`` input) then sees exactly the positions the decode used. Relevance and
layer outputs are shifted back (per node, along the batch and sequence axes read from the
exported symbolic shapes), so ``relevance_trace[i]["input_ids"]`` lines up with
``generated_ids`` and padding positions hold zeros.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .decoding import Decoded, DecodingConfig, Step, decode, iter_decode, position_ids_from_mask
from .sweep import Explanation, Seed

log = logging.getLogger("engine")

OnStep = Callable[[int, Tensor, Tensor, dict[str, Tensor] | None], None]


def _grouped_mm_ops() -> tuple[Any, ...]:
    """The grouped matmuls mixture-of-experts layers of transformers run their experts with
    (rows sorted by expert, ``offs`` = cumulative rows per expert)."""
    try:
        import transformers.integrations.moe  # noqa: F401 - registers the custom op
    except ImportError:
        return ()
    ops = [getattr(torch.ops.aten, "_grouped_mm", None)]
    ops.append(getattr(getattr(torch.ops, "transformers", None), "grouped_mm_fallback", None))
    return tuple(op.default for op in ops if op is not None and hasattr(op, "default"))


SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 0.9}


# ------------------------------------------------------------------ model detection


def find_causal_lm(model: nn.Module) -> nn.Module | None:
    """The transformers causal LM inside ``model`` (``model`` itself, or a wrapped submodule).

    A decoder-only model that can generate: ``can_generate()`` and not encoder-decoder. Wrappers
    (a module whose forward calls an LM and returns its logits) are searched breadth-first, so
    the outermost LM wins.
    """
    for module in model.modules():
        can_generate = getattr(module, "can_generate", None)
        config = getattr(module, "config", None)
        if (
            callable(can_generate)
            and config is not None
            and not getattr(config, "is_encoder_decoder", False)
            and _safe_call(can_generate)
        ):
            return module
    return None


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``run_task(task="auto")`` should generate: a causal LM, even behind a wrapper."""
    return find_causal_lm(model) is not None


def _safe_call(fn: Callable[[], Any]) -> bool:
    try:
        return bool(fn())
    except Exception:  # noqa: BLE001 - a model that cannot answer cannot generate
        return False


# ------------------------------------------------------------------ inputs and settings


def _prompt(inputs: Any, tokenizer: Any, device: torch.device) -> tuple[Tensor, Tensor]:
    """(input_ids, attention_mask) from a dict, a tuple, a tensor, or text with a tokenizer."""
    if isinstance(inputs, str) or (
        isinstance(inputs, list | tuple) and inputs and isinstance(inputs[0], str)
    ):
        if tokenizer is None:
            raise ValueError("text prompts need a tokenizer")
        side = tokenizer.padding_side
        tokenizer.padding_side = "left"
        try:
            inputs = dict(tokenizer(inputs, return_tensors="pt", padding=True))
        finally:
            tokenizer.padding_side = side
    if isinstance(inputs, Tensor):
        ids, mask = inputs, None
    elif isinstance(inputs, Mapping):  # a dict, or a tokenizer's BatchEncoding
        ids, mask = inputs["input_ids"], inputs.get("attention_mask")
    else:
        ids, mask = inputs[0], (inputs[1] if len(inputs) > 1 else None)
    ids = ids.to(device)
    if ids.dim() == 1:
        ids = ids[None]
    mask = torch.ones_like(ids) if mask is None else mask.to(device).long().reshape(ids.shape)
    if not torch.equal(mask, mask.cummax(1).values):
        raise ValueError("prompts must be left padded (attention_mask zeros only on the left)")
    return ids, mask


def _decoding_config(
    lm: nn.Module,
    tokenizer: Any,
    max_new_tokens: int,
    temperature: float | None,
    top_k: int | None,
    top_p: float | None,
    do_sample: bool | None,
    num_beams: int,
    length_penalty: float,
    early_stopping: bool | str,
    seed: int | None,
) -> DecodingConfig:
    """Resolve greedy versus sampling, and EOS / padding ids.

    ``do_sample=None`` samples when a sampling setting was asked for (temperature other than 1
    or 0, or top_k / top_p given) and decodes greedily otherwise, so that plain calls are
    deterministic; temperature 0 always means greedy. When sampling, unset values take the
    reference defaults (temperature 1.0, top_k 50, top_p 0.9).
    """
    if do_sample is None:
        do_sample = (temperature not in (None, 0.0, 1.0)) or top_k is not None or top_p is not None
    if temperature == 0.0:
        do_sample = False
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

    def pick(value, name):
        return SAMPLING_DEFAULTS[name] if value is None else value

    return DecodingConfig(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=pick(temperature, "temperature") if do_sample else 1.0,
        top_k=pick(top_k, "top_k") if do_sample else None,
        top_p=pick(top_p, "top_p") if do_sample else None,
        num_beams=num_beams,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
        eos_token_ids=eos_ids,
        pad_token_id=pad,
        seed=seed,
    )


def select_steps(steps: str | int | Sequence[int] | None, num_steps: int) -> list[int]:
    """Which steps to explain: "all", "none" (or None), the first N (an int), or a list.

    List entries may be negative (from the end); entries past the end are ignored, since a
    generation can stop early at EOS."""
    if steps is None or steps == "none":
        return []
    if steps == "all":
        return list(range(num_steps))
    if isinstance(steps, int):
        return list(range(min(steps, num_steps)))
    if isinstance(steps, str):
        raise ValueError(f"steps must be 'all', 'none', an int or a list, got {steps!r}")
    chosen = {s + num_steps if s < 0 else s for s in steps}
    return sorted(s for s in chosen if 0 <= s < num_steps)


# ------------------------------------------------------------------ explanation


@dataclass
class Layout:
    """Where each row's prompt starts: the explanation forward shifts rows left by ``shift``."""

    prompt_len: int
    shift: Tensor  # [B] left-padding length of each row

    def compact(self, sequence: Tensor) -> tuple[Tensor, Tensor]:
        """Token ids and mask with each row's padding moved to the end."""
        batch, length = sequence.shape
        j = torch.arange(length, device=sequence.device)[None] + self.shift[:, None]
        valid = j < length
        ids = sequence.gather(1, j.clamp(max=length - 1)).masked_fill(~valid, 0)
        return ids, valid.long()

    def position(self, step: int) -> Tensor:
        """[B] compact position whose logits chose the token of ``step``."""
        return self.prompt_len + step - 1 - self.shift


class StepExplainer:
    """Explains emitted tokens of one decode with the captured graph of ``dlb``."""

    def __init__(self, dlb: Any, layout: Layout, mode: str, multiplier: float, nodes: Any):
        self.dlb, self.layout, self.mode = dlb, layout, mode
        self.multiplier, self.nodes = multiplier, nodes
        names = dlb.captured.input_names
        self.token_input = "input_ids" if "input_ids" in names else names[0]
        unknown = set(names) - {self.token_input, "attention_mask", "position_ids"}
        if unknown:
            raise ValueError(
                f"the captured graph takes inputs {sorted(unknown)} that generation cannot fill;"
                " capture the model with input_ids (and attention_mask) only"
            )
        self.axes = _node_axes(dlb.captured, self.token_input)
        experts = _grouped_mm_ops()
        self.expert_nodes = [n for n in dlb.captured.nodes if n.target in experts]
        self.hidden: set[str] = set()  # kept for per-expert totals, not for the trace
        if self.expert_nodes and nodes == "inputs":
            self.hidden = {n.args[0].name for n in self.expert_nodes}
            self.nodes = sorted(self.hidden)

    def graph_inputs(self, sequence: Tensor) -> dict[str, Tensor]:
        ids, mask = self.layout.compact(sequence)
        given = {self.token_input: ids, "attention_mask": mask}
        given["position_ids"] = position_ids_from_mask(mask)
        return {k: v for k, v in given.items() if k in self.dlb.captured.input_names}

    def explain(
        self, sequence: Tensor, steps: list[int], tokens: Tensor, active: Tensor
    ) -> Explanation:
        """One forward over ``sequence`` (a prefix of the final one) and one sweep, seed k on the
        token emitted at ``steps[k]``. ``tokens`` / ``active`` are [B, N] over all steps."""
        batch = sequence.shape[0]
        rows = torch.arange(batch, device=sequence.device)
        index = torch.stack(
            [
                torch.stack([rows, self.layout.position(s), tokens[:, s]], -1)
                for s in steps  # K is small; each entry is a [B, 3] index
            ]
        )
        value = torch.stack([active[:, s].float() * self.multiplier for s in steps])
        return self.dlb.explain(
            self.graph_inputs(sequence), Seed(index, value), self.mode, self.nodes
        )

    def trace(self, exp: Explanation, k: int, step: int, scaler: float) -> dict[str, Tensor]:
        """Relevance of seed k as the trace entry of ``step``: over the prompt and the tokens
        before the emitted one ([B, prompt_len + step] for the token ids), and for other kept
        nodes cut to the same positions along their sequence axes."""
        length = self.layout.prompt_len + step
        return {
            name: _visible(rel[k], self.axes.get(name), self.layout, length) * scaler
            for name, rel in exp.relevance.items()
            if name not in self.hidden
        }

    def expert_relevance(self, exp: Explanation, k: int, scaler: float) -> dict[str, Tensor]:
        """Relevance that passed through each expert, per grouped matmul: {node: [experts]}.

        The rows entering a grouped matmul are (token, expert) pairs sorted by expert, and
        ``offs`` ends each expert's block, so the relevance of those rows summed per block is
        what each expert carried (summed over the batch and tokens)."""
        out = {}
        for node in self.expert_nodes:
            rel = exp.relevance.get(node.args[0].name)
            if rel is None:
                continue
            offs = exp.env[node.args[2] if len(node.args) > 2 else node.kwargs["offs"]]
            rows = rel[k].reshape(rel.shape[1], -1).sum(-1)
            expert = torch.searchsorted(offs, torch.arange(rows.shape[0], device=offs.device),
                                        right=True)  # fmt: skip
            totals = torch.zeros(offs.shape[0], dtype=rows.dtype, device=rows.device)
            out[node.name] = totals.index_add_(0, expert, rows) * scaler
        return out

    def layer_outputs(self, exp: Explanation, step: int) -> dict[str, Tensor]:
        """Every op's output as step ``step`` saw it (positions it could see, left padded)."""
        length = self.layout.prompt_len + step
        return {
            node.name: _visible(value, self.axes.get(node.name), self.layout, length)
            for node, value in exp.env.items()
            if node.op == "call_function" and isinstance(value, Tensor)
        }


@dataclass(frozen=True)
class Axes:
    """Where a node's value keeps the batch and the sequence positions (None / empty: not as
    a whole axis, e.g. folded into [B*T, H])."""

    batch: int | None
    seq: tuple[int, ...]


def _node_axes(captured: Any, token_input: str) -> dict[str, Axes]:
    """Batch and sequence axes of every node, read from the exported symbolic shapes: an axis
    whose size is exactly the batch (or sequence) symbol of the token ids. Attention scores
    [B, H, T, T] get two sequence axes; a folded [B*T, H] axis gets none."""

    def expr(size):
        return size.node.expr if isinstance(size, torch.SymInt) else None

    inputs = [n for n in captured.nodes if n.op == "placeholder" and n.name in captured.input_names]
    t_sym = expr(next(n for n in inputs if n.name == token_input).meta["val"].shape[1])
    # Export may give each input its own batch symbol (they are never compared).
    b_syms = {expr(n.meta["val"].shape[0]) for n in inputs if n.meta["val"].dim() > 0} - {None}
    axes = {token_input: Axes(0, (1,))}
    if t_sym is None:
        return axes
    for node in captured.nodes:
        val = node.meta.get("val")
        if not isinstance(val, Tensor) or node.name in axes:
            continue
        exprs = [expr(s) for s in val.shape]
        seq = tuple(i for i, e in enumerate(exprs) if e == t_sym)
        if seq:
            batch = next((i for i, e in enumerate(exprs) if e in b_syms), None)
            axes[node.name] = Axes(batch, seq)
    return axes


def _visible(t: Tensor, axes: Axes | None, layout: Layout, length: int) -> Tensor:
    """A node value (or its relevance) as step ``length - prompt_len`` saw it: the first
    ``length`` positions, shifted back to the left-padded layout of ``generated_ids`` (zeros
    at padding). Without a sequence axis the value is returned as is."""
    if axes is None:
        return t
    for axis in axes.seq:
        t = t.narrow(axis, 0, min(length, t.shape[axis]))
    if axes.batch is None or not bool(layout.shift.any()):
        return t
    for axis in axes.seq:
        moved = t.movedim((axes.batch, axis), (0, -1))  # [B, ..., T]
        pos = torch.arange(moved.shape[-1], device=t.device)[None] - layout.shift[:, None]
        shape = (moved.shape[0],) + (1,) * (moved.dim() - 2) + (moved.shape[-1],)
        index = pos.clamp(min=0).reshape(shape).expand_as(moved)
        moved = moved.gather(-1, index).masked_fill((pos < 0).reshape(shape), 0)
        t = moved.movedim((0, -1), (axes.batch, axis))
    return t


def _conservation(exp: Explanation, k: int, scaler: float) -> dict[str, Tensor]:
    return {
        "seed": exp.seed[k] * scaler,
        "inputs": exp.inputs[k] * scaler,
        "sinks": exp.sinks[k] * scaler,
    }


def _check_logits(
    exp: Explanation, layout: Layout, steps: list[int], tokens: Tensor, decoded_logits: Tensor
) -> None:
    """Warn when the graph's logits for emitted tokens differ from the decode's (a wrapper that
    changes the logits, or positions the graph builds differently): the trace would then
    explain numbers other than the ones that chose the tokens."""
    logits = exp.outputs[0]
    batch = logits.shape[0]
    rows = torch.arange(batch, device=logits.device)
    for s in steps:
        got = logits[rows, layout.position(s), tokens[:, s]].float()
        want = decoded_logits[:, s].to(got.device)
        tol = 1e-3 * max(1.0, float(want.abs().max()))
        if float((got - want).abs().max()) > tol:
            warnings.warn(
                f"graph logits differ from the decode's at step {s} "
                f"(max diff {float((got - want).abs().max()):.3g}); relevance explains the graph",
                RuntimeWarning,
                stacklevel=3,
            )
            return


# ------------------------------------------------------------------ run_task entry point


def run_generation(
    dlb: Any,
    inputs: Any,
    tokenizer: Any = None,
    *,
    max_new_tokens: int = 50,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    do_sample: bool | None = None,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    seed: int | None = None,
    steps: str | int | Sequence[int] | None = "all",
    path: str = "batched",
    on_step: OnStep | None = None,
    return_scores: bool = False,
    return_relevance: bool = False,
    return_layerwise_output: bool = False,
    mode: str = "default",
    multiplier: float = 100.0,
    scaler: float = 1.0,
    relevance_nodes: str | Sequence[str] = "inputs",
    max_seeds_per_sweep: int = 64,
    debug: bool = False,
) -> dict[str, Any]:
    """Generate from ``inputs`` with ``dlb.model`` and explain the emitted tokens.

    Decoding: greedy unless sampling is asked for (see ``_decoding_config``: ``do_sample=None``
    samples only when temperature differs from 1 or top_k / top_p are given); ``seed`` makes
    sampling reproducible; ``num_beams > 1`` is beam search, and its trace explains the returned
    sequence. Prompts may be a batch with left padding.

    ``steps`` picks the explained steps ("all", "none", first N, or a list); ``path`` is
    "batched" (one forward and one sweep per ``max_seeds_per_sweep`` steps, after decoding) or
    "stepwise" (each step explained as soon as it is emitted; beam search explains after the
    search, since only then is the returned sequence known).

    ``on_step(step, token_ids [B], scores [B, V], relevance)`` streams: it is called with
    ``relevance=None`` as each token is chosen, and once more with the step's trace entry when
    that is ready (stepwise path: right after the token; batched path: after the sweep). In
    the stepwise path the two calls of an explained step are one call.

    Result: ``generated_ids`` [B, prompt_len + N] (left-padded prompt, then the new tokens;
    finished rows continue with the pad id), ``relevance_trace[i]`` (only with
    ``return_relevance``; ``None`` for steps not explained) with ``input_ids`` [B, prompt_len
    + i], ``scores_trace[i]`` [B, V] (processed scores; log-probabilities for beam search),
    ``layerwise_output_trace[i]``, ``conservation_trace[i]`` ({seed, inputs, sinks} per row),
    ``relevance`` / ``conservation`` / ``node_io`` of the last explained step, ``active``
    [B, N] (False after a row finished; such steps get zero seed and zero relevance). For
    mixture-of-experts models, ``expert_relevance_trace[i]`` gives, per grouped expert matmul
    node, the relevance each expert carried for step i ([num_experts], summed over the batch).
    """
    if path not in ("batched", "stepwise"):
        raise ValueError(f"path must be 'batched' or 'stepwise', got {path!r}")
    started = time.perf_counter()
    lm = find_causal_lm(dlb.model)
    if lm is None:
        raise ValueError(f"{type(dlb.model).__name__} contains no transformers causal LM")
    ids, mask = _prompt(inputs, tokenizer, dlb.device)
    cfg = _decoding_config(
        lm, tokenizer, max_new_tokens, temperature, top_k, top_p, do_sample,
        num_beams, length_penalty, early_stopping, seed,
    )  # fmt: skip
    layout = Layout(ids.shape[1], (1 - mask).sum(1))
    explainer = StepExplainer(dlb, layout, mode, multiplier, relevance_nodes)
    keep_scores = return_scores or on_step is not None
    explained: dict[int, Explanation] = {}
    seed_of: dict[int, int] = {}  # step -> seed index within its explanation

    if path == "stepwise" and cfg.num_beams == 1:
        decoded = _decode_stepwise(
            lm, ids, mask, cfg, keep_scores, explainer, steps, on_step, scaler, explained, seed_of
        )
    else:
        decoded = decode(lm, ids, mask, cfg, keep_scores)
        if on_step is not None:
            for i in range(decoded.num_steps):
                on_step(i, decoded.sequences[:, layout.prompt_len + i], decoded.scores[i], None)
    tokens = decoded.sequences[:, layout.prompt_len :]
    chosen = select_steps(steps, decoded.num_steps)
    if not return_relevance and on_step is None and chosen and path == "batched":
        chosen = chosen[-1:]  # only result["relevance"] is needed
    decode_s = time.perf_counter() - started

    todo = [s for s in chosen if s not in explained]
    if path == "batched":
        for start in range(0, len(todo), max_seeds_per_sweep):
            group = todo[start : start + max_seeds_per_sweep]
            length = layout.prompt_len + group[-1]  # positions up to the last seed's
            exp = explainer.explain(decoded.sequences[:, :length], group, tokens, decoded.active)
            for k, s in enumerate(group):
                explained[s], seed_of[s] = exp, k
    else:
        for s in todo:  # beam search: the returned sequence exists only now
            exp = explainer.explain(
                decoded.sequences[:, : layout.prompt_len + s], [s], tokens, decoded.active
            )
            explained[s], seed_of[s] = exp, 0
    for exp in {id(e): e for e in explained.values()}.values():
        group = [s for s in explained if explained[s] is exp]
        _check_logits(exp, layout, group, tokens, decoded.token_logits)

    traces = {s: explainer.trace(explained[s], seed_of[s], s, scaler) for s in explained}
    if on_step is not None and not (path == "stepwise" and cfg.num_beams == 1):
        for s in sorted(traces):
            on_step(s, tokens[:, s], decoded.scores[s], traces[s])

    result: dict[str, Any] = {
        "task": "generation",
        "generated_ids": decoded.sequences,
        "active": decoded.active,
        "explained_steps": sorted(explained),
        "mode": mode,
        "decoding": dataclasses.asdict(cfg),
    }
    if tokenizer is not None:
        result["generated_text"] = tokenizer.batch_decode(
            decoded.sequences, skip_special_tokens=True
        )
    last = max(explained) if explained else None
    if last is not None:
        result["relevance"] = traces[last]
        result["conservation"] = _conservation(explained[last], seed_of[last], scaler)
        result["node_io"] = explained[last].node_io()
    else:
        result["relevance"], result["conservation"], result["node_io"] = {}, None, {}
    n = decoded.num_steps
    result["conservation_trace"] = [
        _conservation(explained[s], seed_of[s], scaler) if s in explained else None
        for s in range(n)
    ]
    if return_relevance:
        result["relevance_trace"] = [traces.get(s) for s in range(n)]
    if explainer.expert_nodes:
        experts = {
            s: explainer.expert_relevance(explained[s], seed_of[s], scaler) for s in explained
        }
        result["expert_relevance"] = experts[last] if last is not None else {}
        result["expert_relevance_trace"] = [experts.get(s) for s in range(n)]
    if return_scores:
        result["scores_trace"] = decoded.scores
    if return_layerwise_output:
        result["layerwise_output_trace"] = [
            explainer.layer_outputs(explained[s], s) if s in explained else None for s in range(n)
        ]
    result["timings"] = {"decode_s": decode_s, "total_s": time.perf_counter() - started}
    if debug:
        _log_steps(result, tokens)
    return result


def _log_steps(result: dict[str, Any], tokens: Tensor) -> None:
    """``debug=True``: one line per step (its tokens and conservation), then the timings."""
    for s, c in enumerate(result["conservation_trace"]):
        told = "" if c is None else (
            f", seed {c['seed'].tolist()}, inputs {c['inputs'].tolist()},"
            f" sinks {c['sinks'].tolist()}"
        )  # fmt: skip
        log.warning("generation step %d: tokens %s%s", s, tokens[:, s].tolist(), told)
    t = result["timings"]
    log.warning(
        "generation: %d steps, explained %s, decode %.3fs, total %.3fs",
        len(result["conservation_trace"]), result["explained_steps"], t["decode_s"], t["total_s"],
    )  # fmt: skip


def _decode_stepwise(
    lm, ids, mask, cfg, keep_scores, explainer, steps, on_step, scaler, explained, seed_of
) -> Decoded:
    """Greedy / sampled decode that explains each selected step as soon as it is emitted.

    Steps are chosen before the number of steps is known; a negative list entry counts from
    ``max_new_tokens`` here, and run_generation explains it afterwards if the generation
    stopped early."""
    chosen = set(select_steps(steps, cfg.max_new_tokens))
    emitted: list[Step] = []
    for step in iter_decode(lm, ids, mask, cfg):
        emitted.append(step)
        relevance = None
        if step.index in chosen:
            tokens = torch.stack([s.tokens for s in emitted], 1)
            active = torch.stack([s.active for s in emitted], 1)
            sequence = torch.cat([ids, tokens[:, :-1]], 1)
            exp = explainer.explain(sequence, [step.index], tokens, active)
            explained[step.index], seed_of[step.index] = exp, 0
            relevance = explainer.trace(exp, 0, step.index, scaler)
        if on_step is not None:
            on_step(step.index, step.tokens, step.scores, relevance)
    return Decoded(
        sequences=torch.cat([ids, torch.stack([s.tokens for s in emitted], 1)], 1),
        prompt_mask=mask,
        active=torch.stack([s.active for s in emitted], 1),
        token_logits=torch.stack([s.token_logits for s in emitted], 1),
        scores=[s.scores for s in emitted] if keep_scores else None,
    )
