"""Engine speed: run_task time over the eager forward time, measured side by side.

``python -m bench.engine`` prints one JSON object per model with ``forward_s``, ``run_task_s``
(medians of several repeats, relevance for the inputs only, as the service asks for it),
``ratio`` = run_task_s / forward_s, and ``peak_extra_mb``: the peak resident memory of a
process doing forward + run_task minus that of a process doing the forward alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

MODELS = ("resnet18", "mobilenet_v2", "minilm")


def build(name: str):
    if name == "minilm":
        from tests.engine.zoo import minilm, minilm_tokenizer

        tok = minilm_tokenizer()
        text = " ".join(["the film was a quiet, moving study of memory and loss"] * 20)
        enc = tok(text, truncation=True, max_length=128, padding="max_length", return_tensors="pt")
        inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        return minilm(), inputs
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    return model, {"x": torch.randn(1, 3, 224, 224)}


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(name: str, repeats: int) -> dict:
    from engine import DLBacktrace

    model, inputs = build(name)
    dlb = DLBacktrace(model, inputs)
    explain = lambda: dlb.run_task(inputs=inputs, relevance_nodes="inputs")  # noqa: E731

    def forward():
        with torch.no_grad():
            model(**inputs)

    for _ in range(2):  # warm up both paths
        forward()
        explain()
    forward_s, run_task_s = [], []
    for _ in range(repeats):  # interleaved, so that machine noise hits both alike
        forward_s.append(median_time(forward, 1))
        run_task_s.append(median_time(explain, 1))
    f, r = statistics.median(forward_s), statistics.median(run_task_s)
    return {
        "model": name,
        "forward_s": round(f, 5),
        "run_task_s": round(r, 5),
        "ratio": round(r / f, 3),
        "threads": torch.get_num_threads(),
    }


def peak_rss_mb(name: str, with_relevance: bool) -> float:
    """Peak RSS of a fresh process running the forward (and run_task) once."""
    code = (
        "import resource, torch; from bench.engine import build; from engine import DLBacktrace\n"
        f"m, x = build({name!r})\n"
        "with torch.no_grad(): m(**x)\n"
        + (
            "DLBacktrace(m, x).run_task(inputs=x, relevance_nodes='inputs')\n"
            if with_relevance
            else ""
        )
        + "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-memory", action="store_true")
    args = parser.parse_args()
    for name in args.models:
        row = measure(name, args.repeats)
        if not args.no_memory:
            row["peak_extra_mb"] = round(peak_rss_mb(name, True) - peak_rss_mb(name, False), 1)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
