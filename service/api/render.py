"""Which heatmap a finished job's result document gets (``service.heatmap`` draws it): token
cells per generation step, the image overlay, one row per text, or one row per tabular
input. numpy and Pillow only."""

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
