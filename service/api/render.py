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
        prompt, new = _labels(g)
        steps = g.get("explained_steps") or range(len(rows))
        return heatmap.token_grid(rows, prompt + new, [new[i] for i in steps])
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
        return heatmap.text_rows(rows, [_cells(it) for it in items], labels)
    arrays = [
        np.atleast_1d(codec.decode(it["relevance"])).reshape(-1)
        for it in items
        if "relevance" in it
    ]
    if not arrays:
        raise LookupError("no heatmap for this result")
    return heatmap.token_grid(arrays, [], [])


def _labels(g: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The first row's prompt and generated tokens as the text each adds (a byte-level
    BPE's token strings read 'Ġcat' for ' cat' and mojibake for CJK), the token string
    where a token adds none of its own (a character's first bytes) or the document
    predates the text pieces."""
    prompt, new = list(g["prompt_tokens"][0]), list(g["new_tokens"][0])
    texts = g.get("prompt_text")
    if texts:
        prompt = [t or str(raw) for t, raw in zip(texts[0], prompt, strict=True)]
    pieces = [step["text"][0] for step in g.get("steps") or []]
    if len(pieces) == len(new):
        new = [t or str(raw) for t, raw in zip(pieces, new, strict=True)]
    return [str(t) for t in prompt], [str(t) for t in new]


def _cells(item: dict[str, Any]) -> list[str]:
    """A text's cell labels: the text each token adds (``documents``: ' cat' for 'Ġcat'),
    its token string where it adds none of its own (a character's first bytes) or the
    document predates the pieces; its ids without a tokenizer."""
    tokens = [str(t) for t in item.get("tokens") or item["token_ids"]]
    texts = item.get("text") or tokens
    return [t or raw for t, raw in zip(texts, tokens, strict=True)]


def _seed_rows(item: dict[str, Any]) -> bytes:
    """A token task's text (``documents.per_token``): relevance [seeds, tokens], one row per
    seed, labelled with what it explains (a token's label, the answer's start or end)."""
    rows = list(np.atleast_2d(codec.decode(item["relevance"])))
    tokens = _cells(item)
    if "answer_span" in item:
        names = list(item["seeds"])
    else:
        at = [item["position"]] if "position" in item else range(len(tokens))
        names = [f"{tokens[k]} {item['labels'][k]}" for k in at]
    return heatmap.token_grid(rows, tokens, names)
