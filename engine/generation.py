"""Text generation with per-step relevance (``run_task(task="generation")``).

Tokens come from a KV-cached eager decode (``engine.decoding``); relevance comes from the
captured graph. ``run_generation`` takes the call's parameters as objects (``engine.params``:
``RelevanceParams``, ``DecodingParams``, ``StepPlan``, ``OutputParams``) and wires the parts:

- this module: which module of a model is the causal LM, the prompt tensors, and the result;
- ``engine.steps``: which steps are explained, along the batched or the stepwise path;
- ``engine.step_explainer``: one sweep's seeds on emitted tokens, and its relevance, layer
  outputs and conservation as a step's trace entry (left padding moved out of the way).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from . import validate
from .capture import Captured, CaptureError
from .decoding import Decoded, decode
from .lm_runner import position_ids_from_mask, sees_later_tokens, takes_position_ids
from .memory import plan_seeds
from .params import DecodingParams, OutputParams, RelevanceParams, StepPlan, with_keywords
from .recording import OnFirstRead
from .rules import grouped_mm_ops
from .seq2seq import find_lm, find_seq2seq_lm, run_seq2seq_generation
from .step_explainer import Explained, Layout, StepExplainer
from .steps import OnStep, decode_stepwise, explain_decoded, select_steps

log = logging.getLogger("engine")

# run_generation's relevance defaults: run_task's, keeping only the inputs' relevance.
GENERATION_RELEVANCE = RelevanceParams(relevance_nodes="inputs")


# ------------------------------------------------------------------ model detection


def find_causal_lm(model: nn.Module) -> nn.Module | None:
    """The transformers causal LM inside ``model`` (``model`` itself, or a wrapped submodule):
    a decoder-only model that can generate (``engine.seq2seq.find_lm``)."""
    return find_lm(model, encoder_decoder=False)


def generates_text(model: nn.Module) -> bool:
    """Whether ``run_task(task="auto")`` should generate: a causal or encoder-decoder LM, even
    behind a wrapper."""
    return find_causal_lm(model) is not None or find_seq2seq_lm(model) is not None


# ------------------------------------------------------------------ prompt


def _prompt(
    inputs: Any, tokenizer: Any, device: torch.device, left: bool = True
) -> tuple[Tensor, Tensor]:
    """(input_ids, attention_mask) from a dict, a tuple, a tensor, or text with a tokenizer.
    ``left``: a decoder's prompt, padded on the left (text is tokenized so; ids are checked);
    otherwise an encoder's source, padded as its tokenizer pads."""
    if isinstance(inputs, str) or (
        isinstance(inputs, list | tuple) and inputs and isinstance(inputs[0], str)
    ):
        if tokenizer is None:
            raise ValueError("text prompts need a tokenizer")
        side = tokenizer.padding_side
        tokenizer.padding_side = "left" if left else side
        try:
            inputs = dict(tokenizer(inputs, return_tensors="pt", padding=True))
        finally:
            tokenizer.padding_side = side
    inputs = validate.as_tensors(inputs)
    if isinstance(inputs, Tensor):
        ids, mask = inputs, None
    elif isinstance(inputs, Mapping):  # a dict, or a tokenizer's BatchEncoding
        ids, mask = inputs["input_ids"], inputs.get("attention_mask")
    else:
        ids, mask = inputs[0], (inputs[1] if len(inputs) > 1 else None)
    ids = ids.to(device)
    if ids.dim() == 1:
        ids = ids[None]
    if mask is not None and mask.numel() != ids.numel():
        raise ValueError(
            f"attention_mask of shape {tuple(mask.shape)} for input_ids of shape "
            f"{tuple(ids.shape)}: generation is explained for one row of ids per sequence, "
            "not several per sample (MusicGen's codebooks, [B * codebooks, T], each step "
            "emitting one token per codebook under a delay pattern)"
        )
    mask = torch.ones_like(ids) if mask is None else mask.to(device).long().reshape(ids.shape)
    if left and not torch.equal(mask, mask.cummax(1).values):
        raise ValueError("prompts must be left padded (attention_mask zeros only on the left)")
    return ids, mask


def _check_prompt(dlb: Any, name: str, ids: Tensor, mask: Tensor, new_tokens: int) -> None:
    """Before decoding: prompt ids inside the vocabulary of the graph's embedding, and the
    longest row plus ``new_tokens`` inside the model's position table."""
    validate.check_values({name: ids})
    if ids.is_floating_point():
        raise TypeError(f"{name}: expected integer token ids, got {ids.dtype}")
    validate.check_ids({name: ids}, dlb.captured.nodes, dlb.captured.constants)
    length = int(mask.sum(1).max()) + new_tokens
    validate.check_length(dlb.model, length, f"the prompt plus max_new_tokens ({new_tokens})")


# ------------------------------------------------------------------ run_task entry point


def run_generation(
    dlb: Any,
    inputs: Any,
    relevance: RelevanceParams = GENERATION_RELEVANCE,
    decoding: DecodingParams = DecodingParams(),  # noqa: B008 - frozen, so one shared default
    tokenizer: Any = None,
    *,
    plan: StepPlan = StepPlan(),  # noqa: B008
    output: OutputParams = OutputParams(),  # noqa: B008
    on_step: OnStep | None = None,
    **keywords: Any,
) -> dict[str, Any]:
    """Generate from ``inputs`` with ``dlb.model`` and explain the emitted tokens.

    Decoding: greedy unless sampling is asked for (``DecodingParams``); ``num_beams > 1`` is
    beam search, and its trace explains the returned sequence. Prompts may be a batch with left
    padding. ``plan`` picks the explained steps and the path (``StepPlan``, ``engine.steps``).
    ``keywords`` named as in ``run_task`` (``max_new_tokens=``, ``steps=``, ``mode=``, ...)
    replace those fields of the objects (``temperature`` is the decode's).

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
    if keywords:
        decoding, plan, output, relevance = with_keywords(
            keywords, decoding, plan, output, relevance
        )
    started = time.perf_counter()
    lm, outer = find_causal_lm(dlb.model), find_seq2seq_lm(dlb.model)
    # an encoder-decoder holding the causal LM found (EncoderDecoderModel's decoder) generates
    if outer is not None and (lm is None or any(m is lm for m in outer.modules())):
        return _encoder_decoder(
            dlb, outer, inputs, relevance, decoding, tokenizer, plan, output, on_step
        )
    if lm is None:
        raise ValueError(
            f"{type(dlb.model).__name__} contains no transformers causal or encoder-decoder LM"
        )
    ids, mask = _prompt(inputs, tokenizer, dlb.device)
    cfg = decoding.resolve(lm, tokenizer)
    explainer = _explainer(dlb, dlb.captured, lm, ids, mask, relevance, output)
    _check_prompt(dlb, explainer.token_input, ids, mask, cfg.max_new_tokens)
    plan = _sweep_plan(dlb, lm, ids, mask, cfg.max_new_tokens, plan, explainer)
    graph = _explained_graph(dlb, ids, mask)  # after the budget's verdict: it may run the model
    if graph is not dlb.captured:
        explainer = _explainer(dlb, graph, lm, ids, mask, relevance, output)
    keep_scores = output.return_scores or on_step is not None
    streamed = plan.path == "stepwise" and cfg.num_beams == 1
    decoded, explained = _decode(lm, ids, mask, cfg, keep_scores, explainer, plan, on_step)
    decode_s = time.perf_counter() - started
    tokens = decoded.sequences[:, ids.shape[1] :]
    chosen = select_steps(plan.steps, decoded.num_steps)
    if not output.return_relevance and on_step is None and chosen and plan.path == "batched":
        chosen = chosen[-1:]  # only result["relevance"] is needed
    explained = _explain_rest(explainer, decoded, explained, chosen, plan)
    traces = {s: explainer.trace(e, s) for s, e in explained.items()}
    if on_step is not None and not streamed:
        for s in sorted(traces):
            on_step(s, tokens[:, s], decoded.scores[s], traces[s])
    result = _result(decoded, explained, traces, explainer, output)
    result["decoding"] = dataclasses.asdict(cfg)
    if tokenizer is not None:
        result["generated_text"] = tokenizer.batch_decode(
            decoded.sequences, skip_special_tokens=True
        )
    result["timings"] = {"decode_s": decode_s, "total_s": time.perf_counter() - started}
    if output.debug:
        _log_steps(result, tokens)
    return result


def _encoder_decoder(
    dlb: Any,
    lm: nn.Module,
    inputs: Any,
    relevance: RelevanceParams,
    decoding: DecodingParams,
    tokenizer: Any,
    plan: StepPlan,
    output: OutputParams,
    on_step: OnStep | None,
) -> dict[str, Any]:
    """Generation with the encoder-decoder LM ``lm`` (``engine.seq2seq``), its source
    checked as a prompt is."""
    ids, mask = _prompt(inputs, tokenizer, dlb.device, left=False)
    cfg = decoding.resolve(lm, tokenizer)
    _check_prompt(dlb, "input_ids", ids, mask, 0)
    validate.check_length(dlb.model, 1 + cfg.max_new_tokens, "the decoder's start and new tokens")
    result = run_seq2seq_generation(dlb, lm, (ids, mask), cfg, relevance, plan, output, on_step)
    if tokenizer is not None:
        result["generated_text"] = tokenizer.batch_decode(
            result["generated_ids"], skip_special_tokens=True
        )
    return result


def _sweep_plan(
    dlb: Any,
    lm: nn.Module,
    ids: Tensor,
    mask: Tensor,
    new_tokens: int,
    plan: StepPlan,
    explainer: StepExplainer,
) -> StepPlan:
    """``plan`` with its seeds per sweep: as many as memory allows (``engine.memory``), at most
    ``plan.max_seeds_per_sweep``, but one
    for an LM that attends to later tokens, where one forward over the final sequence would
    show each step its future."""
    length = ids.shape[1] + new_tokens - 1  # the longest explanation forward
    mode = explainer.relevance.mode
    lean = not explainer.keep_values  # layer outputs keep every recorded value
    seeds = plan_seeds(dlb, plan, ids.shape[0], length, mode, explainer.nodes, lean)
    if seeds > 1 and plan.path == "batched" and sees_later_tokens(lm, ids, mask):
        log.info("%s attends to later tokens: one sweep per step", type(lm).__name__)
        seeds = 1
    return dataclasses.replace(plan, max_seeds_per_sweep=seeds)


def _explainer(
    dlb: Any,
    graph: Captured,
    lm: nn.Module,
    ids: Tensor,
    mask: Tensor,
    relevance: RelevanceParams,
    output: OutputParams,
) -> StepExplainer:
    """The steps' explainer on ``graph``, its rows laid out as ``_layout`` says."""
    layout = _layout(lm, graph, ids, mask)
    explainer = StepExplainer(dlb, graph, layout, relevance, grouped_mm_ops())
    explainer.keep_values = output.return_layerwise_output
    return explainer


def _explained_graph(dlb: Any, ids: Tensor, mask: Tensor) -> Captured:
    """The graph that explains the steps: the first one, with left padding moved to the end
    (``_layout``), where the model numbers the real tokens from 0 itself; else, where its
    forward takes ``position_ids``, one that takes them, captured now on the prompt and fed
    the decode's own layout, mask and positions. A graph that numbers positions itself cannot
    replay them where they do not come from ``arange`` (X-MOD numbers them from the ids,
    RoBERTa-style), nor a model whose numbers move with the padding (DeepSeek-V4's compressed
    attention). The first graph is kept wherever it serves, so that node names (layers asked
    for by name) stay those of the graph the caller captured. Where capturing with positions
    fails, the first graph; the steps' logit check then says that they differ. (The memory
    plan, made before, estimated the first graph: the same values, one [B, T] input more.)"""
    first = dlb.captured
    if "position_ids" in first.input_names or not takes_position_ids(dlb.model):
        return first
    if _replays_moved(dlb.model, first.input_names, ids, mask):
        return first
    given = {"input_ids": ids, "attention_mask": mask}
    example = {k: v for k, v in given.items() if k in first.input_names}
    example["position_ids"] = position_ids_from_mask(mask)
    try:
        return dlb.graph_for(example)
    except (CaptureError, ValueError) as e:
        log.info("generation explained without positions: capturing with them failed: %s", e)
        return first


@torch.no_grad()
def _replays_moved(model: nn.Module, names: list[str], ids: Tensor, mask: Tensor) -> bool:
    """Whether ``model`` run as a graph of inputs ``names`` (no positions) runs the prompt,
    its padding moved to the end, to the logits of the decode's forward (padding in place,
    positions ``cumsum - 1`` of the mask), at every real position (1e-3 of their size)."""
    token = "input_ids" if "input_ids" in names else names[0]
    shift = (1 - mask).sum(1)
    moved_ids, moved_mask = Layout(ids.shape[1], shift, mask).compact(ids)
    moved = {token: moved_ids, "attention_mask": moved_mask}
    decoded = {token: ids, "attention_mask": mask, "position_ids": position_ids_from_mask(mask)}
    got = _first_float(model(**{k: v for k, v in moved.items() if k in names}))
    want = _first_float(
        model(**{k: v for k, v in decoded.items() if k in (*names, "position_ids")})
    )
    for row, pad in enumerate(shift.tolist()):
        real = ids.shape[1] - pad
        a, b = got[row, :real].float(), want[row, pad:].float()
        if float((a - b).abs().max()) > 1e-3 * max(1.0, float(b.abs().max())):
            return False
    return True


def _first_float(out: Any) -> Tensor:
    """The first floating-point tensor of a model's output (its logits, as the graph's)."""
    leaves = torch.utils._pytree.tree_leaves(out)
    return next(t for t in leaves if isinstance(t, Tensor) and t.is_floating_point())


def _layout(lm: nn.Module, graph: Captured, ids: Tensor, mask: Tensor) -> Layout:
    """How the explanation forward lays out the rows: as decoded (left padding in place) where
    the graph takes the decode's positions, or where the LM takes none (it decoded with left
    padding numbered, as ``generate`` does); else left padding moved to the end, so that a
    graph numbering positions itself sees the real tokens' positions as the decode gave them."""
    moved = takes_position_ids(lm) and "position_ids" not in graph.input_names
    shift = (1 - mask).sum(1) if moved else torch.zeros_like(mask[:, 0])
    return Layout(ids.shape[1], shift, mask)


def _decode(
    lm: nn.Module,
    ids: Tensor,
    mask: Tensor,
    cfg: Any,
    keep_scores: bool,
    explainer: StepExplainer,
    plan: StepPlan,
    on_step: OnStep | None,
) -> tuple[Decoded, dict[int, Explained]]:
    """Decode, explaining steps as tokens appear on the stepwise path (greedy or sampling);
    otherwise decode only, announcing each token to ``on_step`` (explained later)."""
    if plan.path == "stepwise" and cfg.num_beams == 1:
        return decode_stepwise(lm, ids, mask, cfg, keep_scores, explainer, plan.steps, on_step)
    decoded = decode(lm, ids, mask, cfg, keep_scores)
    if on_step is not None:
        start = explainer.layout.prompt_len
        for i in range(decoded.num_steps):
            on_step(i, decoded.sequences[:, start + i], decoded.scores[i], None)
    return decoded, {}


def _explain_rest(
    explainer: StepExplainer,
    decoded: Decoded,
    explained: dict[int, Explained],
    chosen: list[int],
    plan: StepPlan,
) -> dict[int, Explained]:
    """``explained`` and the chosen steps not explained while decoding (each sweep's logits
    checked against the decode's as it runs)."""
    todo = [s for s in chosen if s not in explained]
    return {**explained, **explain_decoded(explainer, decoded, todo, plan)}


def _node_io(explainer: StepExplainer, decoded: Decoded, last: Explained, step: int) -> Any:
    """Every op's recorded inputs and output at the last explained ``step``. A lean run (no
    layer outputs asked for) recorded only what its rules read and freed that during its
    sweeps: its last step's forward is recorded again, whole, when the result's ``node_io``
    is first read (one forward more, after the sweeps, for callers that look)."""
    if not last.exp.lean:
        return last.exp.node_io()
    inputs = explainer.graph_inputs(decoded.sequences[:, : explainer.layout.prompt_len + step])
    return OnFirstRead(lambda: explainer.dlb.record(inputs)[0])


def _result(
    decoded: Decoded,
    explained: dict[int, Explained],
    traces: dict[int, dict[str, Tensor]],
    explainer: StepExplainer,
    output: OutputParams,
) -> dict[str, Any]:
    """The result's traces, one entry per step (``None`` where a step was not explained), and
    the relevance, conservation and ``node_io`` of the last explained step."""
    n, last = decoded.num_steps, max(explained, default=None)
    result: dict[str, Any] = {
        "task": "generation",
        "generated_ids": decoded.sequences,
        "active": decoded.active,
        "explained_steps": sorted(explained),
        "mode": explainer.relevance.mode,
        "relevance": {} if last is None else traces[last],
        "conservation": None if last is None else explainer.conservation(explained[last]),
        "node_io": {} if last is None else _node_io(explainer, decoded, explained[last], last),
    }
    result["conservation_trace"] = [
        explainer.conservation(explained[s]) if s in explained else None for s in range(n)
    ]
    if output.return_relevance:
        result["relevance_trace"] = [traces.get(s) for s in range(n)]
    if explainer.expert_nodes:
        experts = {s: explainer.expert_relevance(e) for s, e in explained.items()}
        result["expert_relevance"] = experts[last] if last is not None else {}
        result["expert_relevance_trace"] = [experts.get(s) for s in range(n)]
    if output.return_scores:
        result["scores_trace"] = decoded.scores
    if output.return_layerwise_output:
        result["layerwise_output_trace"] = [
            explainer.layer_outputs(explained[s], s) if s in explained else None for s in range(n)
        ]
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
