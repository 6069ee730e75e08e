"""Generation with relevance for every step versus the model's own generate.

``python -m bench.generation`` prints JSON: ``plain_s`` (``model.generate``, 32 new tokens from
a 32-token prompt, GPT-2 configuration with 6 layers and width 256, random weights),
``explained_s`` (``run_generation`` producing the same tokens plus the relevance of every
step: KV-cached decode, then one forward and one batched sweep) and ``ratio``. Target: ratio <= 4.
Each figure is the median of ``--repeats`` runs after one warm-up; the ``*_cpu_s`` figures
(process CPU time, all threads) are less sensitive to other jobs sharing the machine.
``--device cuda`` runs both on the GPU. ``--scale`` measures a Llama-style model at the sizes
of issue 14 instead (``bench.generation_scale``; ``--scale-sizes 128+16`` for a quick run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import transformers

from bench.engine import sync
from bench.generation_scale import SIZES, parse_sizes, scale_report
from engine import DLBacktrace
from engine.generation import run_generation


def build(layers: int = 6, width: int = 256, prompt_len: int = 32, device: str = "cpu"):
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=layers, n_embd=width, n_head=width // 64)
    model = transformers.GPT2LMHeadModel(config).eval().to(device)
    ids = torch.randint(0, config.vocab_size, (1, prompt_len)).to(device)
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _median_time(fn, repeats: int) -> tuple[float, float, object]:
    """Median wall and CPU seconds of ``fn()``, and its last result."""
    out = fn()  # warm-up
    wall, cpu = [], []
    for _ in range(repeats):
        sync()  # GPU kernels run asynchronously: time only this call's
        start, start_cpu = time.perf_counter(), time.process_time()
        out = fn()
        sync()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--scale", action="store_true", help="the Llama-style sizes of issue 14")
    parser.add_argument("--scale-sizes", type=parse_sizes, default=list(SIZES),
                        help='prompt+new sizes for --scale, e.g. "128+16,512+64"')  # fmt: skip
    parser.add_argument("--memory-budget", default=None, help='for --scale: "2GB", "auto"')
    parser.add_argument(
        "--seeds-per-sweep", type=int, default=None,
        help="for --scale: max_seeds_per_sweep (default: the engine's)",
    )  # fmt: skip
    parser.add_argument(
        "--no-ixg", action="store_true",
        help="for --scale: skip the per-step gradient baseline (memory-only runs)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.scale:
        report = scale_report(args.scale_sizes, args.device, args.memory_budget,
                              not args.no_ixg, args.seeds_per_sweep)  # fmt: skip
        print(json.dumps(report, indent=2))
        return

    model, inputs = build(prompt_len=args.prompt_len, device=args.device)
    # eos_token_id=None: generate all tokens, like the explained run (a random model may hit EOS)
    plain_s, plain_cpu_s, plain = _median_time(
        lambda: model.generate(
            **inputs, max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None
        ),
        args.repeats,
    )
    model.generation_config.eos_token_id = None
    start = time.perf_counter()
    dlb = DLBacktrace(model, inputs, device=args.device)
    capture_s = time.perf_counter() - start
    explained_s, explained_cpu_s, result = _median_time(
        lambda: run_generation(
            dlb, inputs, max_new_tokens=args.new_tokens, return_relevance=True, steps="all"
        ),
        args.repeats,
    )
    c = result["conservation_trace"]
    worst = max(
        float(((s["inputs"] + s["sinks"] - s["seed"]).abs() / s["seed"].abs()).max()) for s in c
    )
    report = {
        "model": "gpt2 n_layer=6 n_embd=256 (random weights)",
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "plain_s": round(plain_s, 4),
        "explained_s": round(explained_s, 4),
        "ratio": round(explained_s / plain_s, 2),
        "plain_cpu_s": round(plain_cpu_s, 4),
        "explained_cpu_s": round(explained_cpu_s, 4),
        "cpu_ratio": round(explained_cpu_s / plain_cpu_s, 2),
        "decode_s": round(result["timings"]["decode_s"], 4),
        "capture_s": round(capture_s, 2),
        "same_tokens": bool(torch.equal(plain, result["generated_ids"])),
        "steps_explained": len(result["explained_steps"]),
        "worst_conservation_error": worst,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
