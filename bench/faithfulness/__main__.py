"""``python -m bench.faithfulness``: faithfulness and cost of every method on every model.

Writes ``bench/results/faithfulness.json`` (committed) and one PNG of the perturbation curves per
model (not committed), and prints a table. See ``bench/README.md`` for the setup and results.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.metadata
import json
import os
import platform
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from .methods import IG_STEPS, METHODS, Method
from .metrics import curves, paired
from .plots import plot_model
from .tasks import TASKS, Task

SAMPLES = {
    "digits-cnn": 300,  # all held-out images
    "digits-cnn-blur": 300,
    "minilm-sentiment": 256,  # of the 384 held-out sentences
    "tiny-lookup-lm": 256,
}
SAMPLES.update({f"{name}-contrast": n for name, n in SAMPLES.items()})
OUT = Path(__file__).resolve().parent.parent / "results"


def run_method(
    task: Task, method: Method, tiebreak: torch.Tensor, batch: int
) -> tuple[dict[str, Any], torch.Tensor]:
    """Explain every sample in batches, then score the curves.

    Cost is the median over full batches of (batch seconds / batch size), after one warm-up
    call: the machine is shared, and a median ignores the batches another job slowed down.
    CPU seconds (all threads of this process) are reported beside wall seconds. Returns the
    report's row and the per-sample ABPC (for the paired comparison with the best peer).
    """
    explain = method.build(task)
    explain(task.subset(slice(0, 2)), task.target[:2])
    parts, wall, cpu = [], [], []
    for i in range(0, task.n, batch):
        inputs, target = task.subset(slice(i, i + batch)), task.target[i : i + batch]
        start, start_cpu = time.perf_counter(), time.process_time()
        parts.append(explain(inputs, target))
        size = target.shape[0]
        if size == batch or not wall:
            wall.append((time.perf_counter() - start) / size)
            cpu.append((time.process_time() - start_cpu) / size)
    relevance = task.pool(torch.cat(parts))
    scored = curves(task, relevance, tiebreak)
    row = scored.summary()
    row["seconds_per_explanation"] = statistics.median(wall)
    row["cpu_seconds_per_explanation"] = statistics.median(cpu)
    return row, scored.abpc


def run_task(name: str, n: int, batch: int, methods: list[str] | None, data_dir: str | None):
    task = TASKS[name](data_dir, n)
    g = torch.Generator().manual_seed(0)
    slots = task.features.shape[1]
    tiebreak = torch.stack([torch.randperm(slots, generator=g) for _ in range(task.n)])
    report: dict[str, Any] = {
        "samples": task.n,
        "features_per_sample": round(float(task.features.sum(1).float().mean()), 2),
        "steps": task.steps,
        "baseline": task.baseline,
        "model": {"build": task.build, "weights_sha256": weights_fingerprint(task.model)},
        "methods": {},
        "skipped": {},
    }
    per_sample = {}
    for method in METHODS:
        if task.kind not in method.kinds or (methods and method.name not in methods):
            continue
        if (
            task.target.dim() == 2
            and method.name.startswith("engine-")
            and method.name != ("engine-contrast")
        ):
            continue  # a contrast row: the engine explains the difference in mode "contrast"
        try:
            report["methods"][method.name], per_sample[method.name] = run_method(
                task, method, tiebreak, batch
            )
        except ImportError as err:  # a peer that is not installed
            report["skipped"][method.name] = f"not installed: {err}"
            continue
        row = report["methods"][method.name]
        print(
            f"  {name:18s} {method.name:20s} ABPC {row['abpc']:9.4f} ± {row['abpc_se']:.4f}"
            f"  {row['seconds_per_explanation'] * 1e3:8.2f} ms",
            flush=True,
        )
    report["against_best_peer"] = against_best_peer(per_sample)
    return report


def weights_fingerprint(model: torch.nn.Module) -> str:
    """The first 16 hex digits of a SHA-256 over the model's parameters and buffers, in
    order: two results files scored the same model only if these agree (the demo models are
    trained on first use, and the lookup LM's training differs between CPUs)."""
    digest = hashlib.sha256()
    for name, value in model.state_dict().items():
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _machine() -> dict[str, Any]:
    """When and where: the date, the CPU and the load average (the cores are shared, and the
    costs move with the load; the ABPCs do not)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if "model name" in line)
    except (OSError, StopIteration):
        pass
    return {
        "started_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_average_start": [round(v, 2) for v in os.getloadavg()],
    }


def against_best_peer(per_sample: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The issue's target, per engine mode: its ABPC minus the best peer's (the other library
    with the highest mean ABPC; random is no peer), paired per sample."""
    peers = {m: v for m, v in per_sample.items() if not m.startswith("engine-") and m != "random"}
    if not peers:
        return {}
    best = max(peers, key=lambda m: float(peers[m].double().mean()))
    return {
        m: {"best_peer": best, **paired(v, peers[best])}
        for m, v in per_sample.items()
        if m.startswith("engine-")
    }


def _versions() -> dict[str, str]:
    names = ("torch", "transformers", "captum", "zennit", "lxt")
    found = {}
    for pkg in names:
        try:
            found[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            found[pkg] = "not installed"
    return found


def table(results: dict[str, Any]) -> str:
    """Markdown table: ABPC and AOPC with standard errors, cost, and cost relative to IG."""
    lines = [
        "| model | method | ABPC ± SE | AOPC MoRF ± SE | ms / explanation | cost / IG |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for model, report in results["models"].items():
        rows = report["methods"]
        ig = rows.get("captum-ig", {}).get("seconds_per_explanation")
        for method, r in sorted(rows.items(), key=lambda kv: -kv[1]["abpc"]):
            s = r["seconds_per_explanation"]
            ratio = f"{s / ig:.3f}" if ig else "-"
            lines.append(
                f"| {model} | {method} | {r['abpc']:.3f} ± {r['abpc_se']:.3f} "
                f"| {r['aopc_morf']:.3f} ± {r['aopc_morf_se']:.3f} | {s * 1e3:.2f} | {ratio} |"
            )
    lines += [
        "",
        "| model | mode | ABPC minus the best peer's (paired, ± SE) | best peer |",
        "| --- | --- | --- | --- |",
    ]
    for model, report in results["models"].items():
        for method, r in report.get("against_best_peer", {}).items():
            lines.append(
                f"| {model} | {method} | {r['diff']:+.4f} ± {r['diff_se']:.4f} | {r['best_peer']} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="*", default=list(TASKS))
    parser.add_argument("--methods", nargs="*", help="method names (default: all)")
    parser.add_argument("--samples", type=int, help="samples per model (default: per model)")
    parser.add_argument("--batch", type=int, default=32, help="samples per explain call")
    parser.add_argument("--data-dir", help="demo model cache (default: BACKTRACE_DATA_DIR)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="Input Tensor 0 did not already require gradients")
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "settings": {
            "metric": "target logit (rows -contrast: target minus runner-up logit); "
            "AOPC = mean_s (f_0 - f_MoRF(s)); ABPC = mean_s (f_LeRF(s) - f_MoRF(s)); "
            "SE over samples",
            "ig_steps": IG_STEPS,
            "batch": args.batch,
            "threads": torch.get_num_threads(),
            "packages": _versions(),
            **_machine(),
        },
        "models": {},
    }
    started = time.perf_counter()
    for name in args.models:
        n = args.samples or SAMPLES[name]
        results["models"][name] = run_task(name, n, args.batch, args.methods, args.data_dir)
        plot_model(name, results["models"][name], args.out)
        (args.out / "faithfulness.json").write_text(json.dumps(results, indent=1) + "\n")
    results["settings"]["total_seconds"] = round(time.perf_counter() - started, 1)
    results["settings"]["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    (args.out / "faithfulness.json").write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
