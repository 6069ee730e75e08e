"""``python -m bench.generation --scale``: explained generation at the sizes of issue 14.

A Llama-style model (8 layers, width 512, 8 heads, 2 KV heads, MLP 1408, vocabulary 32000,
random weights; ``LlamaForCausalLM``), greedy, relevance for every step, at each size
"prompt+new" of ``--scale-sizes`` (default 512+64 and 2048+32). Each size prints, from one run:

- ``plain_s``: ``model.generate``;
- ``explained_s``: ``run_generation`` with every step explained (``--memory-budget`` and
  ``--seeds-per-sweep``, ``StepPlan.max_seeds_per_sweep``, passed where given);
- ``ixg_per_step_s``: gradient x input the way per-step attribution libraries do it (Inseq,
  Captum's LLM attribution): per generated step, one forward over the prefix and one backward
  from the emitted token's logit to the input embeddings (weights frozen), same tokens
  (``--no-ixg`` skips it, about 10 minutes at 512+64 on 2 cores, for memory-only runs: it and
  ``explained_over_ixg`` are then null);
- ``explained_over_plain`` and ``explained_over_ixg``;
- ``peak_extra_mb``: the explained run's peak memory above what was in use before it (RSS
  sampled every 5 ms on the CPU, ``max_memory_allocated`` on CUDA);
- ``planned_seeds_per_sweep``: the seeds per sweep the run used (``engine.memory.plan_seeds``:
  the cap, or what the budget's estimate allows up to it).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import torch
import transformers

from bench.engine import sync
from engine import DLBacktrace
from engine.generation import run_generation
from engine.memory import plan_seeds
from engine.params import StepPlan

SIZES = ((512, 64), (2048, 32))
MODEL = "llama n_layers=8 hidden=512 heads=8 kv_heads=2 mlp=1408 vocab=32000 (random weights)"


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """Sizes "512+64,2048+32" as [(512, 64), (2048, 32)]."""
    return [tuple(int(n) for n in size.split("+")) for size in text.split(",")]  # type: ignore[misc]


def build_llama(prompt_len: int, new: int, device: str) -> tuple[Any, dict]:
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=2, vocab_size=32000, max_position_embeddings=prompt_len + new,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config).eval().to(device)
    model.generation_config.eos_token_id = None  # all tokens, as the explained run
    ids = torch.randint(0, config.vocab_size, (1, prompt_len)).to(device)
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def peak_extra(fn: Callable[[], Any], device: str) -> tuple[Any, float, float]:
    """``fn()``, its wall seconds, and its peak memory in MB above the memory in use before."""
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base, peak, done = _rss(), [0], threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], _rss())
                time.sleep(0.005)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
    start = time.perf_counter()
    out = fn()
    sync()
    seconds = time.perf_counter() - start
    if device == "cuda":
        top = torch.cuda.max_memory_allocated()
    else:
        done.set()
        sampler.join()
        top = max(peak[0], _rss())
    return out, seconds, (top - base) / 1e6


def ixg_per_step(model: Any, sequence: torch.Tensor, prompt_len: int) -> float:
    """Seconds of per-step gradient x input over the generated ``sequence`` [1, P + N]; the
    weights need no gradient (the cheapest form of the baseline)."""
    model.requires_grad_(False)
    embed = model.get_input_embeddings()
    sync()
    start = time.perf_counter()
    for end in range(prompt_len, sequence.shape[1]):
        emb = embed(sequence[:, :end]).detach().requires_grad_()
        logits = model(inputs_embeds=emb, use_cache=False).logits
        logits[0, -1, sequence[0, end]].backward()
        (emb.grad * emb).sum(-1)  # the attribution per position
    sync()
    return time.perf_counter() - start


def measure_size(
    prompt_len: int, new: int, device: str, budget: str | None, ixg: bool, seeds: int | None
) -> dict:
    model, inputs = build_llama(prompt_len, new, device)
    cap = {} if seeds is None else {"max_seeds_per_sweep": seeds}
    plan = StepPlan(memory_budget=budget, **cap)
    start = time.perf_counter()
    plain = model.generate(**inputs, max_new_tokens=new, do_sample=False)
    sync()
    plain_s = time.perf_counter() - start
    dlb = DLBacktrace(model, inputs, device=device)
    result, explained_s, extra_mb = peak_extra(
        lambda: run_generation(dlb, inputs, max_new_tokens=new, return_relevance=True,
                               steps="all", memory_budget=budget, **cap),
        device,
    )  # fmt: skip
    ixg_s = ixg_per_step(model, plain, prompt_len) if ixg else None
    c = result["conservation_trace"]
    worst = max(
        float(((s["inputs"] + s["sinks"] - s["seed"]).abs() / s["seed"].abs()).max()) for s in c
    )
    return {
        "prompt_len": prompt_len,
        "new_tokens": new,
        "memory_budget": budget,
        "seeds_per_sweep": seeds,
        "planned_seeds_per_sweep": plan_seeds(
            dlb, plan, 1, prompt_len + new - 1, "default", "inputs"
        ),  # fmt: skip
        "plain_s": round(plain_s, 2),
        "explained_s": round(explained_s, 2),
        "ixg_per_step_s": None if ixg_s is None else round(ixg_s, 2),
        "explained_over_plain": round(explained_s / plain_s, 2),
        "explained_over_ixg": None if ixg_s is None else round(explained_s / ixg_s, 3),
        "peak_extra_mb": round(extra_mb, 1),
        "weights_mb": round(sum(p.numel() * p.element_size() for p in model.parameters()) / 1e6),
        "same_tokens": bool(torch.equal(plain, result["generated_ids"])),
        "worst_conservation_error": worst,
    }


def scale_report(
    sizes: list[tuple[int, int]],
    device: str,
    budget: str | None,
    ixg: bool = True,
    seeds: int | None = None,
) -> dict:
    return {
        "model": MODEL,
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "sizes": [measure_size(p, n, device, budget, ixg, seeds) for p, n in sizes],
    }
