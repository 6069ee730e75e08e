"""The demo models are trained reproducibly: the same weights whichever process builds them
(a worker that runs one torch thread, a test run that runs several)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from service.demo.digits import build as build_digits
from service.demo.lookup import build_lookup


@pytest.mark.parametrize("build", [build_lookup, build_digits])
def test_a_demo_build_does_not_depend_on_the_callers_threads(build, tmp_path: Path) -> None:
    before = torch.get_num_threads()
    weights = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out = tmp_path / str(threads)
            out.mkdir()
            build(out)
            weights.append(load_file(out / "model.safetensors"))
            assert torch.get_num_threads() == threads  # the build puts the caller's back
    finally:
        torch.set_num_threads(before)
    one, two = weights
    assert one.keys() == two.keys()
    for name in one:
        assert torch.equal(one[name], two[name]), name


def test_the_lookup_lm_seed_gives_another_reproducible_build(tmp_path: Path) -> None:
    """``build_lookup(seed=...)``: the same seed, the same weights; another, other weights
    (the builds a faithfulness comparison averages over)."""
    weights = []
    for name, seed in (("a", 1), ("b", 1), ("c", 0)):
        (tmp_path / name).mkdir()
        info = build_lookup(tmp_path / name, seed=seed)
        assert info["seed"] == seed and info["heldout_accuracy"] >= 0.99
        weights.append(load_file(tmp_path / name / "model.safetensors"))
    one, again, demo = weights
    assert all(torch.equal(one[k], again[k]) for k in one)
    assert not all(torch.equal(one[k], demo[k]) for k in one)
