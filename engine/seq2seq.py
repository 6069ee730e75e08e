"""Explained generation for encoder-decoder language models (T5, BART, Marian, Pegasus, ...).

Greedy and sampled decoding run ``engine.decoding.iter_decode`` (the processors and draws of
``generate``, each token handed to ``on_step`` as it is chosen) on a ``Seq2SeqRunner``: the
encoder reads the source once and the decoder steps with its cache. Beam search is
``generate``'s own. The explanation is the batched path of ``engine.steps``: the decoder is
causal, so one forward of the graph over the source and the decoded sequence serves every
step, and one sweep seeds each step's token at the decoder position that predicted it.
Relevance comes out on both token inputs: the source (``input_ids``, [B, S], what the encoder
read) and the decoder's tokens before the emitted one (``decoder_input_ids``, [B, 1 + step]:
the start token and the tokens generated so far).

The graph takes ``decoder_input_ids``: ``DLBacktrace`` captures such a model with a decoder
start (``with_decoder_start``) when the inputs it is given have none."""

from __future__ import annotations

import dataclasses
import inspect
import time
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from .decoding import DecodingConfig, iter_decode
from .lm_runner import logits_processors
from .memory import plan_seeds
from .params import OutputParams, RelevanceParams, StepPlan
from .recording import OnFirstRead
from .step_explainer import node_axes
from .steps import OnStep, select_steps
from .sweep import Explanation, Seed

DECODER_IDS = "decoder_input_ids"


def find_lm(model: nn.Module, encoder_decoder: bool) -> nn.Module | None:
    """The transformers LM inside ``model`` (itself or a submodule, breadth first, so the
    outermost wins) that can generate and is an encoder-decoder or not, as asked."""
    for module in model.modules():
        config = getattr(module, "config", None)
        can_generate = getattr(module, "can_generate", None)
        if (
            callable(can_generate)
            and config is not None
            and bool(getattr(config, "is_encoder_decoder", False)) == encoder_decoder
            and _answers(can_generate)
        ):
            return module
    return None


def find_seq2seq_lm(model: nn.Module) -> nn.Module | None:
    """The transformers encoder-decoder LM inside ``model`` (``find_lm``)."""
    return find_lm(model, encoder_decoder=True)


def _answers(fn: Any) -> bool:
    try:
        return bool(fn())
    except Exception:  # noqa: BLE001 - a model that cannot answer cannot generate
        return False


def with_decoder_start(model: nn.Module, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
    """``inputs`` for capturing ``model``: an encoder-decoder LM given only its source gets
    ``decoder_input_ids`` of two start tokens per row (its decoder needs tokens to run, and a
    length of 1 would be captured as a fixed length). Other models and inputs as given."""
    lm = find_seq2seq_lm(model)
    decoder_given = {DECODER_IDS, "decoder_inputs_embeds", "labels"} & inputs.keys()
    if lm is None or decoder_given or "input_ids" not in inputs:
        return inputs
    if DECODER_IDS not in inspect.signature(model.forward).parameters:
        return inputs
    start = decoder_start(lm)
    if start is None:
        return inputs
    ids = inputs["input_ids"]
    return {**inputs, DECODER_IDS: torch.full((ids.shape[0], 2), start, device=ids.device)}


def decoder_start(lm: nn.Module) -> int | None:
    """The token an encoder-decoder LM's decoder starts from, as ``generate`` picks it: the
    decoder start token of its generation config, then of its config, else the BOS token
    (mBART, PLBart name none)."""
    configs = (getattr(lm, "generation_config", None), lm.config)
    for name in ("decoder_start_token_id", "bos_token_id"):
        for config in configs:
            start = getattr(config, name, None)
            if isinstance(start, int):
                return start
    return None


def run_seq2seq_generation(
    dlb: Any,
    lm: nn.Module,
    source: tuple[Tensor, Tensor],
    cfg: DecodingConfig,
    relevance: RelevanceParams,
    plan: StepPlan,
    output: OutputParams,
    on_step: OnStep | None = None,
) -> dict[str, Any]:
    """Decode ``source`` (input_ids, attention_mask [B, S]) as ``cfg`` says (each token to
    ``on_step`` as it is chosen; beam search's once it returns), then explain the chosen
    steps (``plan.steps``) in sweeps of ``plan.max_seeds_per_sweep`` seeds. The result has
    the keys of ``run_generation``'s, with ``generated_ids`` the decoder's sequences
    [B, 1 + N] (its start token first) and each trace entry relevance of ``input_ids``
    [B, S] and ``decoder_input_ids`` [B, 1 + step]."""
    started = time.perf_counter()
    ids, mask = source
    seeds = _seeds_per_sweep(dlb, ids, cfg, relevance, plan)  # a budget refuses before work
    if cfg.num_beams == 1:
        sequences, scores, logits = _decode(lm, ids, mask, cfg, on_step)
    else:
        sequences, scores, logits = _beam_search(lm, ids, mask, cfg)
        for s in range(sequences.shape[1] - 1) if on_step is not None else ():
            on_step(s, sequences[:, 1 + s], scores[s], None)
    n = sequences.shape[1] - 1
    tokens, active = sequences[:, 1:], _active(sequences[:, 1:], cfg.eos_token_ids)
    decode_s = time.perf_counter() - started
    chosen = select_steps(plan.steps, n)
    size = seeds if plan.path == "batched" else 1
    explained: dict[int, tuple[Explanation, int]] = {}
    for first in range(0, len(chosen), size):
        group = chosen[first : first + size]
        exp = _sweep(dlb, ids, mask, sequences, group, active, relevance)
        _check_logits(exp, group, tokens, logits)
        exp.env, exp.outputs = {}, ()  # one recorded forward held at a time
        explained.update({s: (exp, k) for k, s in enumerate(group)})
    traces = {s: _trace(e, k, s, relevance.scaler) for s, (e, k) in explained.items()}
    if on_step is not None:
        for s in sorted(traces):
            on_step(s, tokens[:, s], scores[s], traces[s])
    result = _result(dlb, ids, mask, sequences, active, explained, traces, relevance, output)
    if output.return_scores:
        result["scores_trace"] = scores
    result["decoding"] = dataclasses.asdict(cfg)
    result["timings"] = {"decode_s": decode_s, "total_s": time.perf_counter() - started}
    return result


def _seeds_per_sweep(
    dlb: Any, ids: Tensor, cfg: DecodingConfig, relevance: RelevanceParams, plan: StepPlan
) -> int:
    """Seeds per sweep within ``plan.memory_budget`` (``engine.memory.plan_seeds``), for the
    longest explanation forward: the source and ``max_new_tokens`` decoder tokens."""
    batch, length = ids.shape
    decoder = {DECODER_IDS: cfg.max_new_tokens}
    nodes = relevance.relevance_nodes
    return plan_seeds(dlb, plan, batch, length, relevance.mode, nodes, lengths=decoder)


class Seq2SeqRunner:
    """``engine.lm_runner.LMRunner``'s part that ``engine.decoding.iter_decode`` uses, for an
    encoder-decoder: the encoder reads the source once; ``ids`` are the decoder's tokens,
    from its start token; each step feeds the new token with the decoder's cache, as
    ``generate`` runs such a model."""

    def __init__(self, lm: nn.Module, source: Tensor, mask: Tensor, start: int):
        self.lm, self.mask = lm, mask
        self.encoded = lm.get_encoder()(input_ids=source, attention_mask=mask, return_dict=True)
        self.ids = torch.full_like(source[:, :1], start)
        self.cache: Any = None
        params = inspect.signature(lm.forward).parameters
        self.cache_name = next(n for n in ("cache", "past_key_values") if n in params)

    def start(self) -> Tensor:
        return self._forward(self.ids)

    def advance(self, tokens: Tensor) -> Tensor:
        self.ids = torch.cat([self.ids, tokens[:, None]], 1)
        return self._forward(tokens[:, None])

    def _forward(self, new: Tensor) -> Tensor:
        """Logits [B, V] (float32) after the decoder's tokens so far."""
        out = self.lm(
            encoder_outputs=self.encoded,
            attention_mask=self.mask,
            decoder_input_ids=new,
            use_cache=True,
            **{self.cache_name: self.cache},
        )
        self.cache = getattr(out, self.cache_name, None)
        return out.logits[:, -1].float()


@torch.no_grad()
def _decode(
    lm: nn.Module, ids: Tensor, mask: Tensor, cfg: DecodingConfig, on_step: OnStep | None
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """Greedy or sampled decoding (``engine.decoding.iter_decode`` on a ``Seq2SeqRunner``,
    with the processors ``generate`` builds), each token handed to ``on_step`` as soon as it
    is chosen: the decoder's sequences [B, 1 + N], the processed scores (N x [B, V]) and the
    emitted tokens' raw logits (N x [B])."""
    start = decoder_start(lm)
    if start is None:
        raise ValueError(
            f"{type(lm).__name__} names no decoder start token (decoder_start_token_id or "
            "bos_token_id in its generation config or config): set one to generate"
        )
    runner = Seq2SeqRunner(lm, ids, mask, start)
    processors = logits_processors(lm, cfg, runner.ids, mask, source=ids)
    steps = []
    for step in iter_decode(lm, ids, mask, cfg, runner, processors):
        if on_step is not None:
            on_step(step.index, step.tokens, step.scores, None)
        steps.append(step)
    sequences = torch.cat([runner.ids[:, :1], *(s.tokens[:, None] for s in steps)], 1)
    return sequences, [s.scores for s in steps], [s.token_logits for s in steps]


@torch.no_grad()
def _beam_search(
    lm: nn.Module, ids: Tensor, mask: Tensor, cfg: DecodingConfig
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """``generate``'s beam search: its sequences [B, 1 + N], and per step the returned
    sequences' log-probabilities (N x [B, V]) and their tokens' logits (N x [B]), from one
    forward over them (its per-step rows are beams, not the returned sequences; as
    ``engine.decoding`` reports beam search's)."""
    out = lm.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=cfg.max_new_tokens,
        do_sample=False,
        num_beams=cfg.num_beams,
        length_penalty=cfg.length_penalty,
        early_stopping=cfg.early_stopping,
        eos_token_id=list(cfg.eos_token_ids) or None,
        pad_token_id=cfg.pad_token_id,
    )
    logits = lm(input_ids=ids, attention_mask=mask, decoder_input_ids=out[:, :-1]).logits
    chosen = logits.gather(2, out[:, 1:, None]).squeeze(2).float()
    steps = range(logits.shape[1])
    return out, [logits[:, s].float().log_softmax(-1) for s in steps], list(chosen.unbind(1))


def _active(tokens: Tensor, eos_ids: tuple[int, ...]) -> Tensor:
    """[B, N] whether each row was still generating at each step (no EOS before it)."""
    if not eos_ids:
        return torch.ones_like(tokens, dtype=torch.bool)
    eos = torch.isin(tokens, torch.tensor(eos_ids, device=tokens.device))
    ended_before = torch.nn.functional.pad(eos.long().cumsum(1)[:, :-1], (1, 0))
    return ended_before == 0


def _sweep(
    dlb: Any,
    ids: Tensor,
    mask: Tensor,
    sequences: Tensor,
    steps: list[int],
    active: Tensor,
    relevance: RelevanceParams,
) -> Explanation:
    """One forward over the source and the decoder's tokens up to the group's last step, and
    one sweep: seed k on the token of ``steps[k]`` at the decoder position that chose it."""
    rows = torch.arange(ids.shape[0], device=ids.device)
    index = torch.stack(
        [torch.stack([rows, torch.full_like(rows, s), sequences[:, 1 + s]], -1) for s in steps]
    )
    value = torch.stack([active[:, s].float() * relevance.multiplier for s in steps])
    inputs = {"input_ids": ids, "attention_mask": mask, DECODER_IDS: sequences[:, : steps[-1] + 1]}
    names = dlb.captured.input_names
    if DECODER_IDS not in names:
        raise ValueError(
            f"the graph was captured without {DECODER_IDS} ({names}): it cannot be given the "
            "decoder's tokens; capture the model with the source only, or with them"
        )
    return dlb.explain(
        {k: v for k, v in inputs.items() if k in names},
        Seed(index, value),
        relevance.mode,
        relevance.relevance_nodes,
        contrast_with=relevance.contrast_with,
        retain=(),  # lean: the sweep frees each recorded value as it passes (engine.memory)
    )


def _check_logits(exp: Explanation, steps: list[int], tokens: Tensor, logits: list[Tensor]) -> None:
    """Warn where the graph's logits of the emitted tokens are not the decode's (1e-3 of
    their size; a model whose cached decode computes other numbers than its whole forward):
    the trace then explains the whole forward's, as ``step_explainer.check_logits`` warns
    for a causal LM."""
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    for s in steps:
        got = exp.outputs[0][rows, s, tokens[:, s]].float()
        want = logits[s].float().to(got.device)
        off = float((got - want).abs().max())
        if off > 1e-3 * max(1.0, float(want.abs().max())):
            warnings.warn(
                f"graph logits differ from the decode's at step {s} (max diff {off:.3g}); "
                "relevance explains the graph",
                RuntimeWarning,
                stacklevel=5,
            )
            return


def _trace(exp: Explanation, k: int, step: int, scaler: float) -> dict[str, Tensor]:
    """Seed ``k``'s relevance as the trace entry of ``step``: the decoder's tokens cut to the
    start and the tokens before the emitted one; the source and other nodes whole."""
    trace = {name: rel[k] * scaler for name, rel in exp.relevance.items()}
    if DECODER_IDS in trace:
        trace[DECODER_IDS] = trace[DECODER_IDS][:, : step + 1]
    return trace


def _result(
    dlb: Any,
    ids: Tensor,
    mask: Tensor,
    sequences: Tensor,
    active: Tensor,
    explained: dict[int, tuple[Explanation, int]],
    traces: dict[int, dict[str, Tensor]],
    relevance: RelevanceParams,
    output: OutputParams,
) -> dict[str, Any]:
    """``run_generation``'s result keys for this decode and its explained steps."""
    n, last = sequences.shape[1] - 1, max(explained, default=None)

    def conservation(s: int) -> dict[str, Tensor]:
        exp, k = explained[s]
        parts = {"seed": exp.seed, "inputs": exp.inputs, "sinks": exp.sinks}
        return {name: part[k] * relevance.scaler for name, part in parts.items()}

    forward = {"input_ids": ids, "attention_mask": mask, DECODER_IDS: sequences}
    names = dlb.captured.input_names
    result: dict[str, Any] = {
        "task": "generation",
        "generated_ids": sequences,
        "active": active,
        "explained_steps": sorted(explained),
        "mode": relevance.mode,
        "relevance": {} if last is None else traces[last],
        "conservation": None if last is None else conservation(last),
        "conservation_trace": [conservation(s) if s in explained else None for s in range(n)],
        "node_io": OnFirstRead(
            lambda: dlb.record({k: v for k, v in forward.items() if k in names})[0]
        ),
    }
    if output.return_relevance:
        result["relevance_trace"] = [traces.get(s) for s in range(n)]
    if output.return_layerwise_output:
        seen = _layer_outputs(dlb, {k: v for k, v in forward.items() if k in names})
        result["layerwise_output_trace"] = [seen(s) if s in explained else None for s in range(n)]
    return result


def _layer_outputs(dlb: Any, forward: dict[str, Tensor]) -> Any:
    """Every op's output as a step saw it, from one recorded forward of the final sequences:
    the decoder is causal, so step s saw the first 1 + s positions of each value on the
    decoder's positions (``node_axes`` of its ids: a cross-attention's scores cut on the
    decoder's axis only); the encoder's values whole, as every step saw them."""
    io, _ = dlb.record(forward)
    axes = node_axes(dlb.graph_for(forward), DECODER_IDS)

    def seen(step: int) -> dict[str, Tensor]:
        values = {name: io[name]["output_values"] for name in io}
        return {
            name: _first(value, axes.get(name), 1 + step)
            for name, value in values.items()
            if isinstance(value, Tensor)
        }

    return seen


def _first(value: Tensor, axes: Any, length: int) -> Tensor:
    """``value`` cut to its first ``length`` positions on each of its decoder axes."""
    for axis in axes.seq if axes is not None else ():
        value = value.narrow(axis, 0, min(length, value.shape[axis]))
    return value
