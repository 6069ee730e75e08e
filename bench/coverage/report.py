"""The coverage results summarised: per mapping how many architectures built and how many are
ok, the failures grouped by cause (each missing op counted once per architecture it stops),
the ok rows whose relevance mostly ends in sinks, and all as markdown for ``bench/README.md``."""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

from .architectures import MAPPINGS
from .check import OK

LOW_SHARE = 0.3  # under this share of the seed at the inputs, an explanation shows little


def summary(results: dict[str, dict[str, Any]], totals: dict[str, int]) -> dict[str, Any]:
    """Per mapping: architectures listed, run, built (run and not ``not-built``), ok, and ok
    as a percentage of built."""
    out: dict[str, Any] = {}
    for mapping in MAPPINGS:
        rows = [r for r in results.values() if r["mapping"] == mapping]
        if not rows:
            continue
        built = [r for r in rows if r["status"] != "not-built"]
        ok = sum(r["status"] == OK for r in rows)
        out[mapping] = {
            "architectures": totals.get(mapping, len(rows)),
            "run": len(rows),
            "built": len(built),
            "ok": ok,
            "percent": round(100 * ok / len(built), 1) if built else None,
        }
    return out


def cause(row: dict[str, Any]) -> list[str]:
    """The causes a failed row counts under: one per missing op, else its status and the
    detail with numbers and quoted names blanked (so one bug in many models groups as one)."""
    if row["status"] == "unsupported-op":
        return [f"no rule for {op}" for op in row["detail"].split(", ")]
    if row["status"] in ("timeout", "memory", "forward-differs"):
        return [row["status"]]
    detail = re.sub(r"'[^']*'|\"[^\"]*\"|\[[^\]]*\]|\d+(\.\d+)?", "_", row["detail"])
    return [f"{row['status']}: {detail[:90]}"]


def failures(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Causes by the number of architectures they stop (not-built rows left out)."""
    by_cause: dict[str, list[str]] = defaultdict(list)
    for key, row in sorted(results.items()):
        if row["status"] in (OK, "not-built"):
            continue
        for c in cause(row):
            by_cause[c].append(key)
    ranked = sorted(by_cause.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    return [{"cause": c, "count": len(keys), "architectures": keys} for c, keys in ranked]


def low_shares(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Ok rows whose ``input_share`` is under ``LOW_SHARE``, least first."""
    low = {k: r["input_share"] for k, r in results.items()
           if r["status"] == OK and r.get("input_share") is not None
           and r["input_share"] < LOW_SHARE}  # fmt: skip
    return dict(sorted(low.items(), key=lambda kv: kv[1]))


def markdown(
    summ: dict[str, Any], fails: list[dict[str, Any]], low: dict[str, float] | None = None
) -> str:
    """The three tables for ``bench/README.md``."""
    lines = [
        "| mapping | architectures | run | built | ok | ok / built |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for mapping, s in summ.items():
        pct = "-" if s["percent"] is None else f"{s['percent']} %"
        lines.append(
            f"| {mapping} | {s['architectures']} | {s['run']} | {s['built']} | {s['ok']} | {pct} |"
        )
    lines += ["", "| cause | architectures | which |", "| --- | ---: | --- |"]
    for f in fails:
        which = ", ".join(k.split("/", 1)[1] for k in f["architectures"])
        lines.append(f"| {f['cause'].replace('|', '/')} | {f['count']} | {which} |")
    lines += ["", f"| input share < {LOW_SHARE} | share |", "| --- | ---: |"]
    lines += [f"| {key} | {share:.3f} |" for key, share in (low or {}).items()]
    return "\n".join(lines)
