"""Engine speed: run_task time over the eager forward time, measured side by side.

``python -m bench.engine`` prints one JSON object per model with ``forward_s``, ``run_task_s``
(medians of several repeats, relevance for the inputs only, as the service asks for it),
``ratio`` = run_task_s / forward_s, and ``peak_extra_mb``: the peak heap memory in use during
run_task above its starting level, minus the same figure for the forward pass (on a GPU,
``--device cuda``: the same for the device memory that torch allocates).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import threading
import time

import torch

MODELS = ("resnet18", "mobilenet_v2", "minilm")


def build(name: str, batch: int = 1):
    model, inputs = _build(name)
    return model, {k: v.repeat(batch, *[1] * (v.dim() - 1)) for k, v in inputs.items()}


def prepared(name: str, device: str, batch: int):
    """The model on ``device`` (as DLBacktrace moved it), its inputs there, and the explainer."""
    from engine import DLBacktrace

    model, inputs = build(name, batch)
    dlb = DLBacktrace(model, inputs, device=device)
    return dlb.model, {k: v.to(dlb.device) for k, v in inputs.items()}, dlb


def _build(name: str):
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
    """Wall time of ``fn``, including the GPU work it queued (kernels run asynchronously)."""
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sync() -> None:
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def measure(
    name: str, repeats: int, mode: str = "default", device: str = "cpu", batch: int = 1
) -> dict:
    model, inputs, dlb = prepared(name, device, batch)
    explain = lambda: dlb.run_task(inputs=inputs, relevance_nodes="inputs", mode=mode)  # noqa: E731

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
        "batch": batch,
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        **({} if mode == "default" else {"mode": mode}),
    }


class PeakHeap:
    """Peak bytes in use on the C heap above the level at entry, sampled every millisecond.

    glibc's ``mallinfo2`` counts what is allocated now (tensors included, small or mmapped),
    unlike the resident size, which keeps pages the allocator has already freed.
    """

    def __enter__(self) -> PeakHeap:
        self.base = self.peak = _heap()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _heap())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _heap())

    @property
    def extra_mb(self) -> float:
        return (self.peak - self.base) / 2**20


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]  # fmt: skip


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _MallInfo2


def _heap() -> int:
    info = _libc.mallinfo2()
    return info.uordblks + info.hblkhd


class PeakDevice:
    """Peak bytes that torch allocated on the GPU above the level at entry."""

    def __enter__(self) -> PeakDevice:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.base = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc) -> None:
        torch.cuda.synchronize()
        self.extra_mb = (torch.cuda.max_memory_allocated() - self.base) / 2**20


def peak_extra_mb(name: str, device: str = "cpu", batch: int = 1) -> float:
    """Peak memory of run_task over that of the forward pass, same inputs, same process."""
    model, inputs, dlb = prepared(name, device, batch)
    peak = PeakDevice if device == "cuda" else PeakHeap
    with torch.no_grad(), peak() as fwd:
        model(**inputs)
    with peak() as run:
        dlb.run_task(inputs=inputs, relevance_nodes="inputs")
    return run.extra_mb - fwd.extra_mb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--mode", default="default", help="the engine mode timed (run_task mode=)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=1, help="inputs per run_task call")
    parser.add_argument(
        "--default-allocator",
        action="store_true",
        help="measure without engine.tune_allocator() (page faults on every request)",
    )
    args = parser.parse_args()
    from engine import tune_allocator

    tuned = False if args.default_allocator else tune_allocator()
    for name in args.models:
        row = measure(name, args.repeats, args.mode, args.device, args.batch)
        row["allocator"] = "tuned" if tuned else "default"
        if not args.no_memory:
            row["peak_extra_mb"] = round(peak_extra_mb(name, args.device, args.batch), 1)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
