"""Visualisations write real, non-blank images without a display."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from PIL import Image

from engine import DLBacktrace
from engine.generation import run_generation
from engine.visualize import (
    visualize_graph,
    visualize_input_heatmap_for_token,
    visualize_tokenwise_relevance_map,
)
from tests.engine.lm_models import prompts, tiny_lm


@pytest.fixture(scope="module")
def generation():
    batch = prompts(2, 6, seed=2, pads=(0, 2))
    dlb = DLBacktrace(tiny_lm("llama"), batch)
    result = dlb.run_task(
        task="generation", inputs=batch, max_new_tokens=4, return_relevance=True,
        relevance_nodes="all",
    )  # fmt: skip
    return dlb, batch, result


class Tokenizer:
    """Just enough of a tokenizer for labels."""

    def decode(self, ids):
        return "".join(f"t{i}" for i in ids)


def _assert_image(path):
    assert path.exists() and path.stat().st_size > 0
    pixels = np.asarray(Image.open(path).convert("L"), dtype=float)
    assert pixels.size > 100 * 100
    assert pixels.std() > 5, "image is blank"


def test_tokenwise_relevance_map(generation, tmp_path):
    _, batch, result = generation
    path = tmp_path / "map.png"
    fig = visualize_tokenwise_relevance_map(
        result["relevance_trace"], batch["input_ids"], Tokenizer(), result["generated_ids"],
        row=1, save_path=path,
    )  # fmt: skip
    assert fig.axes
    _assert_image(path)


def test_tokenwise_relevance_map_without_generated_ids(generation):
    """Only the prompt's tokens are known then: the generated ones are labelled "?"."""
    _, batch, result = generation
    fig = visualize_tokenwise_relevance_map(result["relevance_trace"], batch["input_ids"])
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    prompt = batch["input_ids"][0].tolist()
    assert labels == [str(i) for i in prompt] + ["?"] * (len(labels) - len(prompt))
    assert len(labels) > len(prompt)
    fig = visualize_input_heatmap_for_token(result["relevance_trace"], 2, batch["input_ids"])
    assert fig.axes[0].get_title().endswith(": ?")
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts == [str(i) for i in prompt] + ["?", "?"]


def test_input_heatmap_for_token(generation, tmp_path):
    _, batch, result = generation
    path = tmp_path / "token.png"
    visualize_input_heatmap_for_token(
        result["relevance_trace"], 2, batch["input_ids"], generated_ids=result["generated_ids"],
        save_path=path,
    )  # fmt: skip
    _assert_image(path)


def test_heatmaps_skip_unexplained_steps(generation, tmp_path):
    dlb, batch, _ = generation
    result = run_generation(dlb, batch, max_new_tokens=4, steps=[1, 3], return_relevance=True)
    path = tmp_path / "partial.png"
    visualize_tokenwise_relevance_map(
        result["relevance_trace"], batch["input_ids"], generated_ids=result["generated_ids"],
        save_path=path,
    )  # fmt: skip
    _assert_image(path)
    with pytest.raises(ValueError, match="not explained"):
        visualize_input_heatmap_for_token(result["relevance_trace"], 0, batch["input_ids"])


@pytest.mark.parametrize("suffix", [".png", ".svg", ".dot"])
def test_graph_with_and_without_relevance(generation, tmp_path, suffix):
    dlb, _, result = generation
    inputs = dlb.captured.input_names
    plain = visualize_graph(dlb.graph, tmp_path / f"graph{suffix}", inputs=inputs)
    with_rel = visualize_graph(
        dlb.graph, tmp_path / f"rel{suffix}", relevance=result["relevance"], inputs=inputs
    )
    for path in (plain, with_rel):
        if suffix == ".png":
            _assert_image(path)
        elif suffix == ".svg":
            assert ET.parse(path).getroot().tag.endswith("svg")
        else:
            text = path.read_text()
            assert text.startswith("digraph") and "->" in text
    if suffix == ".dot":  # relevance colours some nodes
        assert plain.read_text() != with_rel.read_text()


def test_graph_without_suffix_writes_svg_and_large_graphs_drop_labels(generation, tmp_path):
    dlb, _, result = generation
    path = visualize_graph(dlb.graph, tmp_path / "backtrace_graph", label_limit=10)
    assert path.suffix == ".svg" and path.stat().st_size > 0
    assert torch.is_tensor(next(iter(result["relevance"].values())))


def test_heatmaps_take_a_result_and_the_inputs_dict_and_name_bad_arguments(generation):
    _, batch, result = generation
    from_result = visualize_tokenwise_relevance_map(result, batch, generated_ids=None, row=1)
    from_trace = visualize_tokenwise_relevance_map(
        result["relevance_trace"], batch["input_ids"], row=1
    )
    np.testing.assert_array_equal(
        from_result.axes[0].images[0].get_array().filled(np.nan),
        from_trace.axes[0].images[0].get_array().filled(np.nan),
    )
    trace, ids = result["relevance_trace"], batch["input_ids"]
    with pytest.raises(ValueError, match=r"row must be a sample index in \[0, 2\), got 2"):
        visualize_tokenwise_relevance_map(trace, ids, row=2)
    with pytest.raises(ValueError, match=r"n must be a step index in \[0, 4\).*got 4"):
        visualize_input_heatmap_for_token(trace, 4, ids)
    with pytest.raises(TypeError, match="timewise_relevance_out must be the relevance_trace"):
        visualize_input_heatmap_for_token(None, 0, ids)
    with pytest.raises(ValueError, match=r"trace entry of shape \(3, 2, 6\)"):
        visualize_input_heatmap_for_token([{"input_ids": torch.zeros(3, 2, 6)}], 0, ids)
