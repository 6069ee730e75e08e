"""Pictures of relevance: token heatmaps for generation, and the computation graph with or
without relevance. Matplotlib with the Agg backend, so they work without a display; each
function returns the figure (heatmaps) or the written path (graphs).

The graph drawing needs no graphviz: nodes are laid out in layers by their longest distance from
an input, which for the mostly sequential graphs of neural networks reads top to bottom. A
``.dot`` path writes Graphviz text instead, for those who have ``dot``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from torch import Tensor, fx  # noqa: E402

# ------------------------------------------------------------------ token heatmaps


def _token_labels(ids: Sequence[int], tokenizer: Any) -> list[str]:
    if tokenizer is None:
        return [str(int(i)) for i in ids]
    return [tokenizer.decode([int(i)]).replace("\n", "\\n") or "∅" for i in ids]


def _labels(tokens: Tensor, count: int, tokenizer: Any) -> list[str]:
    """Labels of the first ``count`` tokens; "?" past the known ones (the generated tokens,
    when ``generated_ids`` was not given)."""
    known = _token_labels(tokens[:count].tolist(), tokenizer)
    return known + ["?"] * (count - len(known))


def _sequence(input_ids: Tensor, generated_ids: Tensor | None, row: int) -> Tensor:
    """The row's tokens: prompt then generated (``generated_ids`` already holds the prompt when
    it is a ``run_task`` result; a tensor of new tokens only is appended)."""
    prompt = _ids(input_ids, row)[row]
    if generated_ids is None:
        return prompt
    full = torch.as_tensor(generated_ids)
    full = full.reshape(-1, full.shape[-1])[row]
    if full.shape[0] > prompt.shape[0] and torch.equal(full[: prompt.shape[0]], prompt):
        return full
    return torch.cat([prompt, full])


def _step_relevance(entry: Any, row: int) -> np.ndarray | None:
    """One trace entry ({"input_ids": [B, T]} or a tensor) as a 1-D array for ``row``."""
    if entry is None:
        return None
    rel = entry["input_ids"] if isinstance(entry, Mapping) else entry
    rel = torch.as_tensor(rel).detach().float().cpu()
    if rel.dim() > 2:
        raise ValueError(
            f"a trace entry of shape {tuple(rel.shape)}: the heatmaps take generation's "
            "[B, T] per step (a classification's relevance with a seed axis is no trace)"
        )
    return (rel[row] if rel.dim() > 1 else rel).numpy()


def _trace(timewise_relevance_out: Any) -> list[Any]:
    """The per-step relevance: the trace itself, or a ``run_task`` result holding it."""
    trace = timewise_relevance_out
    if isinstance(trace, Mapping) and "task" in trace:
        if "relevance_trace" not in trace:
            raise ValueError(
                "timewise_relevance_out: this result has no relevance_trace; run generation "
                "with return_relevance=True"
            )
        trace = trace["relevance_trace"]
    if trace is None or isinstance(trace, str | Mapping | Tensor) or not hasattr(trace, "__len__"):
        raise TypeError(
            "timewise_relevance_out must be the relevance_trace of a generation run (one "
            f"entry per step, from return_relevance=True), got {type(trace).__name__}"
        )
    return list(trace)


def _ids(input_ids: Any, row: int) -> Tensor:
    """``input_ids`` as [B, T] (a tensor, array, list, or the inputs' dict), ``row`` in it."""
    if isinstance(input_ids, Mapping):
        input_ids = input_ids["input_ids"]
    ids = torch.as_tensor(input_ids)
    ids = ids.reshape(-1, ids.shape[-1])
    if (
        isinstance(row, bool)
        or not isinstance(row, numbers.Integral)
        or not 0 <= row < ids.shape[0]
    ):
        raise ValueError(f"row must be a sample index in [0, {ids.shape[0]}), got {row!r}")
    return ids


def _save(fig: Figure, save_path: str | Path | None) -> None:
    if save_path is not None:
        Path(save_path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(save_path, bbox_inches="tight", dpi=100)


def visualize_tokenwise_relevance_map(
    timewise_relevance_out: Sequence[Any],
    input_ids: Tensor,
    tokenizer: Any = None,
    generated_ids: Tensor | None = None,
    figsize: tuple[float, float] = (12, 6),
    row: int = 0,
    normalize: bool = True,
    save_path: str | Path | None = None,
) -> Figure:
    """Heatmap: one line per generated token, one column per context token (prompt, then
    generated). Cell (i, j) is the relevance of token j for the token emitted at step i; cells
    the step could not see are blank. ``normalize`` scales each line by its largest |value| so
    that early and late steps are comparable."""
    tokens = _sequence(input_ids, generated_ids, row)
    steps = [_step_relevance(e, row) for e in _trace(timewise_relevance_out)]
    explained = [i for i, s in enumerate(steps) if s is not None]
    if not explained:
        raise ValueError("no step of the trace was explained")
    prompt_len = len(steps[explained[0]]) - explained[0]  # entry i covers prompt_len + i tokens
    width = max(prompt_len + len(steps) - 1, max(len(s) for s in steps if s is not None))
    grid = np.full((len(steps), width), np.nan)
    for i, rel in enumerate(steps):
        if rel is None:
            continue
        line = rel / max(np.abs(rel).max(), 1e-12) if normalize else rel
        grid[i, : len(line)] = line
    labels = _labels(tokens, width, tokenizer)
    emitted = _labels(tokens[prompt_len:], len(steps), tokenizer)

    fig, ax = plt.subplots(figsize=figsize)
    limit = np.nanmax(np.abs(grid)) if np.isfinite(grid).any() else 1.0
    image = ax.imshow(
        np.ma.masked_invalid(grid), aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit
    )
    ax.set_xticks(range(width), labels, rotation=90, fontsize=8)
    ax.set_yticks(range(len(steps)), [f"{i}: {t}" for i, t in enumerate(emitted)], fontsize=8)
    ax.axvline(prompt_len - 0.5, color="black", linewidth=1)
    ax.set_xlabel("context token (prompt | generated)")
    ax.set_ylabel("generated token (step)")
    ax.set_title("Relevance of each context token for each generated token")
    fig.colorbar(image, ax=ax, label="relevance" + (" (per-step normalised)" if normalize else ""))
    _save(fig, save_path)
    return fig


def visualize_input_heatmap_for_token(
    timewise_relevance_out: Sequence[Any],
    n: int,
    input_ids: Tensor,
    tokenizer: Any = None,
    generated_ids: Tensor | None = None,
    figsize: tuple[float, float] = (10, 3),
    row: int = 0,
    save_path: str | Path | None = None,
) -> Figure:
    """One line: the relevance of every context token for the ``n``-th generated token, with
    the tokens written in their cells."""
    trace = _trace(timewise_relevance_out)
    if (
        isinstance(n, bool)
        or not isinstance(n, numbers.Integral)
        or not -len(trace) <= n < len(trace)
    ):
        raise ValueError(
            f"n must be a step index in [0, {len(trace)}) (or from the end), got {n!r}"
        )
    tokens = _sequence(input_ids, generated_ids, row)
    rel = _step_relevance(trace[n], row)
    if rel is None:
        raise ValueError(f"step {n} was not explained (its trace entry is None)")
    labels = _labels(tokens, len(rel), tokenizer)
    target = _labels(tokens[len(rel) :], 1, tokenizer)[0]

    fig, ax = plt.subplots(figsize=figsize)
    limit = max(float(np.abs(rel).max()), 1e-12)
    image = ax.imshow(rel[None], aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit)
    for j, label in enumerate(labels):
        strong = abs(rel[j]) > 0.6 * limit
        ax.text(j, 0, label, ha="center", va="center", fontsize=8, rotation=90,
                color="white" if strong else "black")  # fmt: skip
    ax.set_yticks([])
    ax.set_xticks(range(len(labels)), [str(j) for j in range(len(labels))], fontsize=7)
    ax.set_xlabel("context position")
    ax.set_title(f"Relevance for generated token {n}: {target}")
    fig.colorbar(image, ax=ax, label="relevance")
    _save(fig, save_path)
    return fig


# ------------------------------------------------------------------ computation graph


def _drawn_nodes(graph: fx.Graph, inputs: Sequence[str] | None) -> list[fx.Node]:
    """Ops that produce tensors, the output, and the user inputs. Weights and buffers are
    placeholders too, and shape queries and assertions are ops, but drawing them would hide the
    data flow."""
    keep = set(inputs) if inputs is not None else None
    return [
        n
        for n in graph.nodes
        if n.op == "output"
        or (
            isinstance(n.meta.get("val"), torch.Tensor)
            and (n.op != "placeholder" or keep is None or n.name in keep)
        )
    ]


def _label(node: fx.Node) -> str:
    if node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target))
        return name.split(".")[0] if "." in name else name
    return node.name


def _layers(nodes: list[fx.Node]) -> dict[fx.Node, int]:
    """Longest distance from a source among the drawn nodes (graph order is topological)."""
    drawn = set(nodes)
    depth: dict[fx.Node, int] = {}
    for node in nodes:
        parents = [p for p in node.all_input_nodes if p in drawn]
        depth[node] = 1 + max((depth[p] for p in parents), default=-1)
    return depth


def _node_scores(nodes: list[fx.Node], relevance: Mapping[str, Any] | None) -> dict[str, float]:
    """Total |relevance| per node name, from tensors with any leading axes."""
    if not relevance:
        return {}
    scores = {}
    for node in nodes:
        value = relevance.get(node.name)
        if isinstance(value, Tensor):
            scores[node.name] = float(value.detach().float().abs().sum())
        elif isinstance(value, np.ndarray):
            scores[node.name] = float(np.abs(value).sum())
    return scores


def _write_dot(nodes: list[fx.Node], scores: Mapping[str, float], path: Path) -> Path:
    drawn = set(nodes)
    top = max(scores.values(), default=0.0) or 1.0
    lines = ["digraph G {", "  rankdir=TB;", "  node [shape=box, style=filled, fontsize=10];"]
    for node in nodes:
        shade = scores.get(node.name)
        fill = "#dddddd" if shade is None else _hex(plt.cm.Reds(0.15 + 0.85 * shade / top))
        lines.append(f'  "{node.name}" [label="{_label(node)}", fillcolor="{fill}"];')
    for node in nodes:
        for parent in node.all_input_nodes:
            if parent in drawn:
                lines.append(f'  "{parent.name}" -> "{node.name}";')
    lines.append("}")
    path.write_text("\n".join(lines) + "\n")
    return path


def _hex(rgba) -> str:
    return "#" + "".join(f"{int(255 * c):02x}" for c in rgba[:3])


def visualize_graph(
    graph: fx.Graph,
    save_path: str | Path,
    relevance: Mapping[str, Any] | None = None,
    inputs: Sequence[str] | None = None,
    label_limit: int = 1500,
    title: str | None = None,
) -> Path:
    """Draw ``graph`` to ``save_path`` (.png, .svg, .pdf, or .dot for Graphviz text).

    With ``relevance`` ({node name: tensor}), node colour is the node's total |relevance| on a
    log scale (grey: none recorded). ``inputs`` names the placeholders to draw (the others are
    parameters). Graphs with more than ``label_limit`` nodes are drawn as dots without labels,
    which keeps large models readable as a shape and fast to render.
    """
    path = Path(save_path)
    if not path.suffix:
        path = path.with_suffix(".svg")
    path.parent.mkdir(parents=True, exist_ok=True)
    nodes = _drawn_nodes(graph, inputs)
    scores = _node_scores(nodes, relevance)
    if path.suffix == ".dot":
        return _write_dot(nodes, scores, path)

    depth = _layers(nodes)
    by_layer: dict[int, list[fx.Node]] = {}
    for node in nodes:
        by_layer.setdefault(depth[node], []).append(node)
    xy = {}
    for d, members in by_layer.items():
        for i, node in enumerate(members):
            xy[node] = (i - (len(members) - 1) / 2, -d)
    wide = max(len(m) for m in by_layer.values())
    tall = len(by_layer)
    labelled = len(nodes) <= label_limit
    fig, ax = plt.subplots(
        figsize=(min(4 + 1.6 * wide, 40), min(2 + (0.45 if labelled else 0.05) * tall, 300))
    )
    for node in nodes:
        for parent in node.all_input_nodes:
            if parent in xy:
                (x0, y0), (x1, y1) = xy[parent], xy[node]
                ax.plot([x0, x1], [y0, y1], color="#999999", linewidth=0.6, zorder=1)

    positive = [v for v in scores.values() if v > 0]
    lo, hi = (math.log10(min(positive)), math.log10(max(positive))) if positive else (0, 1)
    cmap = plt.cm.Reds

    def colour(node: fx.Node):
        value = scores.get(node.name)
        if value is None or value <= 0:
            return "#dddddd" if relevance else "#cfe2f3"
        return cmap(0.2 + 0.8 * (math.log10(value) - lo) / max(hi - lo, 1e-9))

    xs, ys = zip(*(xy[n] for n in nodes), strict=True)
    if labelled:
        for node in nodes:
            x, y = xy[node]
            ax.text(x, y, _label(node), ha="center", va="center", fontsize=7, zorder=2,
                    bbox=dict(boxstyle="round,pad=0.25", facecolor=colour(node),
                              edgecolor="#555555", linewidth=0.5))  # fmt: skip
    ax.scatter(xs, ys, s=4 if labelled else 8, c=[colour(n) for n in nodes], zorder=1.5)
    if positive:
        mappable = plt.cm.ScalarMappable(cmap=cmap, norm=matplotlib.colors.Normalize(lo, hi))
        fig.colorbar(mappable, ax=ax, label="log10 total |relevance|", shrink=0.5)
    ax.set_xlim(min(xs) - 1, max(xs) + 1)
    ax.set_ylim(min(ys) - 1, 1)
    ax.axis("off")
    ax.set_title(title or f"{len(nodes)} nodes")
    fig.savefig(path, bbox_inches="tight", dpi=80)
    plt.close(fig)
    return path
