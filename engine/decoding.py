"""Decoding for Hugging Face causal LMs: greedy, sampling and beam search.

Why our own loop instead of ``model.generate``: the relevance trace needs, for every emitted token,
the row it belongs to, whether the row was still generating, the processed scores, and (for beam
search) which beam slot each token of the *returned* sequence came from. ``generate`` hides most
of that, and it cannot hand a token to a streaming callback before the next forward pass.

The loop reproduces ``generate`` for the settings it supports: greedy and beam search return the
same token ids, and sampling draws the same tokens as ``torch.manual_seed(seed)`` followed by
``generate(do_sample=True, ...)`` (same warpers, same ``torch.multinomial`` draws). The logits
processors are the ones ``generate`` builds from the model's ``generation_config`` with the
settings given here (forced BOS / EOS, suppressed tokens, minimum length, ...), and each step
runs the model with its KV cache or over the whole prefix (``engine.lm_runner``).

Prompts are left padded; positions follow the attention mask (``cumsum - 1``) exactly as in
``generate``, so left padding does not shift absolute position embeddings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .lm_runner import LMRunner, logits_processors

NEG_INF = -1.0e9  # the "impossible" score of transformers' beam search, kept for identical ties


@dataclass(frozen=True)
class DecodingConfig:
    """What to decode. ``top_k`` None or 0 and ``top_p`` None or 1 disable those warpers."""

    max_new_tokens: int = 50
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    seed: int | None = None


@dataclass
class Step:
    """One emitted token per row: what a streaming consumer needs as soon as it exists."""

    index: int
    tokens: Tensor  # [B] long
    scores: Tensor  # [B, V] processed scores the token was chosen from
    token_logits: Tensor  # [B] raw logit of the emitted token
    active: Tensor  # [B] bool: False where the row had already finished (token is padding)


@dataclass
class Decoded:
    """A finished decode. ``sequences`` = left-padded prompt followed by N generated tokens."""

    sequences: Tensor  # [B, P + N]
    prompt_mask: Tensor  # [B, P]
    active: Tensor  # [B, N] bool
    token_logits: Tensor  # [B, N]
    scores: list[Tensor] | None  # N x [B, V]

    @classmethod
    def from_steps(
        cls, input_ids: Tensor, attention_mask: Tensor, steps: list[Step], keep_scores: bool
    ) -> Decoded:
        """The decode that emitted ``steps`` after the prompt ``input_ids``."""
        return cls(
            sequences=torch.cat([input_ids, torch.stack([s.tokens for s in steps], 1)], dim=1),
            prompt_mask=attention_mask.long(),
            active=torch.stack([s.active for s in steps], 1),
            token_logits=torch.stack([s.token_logits for s in steps], 1),
            scores=[s.scores for s in steps] if keep_scores else None,
        )

    @property
    def prompt_len(self) -> int:
        return self.prompt_mask.shape[1]

    @property
    def num_steps(self) -> int:
        return self.sequences.shape[1] - self.prompt_len


def _check(cfg: DecodingConfig) -> None:
    if cfg.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {cfg.max_new_tokens}")
    if cfg.num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {cfg.num_beams}")
    if cfg.num_beams > 1 and cfg.do_sample:
        raise ValueError("beam sampling (num_beams > 1 with do_sample) is not supported")
    if cfg.do_sample and cfg.temperature <= 0:
        raise ValueError(f"sampling needs temperature > 0, got {cfg.temperature}")


@torch.no_grad()
def iter_decode(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    cfg: DecodingConfig,
    runner: Any = None,
    processors: Any = None,
) -> Iterator[Step]:
    """Greedy or sampled decoding, one ``Step`` per emitted token, as soon as it is chosen.

    Rows that emit an EOS token continue with ``cfg.pad_token_id`` (marked inactive) until every
    row has finished or ``max_new_tokens`` tokens were emitted, as in ``generate``. ``runner``
    and ``processors``: another model's state and processors (an encoder-decoder's,
    ``engine.seq2seq``) than a causal LM's on ``input_ids``.
    """
    _check(cfg)
    if cfg.num_beams > 1:
        raise ValueError("iter_decode does greedy or sampling; use beam_search for num_beams > 1")
    if runner is None:
        runner = LMRunner(model, input_ids, attention_mask)
    if processors is None:
        processors = logits_processors(model, cfg, input_ids, attention_mask)
    generator = None
    if cfg.do_sample:
        generator = torch.Generator(device=input_ids.device)
        generator.manual_seed(cfg.seed if cfg.seed is not None else torch.seed())
    eos = torch.tensor(cfg.eos_token_ids, dtype=torch.long, device=input_ids.device)
    logits = runner.start()
    active = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for index in range(cfg.max_new_tokens):
        scores = processors(runner.ids, logits)
        if cfg.do_sample:
            tokens = torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)
        else:
            tokens = scores.argmax(-1)
        tokens = torch.where(active, tokens, cfg.pad_token_id)
        token_logits = logits.gather(1, tokens[:, None]).squeeze(1)
        yield Step(index, tokens, scores, token_logits, active.clone())
        active &= ~torch.isin(tokens, eos)
        if not active.any() or index + 1 == cfg.max_new_tokens:
            return
        logits = runner.advance(tokens)


def decode(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    cfg: DecodingConfig,
    keep_scores: bool = False,
) -> Decoded:
    """Decode to the end (greedy, sampling or beam search) and collect what the traces need."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if cfg.num_beams > 1:
        return beam_search(model, input_ids, attention_mask, cfg, keep_scores)
    steps = list(iter_decode(model, input_ids, attention_mask, cfg))
    return Decoded.from_steps(input_ids, attention_mask, steps, keep_scores)


def _gather_beams(tensor: Tensor, index: Tensor) -> Tensor:
    """tensor [B, S, ...] indexed along dim 1 by index [B, S']."""
    index = index.reshape(index.shape + (1,) * (tensor.dim() - index.dim()))
    return torch.take_along_dim(tensor, index, dim=1)


@dataclass
class _Hypotheses:
    """Beams with what tracing needs: tokens [B, S, P + N], the beam slot each came from at
    every step [B, S, N] (-1 where none was emitted), the raw logit of every token it emitted
    [B, S, N], and its score [B, S]."""

    seq: Tensor
    came_from: Tensor
    logit: Tensor
    scores: Tensor

    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.seq, self.came_from, self.logit, self.scores

    def gather(self, index: Tensor) -> _Hypotheses:
        return _Hypotheses(*(_gather_beams(t, index) for t in self.tensors()))

    def cat(self, other: _Hypotheses) -> _Hypotheses:
        pairs = zip(self.tensors(), other.tensors(), strict=True)
        return _Hypotheses(*(torch.cat(pair, 1) for pair in pairs))


class _BeamSearch:
    """The state of one beam search: the running beams, the finished hypotheses (the best
    ``num_beams``, length-penalised) and whether each row can still improve on them."""

    def __init__(self, input_ids: Tensor, cfg: DecodingConfig):
        self.cfg = cfg
        batch, self.prompt_len = input_ids.shape
        beams, steps = cfg.num_beams, cfg.max_new_tokens
        self.max_len = self.prompt_len + steps
        device = input_ids.device
        self.eos = torch.tensor(cfg.eos_token_ids, dtype=torch.long, device=device)
        self.keep = max(2, 1 + len(cfg.eos_token_ids)) * beams
        self.in_top_beams = torch.arange(self.keep, device=device) < beams
        # Filler after EOS as in transformers, which treats pad id 0 as unset here.
        fill = cfg.pad_token_id or (cfg.eos_token_ids[0] if cfg.eos_token_ids else -1)
        seq = torch.full((batch, beams, self.max_len), fill, dtype=torch.long, device=device)
        seq[:, :, : self.prompt_len] = input_ids[:, None]
        came_from = torch.full((batch, beams, steps), -1, dtype=torch.long, device=device)
        logit = torch.zeros((batch, beams, steps), device=device)
        scores = torch.zeros((batch, beams), device=device)
        scores[:, 1:] = NEG_INF  # only beam 0 is live at first: no duplicate candidates
        self.running = _Hypotheses(seq, came_from, logit, scores)
        self.done = _Hypotheses(seq.clone(), came_from.clone(), logit.clone(),
                                torch.full((batch, beams), NEG_INF, device=device))  # fmt: skip
        self.done_flag = torch.zeros((batch, beams), dtype=torch.bool, device=device)
        self.improvable = torch.ones((batch, 1), dtype=torch.bool, device=device)
        self.cur = self.prompt_len

    def advance(self, logits: Tensor, log_probs: Tensor) -> bool:
        """One step from the last position's raw logits [B * S, V] and processed
        log-probabilities [B * S, V]: whether the search is over."""
        step, cfg = self.cur - self.prompt_len, self.cfg
        batch, beams = self.running.scores.shape
        vocab = logits.shape[-1]
        log_probs = log_probs.view(batch, beams, vocab)
        total = (log_probs + self.running.scores[..., None]).view(batch, beams * vocab)
        cand_scores, cand = torch.topk(total, self.keep)
        cand_beam, cand_token = cand // vocab, cand % vocab
        grown = self.running.gather(cand_beam)
        grown.seq[:, :, self.cur] = cand_token
        grown.came_from[:, :, step] = cand_beam
        grown.logit[:, :, step] = logits.view(batch, beams * vocab).gather(1, cand)
        stops = torch.isin(cand_token, self.eos) | (self.cur + 1 >= self.max_len)

        # Live beams for the next step: the best candidates that did not stop.
        live_scores = cand_scores + stops.float() * NEG_INF
        live = torch.topk(live_scores, beams).indices
        self.running = dataclasses.replace(grown, scores=live_scores).gather(live)
        self._finish(grown, cand_scores, stops)
        self.cur += 1
        if cfg.early_stopping == "never" and cfg.length_penalty > 0.0:
            best_len = self.max_len - self.prompt_len
        else:
            best_len = self.cur - self.prompt_len
        best_running = self.running.scores[:, :1] / (best_len**cfg.length_penalty)
        worst_done = torch.where(
            self.done_flag, self.done.scores.min(1, keepdim=True).values, NEG_INF
        )
        self.improvable &= (best_running > worst_done).any(-1, keepdim=True)
        all_full = bool(self.done_flag.all()) and cfg.early_stopping is True
        return not self.improvable.any() or all_full or bool(stops.all())

    def _finish(self, grown: _Hypotheses, cand_scores: Tensor, stops: Tensor) -> None:
        """Finished hypotheses: candidates among the top ``num_beams`` that stopped,
        length-penalised, kept with the best finished so far."""
        just_done = stops & self.in_top_beams[None, :]
        final = cand_scores / ((self.cur + 1 - self.prompt_len) ** self.cfg.length_penalty)
        full = self.done_flag.all(-1, keepdim=True) & (self.cfg.early_stopping is True)
        final = final + full.float() * NEG_INF
        final = final + (~self.improvable).float() * NEG_INF
        final = final + (~just_done) * NEG_INF
        both = self.done.cat(dataclasses.replace(grown, scores=final))
        best = torch.topk(both.scores, self.cfg.num_beams).indices
        self.done = both.gather(best)
        self.done_flag = _gather_beams(torch.cat([self.done_flag, just_done], 1), best)

    def parents(self) -> Tensor:
        """[B * S] the flat cache row each running beam continues."""
        batch, beams = self.running.scores.shape
        step = self.cur - 1 - self.prompt_len
        offset = torch.arange(batch, device=self.running.seq.device)[:, None] * beams
        return (self.running.came_from[:, :, step] + offset).reshape(-1)

    def last_tokens(self) -> Tensor:
        """[B * S] the token each running beam emitted last."""
        return self.running.seq[:, :, self.cur - 1].reshape(-1)

    def decoded(self, attention_mask: Tensor, step_log_probs: list[Tensor] | None) -> Decoded:
        """The best finished hypothesis of each row, and (with ``step_log_probs``) for each
        step the log-probabilities of the beam that is its ancestor there."""
        best = self.done
        sequences, came_from, token_logits = best.seq[:, 0], best.came_from[:, 0], best.logit[:, 0]
        lengths = (came_from >= 0).sum(1)
        num_steps = int(lengths.max())
        active = torch.arange(num_steps, device=sequences.device)[None, :] < lengths[:, None]
        scores = None
        if step_log_probs is not None:
            ancestors = came_from.clamp(min=0)
            scores = [
                _gather_beams(step_log_probs[i], ancestors[:, i, None])
                .squeeze(1)
                .masked_fill(~active[:, i, None], 0.0)
                for i in range(num_steps)
            ]
        return Decoded(
            sequences=sequences[:, : self.prompt_len + num_steps],
            prompt_mask=attention_mask.long(),
            active=active,
            token_logits=token_logits[:, :num_steps],
            scores=scores,
        )


@torch.no_grad()
def beam_search(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    cfg: DecodingConfig,
    keep_scores: bool = False,
) -> Decoded:
    """Beam search with the semantics of transformers' ``generate(num_beams=...)``.

    Each beam carries, besides its tokens, the slot it came from at every step and the raw logit
    of every token it emitted, so that the returned (best finished) sequence can be traced back:
    ``scores[i]`` holds, for each row, the log-probabilities of the beam that is the returned
    sequence's ancestor at step i (not beam slot 0, which need not be an ancestor).
    """
    _check(cfg)
    search = _BeamSearch(input_ids, cfg)
    mask = attention_mask.long().repeat_interleave(cfg.num_beams, 0)
    runner = LMRunner(model, input_ids.repeat_interleave(cfg.num_beams, 0), mask)
    processors = logits_processors(model, cfg, runner.ids, mask)
    step_log_probs: list[Tensor] = []
    logits = runner.start()
    while True:
        log_probs = processors(runner.ids, logits.log_softmax(-1))
        over = search.advance(logits, log_probs)
        if keep_scores:
            step_log_probs.append(log_probs.view(search.running.scores.shape + (-1,)))
        if over:
            break
        logits = runner.advance(search.last_tokens(), search.parents())
    return search.decoded(attention_mask, step_log_probs if keep_scores else None)
