"""Smoke test of ``bench.faithfulness`` on a few samples: the methods run on the digits CNN and
the peers on MiniLM, and the curves and areas are well formed. Skipped where the ``bench``
extra (Captum, Zennit, LXT) is not installed, as in CI, which runs the tests but not the
benchmark."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("captum")
pytest.importorskip("zennit")
pytest.importorskip("lxt")

from bench.faithfulness.__main__ import run_task  # noqa: E402
from bench.faithfulness.methods import METHODS  # noqa: E402

# MiniLM with the peers only: capturing it for the engine's modes is the slow part, and the
# engine's own tests cover those modes on BERT models.
CASES = [
    ("digits-cnn", [m.name for m in METHODS if "image" in m.kinds]),
    ("minilm-sentiment", ["random", "captum-ixg", "lxt-attnlrp", "lxt-cplrp"]),
]


@pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require gradients")
@pytest.mark.parametrize("name, methods", CASES)
def test_methods_give_well_formed_curves(name, methods):
    report = run_task(name, n=4, batch=4, methods=methods, data_dir=None)
    assert set(report["methods"]) == set(methods), report["skipped"]
    # which model was scored: its build report and a fingerprint of its weights
    assert report["model"]["build"]["model_id"] == name
    assert len(report["model"]["weights_sha256"]) == 16
    for row in report["methods"].values():
        assert len(row["morf_curve"]) == len(row["lerf_curve"]) == report["steps"] + 1
        # both curves start from the same unperturbed input and end with everything removed
        assert row["morf_curve"][0] == pytest.approx(row["lerf_curve"][0])
        assert row["morf_curve"][-1] == pytest.approx(row["lerf_curve"][-1])
        assert all(math.isfinite(row[k]) for k in ("abpc", "abpc_se", "aopc_morf"))
        assert row["seconds_per_explanation"] > 0
    # the target: each engine mode against the peer with the best ABPC, paired
    rows = report["methods"]
    peers = [m for m in rows if not m.startswith("engine-") and m != "random"]
    best = max(peers, key=lambda m: rows[m]["abpc"])
    engine = {m for m in rows if m.startswith("engine-")}
    assert set(report["against_best_peer"]) == engine
    for m, r in report["against_best_peer"].items():
        assert r["best_peer"] == best
        assert r["diff"] == pytest.approx(rows[m]["abpc"] - rows[best]["abpc"], abs=1e-5)
        assert r["diff_se"] >= 0
