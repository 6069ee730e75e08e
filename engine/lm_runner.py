"""How decoding calls a transformers causal LM: one forward per step, with the model's KV cache
where it has a standard one, else over the whole prefix; and the logits processors its
``generation_config`` asks for, built by transformers itself.

Why the whole prefix as the general fallback: models without a cache (OpenAI GPT), with a
state of their own (RWKV's ``state``, XLNet's ``mems``, legacy tuples) or whose cached step
fails (transformers' own attention raising on a cached shape) give the same logits when the
whole sequence is run again, and that is the forward the explanation replays anyway. Which
path a model takes is decided from what its forward accepts and returns, never by its name.
"""

from __future__ import annotations

import copy
import inspect
import logging
from typing import Any

import torch
from torch import Tensor, nn

log = logging.getLogger("engine")


def position_ids_from_mask(mask: Tensor) -> Tensor:
    """Positions that count only real tokens, as ``generate`` builds them for left padding."""
    positions = mask.long().cumsum(-1) - 1
    return positions.masked_fill(mask == 0, 0)


def takes_position_ids(model: nn.Module) -> bool:
    """Whether decoding can hand ``model`` the positions of the real tokens (``cumsum - 1`` of
    the mask). A model that cannot numbers every position, left padding included."""
    return "position_ids" in inspect.signature(model.forward).parameters


def is_standard_cache(cache: Any) -> bool:
    """A transformers ``Cache`` (what a step can continue from and beam search can reorder),
    told by its interface: RWKV states, XLNet mems and legacy tuples are not."""
    return callable(getattr(cache, "reorder_cache", None)) and callable(
        getattr(cache, "get_seq_length", None)
    )


@torch.no_grad()
def sees_later_tokens(model: nn.Module, input_ids: Tensor, mask: Tensor) -> bool:
    """Whether the LM's logits at a position depend on later tokens: a BERT-style decoder
    run as a causal LM without ``is_decoder`` attends both ways. Asked of the first prompt
    row: its last real token replaced, do the logits of its earlier real positions move (a
    causal model's do not, to the bit; a bidirectional one's by far more than 1e-5 of their
    size)? Padding is left out on both sides of the comparison: a padded position's logits
    can be anything, NaN included, and a padded token is seen by no model."""
    ids, real = input_ids[:1], mask[0].bool()
    where = real.nonzero().flatten()
    if where.numel() < 2:
        return False
    last, earlier = int(where[-1]), where[:-1]
    before = model(input_ids=ids, attention_mask=mask[:1]).logits[0, earlier].float()
    changed = ids.clone()
    token = int(ids[0, last])
    changed[0, last] = token - 1 if token > 0 else 1  # another id inside any vocabulary
    after = model(input_ids=changed, attention_mask=mask[:1]).logits[0, earlier].float()
    return float((after - before).abs().max()) > 1e-5 * float(before.abs().max())


# What generate may feed a causal LM besides the prompt's ids and mask, all of which decoding
# gives too (positions) or which carry nothing (a cache position).
_PLAIN_INPUTS = {"input_ids", "attention_mask", "position_ids", "cache_position"}


def check_plain_forward(model: nn.Module, input_ids: Tensor, mask: Tensor) -> None:
    """Raise if ``generate`` would not run ``model`` on the prompt itself: XLNet appends a
    dummy token and predicts it through ``perm_mask`` / ``target_mapping``, logits that the
    plain forward (of the decode, and of a graph captured from ids and mask) never computes,
    so the tokens and their explanation would be another model's. Asks the model's own
    ``prepare_inputs_for_generation``; a model whose preparation needs more than the prompt
    to run is not judged here."""
    try:
        fed = model.prepare_inputs_for_generation(input_ids, attention_mask=mask, use_cache=False)
    except Exception:  # noqa: BLE001 - it needs inputs the prompt does not have: no verdict
        return
    extra = sorted(k for k, v in fed.items() if isinstance(v, Tensor) and k not in _PLAIN_INPUTS)
    ids = fed.get("input_ids")
    if isinstance(ids, Tensor) and ids.shape != input_ids.shape:
        extra.insert(
            0, f"input_ids of shape {tuple(ids.shape)} for a prompt of {tuple(input_ids.shape)}"
        )
    if extra:
        raise ValueError(
            f"{type(model).__name__}.generate runs it on {', '.join(extra)}: not a plain forward"
            " over the prompt, which is what decoding and the captured graph compute; its"
            " generation cannot be explained"
        )


def withheld(
    model: nn.Module, ids: Tensor, cached: bool, first: bool, kwargs: dict[str, Any]
) -> list[str]:
    """The mask or positions of ``kwargs`` that ``generate`` does not feed ``model`` at this
    step, asked of the model's own ``prepare_inputs_for_generation``: Mamba's cached step
    takes no mask (its state already holds the padding), and feeding it one gives other
    logits than generate's, and than a full forward's. Only what it withholds is taken from
    it; the inputs themselves stay the runner's. A preparation that raises: no verdict."""
    try:
        fed = model.prepare_inputs_for_generation(
            ids, next_sequence_length=1 if cached else None, is_first_iteration=first, **kwargs
        )
    except Exception:  # noqa: BLE001 - it needs inputs the runner does not have: no verdict
        return []
    return [k for k in ("attention_mask", "position_ids") if k in kwargs and fed.get(k) is None]


class LMRunner:
    """The sequences decoded so far (``ids`` [R, L], ``mask`` [R, L]) and the model's state.

    ``start`` runs the prompt; ``advance`` appends one token per row (after reordering rows by
    ``parents`` for beam search) and returns the next logits. With a standard cache a step feeds
    only the new token; otherwise (``uncached`` says why) it re-runs the whole prefix."""

    def __init__(self, model: nn.Module, input_ids: Tensor, attention_mask: Tensor):
        self.model = model
        params = inspect.signature(model.forward).parameters
        self.takes_positions = takes_position_ids(model)
        self.takes_logits_to_keep = "logits_to_keep" in params
        self.takes_use_cache = "use_cache" in params
        # transformers renamed past_key_values to cache in 5.2x; earlier 5.x take the old name
        self.cache_name = next((n for n in ("cache", "past_key_values") if n in params), None)
        self.ids, self.mask = input_ids, attention_mask.long()
        self.uncached: str | None = None
        self.cache: Any = None
        if self.cache_name is None:
            self._drop_cache("its forward takes no cache")
        check_plain_forward(model, self.ids, self.mask)

    def start(self) -> Tensor:
        """Logits [R, V] (float32) of the prompt's last position. A prompt forward that fails
        when asked for a cache runs without one, as a failed cached step does: BLT's builds its
        cache from a configuration without a layer count (its four parts have one)."""
        if self.uncached is not None:
            return self._forward(None, first=True)
        try:
            return self._forward(None, first=True)
        except Exception as e:  # noqa: BLE001 - any failure of the cached path: run uncached
            self._drop_cache(f"its forward with a cache raised {type(e).__name__}: {str(e)[:200]}")
            return self._forward(None, first=True)

    def advance(self, tokens: Tensor, parents: Tensor | None = None) -> Tensor:
        """Rows continue ``parents`` (when given) and emit ``tokens`` [R]: the next logits."""
        if parents is not None:
            self.ids, self.mask = self.ids[parents], self.mask[parents]
            if self.cache is not None:
                self.cache.reorder_cache(parents)
        self.ids = torch.cat([self.ids, tokens[:, None]], dim=1)
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        if self.cache is None:
            return self._forward(None)
        try:
            return self._forward(self.cache)
        except Exception as e:  # noqa: BLE001 - any failure of the cached step: run uncached
            self._drop_cache(f"its cached step raised {type(e).__name__}: {str(e)[:200]}")
            return self._forward(None)

    def _forward(self, cache: Any, first: bool = False) -> Tensor:
        """Logits of the last position of ``self.ids``: with ``cache``, a step over the last
        token; without, the whole sequence."""
        kwargs: dict[str, Any] = {"attention_mask": self.mask}
        if self.uncached is None:
            kwargs["use_cache"] = True
            if cache is not None:
                kwargs[self.cache_name] = cache
        elif self.takes_use_cache:
            kwargs["use_cache"] = False
        if self.takes_positions:
            kwargs["position_ids"] = position_ids_from_mask(self.mask)
        if self.takes_logits_to_keep:
            kwargs["logits_to_keep"] = 1
        for name in withheld(self.model, self.ids, cache is not None, first, kwargs):
            del kwargs[name]
        if "position_ids" in kwargs and cache is not None:
            kwargs["position_ids"] = kwargs["position_ids"][:, -1:]
        ids = self.ids if cache is None else self.ids[:, -1:]
        out = self.model(input_ids=ids, **kwargs)
        if self.uncached is None:
            self.cache = getattr(out, self.cache_name, None)
            if not is_standard_cache(self.cache):
                self._drop_cache(f"it returns {type(self.cache).__name__} as its cache")
        return out.logits[:, -1].float()

    def _drop_cache(self, reason: str) -> None:
        self.uncached, self.cache = reason, None
        log.info(
            "decoding %s without a KV cache (%s): each step re-runs the whole prefix",
            type(self.model).__name__, reason,
        )  # fmt: skip


def logits_processors(
    model: nn.Module, cfg: Any, input_ids: Tensor, mask: Tensor, source: Tensor | None = None
) -> Any:
    """The ``LogitsProcessorList`` ``generate`` would apply for ``cfg`` (a ``DecodingConfig``)
    on prompts ``input_ids`` [R, P]: the model's ``generation_config`` with ``cfg``'s settings,
    handed to transformers' own builder, so that every processor a checkpoint configures
    (forced BOS / EOS, suppressed tokens, minimum length, repetition penalty, bad words,
    no-repeat n-grams, ...) and the sampling warpers act exactly as in ``generate``. For an
    encoder-decoder, ``input_ids`` are the decoder's start tokens and ``source`` [R, S] (with
    its ``mask``) what the encoder reads.

    Lengths as ``generate`` sets them: ``max_length`` = P + max_new_tokens, ``min_length`` =
    P + min_new_tokens when the configuration gives ``min_new_tokens``."""
    gen = copy.deepcopy(model.generation_config)
    prompt_len = input_ids.shape[1]
    gen.do_sample, gen.num_beams = cfg.do_sample, cfg.num_beams
    if cfg.do_sample:  # unset (None) warpers are off: top_k 0 and top_p 1 in transformers
        gen.temperature, gen.top_k = cfg.temperature, cfg.top_k or 0
        gen.top_p = 1.0 if cfg.top_p is None else cfg.top_p
    gen.eos_token_id = list(cfg.eos_token_ids) or None
    gen.pad_token_id = cfg.pad_token_id
    gen.max_new_tokens, gen.max_length = cfg.max_new_tokens, prompt_len + cfg.max_new_tokens
    if gen.min_new_tokens is not None:
        gen.min_length = prompt_len + gen.min_new_tokens
    model._prepare_special_tokens(gen, kwargs_has_attention_mask=True, device=input_ids.device)
    return model._get_logits_processor(
        generation_config=gen,
        input_ids_seq_length=prompt_len,
        encoder_input_ids=input_ids if source is None else source,
        device=input_ids.device,
        model_kwargs={"attention_mask": mask},
    )
