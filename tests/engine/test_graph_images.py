"""The graph visualisations of DLBacktrace write real, non-blank images without a display."""

from __future__ import annotations

import numpy as np
from PIL import Image

from engine import DLBacktrace

from .zoo import ZOO


def _not_blank(path) -> None:
    image = np.asarray(Image.open(path).convert("L"), dtype=float)
    assert image.std() > 1.0, f"{path} is blank"


def test_graph_and_relevance_graph_images(tmp_path):
    model, inputs = ZOO["tabular"]()
    dlb = DLBacktrace(model, inputs)
    graph = dlb.visualize(save_path=tmp_path / "graph.png")
    _not_blank(graph)
    dlb.run_task(inputs=inputs)
    coloured = dlb.visualize_dlbacktrace(output_path=tmp_path / "backtrace.png")
    _not_blank(coloured)
    assert (
        dlb.visualize_dlbacktrace(output_path=tmp_path / "graph.dot")
        .read_text()
        .startswith("digraph")
    )
