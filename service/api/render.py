"""Which heatmap a finished job's result document gets (``service.heatmap`` draws it): token
cells per generation step, the image overlay, one row per text, one row per seed of a
token task's first text, or one row per tabular input. numpy and Pillow only."""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import codec, heatmap


def heatmap_png(result: dict[str, Any]) -> bytes:
    """The result's heatmap as a PNG; LookupError (with the reason) when it has none."""
    if "generation" in result:
        g = result["generation"]
        rows = [codec.decode(t)[0] for t in g.get("relevance_trace", [])]
        if not rows:
            raise LookupError("no heatmap: this job has no relevance trace")
        cols = list(g["prompt_tokens"][0]) + list(g["new_tokens"][0])
        return heatmap.token_grid(rows, cols, [str(t) for t in g["new_tokens"][0]])
    items = result.get("inputs", [])
    if "image_png_b64" in result and items and "relevance_map" in items[0]:
        return heatmap.image_overlay(
            result["image_png_b64"], codec.decode(items[0]["relevance_map"])
        )
    if items and "seeds" in items[0] and "relevance" in items[0]:
        return _seed_rows(items[0])
    if items and "tokens" in items[0] and "relevance" in items[0]:
        rows = [codec.decode(it["relevance"]) for it in items]
        labels = [p["label"] for p in result.get("predictions", [])]
        return heatmap.token_grid(rows, [str(t) for t in items[0]["tokens"] or []], labels)
    arrays = [
        np.atleast_1d(codec.decode(it["relevance"])).reshape(-1)
        for it in items
        if "relevance" in it
    ]
    if not arrays:
        raise LookupError("no heatmap for this result")
    return heatmap.token_grid(arrays, [], [])


def _seed_rows(item: dict[str, Any]) -> bytes:
    """A token task's text (``documents.per_token``): relevance [seeds, tokens], one row per
    seed, labelled with what it explains (a token's label, the answer's start or end)."""
    rows = list(np.atleast_2d(codec.decode(item["relevance"])))
    tokens = [str(t) for t in item.get("tokens") or item["token_ids"]]
    if "answer_span" in item:
        names = list(item["seeds"])
    else:
        at = [item["position"]] if "position" in item else range(len(tokens))
        names = [f"{tokens[k]} {item['labels'][k]}" for k in at]
    return heatmap.token_grid(rows, tokens, names)
