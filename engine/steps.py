"""Which generation steps are explained, and the two paths that explain them.

* **batched** (default): in a causal model the activations at positions <= p do not depend on
  later tokens, so one forward over the final sequence serves every step, and one sweep with one
  seed per step (seed i sits on the logit of token i at the position that predicted it) explains
  them all (``explain_decoded``). This is exact, not an approximation.
* **stepwise**: explain each step as soon as its token exists (one forward over the prefix and
  one single-seed sweep per step, ``decode_stepwise``), for consumers that want relevance while
  decoding continues. Beam search explains after the search, since only then is the returned
  sequence known.

Both give the same numbers (tested to 1e-5 relative).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .decoding import Decoded, DecodingConfig, Step, iter_decode
from .params import StepPlan
from .step_explainer import Explained, StepExplainer, check_logits

# on_step(step, token_ids [B], scores [B, V], relevance or None): see ``run_generation``.
OnStep = Callable[[int, Tensor, Tensor, dict[str, Tensor] | None], None]


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


def explain_decoded(
    explainer: StepExplainer, decoded: Decoded, todo: list[int], plan: StepPlan
) -> dict[int, Explained]:
    """Explain the ``todo`` steps of a finished decode: batched, one forward over the positions
    up to the group's last seed and one sweep per ``plan.max_seeds_per_sweep`` steps; stepwise,
    one forward and one sweep per step. Each sweep's logits are checked against the decode's,
    and its recorded forward released before the next sweep's forward."""
    prompt_len = explainer.layout.prompt_len
    tokens = decoded.sequences[:, prompt_len:]
    size = plan.max_seeds_per_sweep if plan.path == "batched" else 1
    explained: dict[int, Explained] = {}
    for start in range(0, len(todo), size):
        group = todo[start : start + size]
        sequence = decoded.sequences[:, : prompt_len + group[-1]]
        if explained:  # before the next forward: one recorded forward alive at a time
            explainer.release(explained[todo[start - 1]].exp)
        exp = explainer.explain(sequence, group, tokens, decoded.active)
        check_logits(exp, explainer.layout, group, tokens, decoded.token_logits, stacklevel=5)
        explained.update({s: Explained(exp, k) for k, s in enumerate(group)})
    return explained


def decode_stepwise(
    lm: nn.Module,
    ids: Tensor,
    mask: Tensor,
    cfg: DecodingConfig,
    keep_scores: bool,
    explainer: StepExplainer,
    steps: str | int | Sequence[int] | None,
    on_step: OnStep | None,
) -> tuple[Decoded, dict[int, Explained]]:
    """Greedy / sampled decode that explains each selected step as soon as it is emitted, and
    hands it to ``on_step`` with its trace entry. Returns the decode and the explained steps.

    Steps are chosen before the number of steps is known; a negative list entry counts from
    ``max_new_tokens`` here, and run_generation explains it afterwards if the generation
    stopped early. Each step's logits are checked against the decode's as it is explained,
    and the previous step's recorded forward released before the next."""
    chosen = set(select_steps(steps, cfg.max_new_tokens))
    emitted: list[Step] = []
    explained: dict[int, Explained] = {}
    for step in iter_decode(lm, ids, mask, cfg):
        emitted.append(step)
        relevance = None
        if step.index in chosen:
            tokens = torch.stack([s.tokens for s in emitted], 1)
            active = torch.stack([s.active for s in emitted], 1)
            sequence = torch.cat([ids, tokens[:, :-1]], 1)
            if explained:  # before the next forward: one recorded forward alive at a time
                explainer.release(explained[max(explained)].exp)
            exp = explainer.explain(sequence, [step.index], tokens, active)
            logits = torch.stack([s.token_logits for s in emitted], 1)
            check_logits(exp, explainer.layout, [step.index], tokens, logits)
            explained[step.index] = Explained(exp, 0)
            relevance = explainer.trace(explained[step.index], step.index)
        if on_step is not None:
            on_step(step.index, step.tokens, step.scores, relevance)
    return Decoded.from_steps(ids, mask, emitted, keep_scores), explained
