"""``python -m bench.coverage``: every architecture of the transformers auto mappings and of
torchvision, built small, through the engine; one subprocess each, under a time and a memory
limit, so that a hang or a crash stops only its own architecture.

    python -m bench.coverage --sample 15 --jobs 1          # 15 of each mapping (fixed seed)
    python -m bench.coverage --mapping causal-lm --only 'llama|gpt2'

Results are merged into ``bench/results/coverage.json`` (per architecture: mapping, status,
detail, seconds, input share), written after each architecture; then the summary per mapping
(JSON), the failures by cause (JSON), the ok rows with little relevance at the inputs (JSON)
and all as markdown for ``bench/README.md`` are printed.
"""

from __future__ import annotations

import argparse
import fcntl
import itertools
import json
import os
import random
import re
import resource
import signal
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .architectures import MAPPINGS, Arch, list_architectures
from .check import Outcome, check_architecture
from .report import failures, low_shares, markdown, summary

RESULTS = Path(__file__).resolve().parents[1] / "results" / "coverage.json"
_RESULT = "@result "


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.one:
        _child(args.one)
        return
    mappings = [args.mapping] if args.mapping else list(MAPPINGS)
    listed = {m: list_architectures(m) for m in mappings}
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    chosen = [_select(listed[m], args) for m in mappings]
    # mappings interleaved, so a run stopped early has covered each of them alike
    todo = [a for group in itertools.zip_longest(*chosen) for a in group if a is not None]
    if args.resume:
        todo = [a for a in todo if a.key not in results]
    lock = threading.Lock()

    def one(arch: Arch) -> None:
        outcome = run_isolated(arch, args.timeout, args.memory_gb)
        with lock:
            results.update(_merge(args.out, {arch.key: outcome.as_dict()}))
            share = "" if outcome.input_share is None else f" share {outcome.input_share:.3f}"
            print(f"{arch.key}: {outcome.status} {outcome.detail}{share} "
                  f"({outcome.seconds:.1f} s)", file=sys.stderr, flush=True)  # fmt: skip

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(one, todo))
    totals = {m: len(list_architectures(m)) for m in MAPPINGS}
    summ, fails, low = summary(results, totals), failures(results), low_shares(results)
    print(json.dumps({"summary": summ}, indent=1))
    print(json.dumps({"failures": [{k: f[k] for k in ("cause", "count")} for f in fails]},
                     indent=1))  # fmt: skip
    print(json.dumps({"low_input_share": low}, indent=1))
    print(markdown(summ, fails, low))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.coverage", description=__doc__)
    p.add_argument("--mapping", choices=MAPPINGS, help="one mapping only")
    p.add_argument("--only", help="architectures whose name matches this regex")
    p.add_argument("--sample", type=int, help="a random sample of N per mapping (seed 0)")
    p.add_argument("--jobs", type=int, default=1, help="architectures run at once")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per architecture")
    p.add_argument("--memory-gb", type=float, default=8.0, help="address space per run")
    p.add_argument("--resume", action="store_true", help="skip architectures already in --out")
    p.add_argument("--out", type=Path, default=RESULTS, help="results file (merged into)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # mapping/name, in the child process
    return p


def _select(archs: list[Arch], args: argparse.Namespace) -> list[Arch]:
    if args.only:
        archs = [a for a in archs if re.search(args.only, a.name)]
    if args.sample is not None and args.sample < len(archs):
        archs = sorted(random.Random(0).sample(archs, args.sample), key=lambda a: a.name)
    return archs


def _merge(path: Path, rows: dict) -> dict:
    """``rows`` written into the results file as it is now, under an exclusive lock: another
    run writing the same file meanwhile keeps its rows. Returns the file's rows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(Path(tempfile.gettempdir()) / f"{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = json.loads(path.read_text()) if path.exists() else {}
        results.update(rows)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(dict(sorted(results.items())), indent=1) + "\n")
        tmp.replace(path)
    return results


# ------------------------------------------------------------------ isolation


def run_isolated(arch: Arch, timeout: float, memory_gb: float) -> Outcome:
    """``check_architecture`` in a fresh process; a run past ``timeout`` is killed and says
    which stage it was in, one that dies says how."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    limit = int(memory_gb * 2**30)
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.coverage", "--one", arch.key],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)),
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return Outcome(arch.mapping, arch.name, "timeout", f"over {timeout:g} s in "
                       f"{_last_stage(err)}", timeout)  # fmt: skip
    for line in out.splitlines():
        if line.startswith(_RESULT):
            return Outcome(**json.loads(line[len(_RESULT) :]))
    how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
    status = "memory" if proc.returncode == -signal.SIGKILL else "run-error"
    tail = err.strip().splitlines()[-1:] or [""]
    return Outcome(arch.mapping, arch.name, status,
                   f"crashed ({how}) in {_last_stage(err)}: {tail[0][:200]}")  # fmt: skip


def _last_stage(err: str) -> str:
    stages = re.findall(r"^@stage (\w+)", err, re.M)
    return stages[-1] if stages else "start"


def _child(key: str) -> None:
    import torch

    torch.set_num_threads(1)
    mapping, name = key.split("/", 1)
    arch = next(a for a in list_architectures(mapping) if a.name == name)
    outcome = check_architecture(arch)
    print(_RESULT + json.dumps(outcome.as_dict()), flush=True)


if __name__ == "__main__":
    main()
